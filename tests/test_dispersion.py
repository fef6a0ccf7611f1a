"""Dispersion summaries and leave-one-model-out (docs/method.md, "Dispersion")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _planted import planted_reps
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr, spearmanr

from xmodal.dispersion import (
    dispersion_table,
    leave_one_model_out,
    mean_dispersion,
    pc1_dispersion,
    pc1_orientation,
    read_dispersion_table,
    stable_rank,
)
from xmodal.gpa import gpa, project, twin_rows


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_pc1_sign_convention(seed):
    r = np.abs(np.random.default_rng(seed).standard_normal((50, 4))) + 0.1
    scores, ev = pc1_dispersion(r)
    assert np.corrcoef(scores, mean_dispersion(r))[0, 1] >= 0
    assert 0 < ev <= 1
    flipped, _ = pc1_dispersion(r[:, ::-1])
    np.testing.assert_allclose(flipped, scores, atol=1e-12)


def test_pc1_rank_one_orders_like_mean():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 80)
    b = np.array([0.5, 1.0, 2.0, 1.5])
    r = 0.3 + np.outer(a, b)  # rank-1 residual structure around a constant
    scores, ev = pc1_dispersion(r)
    assert ev == pytest.approx(1.0)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(mean_dispersion(r)))
    assert spearmanr(scores, a).statistic == pytest.approx(1.0)


def test_pc1_explained_variance_is_the_top_eigenvalues_share():
    """The explained variance is λ₁ / Σλ of the residuals' covariance (squared singular
    values): s₁ / Σs, of the singular values themselves, would give another number."""
    rng = np.random.default_rng(0)
    r = np.abs(rng.standard_normal((60, 4))) * [1, 2, 3, 4]
    lam = np.linalg.eigvalsh(np.cov(r, rowvar=False))
    assert pc1_dispersion(r)[1] == pytest.approx(lam[-1] / lam.sum(), rel=1e-10)


def test_dispersion_table():
    r = np.array([[1.0, 1.0], [0.5, 0.5], [0.5, 0.5], [2.0, 3.0]])
    table, ev = dispersion_table(["a", "b", "c", "d"], r)
    assert list(table.columns) == [
        "stimulus_id",
        "position",
        "mean_dispersion",
        "pc1_score",
        "rank_mean",
        "rank_pc1",
    ]
    assert table["rank_mean"].tolist() == [2, 0, 1, 3]  # ties by position
    assert table["rank_pc1"].tolist() == [2, 0, 1, 3]
    assert 0 < ev <= 1
    with pytest.raises(ValueError, match="stimulus ids"):
        dispersion_table(["a"], r)
    dist = np.array([[1.0, 3.0], [0.5, 0.5], [0.2, 0.4], [4.0, 0.0]])
    with_distance, _ = dispersion_table(["a", "b", "c", "d"], r, dist)
    pd.testing.assert_frame_equal(with_distance.drop(columns="mean_distance"), table)
    assert with_distance["mean_distance"].tolist() == [2.0, 0.5, pytest.approx(0.3), 2.0]
    with pytest.raises(ValueError, match=r"distances of shape \(4, 1\)"):
        dispersion_table(["a", "b", "c", "d"], r, dist[:, :1])


def test_stable_rank():
    assert stable_rank(np.array([3.0, 1.0, 1.0, 0.0])).tolist() == [3, 1, 2, 0]


def test_stable_rank_breaks_many_ties_by_position():
    """200 values in three tie groups rank by (value, position): an unstable sort
    (``kind="quicksort"``) reorders the members of large tie groups."""
    v = np.random.default_rng(0).integers(0, 3, 200).astype(float)
    want = np.empty(200, int)
    want[sorted(range(200), key=lambda j: (v[j], j))] = np.arange(200)
    assert stable_rank(v).tolist() == want.tolist()


@pytest.mark.parametrize("seed", range(12))
def test_twin_stimuli_get_equal_dispersions_and_rank_in_manifest_order(seed):
    """A stimulus listed twice (equal rows in every model) has equal residuals in exact
    arithmetic; the reduction to m − 1 columns gave the copies residuals 1e-17 apart, and the
    later copy ranked first in 12 of 40 such fits (docs/method.md, "Dispersion")."""
    rng = np.random.default_rng(seed)
    m = 24
    reps = [rng.standard_normal((m, w)).astype(np.float32).astype(float) for w in (32, 48, 40)]
    for x in reps:
        x[[11, 17]] = x[10]
    res = gpa(reps, tol=1e-10, max_iter=1000)
    assert np.array_equal(res.residuals[11], res.residuals[10])
    assert np.array_equal(res.residuals[17], res.residuals[10])
    assert np.array_equal(res.distances[11], res.distances[10])
    table, _ = dispersion_table([f"s{j:02d}" for j in range(m)], res.residuals, res.distances)
    for col in ("rank_mean", "rank_pc1"):
        r = table[col].to_numpy()
        assert r[10] + 1 == r[11] and r[11] + 1 == r[17]  # consecutive, in manifest order
    models, stimuli = leave_one_model_out(reps, names=["a", "b", "c"])
    for name, rows in stimuli.groupby("held_out"):
        v = rows.set_index("stimulus_index")
        for col in ("partial_dispersion", "partial_pc1", "deviation"):
            assert v.loc[11, col] == v.loc[10, col] == v.loc[17, col], (name, col)


def test_rows_equal_in_some_models_only_are_not_twins():
    """Twins are equal in every model of a fit: in the fits without the model that tells two
    stimuli apart their partial dispersions are equal, while their deviations are not."""
    rng = np.random.default_rng(3)
    m = 20
    reps = [rng.standard_normal((m, w)) for w in (30, 26, 22)]
    reps[0][5] = reps[0][4]
    reps[1][5] = reps[1][4]  # model 2 ("c") tells 4 and 5 apart
    assert twin_rows(reps).tolist() == list(range(m))
    assert twin_rows(reps[:2])[5] == 4
    _, stimuli = leave_one_model_out(reps, names=["a", "b", "c"])
    without_c = stimuli[stimuli.held_out == "c"].set_index("stimulus_index")
    assert without_c.loc[5, "partial_dispersion"] == without_c.loc[4, "partial_dispersion"]
    assert without_c.loc[5, "deviation"] != without_c.loc[4, "deviation"]
    without_a = stimuli[stimuli.held_out == "a"].set_index("stimulus_index")
    assert without_a.loc[5, "partial_dispersion"] != without_a.loc[4, "partial_dispersion"]


def test_equal_residual_rows_get_equal_summaries():
    r = np.abs(np.random.default_rng(0).standard_normal((300, 4))) + 0.1
    r[[150, 299]] = r[7]
    scores, _ = pc1_dispersion(r)
    d = mean_dispersion(r)
    assert scores[150] == scores[299] == scores[7] and d[150] == d[299] == d[7]


def test_pc1_orientation_bound_is_two_over_root_m_inclusive():
    """|r| ≥ 2/√m orients PC1 (docs/method.md, "Dispersion"): r = 0.15 at m = 100 lies between
    1/√m and 2/√m, and r = 1 at m = 4 is on the bound; 1/√m and '>' passed every test."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(100), rng.standard_normal(100)
    a, b = a - a.mean(), b - b.mean()
    b -= (b @ a) / (a @ a) * a
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    score = 0.15 * a + np.sqrt(1 - 0.15**2) * b
    r, oriented = pc1_orientation(pd.DataFrame({"pc1_score": score, "mean_dispersion": a}))
    assert r == pytest.approx(0.15) and not oriented
    four = pd.DataFrame({"pc1_score": [0.0, 1, 2, 3], "mean_dispersion": [0.0, 2, 4, 6]})
    assert pc1_orientation(four) == (pytest.approx(1.0), True)


