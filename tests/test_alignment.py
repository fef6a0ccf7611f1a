"""Fast grid path agrees with the one-pair metric; tables follow docs/contracts.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from xmodal import alignment as al
from xmodal import metrics as mt
from xmodal import selection as sel
from xmodal import stats as st

M = 120
IDS = [f"s{i:03d}" for i in range(M)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((M, 8))
    sigma = rng.uniform(0, 1.5, M)
    vision = mt.prepare(
        shared @ rng.standard_normal((8, 20)) + sigma[:, None] * rng.standard_normal((M, 20))
    )
    layers = [
        mt.prepare_layer(
            a * shared @ rng.standard_normal((8, 24))
            + sigma[:, None] * rng.standard_normal((M, 24)),
            10.0,
        )
        for a in (0.2, 1.0, 3.0, 0.5)
    ]
    sets = sel.make_sets(
        IDS,
        sigma,
        sigma + 0.1 * rng.standard_normal(M),
        set_size=30,
        n_random=8,
        drop_fraction=0.25,
        seed=0,
    )
    return vision, layers, sets


def test_layer_search_equals_pairwise(data):
    vision, layers, _ = data
    values = al.layer_search(vision, iter(layers), k=10)
    expected = [mt.cknna(vision, y, 10) for y in layers]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    many = al.layer_search_many([vision, layers[0]], iter(layers), k=10)
    assert many.shape == (2, 4)
    np.testing.assert_allclose(many[0], expected, atol=1e-12)
    assert many[1, 0] == pytest.approx(1.0)


def test_layer_profile_table(data):
    vision, layers, _ = data
    table = al.layer_profile_table(
        "v", "l", 7, vision, ((i, f"layers.{i}", y) for i, y in enumerate(layers)), k=10
    )
    assert list(table.columns) == [
        "vision",
        "llm",
        "vision_layer",
        "llm_layer",
        "layer_name",
        "metric",
        "value",
        "chosen",
    ]
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "llm_layer"].item() == int(np.argmax(table["value"]))
    assert (table["metric"] == "cknna").all() and (table["vision_layer"] == 7).all()


def test_layer_profile_table_never_chooses_an_undefined_layer(data):
    """An all-zero LLM layer has no CKNNA (NaN); argmax picked the first NaN as the best layer."""
    vision, layers, _ = data
    zero = np.zeros_like(layers[0])
    table = al.layer_profile_table(
        "v", "l", 7, vision, ((i, f"layers.{i}", y) for i, y in enumerate([zero, *layers])), k=10
    )
    assert np.isnan(table["value"].iloc[0]) and not table["chosen"].iloc[0]
    assert table.loc[table["chosen"], "llm_layer"].item() == int(np.nanargmax(table["value"]))


def test_condition_table_values(data):
    vision, layers, sets = data
    y = layers[2]
    conditions, contrasts = al.condition_table(
        "v", "l", 2, vision, y, sets, IDS, k=10, n_boot=40, seed=0
    )
    assert list(conditions.columns) == [
        "vision",
        "llm",
        "llm_layer",
        "condition",
        "summary",
        "draw",
        "n_stimuli",
        "metric",
        "value",
    ]
    full = conditions.query("condition == 'full'")
    assert len(full) == 1 and full.summary.item() == "none" and full.draw.item() == 0
    assert full.value.item() == pytest.approx(mt.cknna(vision, y, 10), abs=1e-12)
    pos = {s: i for i, s in enumerate(IDS)}
    for (name, summary, draw), group in sets.groupby(["set", "summary", "draw"]):
        idx = [pos[s] for s in group.stimulus_id]
        row = conditions[
            (conditions.condition == name)
            & (conditions.summary == summary)
            & (conditions.draw == draw)
        ]
        assert len(row) == 1 and row.n_stimuli.item() == len(idx)
        assert row.value.item() == pytest.approx(mt.cknna(vision[idx], y[idx], 10), abs=1e-6)
    assert len(conditions) == 1 + len(sets.groupby(["set", "summary", "draw"]))
    assert list(contrasts.columns) == [
        "vision",
        "llm",
        "summary",
        "low",
        "high",
        "random_mean",
        "random_ci_low",
        "random_ci_high",
        "frac_random_ge_low",
        "diff_low_high",
        "diff_ci_low",
        "diff_ci_high",
        "n_boot",
    ]
    assert sorted(contrasts.summary) == ["mean", "pc1"]
    row = contrasts.set_index("summary").loc["mean"]
    rand = conditions.query("condition == 'random'").value
    assert row.random_mean == pytest.approx(rand.mean())
    assert row.frac_random_ge_low == pytest.approx(np.mean(rand >= row.low))
    assert row.diff_low_high == pytest.approx(row.low - row.high)
    assert row.diff_ci_low <= row.diff_ci_high and row.n_boot == 40
    again = al.condition_table("v", "l", 2, vision, y, sets, IDS, k=10, n_boot=40, seed=0)
    pd.testing.assert_frame_equal(contrasts, again[1])


def test_condition_table_unknown_ids(data):
    vision, layers, sets = data
    bad = sets.copy()
    bad.loc[0, "stimulus_id"] = "nope"
    with pytest.raises(ValueError, match="nope"):
        al.condition_table("v", "l", 0, vision, layers[0], bad, IDS, n_boot=0)


def test_a_set_listed_out_of_order_scores_as_in_stimulus_order():
    """A set is evaluated in stimulus order whatever order its table lists it in (e.g. by
    dispersion rank): without ``np.sort(pos)`` exact ties would break by listing order."""
    rng = np.random.default_rng(0)
    m = 40
    x = rng.integers(-2, 3, (m, 4)).astype(np.float64)
    x[[5, 11, 23, 30]] = x[2]  # exact duplicates: exact ties
    x[[7, 19]] = x[3]
    y = rng.integers(-2, 3, (m, 3)).astype(np.float64)
    y[[6, 12, 25]] = y[1]
    ids = IDS[:m]
    pos = np.arange(0, 32)
    listed = [ids[j] for j in pos[::-1]]
    sets = pd.DataFrame({"set": "low", "summary": "mean", "draw": 0, "stimulus_id": listed})
    plan = al.ConditionPlan(sets, ids, k=3, n_boot=0)
    xs, ys = plan.side(x, is_kernel=False, boot=False), plan.side(y, boot=False)
    cond, _ = plan.evaluate_metrics("v", "l", 0, xs, ys, ("cknna", "mutual_knn"))
    for metric, fn in (("cknna", mt.cknna), ("mutual_knn", mt.mutual_knn)):
        got = cond[(cond.condition == "low") & (cond.metric == metric)].value.item()
        assert got == pytest.approx(fn(x[pos], y[pos], 3), abs=1e-12)


def test_each_summarys_bootstrap_draws_from_its_own_seed_stream():
    """The i-th summary's low and high sets draw from ``default_rng([seed, i])`` (docs): one
    ``default_rng(seed)`` per summary would give mean and pc1 the same resample stream."""
    ids = IDS[:40]
    rows = []
    for summary, lo, hi in (
        ("mean", range(0, 12), range(28, 40)),
        ("pc1", range(3, 15), range(20, 32)),
    ):
        rows += [("low", summary, 0, ids[j]) for j in lo]
        rows += [("high", summary, 0, ids[j]) for j in hi]
    sets = pd.DataFrame(rows, columns=["set", "summary", "draw", "stimulus_id"])
    plan = al.ConditionPlan(sets, ids, k=3, n_boot=20, seed=7)
    for si, summary in enumerate(("mean", "pc1")):
        rng = np.random.default_rng([7, si])
        for name in ("low", "high"):
            want = st.BootstrapPlan(plan.positions[(name, summary, 0)], 20, rng, 3).weights
            assert np.array_equal(plan.plans[(name, summary)].weights.numpy(), want.numpy())


def test_contrast_interval_is_the_95_percent_percentile_interval_of_low_minus_high(data):
    """diff_ci_low/diff_ci_high are the 2.5th and 97.5th percentiles of the resampled
    CKNNA(low*) − CKNNA(high*) (docs/method.md, "Layer choice and statistics"), redrawn here from
    each summary's seed stream: a 90% interval moved both ends by ~0.01 and passed every other
    test."""
    vision, layers, sets = data
    y = layers[2]
    _, contrasts = al.condition_table("v", "l", 2, vision, y, sets, IDS, k=10, n_boot=200, seed=3)
    pos = {s: i for i, s in enumerate(IDS)}
    kx, ky = vision @ vision.T, y @ y.T
    for si, summary in enumerate(sorted(set(sets[sets.set == "low"].summary))):  # mean, pc1
        rng = np.random.default_rng([3, si])
        values = {}
        for name in ("low", "high"):
            chosen = sets[(sets.set == name) & (sets.summary == summary)].stimulus_id
            p = np.sort([pos[s] for s in chosen])
            weights = np.stack(
                [np.bincount(d, minlength=len(p)) for d in rng.integers(0, len(p), (200, len(p)))]
            )
            values[name] = st.weighted_cknna(kx[np.ix_(p, p)], ky[np.ix_(p, p)], weights, 10)
        d = values["low"] - values["high"]
        row = contrasts.set_index("summary").loc[summary]
        assert np.percentile(d, 5) - np.percentile(d, 2.5) > 1e-3  # a 90% interval would fail
        assert row.diff_ci_low == pytest.approx(np.percentile(d, 2.5), abs=1e-5)
        assert row.diff_ci_high == pytest.approx(np.percentile(d, 97.5), abs=1e-5)


def test_subsets_keep_the_full_kernels_resolution():
    """A subset's kNN takes τ of the full set's kernel: τ = 0 would leave row 33's near tie
    (rows 3 and 10, 3e-8 apart in its kernel row) resolved."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 16)).astype(np.float32)
    x[10] = x[3] + 1e-7 * rng.standard_normal(16).astype(np.float32)  # near-duplicate rows
    x = mt.prepare_layer(x, 1e30)
    full = mt.KernelKNN.from_features(x, 1)
    sub = al._subsets_of(full, np.arange(0, 40)[None, :])[0]
    assert sub.tau == full.tau > 0
    expected = mt.KernelKNN.build(full.kernel[0][:40, :40], 1, full.tau)
    assert sub.unresolved[0].tolist() == expected.unresolved[0].tolist()
    # which of the two near-duplicates rows 30 and 33 pick is rounding's choice (1 ulp)
    assert np.flatnonzero(sub.unresolved[0].numpy()).tolist() == [30, 33]


