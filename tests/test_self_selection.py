"""Sets chosen without the scored vision model (docs/method.md, "Sets chosen without the scored
model"): each vision model scored on low and high sets of the GPA of the other vision models."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_language_dispersion import _layers_table, _write_lm

from xmodal.io import read_table, write_table
from xmodal.metrics import cknna, prepare_layer, threshold_from_quantiles
from xmodal.pipeline import run_conditions
from xmodal.selection import make_sets, others_sets
from xmodal.summary import self_selection_summary_table, summary_table


def _loo(
    ids: list[str], scores: dict[str, np.ndarray], rng, pc1: dict[str, np.ndarray] | None = None
) -> pd.DataFrame:
    """loo_stimuli.tsv with planted partial dispersions (and PC1 scores, when given)."""
    rows = [
        {"held_out": v, "stimulus_index": j, "stimulus_id": ids[j],
         "partial_dispersion": s[j], **({"partial_pc1": pc1[v][j]} if pc1 else {}),
         "deviation": 0.0}
        for v, s in scores.items()
        for j in rng.permutation(len(ids))  # rows in another order: matched by id
    ]  # fmt: skip
    return pd.DataFrame(rows)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(8, 40), n_values=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_others_sets_are_the_extremes_of_the_others_dispersion_ties_by_position(m, n_values, seed):
    rng = np.random.default_rng(seed)
    ids = [f"{j:03d}" for j in range(m)]  # numeric-looking ids stay text
    scores = {v: rng.integers(0, n_values, m).astype(float) for v in ("a", "b")}
    pc1 = {v: rng.integers(-n_values, n_values + 1, m).astype(float) for v in ("a", "b")}
    size = int(rng.integers(1, m // 2 + 1))
    got = others_sets(ids, _loo(ids, scores, rng, pc1), size)
    for summary, planted in (("mean", scores), ("pc1", pc1)):
        for v, s in planted.items():
            ranked = sorted(range(m), key=lambda j, s=s: (s[j], j))  # brute force
            for name, want in (("low", ranked[:size]), ("high", ranked[m - size :])):
                sel = got[(got["vision"] == v) & (got["set"] == name) & (got["summary"] == summary)]
                assert sel["stimulus_id"].tolist() == [ids[j] for j in want]
                assert set(sel["draw"]) == {0}
    # a table written before partial_pc1 existed: the mean sets only
    old = others_sets(ids, _loo(ids, scores, rng), size)
    assert set(old["summary"]) == {"mean"}
    pd.testing.assert_frame_equal(old, got[got["summary"] == "mean"].reset_index(drop=True))


def test_others_sets_refuse_a_table_of_other_stimuli():
    ids = [f"s{j}" for j in range(10)]
    loo = _loo(ids, {"a": np.arange(10.0)}, np.random.default_rng(0))
    with pytest.raises(ValueError, match="without 'a' covers 9 of 10 stimuli"):
        others_sets(ids, loo.iloc[1:], 3)


def test_others_sets_name_a_score_that_is_not_a_number():
    """A NaN in loo_stimuli.tsv (a table edited or written by other code) said only "scores
    contain non-finite values": now the column, the held-out model and the stimuli."""
    ids = [f"s{j}" for j in range(10)]
    pc1 = {"a": np.arange(10.0), "b": np.r_[np.arange(8.0), np.nan, np.inf]}
    loo = _loo(ids, {"a": np.arange(10.0), "b": np.arange(10.0)}, np.random.default_rng(0), pc1)
    with pytest.raises(ValueError) as err:
        others_sets(ids, loo, 3)
    assert str(err.value) == (
        "partial_pc1 without 'b' (leave-one-model-out table) is not a finite number for 2 "
        "stimuli: 's8', 's9'"
    )
    with pytest.raises(ValueError, match="the mean dispersion is not a finite number for 1 "
                       "stimuli: 's3'"):  # fmt: skip
        make_sets(ids, np.r_[np.arange(3.0), np.nan, np.arange(6.0)], np.arange(10.0), 3)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three vision models and one LLM sharing a latent structure, stimulus sets from a
    planted dispersion, and a planted partial dispersion per held-out model."""
    tmp = tmp_path_factory.mktemp("self_selection")
    rng = np.random.default_rng(5)
    m, k, size = 90, 5, 20
    ids = [f"id{j}" for j in range(m)]
    z = rng.normal(size=(m, 6))
    vision, layers = ["va", "vb", "vc"], {}
    paths = []
    for key in vision:
        layers[key] = [z @ rng.normal(size=(6, 16)) + rng.normal(size=(m, 16)) for _ in range(3)]
        paths.append(_write_lm(tmp / f"{key}.h5", key, layers[key], ids, "vision"))
    llm = [z @ rng.normal(size=(6, 10)) + s * rng.normal(size=(m, 10)) for s in (2, 0.5, 1)]
    llm_path = _write_lm(tmp / "lm.h5", "lm", llm, ids)
    chosen = {"va": 1, "vb": 2, "vc": 1}
    write_table(_layers_table("lm", chosen, n_layers=3), tmp / "layers.tsv")
    disp = rng.normal(size=m)
    sets = make_sets(ids, disp, rng.normal(size=m), size, n_random=15, seed=0)
    write_table(sets, tmp / "sets.tsv")
    partial = {v: disp + rng.normal(0, s, m) for v, s in zip(vision, (0.1, 1.0, 3.0), strict=True)}
    pc1 = {v: rng.normal(size=m) for v in vision}
    pc1["va"] = partial["va"] + 0.5 * pc1["va"]  # a PC1 that follows its mean dispersion
    write_table(_loo(ids, partial, rng, pc1), tmp / "loo_stimuli.tsv")
    run_conditions(
        paths, llm_path, tmp / "layers.tsv", tmp / "sets.tsv", vision, "lm", vision_layer=-2,
        k=k, n_boot=50, seed=0, out_conditions=tmp / "c.tsv", out_contrasts=tmp / "x.tsv",
        loo_stimuli_path=tmp / "loo_stimuli.tsv", out_self_selection=tmp / "s.tsv",
    )  # fmt: skip
    return dict(
        tmp=tmp, paths=paths, llm_path=llm_path,
        ids=ids, k=k, size=size, layers=layers, llm=llm, chosen=chosen, sets=sets,
        partial=partial, pc1=pc1, cond=read_table(tmp / "c.tsv"), con=read_table(tmp / "x.tsv"),
        own=read_table(tmp / "s.tsv"),
    )  # fmt: skip


def _prepared(layers: list[np.ndarray], i: int) -> np.ndarray:
    stack = np.stack(layers).astype(np.float32)
    m = stack.shape[1]
    q = np.quantile(np.abs(stack).transpose(1, 0, 2).reshape(m, -1), 0.95, axis=1)
    return prepare_layer(stack[i], threshold_from_quantiles(q))


def test_each_model_is_scored_on_the_sets_chosen_without_it(run):
    ids, k, size, own = run["ids"], run["k"], run["size"], run["own"]
    assert len(own) == 6 and own["summary"].tolist() == ["mean", "pc1"] * 3
    for r in own.itertuples():
        s = (run["partial"] if r.summary == "mean" else run["pc1"])[r.vision]
        ranked = sorted(range(len(ids)), key=lambda j, s=s: (s[j], j))
        x = _prepared(run["layers"][r.vision], 1)  # vision_layer -2 of 3 blocks
        y = _prepared(run["llm"], run["chosen"][r.vision])
        for value, pos in ((r.low, ranked[:size]), (r.high, ranked[-size:])):
            idx = sorted(pos)
            assert value == pytest.approx(cknna(x[idx], y[idx], k), abs=2e-6)
        assert (r.llm_layer, r.n_stimuli, r.n_boot) == (run["chosen"][r.vision], size, 50)
        assert r.diff_low_high == pytest.approx(r.low - r.high)
        assert r.diff_ci_low <= r.diff_ci_high
        # the random baseline: the main job's draws (independent of dispersion), against low
        rand = run["cond"]
        rand = rand[(rand["vision"] == r.vision) & (rand["condition"] == "random")]
        assert r.random_mean == pytest.approx(rand["value"].mean(), abs=1e-12)
        assert r.frac_random_ge_low == np.mean(rand["value"].to_numpy() >= r.low)
        main = run["con"]
        main = main[(main["vision"] == r.vision) & (main["summary"] == r.summary)]
        assert (r.low_all, r.high_all) == (main["low"].item(), main["high"].item())
        # the lower end of the main interval, not its upper (a mutant passed, mutation audit)
        assert r.diff_ci_low_all == main["diff_ci_low"].item() < main["diff_ci_high"].item()
        sets = run["sets"]
        for name, got, pos in (
            ("low", r.n_shared_low, ranked[:size]),
            ("high", r.n_shared_high, ranked[-size:]),
        ):
            ref = set(sets[(sets["set"] == name) & (sets["summary"] == r.summary)]["stimulus_id"])
            assert got == len(ref & {ids[j] for j in pos})
    # pc1_oriented: on pc1 rows, whether the fit's PC1 follows its mean dispersion (|r| ≥ 2/√m)
    for r in own.itertuples():
        pc1, partial = run["pc1"][r.vision], run["partial"][r.vision]
        follows = abs(np.corrcoef(pc1, partial)[0, 1]) >= 2 / np.sqrt(len(ids))
        assert r.pc1_oriented == (r.summary == "mean" or follows), r
    assert set(own.loc[own["summary"] == "pc1", "pc1_oriented"]) == {True, False}
    # the nearly exact partial dispersion of va chose nearly the main sets; vc's did not
    by = own[own["summary"] == "mean"].set_index("vision")
    assert by.loc["va", "n_shared_low"] > by.loc["vc", "n_shared_low"]


def test_the_summary_puts_both_kinds_of_sets_side_by_side(run):
    table = self_selection_summary_table(run["own"], run["con"])
    assert table["sets"].tolist() == ["all", "others"] * 2
    assert table["summary"].tolist() == ["mean", "mean", "pc1", "pc1"]
    main = summary_table(run["con"])  # mean, then pc1
    for i, summary in enumerate(("mean", "pc1")):
        assert table.iloc[2 * i].drop("sets").equals(main.iloc[i])
        others = table.iloc[2 * i + 1]
        own = run["own"][run["own"]["summary"] == summary]
        assert others["n_low_gt_high"] == int((own["low"] > own["high"]).sum())
        assert others["n_diff_ci_above_zero"] == int((own["diff_ci_low"] > 0).sum())
        assert others["n_pairs"] == 3


def test_a_tied_layer_choice_is_said_on_every_row_at_that_layer(run):
    """The layer search's ``layer_tied`` of a pair's choice reaches the rows computed at that
    layer: the contrasts, the sets chosen without the model, and their summary's count; the
    numbers themselves do not change."""
    tmp = run["tmp"]
    layers = _layers_table("lm", run["chosen"], n_layers=3)
    layers["layer_tied"] = layers["chosen"] & (layers["vision"] == "vb")
    write_table(layers, tmp / "layers_tied.tsv")
    run_conditions(
        run["paths"], run["llm_path"], tmp / "layers_tied.tsv", tmp / "sets.tsv",
        ["va", "vb", "vc"], "lm", vision_layer=-2, k=run["k"], n_boot=50, seed=0,
        out_conditions=tmp / "c2.tsv", out_contrasts=tmp / "x2.tsv",
        loo_stimuli_path=tmp / "loo_stimuli.tsv", out_self_selection=tmp / "s2.tsv",
    )  # fmt: skip
    con, own = read_table(tmp / "x2.tsv"), read_table(tmp / "s2.tsv")
    for table, before in ((con, run["con"]), (own, run["own"])):
        assert (table["layer_tied"] == (table["vision"] == "vb")).all()
        assert not before["layer_tied"].any()  # a table without the column: none tied
        pd.testing.assert_frame_equal(
            table.drop(columns="layer_tied"), before.drop(columns="layer_tied")
        )
    summary = summary_table(con)
    assert summary[["summary", "n_layer_tied"]].values.tolist() == [["mean", 1], ["pc1", 1]]
    # a tied pair whose low is not a number is not counted (n_valid leaves it out too)
    con.loc[(con["vision"] == "vb") & (con["summary"] == "mean"), "low"] = np.nan
    summary = summary_table(con)
    assert summary[["summary", "n_valid", "n_layer_tied"]].values.tolist() == [
        ["mean", 2, 0], ["pc1", 3, 1]
    ]  # fmt: skip