def test_leave_one_model_out_orients_each_fits_pc1_by_its_partial_dispersion():
    """loo.tsv's pc1_oriented and partial_pc1_orientation test corr(partial_pc1, partial
    dispersion), not the deviation; stimulus_index is the position (0-based). Orienting by the
    deviation passed every test (mutation audit)."""
    from xmodal.dispersion import partial_pc1_orientation

    m, seen = 40, 0
    for seed in range(6):
        rng = np.random.default_rng(seed)
        base = rng.standard_normal((m, 6))
        reps = [
            base @ rng.standard_normal((6, 8)) + rng.uniform(0.5, 2.0) * rng.standard_normal((m, 8))
            for _ in range(4)
        ]
        models, stimuli = leave_one_model_out(reps, names=list("abcd"), n_jobs=1)
        for name, rows in stimuli.groupby("held_out"):
            assert rows["stimulus_index"].tolist() == list(range(m))
            r = np.corrcoef(rows["partial_pc1"], rows["partial_dispersion"])[0, 1]
            by_deviation = np.corrcoef(rows["partial_pc1"], rows["deviation"])[0, 1]
            want = bool(abs(r) >= 2 / np.sqrt(m))
            seen += want != bool(abs(by_deviation) >= 2 / np.sqrt(m))
            assert bool(models.set_index("held_out").at[name, "pc1_oriented"]) == want
            assert partial_pc1_orientation(stimuli, name) == (pytest.approx(r), want)
    assert seen  # the two definitions disagree somewhere here