# ----------------------------------------------------------------------------- per-LLM API


def vision_map(data):
    vision, layers, _ = data
    return {"va": (7, vision), "vb": (3, layers[0] + 0.0)}


METRIC_FN = {
    "cknna": lambda x, y: mt.cknna(x, y, 10),
    "mutual_knn": lambda x, y: mt.mutual_knn(x, y, 10),
    "unbiased_cka": mt.unbiased_cka,
    "cka": mt.cka,
}


def test_layer_search_table_values_and_choice(data):
    _, layers, _ = data
    vis = vision_map(data)
    table = al.layer_search_table(
        vis, "l", ((i, f"layers.{i}", y) for i, y in enumerate(layers)), k=10, metrics=al.METRICS
    )
    assert list(table.columns) == al.LAYER_COLUMNS
    assert len(table) == 2 * len(layers) * len(al.METRICS)
    for (v, metric), group in table.groupby(["vision", "metric"]):
        x = vis[v][1]
        expected = [METRIC_FN[metric](x, y) for y in layers]
        np.testing.assert_allclose(group["value"], expected, atol=1e-9)
        assert (group["vision_layer"] == vis[v][0]).all()
        assert group["chosen"].sum() == 1
        assert group.loc[group["chosen"], "llm_layer"].item() == int(np.argmax(expected))
    assert table["valid"].all() and (table["reason"] == "").all()
    # the cknna rows equal today's per-pair layer profile
    old = al.layer_profile_table(
        "va", "l", 7, vis["va"][1], ((i, f"layers.{i}", y) for i, y in enumerate(layers)), k=10
    )
    new = table.query("vision == 'va' and metric == 'cknna'").reset_index(drop=True)
    np.testing.assert_array_equal(new["value"], old["value"])
    np.testing.assert_array_equal(new["chosen"], old["chosen"])