def test_leave_one_model_out_planted():
    rng = np.random.default_rng(0)
    m = 200
    reps, sigma = planted_reps(rng, m, 24, (24, 28, 32, 32), max_noise=0.4)
    res = leave_one_model_out(reps, names=["a", "b", "c", "d"], tol=1e-8)
    models, stimuli = res
    assert list(models.columns) == [
        "held_out",
        "pearson_r",
        "pearson_p",
        "spearman_rho",
        "spearman_p",
        "n",
        "converged",
        "n_iter",
        "pc1_oriented",
    ]
    assert models["converged"].all() and (models["n_iter"] > 0).all()
    assert models["pc1_oriented"].all()
    assert (models["pearson_r"] > 0.5).all() and (models["spearman_rho"] > 0.5).all()
    assert (models["pearson_p"] < 1e-6).all() and (models["n"] == m).all()
    assert len(stimuli) == 4 * m
    assert {"held_out", "stimulus_id", "partial_dispersion", "deviation"} <= set(stimuli.columns)
    sub = stimuli[stimuli.held_out == "a"]
    np.testing.assert_allclose(sub.partial_dispersion, res.fits["a"].residuals.mean(axis=1))


def test_leave_one_model_out_coefficients_are_over_the_held_out_models_stimuli():
    """Each held-out model's spearman_rho and pearson_r are those of its own stimuli's partial
    dispersion and deviation: Kendall's τ in place of Spearman's ρ would pass a sign check."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((30, 5))
    # four models, so that each fit holds three and its PC1 is not its mean dispersion (with
    # two, both residuals are half the distance: PC1 ranks as the mean, and ρ of partial_pc1
    # in place of the partial dispersion passed, mutation audit)
    reps = [
        x @ rng.standard_normal((5, w)) + noise * rng.standard_normal((30, w))
        for w, noise in ((8, 0.2), (9, 0.5), (10, 1.5), (7, 0.8))
    ]
    res = leave_one_model_out(reps, names=list("abcd"))
    differs = False
    for row in res.models.itertuples():
        s = res.stimuli[res.stimuli.held_out == row.held_out]
        rho = spearmanr(s.partial_dispersion, s.deviation).statistic
        r = pearsonr(s.partial_dispersion, s.deviation).statistic
        assert row.spearman_rho == pytest.approx(rho, abs=1e-12)
        assert row.pearson_r == pytest.approx(r, abs=1e-12)
        differs |= abs(spearmanr(s.partial_pc1, s.deviation).statistic - rho) > 1e-3
    assert differs  # the test tells the partial dispersion from its PC1


def test_leave_one_model_out_does_not_depend_on_the_order_of_the_models():
    """The same models listed in another order give the same numbers, to the bit, with rows in
    the order given. Each fit starts from its first model's frame; that order had decided which
    of several stationary points a fit reached (the demo: partial dispersions moved 7e-7 with
    CLIP listed first, more than gaps inside its self-selection sets, reviewer)."""
    rng = np.random.default_rng(3)
    reps, _ = planted_reps(rng, 40, 12, (20, 24, 28, 16), max_noise=0.6)
    names = ["mae", "dino", "clip", "clipft"]
    a = leave_one_model_out(reps, names=names)
    perm = [2, 3, 1, 0]
    b = leave_one_model_out([reps[i] for i in perm], names=[names[i] for i in perm])
    assert list(a.models.held_out) == names and list(b.models.held_out) == [names[i] for i in perm]
    pd.testing.assert_frame_equal(
        a.models.set_index("held_out").loc[names],
        b.models.set_index("held_out").loc[names],
        check_exact=True,
    )
    key = ["held_out", "stimulus_index"]
    pd.testing.assert_frame_equal(
        a.stimuli.sort_values(key).reset_index(drop=True),
        b.stimuli.sort_values(key).reset_index(drop=True),
        check_exact=True,
    )
    with pytest.raises(ValueError, match="distinct"):
        leave_one_model_out(reps, names=["a", "b", "a", "c"])


@pytest.mark.parametrize("m", [18, 26, 60])
def test_leave_one_model_out_equals_separate_fits(m):
    """Shared preprocessing gives what separate gpa(others) + project(held-out) give.

    Widths 24/30/22/20: with m = 18 every subset is reduced, with m = 26 some subsets are
    reduced and some only padded, with m = 60 none is reduced (padding to each subset's width).
    """
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, 6))
    reps = [
        x @ rng.standard_normal((6, w)) + 0.5 * rng.standard_normal((m, w)) + 3.0
        for w in (24, 30, 22, 20)
    ]
    res = leave_one_model_out(reps, names=list("abcd"))
    for k, name in enumerate("abcd"):
        fit = gpa([r for i, r in enumerate(reps) if i != k])
        deviation = project(reps[k], fit.consensus)[1]
        sub = res.stimuli[res.stimuli.held_out == name]
        np.testing.assert_allclose(sub.partial_dispersion, fit.residuals.mean(axis=1), atol=1e-12)
        np.testing.assert_allclose(sub.deviation, deviation, atol=1e-12)
        assert res.fits[name].n_iter == fit.n_iter
        # partial_pc1: the PC1 score of the fit's residuals, sign towards its mean dispersion
        r = fit.residuals
        rc = r - r.mean(axis=0)
        score = rc @ np.linalg.svd(rc, full_matrices=False)[2][0]
        score *= np.sign(score @ (r.mean(axis=1) - r.mean()))
        np.testing.assert_allclose(sub.partial_pc1, score, atol=1e-9)


def test_leave_one_model_out_shares_cross_products(monkeypatch):
    """Slow regime (Gauss–Seidel on the cross-products): computed once for the M fits."""
    import xmodal.gpa

    calls = []
    original = xmodal.gpa.cross_products

    def counting(mats, pmap=map):
        calls.append([a.shape[1] for a in mats])
        return original(mats, pmap)

    monkeypatch.setattr(xmodal.gpa, "cross_products", counting)
    rng = np.random.default_rng(1)
    reps, _ = planted_reps(rng, 80, 12, (16, 20, 16, 18), max_noise=0.4)
    res = leave_one_model_out(reps, names=list("abcd"))
    assert calls == [[16, 20, 16, 18]]  # the full set's, once; fits take sub-blocks
    assert all(f.method == "gauss-seidel" and f.converged for f in res.fits.values())


def test_leave_one_model_out_records_a_fit_that_did_not_converge(caplog):
    """DESIGN 2.1: warn and record converged = False. Before, loo.tsv had no such column and
    four identical warnings named no held-out model."""
    rng = np.random.default_rng(0)
    reps, _ = planted_reps(rng, 120, 24, (24, 28, 32, 32), max_noise=0.4)
    with caplog.at_level("WARNING", logger="xmodal.dispersion"):
        models, _ = leave_one_model_out(reps, names=list("abcd"), max_iter=2)
    assert not models["converged"].any() and (models["n_iter"] == 2).all()
    assert "GPA without 'c' did not converge in 2 iterations" in caplog.text


def test_pc1_orientation_says_when_pc1_is_a_contrast_between_models():
    """Two camps of models: PC1 is their contrast b, uncorrelated with the mean dispersion a;
    r's sign was noise (a 1e-9 change to one residual swapped the PC1 low and high sets) and
    nothing said so. pc1_orientation gives r and refuses to call PC1 oriented below 2/√m."""
    rng = np.random.default_rng(0)
    m = 400
    a = rng.standard_normal(m)
    b = rng.standard_normal(m)
    a -= a.mean()
    b -= b.mean()
    b -= (b @ a) / (a @ a) * a  # b ⟂ a: PC1 (along b) has r = 0 with the mean (a)
    b *= 5 * a.std() / b.std()
    r = 5 + np.column_stack([a + b, a - b, a])
    table, explained = dispersion_table([f"s{i}" for i in range(m)], r)
    assert explained > 0.9  # a well-defined PC1 ...
    corr, oriented = pc1_orientation(table)
    assert abs(corr) < 1e-6 and not oriented  # ... that says nothing about dispersion
    one_camp = 5 + np.column_stack([a + 0.1 * b, a, 1.2 * a])
    corr, oriented = pc1_orientation(dispersion_table([f"s{i}" for i in range(m)], one_camp)[0])
    score, mean = pc1_dispersion(one_camp)[0], mean_dispersion(one_camp)
    assert corr == pytest.approx(np.corrcoef(score, mean)[0, 1], abs=1e-12)
    assert corr > 0.9 and oriented
    # at the bound: |r| ≥ 2/√m orients it; a constant score has no r
    table = pd.DataFrame({"pc1_score": a, "mean_dispersion": a + 1e3 * b})
    expected = np.corrcoef(a, a + 1e3 * b)[0, 1]
    assert pc1_orientation(table) == (pytest.approx(expected), abs(expected) >= 2 / np.sqrt(m))
    flat = pd.DataFrame({"pc1_score": np.zeros(m), "mean_dispersion": a})
    corr, oriented = pc1_orientation(flat)
    assert np.isnan(corr) and not oriented


def test_leave_one_model_out_checks_each_fits_pc1_orientation(monkeypatch, caplog):
    """The PC1 sets chosen without a vision model (analysis.self_selection) use that fit's PC1
    score, whose sign is noise where it does not follow the fit's mean dispersion: loo.tsv's
    pc1_oriented is pc1_orientation of loo_stimuli's columns, and an unoriented fit is warned
    about by name."""
    import xmodal.dispersion as xdispersion

    rng = np.random.default_rng(0)
    m = 120
    reps, _ = planted_reps(rng, m, 24, (24, 28, 32, 32), max_noise=0.4)
    models, stimuli = leave_one_model_out(reps, names=list("abcd"))
    for name, rows in stimuli.groupby("held_out"):
        r = np.corrcoef(rows["partial_pc1"], rows["partial_dispersion"])[0, 1]
        want = abs(r) >= 2 / np.sqrt(m)
        assert models.set_index("held_out").at[name, "pc1_oriented"] == want
    real, calls = xdispersion._orientation, []

    def second_unoriented(score, mean):  # the fits are checked in name order: 'b' second
        calls.append(1)
        return (0.01, False) if len(calls) == 2 else real(score, mean)

    monkeypatch.setattr(xdispersion, "_orientation", second_unoriented)
    with caplog.at_level("WARNING", logger="xmodal.dispersion"):
        models, _ = leave_one_model_out(reps, names=list("abcd"))
    assert models.set_index("held_out")["pc1_oriented"].to_dict() == {
        "a": True, "b": False, "c": True, "d": True
    }  # fmt: skip
    assert "without 'b', PC1 of the other models' dispersion hardly follows" in caplog.text
    assert "without 'a'" not in caplog.text


def _edited(path, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))


def _replace(lines: list[str], row: int, column: int, text: str) -> list[str]:
    cells = lines[row + 1].rstrip("\n").split("\t")
    cells[column] = text
    return [*lines[: row + 1], "\t".join(cells) + "\n", *lines[row + 2 :]]


EDITS = {
    "a row deleted": (
        lambda ls: ls[:6] + ls[7:],
        r"row 6 \(stimulus 'id6'\) has position 6 where 5",
    ),
    "rows sorted by value": (
        lambda ls: [ls[0], *sorted(ls[1:], key=lambda line: float(line.split("\t")[2]))],
        r"has position \d+ where 0 is expected",
    ),
    "a value changed": (
        lambda ls: _replace(ls, 3, 2, "99.0"),
        r"row 4 \(stimulus 'id3'\) has rank_mean",
    ),
    "a PC1 score changed": (
        lambda ls: _replace(ls, 0, 3, "-99.0"),
        r"row 1 \(stimulus 'id0'\) has rank_pc1",
    ),
    "a row twice": (lambda ls: [*ls, ls[4]], r"stimulus 'id3' is listed twice \(row 31\)"),
    "a comma decimal": (lambda ls: _replace(ls, 2, 2, "0,25"), r"column 'mean_dispersion', row 3"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_dispersion_table_is_refused_naming_file_and_row(tmp_path, edit):
    """dispersion.tsv with a row deleted or the rows sorted in a spreadsheet gave other low and
    high sets with exit code 0; every reader now refuses it, naming the file and the row."""
    from xmodal.io import TableError, write_table
    from xmodal.pipeline import run_stimulus_sets

    rng = np.random.default_rng(4)
    res = np.abs(rng.normal(size=(30, 4)))
    table, _ = dispersion_table([f"id{j}" for j in range(30)], res, res + 1)
    path = tmp_path / "dispersion.tsv"
    write_table(table, path)
    pd.testing.assert_frame_equal(read_dispersion_table(path), table)  # as written: read back
    change, message = EDITS[edit]
    _edited(path, change)
    with pytest.raises(TableError, match=message):
        read_dispersion_table(path)
    analysis = dict(set_size=5, n_random=2, drop_fraction=0.25, seed=0, knn_k=2)
    with pytest.raises(TableError, match=str(path)):
        run_stimulus_sets(path, analysis, tmp_path / "sets.tsv")
    assert not (tmp_path / "sets.tsv").exists()


def test_a_dispersion_table_next_to_its_gpa_summary_is_checked_against_it(tmp_path):
    """Edits the table alone cannot show: its last rows cut off (when they held the top ranks)
    and a value moved without changing its rank. gpa.json, written by the same job, records m
    and the table's SHA-256; every reader compares them."""
    from xmodal.io import TableError, write_table
    from xmodal.pipeline import _gpa_and_dispersion

    reps = planted_reps(np.random.default_rng(2), 30, 6, (8, 10, 12), 0.5)[0]
    ids = [f"id{j}" for j in range(30)]
    out = [tmp_path / n for n in ("residuals.tsv", "dispersion.tsv", "gpa.json")]
    _gpa_and_dispersion(ids, ["a", "b", "c"], reps, 1e-10, 1000, *out, "vision")
    table = read_dispersion_table(out[1])
    top = int(np.argmax(table["mean_dispersion"]))
    cut = table.drop(index=top)
    cut["position"] = np.arange(29)
    cut["rank_mean"] = stable_rank(cut["mean_dispersion"].to_numpy())
    cut["rank_pc1"] = stable_rank(cut["pc1_score"].to_numpy())
    write_table(cut, out[1])  # consistent in itself: one stimulus fewer
    with pytest.raises(
        TableError, match=r"dispersion.tsv: 29 stimuli, where the GPA that wrote it had 30"
    ):
        read_dispersion_table(out[1])
    moved = table.copy()
    order = np.argsort(moved["mean_dispersion"].to_numpy())
    lo, hi = moved["mean_dispersion"].to_numpy()[order[[10, 11]]]
    moved.loc[order[10], "mean_dispersion"] = (lo + hi) / 2  # the same rank, another value
    write_table(moved, out[1])
    with pytest.raises(TableError, match=r"not the table the GPA wrote \(its SHA-256 differs"):
        read_dispersion_table(out[1])
    write_table(table, out[1])  # as written: accepted again
    pd.testing.assert_frame_equal(read_dispersion_table(out[1]), table)
    crlf = out[1].read_bytes().replace(b"\n", b"\r\n")  # through git's autocrlf: same numbers
    out[1].write_bytes(crlf)
    pd.testing.assert_frame_equal(read_dispersion_table(out[1]), table)


def test_pc1_orientation_bound_is_on_the_absolute_correlation_and_needs_3_stimuli():
    """Oriented when |r| ≥ 2/√m: a PC1 score falling with the mean (r = −1) is oriented; with
    fewer than 3 stimuli r is NaN and not oriented (docstring)."""
    frame = pd.DataFrame(
        {"pc1_score": [3.0, 2.0, 1.0, 0.0], "mean_dispersion": [0.0, 2.0, 4.0, 6.0]}
    )
    r, oriented = pc1_orientation(frame)
    assert r == pytest.approx(-1.0) and oriented
    r, oriented = pc1_orientation(
        pd.DataFrame({"pc1_score": [0.0, 1.0], "mean_dispersion": [0.0, 2.0]})
    )
    assert np.isnan(r) and not oriented


def test_dispersion_of_one_stimulus_or_two_models_is_refused():
    """dispersion_table needs m ≥ 2 stimuli; leave-one-model-out needs at least 3 models (GPA of
    the 2 left needs 2), said as such."""
    with pytest.raises(ValueError, match=r"m×M matrix \(m ≥ 2\), got shape \(1, 2\)"):
        dispersion_table(["a"], np.array([[0.1, 0.2]]))
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="leave-one-model-out needs at least 3 models, got 2"):
        leave_one_model_out([rng.standard_normal((10, 4)) for _ in range(2)], n_jobs=1)


def test_leave_one_model_out_fits_are_in_the_order_given():
    """Models given as c, a, b: the fits, like the tables' rows, follow that order."""
    rng = np.random.default_rng(0)
    reps = [rng.standard_normal((10, 4)) for _ in range(3)]
    res = leave_one_model_out(reps, names=["c", "a", "b"], n_jobs=1)
    assert list(res.fits) == ["c", "a", "b"]
    assert res.models["held_out"].tolist() == ["c", "a", "b"]


def test_leave_one_model_out_names_the_callers_model_in_its_errors():
    """The fits run in the order of the names, and the preprocessing named the models by their
    place in that order: a NaN in the first model given, 'zeta', was said to be in reps[2]
    (audit). The error names 'zeta'."""
    rng = np.random.default_rng(0)
    reps = [rng.standard_normal((30, 4)) for _ in range(3)]
    reps[0][3, 1] = np.nan
    with pytest.raises(ValueError, match=r"^zeta") as err:
        leave_one_model_out(reps, names=["zeta", "beta", "alpha"])
    assert "reps[" not in str(err.value)
    reps[0] = reps[0][:29]
    reps[0][:] = rng.standard_normal((29, 4))
    with pytest.raises(ValueError, match=r"zeta has 29 stimuli, alpha has 30"):
        leave_one_model_out(reps, names=["zeta", "beta", "alpha"])