def test_a_layer_choice_within_the_stabilities_is_flagged_tied(data, caplog):
    """Two layers whose values differ by less than their stabilities are ordered by the kNN
    tie-breaks, so another order of the stimuli could choose the other one and move every
    value of the pair (audit: 2 of the demo's 12 pairs changed layer when only the manifest's
    rows were permuted, and nothing said so). The chosen row says ``layer_tied``, computed here
    from the table's own values and stabilities, and the job's log names both layers."""
    import logging

    _, layers, _ = data
    vis = vision_map(data)
    # layer 3 repeats layer 1: equal values, so whichever is chosen, the choice is tied
    stack = [layers[0], layers[1], layers[2], layers[1].copy()]
    with caplog.at_level(logging.WARNING, logger="xmodal.alignment"):
        table = al.layer_search_table(
            vis, "l", ((i, f"layers.{i}", y) for i, y in enumerate(stack)), k=10,
            metrics=("cknna", "cka"),
        )  # fmt: skip
    assert list(table.columns) == al.LAYER_COLUMNS
    assert not table.loc[~table["chosen"], "layer_tied"].any()
    for _, g in table.groupby(["vision", "metric"]):
        best = g[g["chosen"]].iloc[0]
        rest = g[~g["chosen"]]
        expected = bool(
            ((best["value"] - rest["value"]) <= best["stability"] + rest["stability"]).any()
        )
        assert bool(best["layer_tied"]) is expected
        if best["llm_layer"] in (1, 3):  # the repeated layer won: tied, at its first copy
            assert best["llm_layer"] == 1 and best["layer_tied"]
    assert table["layer_tied"].any()
    assert "the chosen layer 1" in caplog.text and "layer(s) 3" in caplog.text
    # the rule on values and stabilities as given (0.100 vs 0.0995: within 3e-4 + 3e-4, not
    # within 2e-4 + 2e-4)
    for stab, tied in ((3e-4, True), (2e-4, False)):
        t = pd.DataFrame(
            {"vision": "v", "metric": "cknna", "llm_layer": [0, 1, 2],
             "value": [0.0995, 0.100, 0.09], "stability": [stab, stab, 0.0],
             "valid": True, "reason": ""}
        )  # fmt: skip
        chosen, flag = al._choose(t, "l")
        assert chosen.tolist() == [False, True, False]
        assert flag.tolist() == [False, tied, False]
    # an invalid layer (a degenerate one) is never a rival, whatever its value
    t = pd.DataFrame(
        {"vision": "v", "metric": "cknna", "llm_layer": [0, 1], "value": [0.1, 0.0999],
         "stability": [3e-4, 3e-4], "valid": [True, False], "reason": ["", "constant rows"]}
    )  # fmt: skip
    assert al._choose(t, "l")[1].tolist() == [False, False]


def test_condition_tables_equal_condition_table(data):
    vision, layers, sets = data
    vis = vision_map(data)
    chosen = {("va", "cknna"): 2, ("vb", "cknna"): 1, ("va", "mutual_knn"): 2}
    calls = []

    def llm_layer(i):
        calls.append(i)
        return layers[i]

    conds, contrasts = al.condition_tables(
        {"va": vis["va"]},
        "l",
        chosen,
        llm_layer,
        sets,
        IDS,
        k=10,
        n_boot=30,
        seed=0,
        metrics=("cknna", "mutual_knn"),
    )
    assert calls == [2]  # one read per distinct chosen layer
    assert list(conds.columns) == al.CONDITION_COLUMNS
    assert list(contrasts.columns) == al.CONTRAST_COLUMNS
    old_c, old_d = al.condition_table("va", "l", 2, vision, layers[2], sets, IDS, k=10, n_boot=30)
    new_c = conds.query("metric == 'cknna'").reset_index(drop=True)
    new_d = contrasts.query("metric == 'cknna'").reset_index(drop=True)
    pd.testing.assert_frame_equal(new_c[old_c.columns], old_c)
    pd.testing.assert_frame_equal(new_d[old_d.columns], old_d)
    mk = conds.query("metric == 'mutual_knn'")
    pos = {s: i for i, s in enumerate(IDS)}
    for (name, summary, draw), group in sets.groupby(["set", "summary", "draw"]):
        idx = [pos[s] for s in group.stimulus_id]
        row = mk[(mk.condition == name) & (mk.summary == summary) & (mk.draw == draw)]
        assert row.value.item() == pytest.approx(mt.mutual_knn(vision[idx], layers[2][idx], 10))
    mk_d = contrasts.query("metric == 'mutual_knn'")
    assert (mk_d["n_boot"] == 30).all() and (mk_d["diff_ci_low"] <= mk_d["diff_ci_high"]).all()


@pytest.mark.parametrize("dense", [True, False])
def test_vision_bootstrap_structures_prepared_once_give_the_same_tables(data, tmp_path, dense):
    """The vision models' bootstrap sides prepared once (rule vision_bootstrap), stored and
    reused by a conditions job, give the tables of a job that builds its own; sides stored
    from other vision features are not taken (rebuilt, same tables)."""
    vision, layers, sets = data
    vis = vision_map(data)
    chosen = {(v, "cknna"): 1 for v in vis}
    kw = dict(k=10, n_boot=40, seed=3, dense=dense)
    expected = al.condition_tables(vis, "l", chosen, lambda i: layers[i], sets, IDS, **kw)
    plan = al.ConditionPlan(sets, IDS, k=10, n_boot=40, seed=3, dense=dense)
    cache: dict = {}
    for _, x in vis.values():
        plan.bootstrap_sides(x, cache=cache)
    assert len(cache) == len(vis) * len(plan.plans) == 2 * 4
    st.save_sides(cache, tmp_path / "vision_bootstrap.pt")
    stored = st.load_sides(tmp_path / "vision_bootstrap.pt")
    got = al.condition_tables(
        vis, "l", chosen, lambda i: layers[i], sets, IDS, boot_cache=stored, **kw
    )
    assert len(stored) == 8  # every vision side taken from the file
    for a, b in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(a, b)
    other = {key: (i, mt.prepare(x + 0.01)) for key, (i, x) in vis.items()}
    plan.bootstrap_sides(other["va"][1], cache=(stale := {}))
    got = al.condition_tables(
        vis, "l", chosen, lambda i: layers[i], sets, IDS, boot_cache=stale, **kw
    )
    assert len(stale) == 4 + 8  # the stale ones stay unused; every side was rebuilt
    for a, b in zip(got, expected, strict=True):
        pd.testing.assert_frame_equal(a, b)


def test_condition_tables_other_metrics_on_subsets(data):
    vision, layers, sets = data
    names = ("unbiased_cka", "cka")
    chosen = {("va", n): 1 for n in names}
    conds, contrasts = al.condition_tables(
        {"va": (7, vision)},
        "l",
        chosen,
        lambda i: layers[i],
        sets,
        IDS,
        k=10,
        n_boot=0,
        metrics=names,
    )
    pos = {s: i for i, s in enumerate(IDS)}
    assert conds.query("condition == 'full'").set_index("metric").value.to_dict() == pytest.approx(
        {n: METRIC_FN[n](vision, layers[1]) for n in names}, abs=1e-9
    )
    for (name, summary, draw), group in sets.groupby(["set", "summary", "draw"]):
        idx = [pos[s] for s in group.stimulus_id]
        for metric in names:
            row = conds[
                (conds.metric == metric)
                & (conds.condition == name)
                & (conds.summary == summary)
                & (conds.draw == draw)
            ]
            expected = METRIC_FN[metric](vision[idx], layers[1][idx])
            assert row.value.item() == pytest.approx(expected, abs=1e-9)
    assert len(contrasts) == 4


def test_layer_search_table_rejects(data):
    vision, layers, _ = data
    with pytest.raises(ValueError, match="metrics"):
        al.layer_search_table({"v": (0, vision)}, "l", [(0, "a", layers[0])], metrics=("nope",))
    bad = np.full_like(layers[0], np.nan)
    with pytest.raises(al.AlignmentError, match="'l'.*'v'"):
        al.layer_search_table({"v": (0, vision)}, "l", [(0, "a", bad)])