def test_leave_one_model_out_shuffled_rows_baseline_tells_a_shared_property_from_none():
    """Three models share a low-rank latent; a fourth is noise, unrelated to the stimuli. The
    noise model's deviation still correlates with the others' partial dispersion (r ≈ 0.4, p
    against 0 below 1e-10: both grow with the stimulus's distance from the consensus's
    centre; coverage audit, where the demo's shuffled models reached the same r), so r > 0 does
    not show a shared property. Against its rows shuffled across stimuli it is not
    distinguished (permutation p well above 0.05), while each model that shares the latent
    lies above all 50 of its shuffles (p = 1/51)."""
    rng = np.random.default_rng(0)
    m, n_perm = 240, 50
    z = rng.standard_normal((m, 4))
    reps = [z @ rng.standard_normal((4, 32)) + 0.7 * rng.standard_normal((m, 32)) for _ in range(3)]
    reps.append(rng.standard_normal((m, 32)))
    names = ["a", "b", "c", "noise"]
    res = leave_one_model_out(reps, names=names, n_permutations=n_perm, seed=0)
    rows = res.models.set_index("held_out")
    assert list(res.models.columns[-5:]) == [
        "perm_pearson_r", "perm_pearson_p", "perm_spearman_rho", "perm_spearman_p",
        "n_permutations",
    ]  # fmt: skip
    noise = rows.loc["noise"]
    assert noise.pearson_r > 0.3 and noise.pearson_p < 1e-10  # the paper's test is passed
    assert noise.perm_pearson_p > 0.1 and noise.perm_spearman_p > 0.1
    assert abs(noise.pearson_r - noise.perm_pearson_r) < 0.1
    for key in "abc":
        row = rows.loc[key]
        assert row.perm_pearson_p == pytest.approx(1 / (n_perm + 1))
        assert row.pearson_r - row.perm_pearson_r > 0.15
    assert (rows.n_permutations == n_perm).all()
    # the p-values count shuffles: (1 + how many reach the model's value) / (P + 1)
    counts = rows[["perm_pearson_p", "perm_spearman_p"]].to_numpy() * (n_perm + 1)
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-9)
    # seeded by the analysis seed and the model's name: the same numbers in any model order,
    # others with another seed; without permutations, no baseline columns
    again = leave_one_model_out(reps[::-1], names=names[::-1], n_permutations=n_perm, seed=0)
    pd.testing.assert_frame_equal(again.models.set_index("held_out").loc[names], rows)
    other = leave_one_model_out(reps, names=names, n_permutations=n_perm, seed=1)
    assert not np.array_equal(other.models.perm_pearson_r, res.models.perm_pearson_r)
    np.testing.assert_array_equal(other.models.pearson_r, res.models.pearson_r)
    bare = leave_one_model_out(reps, names=names)
    assert not any(c.startswith("perm_") or c == "n_permutations" for c in bare.models.columns)