def test_blocked_conditions_equal_dense(data, monkeypatch):
    """ConditionPlan without an m×m kernel (subsets from features, blocked bootstrap lists)."""
    vision, layers, sets = data
    y = layers[2]
    out = {}
    for dense in (True, False):
        plan = al.ConditionPlan(sets, IDS, k=10, n_boot=30, seed=0, dense=dense)
        if not dense:
            monkeypatch.setattr(mt, "BLOCK_ELEMS", 17 * M)
        xs, ys = plan.side(vision), plan.side(y)
        assert (xs.full.kernel is None) == (not dense)
        out[dense] = plan.evaluate_metrics("v", "l", 2, xs, ys, al.METRICS)
    (cd, dd), (cb, db) = out[True], out[False]
    np.testing.assert_allclose(cb["value"], cd["value"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(cb["stability"], cd["stability"], atol=1e-6, rtol=0)
    for col in ("low", "high", "random_mean", "diff_ci_low", "diff_ci_high"):
        np.testing.assert_allclose(db[col], dd[col], atol=1e-6, rtol=0)


def test_a_collapsed_llm_layer_is_never_chosen_however_high_its_value():
    rng = np.random.default_rng(2)
    m = 120
    z = rng.standard_normal((m, 8))
    vision = mt.prepare_layer((z @ rng.standard_normal((8, 32))).astype(np.float32), 1e30)
    weak = z @ rng.standard_normal((8, 24)) + 20 * rng.standard_normal((m, 24))
    v = rng.standard_normal(24)
    # rows one direction plus 1e-7 of the vision features: rounding picks every kNN set
    collapsed = v + 1e-7 * (vision[:, :24] / np.abs(vision[:, :24]).max())
    layers = [
        (i, name, mt.prepare_layer(x.astype(np.float32), 1e30))
        for i, (name, x) in enumerate((("weak", weak), ("collapsed", collapsed)))
    ]
    t = al.layer_search_table({"v": (0, vision)}, "l", layers, metrics=("cknna", "mutual_knn"))
    bad = t[t["layer_name"] == "collapsed"]
    assert not bad["valid"].any() and bad["reason"].str.startswith("collapsed").all(), bad
    assert (bad["stability"] == np.inf).all() and not bad["chosen"].any()
    chosen = t[t["chosen"]]
    assert chosen["layer_name"].tolist() == ["weak", "weak"]
    assert (bad["value"].to_numpy() > chosen["value"].to_numpy()).all()  # rounding's luck


def test_stability_columns(data):
    vision, layers, sets = data
    tied = layers[1].copy()
    tied[5:16] = tied[4]  # 12 copies: each copy's 11 nearest are exact ties, k = 10 splits them
    table = al.layer_search_table(
        {"v": (0, vision)}, "l", [(0, "a", layers[0]), (1, "b", tied)], metrics=al.METRICS
    )
    knn = table["metric"].isin(al.KNN_METRICS)
    assert (table.loc[~knn, "stability"] == 0).all()
    assert (table.loc[knn & (table.llm_layer == 1), "stability"] > 0).all()
    assert not mt.KernelKNN.from_features(layers[0], 10).unresolved.any()
    assert not mt.KernelKNN.from_features(vision, 10).unresolved.any()
    assert (table.loc[knn & (table.llm_layer == 0), "stability"] == 0).all()
    conds, contrasts = al.condition_tables(
        {"v": (0, vision)}, "l", {("v", "cknna"): 1}, lambda i: tied, sets, IDS, n_boot=0
    )
    assert conds["stability"].notna().all() and (conds["stability"] >= 0).all()
    low = conds.query("condition == 'low' and summary == 'mean'")
    assert contrasts.set_index("summary").loc["mean", "low_stability"] == low.stability.item()


# ----------------------------------------------------------------------------- degenerate layers


def test_degenerate_llm_layers_are_never_chosen(data, caplog):
    vision, layers, _ = data
    const = np.tile(layers[0][:1], (M, 1))
    nan = layers[0].copy()
    nan[3, 2] = np.nan
    huge = mt.prepare_layer(layers[1] * 1e19, threshold=1e30)  # prepared without overflow
    bad = [
        (0, "zero", np.zeros_like(layers[0])),
        (1, "const", const),
        (2, "nan", nan),
        (3, "good", layers[2]),
        (4, "huge", huge),
    ]
    with caplog.at_level("WARNING", logger="xmodal.alignment"):
        table = al.layer_search_table({"v": (5, vision)}, "l", bad, metrics=al.METRICS)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 3 and "layer 1 (const) is invalid (constant rows)" in warned[1]
    reasons = table.groupby("llm_layer")["reason"].first().to_dict()
    assert reasons == {
        0: "zero rows",
        1: "constant rows",
        2: "non-finite features",
        3: "",
        4: "",
    }
    assert not table.loc[table.llm_layer.isin([0, 1, 2]), "valid"].any()
    assert table.loc[table.llm_layer.isin([0, 1, 2]), "value"].isna().all()
    assert not table.loc[table.chosen, "llm_layer"].isin([0, 1, 2]).any()
    assert table.chosen.sum() == len(al.METRICS)
    huge_rows = table.query("llm_layer == 4 and metric == 'cknna'")
    assert huge_rows.value.item() == pytest.approx(mt.cknna(vision, layers[1], 10), abs=1e-6)
    with pytest.raises(al.AlignmentError, match=r"LLM 'l'.*vision model 'v'.*zero rows"):
        al.layer_search_table({"v": (5, vision)}, "l", bad[:1])


def test_degenerate_vision_layer_is_an_error(data):
    _, layers, _ = data
    with pytest.raises(al.AlignmentError, match=r"'vz', layer 7: zero rows.*analysis.vision_layer"):
        al.layer_search_table({"vz": (7, np.zeros_like(layers[0]))}, "l", [(0, "a", layers[0])])


def test_layer_search_blocked_equals_dense(data, monkeypatch):
    vision, layers, _ = data
    vis = {"v": (0, vision)}
    lay = [(i, f"layers.{i}", y) for i, y in enumerate(layers)]
    dense = al.layer_search_table(vis, "l", lay, metrics=al.METRICS, dense=True)
    monkeypatch.setattr(mt, "BLOCK_ELEMS", 23 * M)
    blocked = al.layer_search_table(vis, "l", lay, metrics=al.METRICS, dense=False)
    np.testing.assert_allclose(blocked["value"], dense["value"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(blocked["stability"], dense["stability"], atol=1e-6, rtol=0)
    assert blocked["chosen"].tolist() == dense["chosen"].tolist()


def test_blocked_cka_of_float64_features_is_not_rounded_to_float32(data, monkeypatch):
    vision, layers, _ = data
    vis = {"v": (0, vision.astype(np.float64))}
    lay = [(i, f"layers.{i}", y.astype(np.float64)) for i, y in enumerate(layers)]
    cka = ("unbiased_cka", "cka")
    dense = al.layer_search_table(vis, "l", lay, metrics=cka, dense=True)
    monkeypatch.setattr(mt, "BLOCK_ELEMS", 23 * M)
    blocked = al.layer_search_table(vis, "l", lay, metrics=cka, dense=False)
    np.testing.assert_allclose(blocked["value"], dense["value"], atol=1e-12, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu(data):
    vision, layers, sets = data
    vis = {"v": (0, vision)}
    lay = [(i, f"layers.{i}", y) for i, y in enumerate(layers)]
    cpu = al.layer_search_table(vis, "l", lay, metrics=al.METRICS, device=torch.device("cpu"))
    gpu = al.layer_search_table(vis, "l", lay, metrics=al.METRICS, device=torch.device("cuda"))
    np.testing.assert_allclose(gpu["value"], cpu["value"], atol=1e-6, rtol=0)
    assert gpu["chosen"].tolist() == cpu["chosen"].tolist()
    chosen = {("v", m): 2 for m in al.METRICS}
    args = (vis, "l", chosen, lambda i: layers[i], sets, IDS)
    kw = {"n_boot": 20, "metrics": al.METRICS}
    c_cpu, d_cpu = al.condition_tables(*args, **kw, device=torch.device("cpu"))
    c_gpu, d_gpu = al.condition_tables(*args, **kw, device=torch.device("cuda"))
    np.testing.assert_allclose(c_gpu["value"], c_cpu["value"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(d_gpu["diff_ci_low"], d_cpu["diff_ci_low"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("dense", [True, False])
def test_cka_on_a_collapsed_layer_is_flagged_not_reported_as_exact(dense):
    """A vision layer at mean cosine 0.9999999 (every kNN set rounding's): its float32 kernel
    is rounding too, and CKA from it was 0.106 (dense) or 0.837 (blocked) with stability 0,
    where CKNNA was flagged ∞. Every metric's finite value that uses a collapsed side now
    carries stability ∞; a healthy pair keeps CKA stability 0."""
    rng = np.random.default_rng(0)
    m, half, k, d = 200, 50, 10, 64
    s = rng.normal(size=(m, d))

    def unit(a):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    y = unit(s + 0.5 * rng.normal(size=(m, d)))
    ids = [f"s{i:03d}" for i in range(m)]
    rows = [("low", "mean", 0, ids[i]) for i in range(half)]
    rows += [("high", "mean", 0, ids[i]) for i in range(m - half, m)]
    sets = pd.DataFrame(rows, columns=["set", "summary", "draw", "stimulus_id"])
    metrics = ("cknna", "cka", "unbiased_cka")
    # the last: 20 stimuli, each 10 times (as captions repeat): tied kNN sets, an exact kernel
    dups = unit(np.repeat(s[:20], 10, axis=0))  # its CKA values stay unflagged (review)
    for x, flagged in ((unit(rng.normal(size=(1, d)) + 3e-4 * s), True), (unit(s), False),
                       (dups, False)):  # fmt: skip
        plan = al.ConditionPlan(sets, ids, k=k, n_boot=0, seed=0, dense=dense)
        cond, _ = plan.evaluate_metrics("V", "L", 0, plan.side(x), plan.side(y), metrics)
        shown = cond[np.isfinite(cond["value"])]  # NaN (unbiased CKA, blocked): not shown
        got = shown.groupby("metric")["stability"].apply(lambda v: set(np.isinf(v)))
        assert set(got.index) >= {"cknna", "cka"}, cond[["metric", "value"]]
        cka = got.drop("cknna") if x is dups else got  # CKNNA's ties are its own (∞ there)
        assert all(v == {flagged} for v in cka), cond[["metric", "value", "stability"]]
        if not flagged:
            assert (cond.loc[cond.metric != "cknna", "stability"] == 0).all()
        if x is dups:
            side = mt.KernelKNN.from_features(x, k, dense=dense)
            assert mt.rounding_decides(side).all()  # ties that the first fix flagged CKA by


def test_an_analysis_job_given_gpus_it_cannot_see_says_so(monkeypatch, caplog):
    """analysis.gpu with a CPU-only torch: the job held a GPU and ran on the CPU, its log
    naming no device. Same numbers, so not refused, but warned about, naming the setting."""
    import logging

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for var in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    with caplog.at_level(logging.INFO, logger="xmodal.alignment"):
        assert al.default_device() == torch.device("cpu")
    assert "alignment on the CPU" in caplog.text and "SLURM" not in caplog.text
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xmodal.alignment"):
        assert al.default_device() == torch.device("cpu")
    assert "given GPUs by SLURM (SLURM_JOB_GPUS=0)" in caplog.text
    assert "analysis.gpu: false" in caplog.text
    # a job that asked for no GPU (its CUDA_VISIBLE_DEVICES emptied by scripts/_bootstrap.py)
    # inside a GPU allocation: not warned (review)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="xmodal.alignment"):
        assert al.default_device() == torch.device("cpu")
    assert "SLURM" not in caplog.text and "alignment on the CPU" in caplog.text


@pytest.mark.parametrize("budget", [1, 2])
def test_a_conditions_pool_runs_one_blas_and_torch_thread_per_worker(data, monkeypatch, budget):
    """docs/cluster.md: an analysis job uses at most its rule's threads. The conditions job's
    pool of one worker per vision model called torch and BLAS, which each used the job's
    threads too: 2 threads ran 4 (audit). Inside a pool of several workers each runs one;
    one worker keeps the job's threads; torch's setting is restored afterwards."""
    from threadpoolctl import threadpool_info

    from xmodal.parallel import set_thread_budget

    vision, layers, sets = data
    vis = vision_map(data)
    chosen = {(v, "cknna"): 1 for v in vis}
    seen = []
    side = al.ConditionPlan.side

    def blas():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    def counted(self, *args, **kwargs):
        seen.append((torch.get_num_threads(), blas()))
        return side(self, *args, **kwargs)

    monkeypatch.setattr(al.ConditionPlan, "side", counted)
    before = torch.get_num_threads()
    monkeypatch.setattr("xmodal.parallel.available_cores", lambda: budget)
    try:
        torch.set_num_threads(2)
        job = (2, blas())  # the job's own threads (BLAS: as the machine and torch set them)
        set_thread_budget(budget)
        al.condition_tables(vis, "l", chosen, lambda i: layers[i], sets, IDS, k=10, n_boot=5)
        assert torch.get_num_threads() == 2  # restored
    finally:
        set_thread_budget(None)
        torch.set_num_threads(before)
    # the two vision models' sides in the pool, then the LLM's alone, with the job's threads
    want = (1, {1}) if budget > 1 else job  # two workers: one thread each; one: the job's
    assert seen == [want, want, job], seen


def test_a_value_outside_minus_one_to_one_is_written_as_nan_and_warned(caplog):
    """CKNNA's masked kernels are not positive semi-definite: on sets of 4 stimuli with k = 2
    (which max(4, 2k) allows) it left [−1, 1] in most random sets, and a pilot run wrote
    values up to 100 to its tables, exit 0 (sizes audit). Such a value is NaN, with its
    stability, and one warning names the keys; values inside are untouched."""
    rng = np.random.default_rng(0)
    found = {}
    for _ in range(200):
        x = mt.prepare_layer(rng.standard_normal((4, 6)).astype(np.float32), 1e30)
        y = mt.prepare_layer(rng.standard_normal((4, 6)).astype(np.float32), 1e30)
        xs, ys = mt.KernelKNN.from_features(x, 2), mt.KernelKNN.from_features(y, 2)
        raw = float(mt.knn_metric("cknna", xs, ys)[0][0])
        key = "out" if abs(raw) > 1.01 else "in" if abs(raw) < 0.99 else None
        if key:
            found.setdefault(key, (xs, ys, raw))
    assert set(found) == {"out", "in"}
    al._warned_out_of_range.clear()
    xs, ys, raw = found["out"]
    with caplog.at_level("WARNING", logger="xmodal.alignment"):
        value, stability = al.side_values("cknna", xs, ys)
        al.side_values("cknna", xs, ys)  # warned once
    assert torch.isnan(value).all() and torch.isnan(stability).all()
    warned = [r.getMessage() for r in caplog.records if "outside [-1, 1]" in r.getMessage()]
    assert len(warned) == 1 and "analysis.knn_k" in warned[0] and "analysis.set_size" in warned[0]
    assert "sets of 4 stimuli (k = 2)" in warned[0] and f"{abs(raw):.3g}" in warned[0]
    xs, ys, raw = found["in"]
    value, _ = al.side_values("cknna", xs, ys)
    assert float(value[0]) == pytest.approx(raw, abs=1e-12)


def test_values_outside_the_range_are_warned_once_across_threads(caplog, monkeypatch):
    """The pair jobs evaluate LLM layers on worker threads (xmodal.parallel) that share the
    once-per-key record: its check and its entry are one step, so threads that meet the same
    key at once warn once (with a record that yields between check and entry, as a thread
    switch can, every thread warned before)."""
    import threading
    import time

    class Yielding(set):
        def __contains__(self, key):
            seen = super().__contains__(key)
            time.sleep(0.02)  # a thread switch between the check and the entry
            return seen

    monkeypatch.setattr(al, "_warned_out_of_range", Yielding())
    value = torch.tensor([0.5, 3.0], dtype=torch.float64)
    start = threading.Barrier(6)

    def run():
        start.wait()
        al._outside_range("cknna", value, 4, 2)

    with caplog.at_level("WARNING", logger="xmodal.alignment"):
        threads = [threading.Thread(target=run) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    warned = [r.getMessage() for r in caplog.records if "outside [-1, 1]" in r.getMessage()]
    assert len(warned) == 1 and "sets of 4 stimuli (k = 2)" in warned[0]


def test_a_bootstrap_resample_outside_minus_one_to_one_makes_the_interval_nan(caplog):
    """A resample's CKNNA outside [−1, 1] is NaN as a set's value is, so the low − high
    interval is NaN, with one warning naming the keys, rather than stretched by it: on sets of
    8 with k = 4 (which max(4, 2k) allows) 8 of 400 resamples reached up to 4.2 and the
    interval was finite. Where no resample leaves the range, the interval is the raw
    resamples'."""
    m, ids = 48, [f"s{i:02d}" for i in range(48)]

    def pair(seed, set_size):
        rng = np.random.default_rng(seed)
        sigma = rng.uniform(0, 1.5, m)
        shared = rng.standard_normal((m, 4))
        v, y = (
            mt.prepare(shared @ rng.standard_normal((4, 6)) + rng.standard_normal((m, 6)))
            for _ in range(2)
        )
        sets = sel.make_sets(ids, sigma, sigma, set_size=set_size, n_random=4, seed=0)
        return v, y, sets

    def raw_resamples(v, y, sets, k):
        plan = al.ConditionPlan(sets, ids, k=k, n_boot=200, seed=0)
        xs, ys = plan.side(v), plan.side(y)
        return {
            name: plan.plans[(name, "mean")].values(
                xs.boot[(name, "mean")], ys.boot[(name, "mean")], "cknna"
            )
            for name in ("low", "high")
        }

    v, y, sets = pair(5, 8)
    raw = raw_resamples(v, y, sets, 4)
    both = np.concatenate([raw["low"], raw["high"]])
    assert np.isfinite(both).all() and np.abs(both).max() > 4  # the planted case leaves the range
    al._warned_out_of_range.clear()
    with caplog.at_level("WARNING", logger="xmodal.alignment"):
        _, contrasts = al.condition_table("v", "l", 0, v, y, sets, ids, k=4, n_boot=200)
    row = contrasts.set_index("summary").loc["mean"]
    assert np.isfinite(row["diff_low_high"])
    assert np.isnan(row["diff_ci_low"]) and np.isnan(row["diff_ci_high"])
    warned = [r.getMessage() for r in caplog.records if "bootstrap resamples lie" in r.getMessage()]
    assert len(warned) == 1 and "sets of 8 stimuli (k = 4)" in warned[0]
    assert "analysis.knn_k" in warned[0] and "analysis.set_size" in warned[0]

    v, y, sets = pair(5, 12)
    raw = raw_resamples(v, y, sets, 6)
    assert np.abs(np.concatenate([raw["low"], raw["high"]])).max() <= 1
    _, contrasts = al.condition_table("v", "l", 0, v, y, sets, ids, k=6, n_boot=200)
    row = contrasts.set_index("summary").loc["mean"]
    want = np.percentile(raw["low"] - raw["high"], [2.5, 97.5])
    assert [row["diff_ci_low"], row["diff_ci_high"]] == pytest.approx(want, abs=1e-12)


def test_kernel_takes_any_array_gram_takes():
    """alignment.kernel went through torch.as_tensor, which refuses a view with negative
    strides (``x[::-1]``) that metrics.gram took (regression of 2026-12-07, in this change)."""
    from xmodal.alignment import kernel
    from xmodal.metrics import gram

    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    for a in (x, x[::-1], x[:, ::2], x.astype(np.float16), np.arange(12).reshape(4, 3)):
        np.testing.assert_array_equal(kernel(a).numpy(), gram(a))
