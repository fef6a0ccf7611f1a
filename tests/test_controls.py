"""The controls (docs/method.md, "Controls"): size-matched random sets of the drop ablation and
the held-out layer choice, against planted ground truth, brute-force loops and the one-pair
CKNNA (xmodal.metrics.cknna, which shares no code with the batched subset path)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xmodal import alignment as al
from xmodal import metrics as mt
from xmodal import selection as sel
from xmodal.config import ConfigError
from xmodal.language_dispersion import CELL_COLUMNS, cell_table
from xmodal.summary import (
    DROP_SUMMARY_COLUMNS,
    HELDOUT_SUMMARY_COLUMNS,
    drop_summary_table,
    heldout_pairs,
    heldout_summary_table,
)

K = 10


def _unit(a: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _ids(m: int) -> list[str]:
    return [f"s{i:03d}" for i in range(m)]


# ---------------------------------------------------------------- selection


def test_drop_random_draws_have_the_drop_size_and_seeded_membership():
    m, seed, n = 50, 7, 6
    rng = np.random.default_rng(1)
    ids = _ids(m)
    scores, pc1 = rng.standard_normal(m), rng.standard_normal(m)
    sets = sel.make_sets(ids, scores, pc1, 10, n_random=4, drop_fraction=0.25, seed=seed,
                         n_drop_random=n)  # fmt: skip
    plain = sel.make_sets(ids, scores, pc1, 10, n_random=4, drop_fraction=0.25, seed=seed)
    # the other sets (the random baseline's draws included) do not change
    pd.testing.assert_frame_equal(sets[sets["set"] != "random_drop"].reset_index(drop=True), plain)
    drop = sets[sets["set"] == "random_drop"]
    assert set(drop["summary"]) == {"none"}
    assert sorted(drop["draw"].unique()) == list(range(n))
    size = m - round(0.25 * m)  # 50 - 12 (Python rounds 12.5 to even)
    assert sel.drop_set_size(m, 0.25) == size == 38
    assert (sets[sets["set"] == "drop_high"].groupby("summary").size() == size).all()
    gen = np.random.default_rng([seed, 11])  # the documented stream, independently
    for d in range(n):
        want = gen.choice(m, size, replace=False)
        got = drop[drop["draw"] == d]["stimulus_id"].tolist()
        assert got == [ids[j] for j in want]
    with pytest.raises(ValueError, match="n_drop_random"):
        sel.make_sets(ids, scores, pc1, 10, 4, 0.25, 0, n_drop_random=-1)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 120), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_split_halves_are_disjoint_seeded_halves(m, n_splits, seed):
    a, b = sel.split_halves(m, n_splits, seed)
    assert a.shape == (n_splits, m // 2) and b.shape == (n_splits, m - m // 2)
    gen = np.random.default_rng([seed, 12])
    for s in range(n_splits):
        assert not set(a[s]) & set(b[s])
        assert sorted([*a[s], *b[s]]) == list(range(m))
        assert list(a[s]) == sorted(a[s]) and list(b[s]) == sorted(b[s])
        perm = gen.permutation(m)  # the documented rule, independently
        assert set(a[s]) == set(perm[: m // 2].tolist())
    again = sel.split_halves(m, n_splits, seed)
    np.testing.assert_array_equal(a, again[0])
    np.testing.assert_array_equal(b, again[1])


def test_split_halves_errors():
    with pytest.raises(ValueError, match="at least 2"):
        sel.split_halves(1, 3, 0)
    with pytest.raises(ValueError, match="n_splits"):
        sel.split_halves(10, 0, 0)


def test_heldout_sets_lie_inside_half_b_by_rank_within_b():
    m, k_set, n_random, n_splits, seed = 41, 12, 5, 3, 4
    rng = np.random.default_rng(2)
    ids = _ids(m)
    mean_s = np.round(rng.uniform(0, 1, m), 1)  # ties: broken by manifest order
    pc1_s = rng.standard_normal(m)
    sets = sel.heldout_sets(ids, mean_s, pc1_s, k_set, n_random, n_splits, seed, knn_k=3)
    assert list(sets.columns) == ["split", "set", "summary", "draw", "stimulus_id"]
    k_b = math.floor(k_set * (m - m // 2) / m + 0.5)  # 12 · 21/41 = 6.15 → 6
    assert sel.heldout_set_size(k_set, m) == k_b == 6
    _, halves_b = sel.split_halves(m, n_splits, seed)
    for s in range(n_splits):
        b = list(halves_b[s])
        part = sets[sets["split"] == s]
        assert set(part["stimulus_id"]) <= {ids[j] for j in b}
        for summary, score in (("mean", mean_s), ("pc1", pc1_s)):
            ranked = sorted(b, key=lambda j, score=score: (score[j], j))  # brute force
            for name, want in (("low", ranked[:k_b]), ("high", ranked[-k_b:])):
                got = part[(part["set"] == name) & (part["summary"] == summary)]["stimulus_id"]
                assert sorted(got) == sorted(ids[j] for j in want), (s, name, summary)
        gen = np.random.default_rng([seed, 13, s])
        rand = part[part["set"] == "random"]
        assert sorted(rand["draw"].unique()) == list(range(n_random))
        for d in range(n_random):
            want = [ids[b[j]] for j in gen.choice(len(b), k_b, replace=False)]
            assert rand[rand["draw"] == d]["stimulus_id"].tolist() == want
    with pytest.raises(ValueError, match="analysis.set_size.*analysis.heldout_layer"):
        sel.heldout_sets(ids, mean_s, pc1_s, k_set, n_random, n_splits, seed, knn_k=6)


@pytest.mark.parametrize("m", [22, 30, 1026])
def test_heldout_low_and_high_sets_are_disjoint_when_set_size_is_half_of_m(m):
    """K = m/2 with K odd: rounding K·|B|/m up gave low and high one stimulus in common."""
    k_set = m // 2
    assert k_set % 2 == 1
    rng = np.random.default_rng(0)
    ids = _ids(m)
    sets = sel.heldout_sets(ids, rng.random(m), rng.standard_normal(m), k_set, 2, 3, 0, 2)
    n_b = m - m // 2
    assert sel.heldout_set_size(k_set, m) == n_b // 2
    for (_, summary), part in sets[sets["set"] != "random"].groupby(["split", "summary"]):
        low = set(part.loc[part["set"] == "low", "stimulus_id"])
        high = set(part.loc[part["set"] == "high", "stimulus_id"])
        assert len(low) == len(high) == n_b // 2 and not low & high, summary


def test_control_settings_defaults_and_errors():
    assert sel.DropControl.from_config({}) == sel.DropControl(True, None)
    assert sel.DropControl.from_config({"analysis": {}}).draws({"n_random": 30}) == 30
    d = sel.DropControl.from_config({"analysis": {"drop_control": {"n_random": 7}}})
    assert d.draws({"n_random": 30}) == 7
    off = sel.DropControl.from_config({"analysis": {"drop_control": {"enabled": False}}})
    assert off.draws({"n_random": 30}) == 0
    h = sel.HeldOutLayer.from_config({"analysis": {"heldout_layer": {"enabled": True}}})
    assert h == sel.HeldOutLayer(True, 20)
    assert not sel.HeldOutLayer.from_config({}).enabled
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="analysis.heldout_layer.n_splits"):
            sel.HeldOutLayer.from_config({"analysis": {"heldout_layer": {"n_splits": bad}}})
        with pytest.raises(ConfigError, match="analysis.drop_control.n_random"):
            sel.DropControl.from_config({"analysis": {"drop_control": {"n_random": bad}}})


# ---------------------------------------------------------------- item 1: size-matched drop


def _drop_case(m: int, seed: int, planted: bool) -> tuple[dict, list, pd.DataFrame]:
    """Vision and LLM features sharing structure; the LLM's per-stimulus noise σ_j is the
    dispersion score (planted) or the same for every stimulus with scores unrelated to it."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((m, 6))
    scores = rng.uniform(0.0, 1.0, m)
    sigma = 2.0 * scores if planted else np.full(m, 1.0)
    x = _unit(shared @ rng.standard_normal((6, 16)) + 0.3 * rng.standard_normal((m, 16)))
    y = shared @ rng.standard_normal((6, 24))
    y = _unit(y + sigma[:, None] * np.linalg.norm(y, axis=1, keepdims=True) / 5 * rng.standard_normal((m, 24)))  # fmt: skip
    ids = _ids(m)
    sets = sel.make_sets(ids, scores, scores, 20, n_random=5, drop_fraction=0.25, seed=seed,
                         n_drop_random=40)  # fmt: skip
    return {"v": (0, x)}, [y], sets


@pytest.fixture(scope="module")
def drop_tables() -> dict[bool, tuple]:
    out = {}
    for planted in (False, True):
        vision, layers, sets = _drop_case(120, 3, planted)
        cond, _ = al.condition_tables(vision, "l", {("v", "cknna"): 0}, lambda i, ys=layers: ys[i],
                                      sets, _ids(120), k=K, n_boot=0)  # fmt: skip
        out[planted] = (vision, layers, sets, cond, al.drop_table(cond))
    return out


def test_drop_sets_fall_inside_the_size_matched_distribution_without_an_effect(drop_tables):
    _, _, _, cond, drop = drop_tables[False]
    for r in drop.itertuples():
        assert r.random_ci_low <= r.drop_high <= r.random_ci_high, r
        assert r.random_ci_low <= r.drop_low <= r.random_ci_high, r
        assert 0.025 < r.frac_random_ge_drop_high < 0.975
        assert 0.025 < r.frac_random_ge_drop_low < 0.975
        # and the set size alone moves CKNNA: the full set is outside the random 75% interval
        assert not r.random_ci_low <= r.full <= r.random_ci_high, r


def test_drop_sets_fall_outside_it_with_planted_per_stimulus_noise(drop_tables):
    _, _, _, _, drop = drop_tables[True]
    for r in drop.itertuples():
        assert r.drop_high > r.random_ci_high and r.frac_random_ge_drop_high == 0.0
        assert r.drop_low < r.random_ci_low and r.frac_random_ge_drop_low == 1.0
    summ = drop_summary_table(drop)
    assert list(summ.columns) == DROP_SUMMARY_COLUMNS
    summ = summ.set_index("summary")
    assert (summ["n_drop_high_gt_random_gt_drop_low"] == 1).all()
    assert (summ["n_drop_high_above_random_ci"] == 1).all()


def test_drop_table_against_brute_force(drop_tables):
    vision, layers, sets, cond, drop = drop_tables[True]
    x, y = vision["v"][1], layers[0]
    pos = {s: i for i, s in enumerate(_ids(120))}

    def cknna_of(name, summary, draw=0):
        g = sets[(sets["set"] == name) & (sets["summary"] == summary) & (sets["draw"] == draw)]
        idx = sorted(pos[s] for s in g["stimulus_id"])
        return mt.cknna(x[idx], y[idx], K)

    rand = np.array([cknna_of("random_drop", "none", d) for d in range(40)])
    assert len(drop) == 2
    for r in drop.itertuples():
        hi, lo = cknna_of("drop_high", r.summary), cknna_of("drop_low", r.summary)
        assert r.drop_high == pytest.approx(hi, abs=1e-6)
        assert r.drop_low == pytest.approx(lo, abs=1e-6)
        assert r.full == pytest.approx(mt.cknna(x, y, K), abs=1e-6)
        assert r.random_mean == pytest.approx(rand.mean(), abs=1e-6)
        ordered = np.sort(rand)  # the 2.5th / 97.5th percentiles, linear interpolation
        for q, got in ((0.025, r.random_ci_low), (0.975, r.random_ci_high)):
            pos_q = q * (rand.size - 1)
            lo_i = int(math.floor(pos_q))
            want = ordered[lo_i] + (pos_q - lo_i) * (ordered[min(lo_i + 1, rand.size - 1)] - ordered[lo_i])  # fmt: skip
            assert got == pytest.approx(want, abs=1e-6)
        assert r.frac_random_ge_drop_high == sum(v >= r.drop_high for v in rand) / 40
        assert r.frac_random_ge_drop_low == sum(v >= r.drop_low for v in rand) / 40
        assert (r.n_stimuli, r.n_random) == (90, 40)
        stabs = cond[cond["condition"] == "random_drop"]["stability"].to_numpy()
        assert r.random_stability == pytest.approx(stabs.mean())


def test_large_families_are_evaluated_in_chunks_with_the_same_values(drop_tables, monkeypatch):
    vision, layers, sets, cond, _ = drop_tables[True]
    monkeypatch.setattr(al, "EAGER_FAMILY_BYTES", 0)  # every family built at evaluation time
    monkeypatch.setattr(al, "_MAX_BATCH_ELEMS", 3 * 90 * 90)  # chunks of three draws
    plan = al.ConditionPlan(sets, _ids(120), k=K, n_boot=0)
    assert plan.lazy == {"random", "random_drop"}
    assert plan.lazy_fixed == set(plan.fixed)  # the drop, low and high sets too
    for dense in (True, False):
        lazy, _ = al.condition_tables(vision, "l", {("v", "cknna"): 0}, lambda i: layers[i],
                                      sets, _ids(120), k=K, n_boot=0, dense=dense)  # fmt: skip
        side = al.ConditionPlan(sets, _ids(120), k=K, n_boot=0, dense=dense).side(layers[0])
        assert not side.subsets  # nothing kept with the side: built at evaluation
        pd.testing.assert_frame_equal(lazy, cond, check_exact=dense, rtol=0, atol=1e-6)


def test_only_the_largest_fixed_sets_are_left_to_evaluation(drop_tables, monkeypatch):
    sets = drop_tables[True][2]
    plan = al.ConditionPlan(sets, _ids(120), k=K, n_boot=0)
    assert not plan.lazy_fixed  # 120 stimuli: everything kept
    drop = {key for key in plan.fixed if key[0].startswith("drop")}
    sizes = {key: len(plan.positions[key]) ** 2 * 6 for key in plan.fixed}
    monkeypatch.setattr(al, "EAGER_FAMILY_BYTES", sum(sizes.values()) - sum(sizes[k] for k in drop))
    assert al.ConditionPlan(sets, _ids(120), k=K, n_boot=0).lazy_fixed == drop


def test_drop_table_says_which_pairs_layer_choice_was_tied(drop_tables):
    """The drop sets are scored at the pair's chosen layer: its ``layer_tied`` (the layer
    search's) is on their rows, and nothing else changes."""
    cond = drop_tables[True][3]
    plain = al.drop_table(cond)
    first = str(plain["vision"].iloc[0])
    tied = al.drop_table(cond, {(first, "cknna"): True})
    assert not plain["layer_tied"].any()
    assert (tied["layer_tied"] == ((tied["vision"] == first) & (tied["metric"] == "cknna"))).all()
    assert tied["layer_tied"].any()
    pd.testing.assert_frame_equal(tied.drop(columns="layer_tied"), plain.drop(columns="layer_tied"))


def test_drop_table_refuses_inconsistent_tables(drop_tables):
    cond = drop_tables[True][3]
    with pytest.raises(ValueError, match="no random_drop draws.*analysis.drop_control"):
        al.drop_table(cond[cond["condition"] != "random_drop"])
    bad = cond.copy()
    bad.loc[bad["condition"] == "random_drop", "n_stimuli"] = 80
    with pytest.raises(ValueError, match="random_drop draws hold \\[80\\].*drop sets 90"):
        al.drop_table(bad)


def test_drop_summary_against_loops():
    rows = [
        # drop_high, drop_low, random mean, ci low, ci high, full, frac hi, frac lo, stab
        (0.50, 0.30, 0.40, 0.35, 0.45, 0.38, 0.0, 1.0, 0.0),  # ordered, both outside
        (0.42, 0.30, 0.40, 0.35, 0.45, 0.38, 0.3, 1.0, 2e-3),  # ordered, high inside; unstable
        (0.30, 0.42, 0.40, 0.35, 0.45, 0.38, 0.9, 0.2, 0.0),  # reversed
        (np.nan, 0.3, 0.40, 0.35, 0.45, 0.38, np.nan, 1.0, 0.0),  # undefined
    ]
    df = pd.DataFrame(rows, columns=["drop_high", "drop_low", "random_mean", "random_ci_low",
                                     "random_ci_high", "full", "frac_random_ge_drop_high",
                                     "frac_random_ge_drop_low", "random_stability"])  # fmt: skip
    df["drop_high_stability"] = df["drop_low_stability"] = 0.0
    df["metric"], df["summary"] = "cknna", "mean"
    r = drop_summary_table(df).iloc[0]
    assert (r.n_pairs, r.n_valid, r.n_unstable) == (4, 3, 1)
    assert r.n_drop_high_gt_random_gt_drop_low == 2
    assert (r.n_drop_high_above_random_ci, r.n_drop_low_below_random_ci) == (1, 2)
    assert (r.n_drop_high_gt_full, r.n_drop_low_gt_full) == (2, 1)
    assert r.median_frac_random_ge_drop_high == pytest.approx(0.3)
    assert r.median_frac_random_ge_drop_low == pytest.approx(1.0)
    assert r.median_random_minus_full == pytest.approx(0.02)


def drop_row(drop_high, drop_low, random_mean, frac) -> pd.DataFrame:
    """One pair's drop-control row: full 0.3, random interval (0.25, 0.35), both fractions frac."""
    row = dict(drop_high=drop_high, drop_low=drop_low, random_mean=random_mean)
    return pd.DataFrame([row]).assign(
        vision="v",
        llm="l",
        metric="cknna",
        summary="mean",
        full=0.3,
        random_ci_low=0.25,
        random_ci_high=0.35,
        frac_random_ge_drop_high=frac,
        frac_random_ge_drop_low=frac,
    )


def test_random_below_drop_low_is_not_between_the_drop_sets():
    """Random 0.3 below drop_low 0.4 is not between the drop sets: ``(drop_high > random) &
    (drop_high > drop_low)`` would count the pair."""
    r = drop_summary_table(drop_row(0.5, 0.4, 0.3, 0.0)).iloc[0]
    assert r.n_drop_high_gt_random_gt_drop_low == 0


def test_drop_equal_to_full_is_not_above_it():
    """A drop set's value equal to the full set's (0.3) is not above it: ``>=`` would count
    it."""
    r = drop_summary_table(drop_row(0.3, 0.3, 0.3, 0.5)).iloc[0]
    assert (r.n_drop_high_gt_full, r.n_drop_low_gt_full) == (0, 0)


def test_drop_low_on_the_interval_end_is_not_below_it():
    """Drop low equal to the draws' lower interval end (0.25) is inside the interval, not below
    it, which ``<=`` counted (mutation audit of the tables)."""
    rows = pd.concat(
        [drop_row(0.5, 0.25, 0.3, 0.0).assign(vision="a"), drop_row(0.5, 0.2, 0.3, 0.0)],
        ignore_index=True,
    )
    r = drop_summary_table(rows).iloc[0]
    assert r.n_drop_low_below_random_ci == 1  # v (drop low 0.2) only


# ---------------------------------------------------------------- stability of the baselines


def test_random_stability_is_the_mean_of_the_draws_stabilities():
    """Duplicated stimuli tie neighbours exactly: some draws get a stability > 0."""
    rng = np.random.default_rng(5)
    m = 60
    x = rng.standard_normal((m, 8))
    x[30:] = x[:30]  # every stimulus has a twin: exact ties
    y = x @ rng.standard_normal((8, 12)) + 0.5 * rng.standard_normal((m, 12))
    ids = _ids(m)
    sets = sel.make_sets(ids, rng.uniform(size=m), rng.uniform(size=m), 15, n_random=12,
                         drop_fraction=0.25, seed=0)  # fmt: skip
    cond, con = al.condition_tables({"v": (0, _unit(x))}, "l", {("v", "cknna"): 0},
                                    lambda i: _unit(y), sets, ids, k=4, n_boot=0)  # fmt: skip
    stabs = cond[cond["condition"] == "random"]["stability"].to_numpy()
    assert (stabs > 0).any()
    assert "random_stability" in al.CONTRAST_COLUMNS
    np.testing.assert_allclose(con["random_stability"], sum(stabs) / len(stabs), rtol=1e-12)
    cells = cell_table(cond.assign(condition=cond["condition"].replace({"low": "vlow_llow"})))
    assert list(cells.columns) == CELL_COLUMNS
    low = cond[(cond["condition"] == "low")].set_index("summary")["stability"]
    for r in cells.itertuples():
        assert r.stability == low[r.summary]
        assert r.random_stability == pytest.approx(sum(stabs) / len(stabs))


# ---------------------------------------------------------------- item 2: held-out layer


def _layers_case(m: int, seed: int, biased: bool) -> tuple[dict, list, np.ndarray]:
    """Vision features and two LLM layers.

    Not biased: layer 1 is the vision structure plus little noise, layer 0 plus much more:
    layer 1 is best on every half. Biased: a few stimuli (the first 12, a tight cluster in
    the vision features, the least dispersed) are aligned in layer 1 only, whose other stimuli
    are noisier than layer 0's: layer 1 is best on the full set only through those few.
    Returns vision, layers and the dispersion scores.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, 12))
    special = np.arange(12)
    if biased:
        x[special] = 2 * rng.standard_normal(12) + 0.05 * rng.standard_normal((12, 12))
    base = x @ rng.standard_normal((12, 16))
    scale = np.linalg.norm(base, axis=1, keepdims=True) / 4

    def noisy(level: float) -> np.ndarray:
        return base + level * scale * rng.standard_normal((m, 16))

    if biased:
        y0, y1 = noisy(0.6), noisy(0.8)
        y1[special] = base[special] + 0.01 * rng.standard_normal((12, 16))
        others = rng.choice(np.arange(12, m), 12, replace=False)
        y0[special] = y0[others] + 0.3 * rng.standard_normal((12, 16))
    else:
        y0, y1 = noisy(2.0), noisy(0.3)
    scores = rng.uniform(1, 2, m)
    if biased:
        scores[special] = rng.uniform(0, 0.5, 12)
    vision = {"v": (0, _unit(x + 0.05 * rng.standard_normal(x.shape)))}
    return vision, [_unit(y0), _unit(y1)], scores


def _heldout_run(vision, layers, scores, n_splits=12, seed=0, k_set=40, k=5):
    m = len(scores)
    ids = _ids(m)
    halves = sel.split_halves(m, n_splits, seed)[0]
    table, held = al.layer_search_tables(
        vision, "l", ((i, f"layers.{i}", y) for i, y in enumerate(layers)), halves, k=k
    )
    chosen = {("v", "cknna"): int(table.loc[table["chosen"], "llm_layer"].item())}
    per_split = {("v", "cknna", int(r.split)): int(r.llm_layer) for r in held.itertuples()}
    sets = sel.heldout_sets(ids, scores, scores, k_set, 6, n_splits, seed, k)
    out = al.heldout_condition_table(vision, "l", chosen, per_split, lambda i: layers[i], sets,
                                     ids, k=k)  # fmt: skip
    return table, held, sets, out


def test_the_heldout_evaluation_logs_each_split(caplog):
    """It logged nothing between the last condition and its end: 31 s at m = 2048, about 8
    minutes projected at 8192 (audit)."""
    vision, layers, scores = _layers_case(80, 1, biased=False)
    with caplog.at_level("INFO", logger="xmodal.alignment"):
        _heldout_run(vision, layers, scores, n_splits=3, k_set=20)
    lines = [r.getMessage() for r in caplog.records if "held-out layer choice" in r.getMessage()]
    assert [re.search(r"split (\d) of 3 evaluated, \d+ s so far", x)[1] for x in lines] == list(
        "123"
    )


@pytest.fixture(scope="module")
def unbiased():
    vision, layers, scores = _layers_case(160, 1, biased=False)
    return (vision, layers, scores, *_heldout_run(vision, layers, scores))


@pytest.mark.parametrize("cached", [True, False])
def test_llm_halves_are_built_one_batch_at_a_time_with_the_same_values(
    unbiased, monkeypatch, cached
):
    """The halves of an LLM layer were all held at once (n_splits · (m/2)² kernels: 2.4 GB at
    m = 9000); now one batch of splits at a time, whether or not the vision halves are cached."""
    vision, layers, scores, _, held, _, _ = unbiased
    halves = sel.split_halves(len(scores), 12, 0)[0]
    sizes: list[int] = []
    subsets_of = al._subsets_of

    def spy(side, positions):
        sizes.append(np.atleast_2d(positions).shape[0])
        return subsets_of(side, positions)

    monkeypatch.setattr(al, "_subsets_of", spy)
    monkeypatch.setattr(al, "_MAX_BATCH_ELEMS", 2 * 80 * 80)  # two halves of 80 per batch
    if not cached:
        monkeypatch.setattr(al, "HALF_CACHE_BYTES", 0)
    layer_iter = ((i, f"layers.{i}", y) for i, y in enumerate(layers))
    _, again = al.layer_search_tables(vision, "l", layer_iter, halves, k=5)
    # 6 batches: the vision halves once (cached) or for each of the 2 LLM layers, the LLM's
    # for each layer
    assert max(sizes) == 2 and len(sizes) == (6 if cached else 12) + 12
    pd.testing.assert_frame_equal(again, held)


def test_one_layer_best_everywhere_is_chosen_on_every_half(unbiased):
    _, _, _, table, held, _, out = unbiased
    assert list(held.columns) == al.HELDOUT_LAYER_COLUMNS
    assert table.loc[table["chosen"], "llm_layer"].item() == 1
    assert (held["llm_layer"] == 1).all() and held["same_as_full"].all()
    assert (held["full_layer"] == 1).all() and (held["n_stimuli"] == 80).all()
    # both rules then evaluate the same layer: identical rows
    h = out[out["layer_rule"] == "heldout"].drop(columns="layer_rule").reset_index(drop=True)
    f = out[out["layer_rule"] == "full"].drop(columns="layer_rule").reset_index(drop=True)
    pd.testing.assert_frame_equal(h, f)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_layer_collapsed_on_half_a_is_not_chosen_there(seed):
    """A layer whose rows in half A of split 0 are one point (plus 1e-7 of the vision features)
    is valid on the full set (21% of its rows unresolved) but collapsed on that half (70%): it
    was chosen there by rounding's luck, with stability ∞; now the other layer is."""
    rng = np.random.default_rng(seed)
    m = 120
    z = rng.standard_normal((m, 8))
    vision = mt.prepare_layer((z @ rng.standard_normal((8, 32))).astype(np.float32), 1e30)
    weak = z @ rng.standard_normal((8, 24)) + 20 * rng.standard_normal((m, 24))
    halves = sel.split_halves(m, 4, 0)[0]
    one_point = halves[0][: int(0.7 * halves.shape[1])]
    partial = weak.copy()
    partial[one_point] = rng.standard_normal(24) + 1e-7 * (
        vision[one_point, :24] / np.abs(vision[:, :24]).max()
    )
    layers = [
        (i, name, mt.prepare_layer(x.astype(np.float32), 1e30))
        for i, (name, x) in enumerate((("weak", weak), ("partial", partial)))
    ]
    table, held = al.layer_search_tables(
        {"v": (0, vision)}, "l", iter(layers), halves, k=5, metrics=("cknna",)
    )
    assert table["valid"].all() and np.isfinite(table["stability"]).all()
    split0 = held[held["split"] == 0].iloc[0]
    assert split0["layer_name"] == "weak" and np.isfinite(split0["stability"])
    assert np.isfinite(held["stability"]).all()
    weak_a = mt.cknna(vision[halves[0]], layers[0][2][halves[0]], 5)
    assert split0["value"] == pytest.approx(weak_a, abs=1e-6)


def test_heldout_choice_against_brute_force(unbiased):
    vision, layers, _, _, held, _, _ = unbiased
    x = vision["v"][1]
    halves = sel.split_halves(160, 12, 0)[0]
    for r in held.itertuples():
        a = list(halves[r.split])
        values = [mt.cknna(x[a], y[a], 5) for y in layers]
        assert r.llm_layer == int(np.argmax(values))
        assert r.value == pytest.approx(max(values), abs=1e-6)


def test_heldout_conditions_against_brute_force(unbiased):
    vision, layers, scores, _, held, sets, out = unbiased
    x = vision["v"][1]
    pos = {s: i for i, s in enumerate(_ids(160))}
    assert list(out.columns) == al.HELDOUT_COLUMNS
    assert len(out) == 12 * 2 * 2  # splits × summaries × layer rules
    for r in out[out["split"].isin([0, 5])].itertuples():
        part = sets[sets["split"] == r.split]
        y = layers[r.llm_layer]

        def value(name, summary, draw=0, part=part, y=y):
            g = part[(part["set"] == name) & (part["summary"] == summary) & (part["draw"] == draw)]
            idx = sorted(pos[s] for s in g["stimulus_id"])
            return mt.cknna(x[idx], y[idx], 5)

        low, high = value("low", r.summary), value("high", r.summary)
        rand = [value("random", "none", d) for d in range(6)]
        assert (r.low, r.high) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
        assert r.diff_low_high == pytest.approx(low - high, abs=1e-6)
        assert r.random_mean == pytest.approx(np.mean(rand), abs=1e-6)
        assert r.frac_random_ge_low == sum(v >= r.low for v in rand) / 6
        assert (r.n_stimuli, r.n_random) == (20, 6)  # K_B = 40 · 80/160


def test_planted_selection_bias_shrinks_the_heldout_contrast():
    vision, layers, scores = _layers_case(160, 0, biased=True)
    table, held, _, out = _heldout_run(vision, layers, scores, n_splits=20)
    assert table.loc[table["chosen"], "llm_layer"].item() == 1  # best on the full set
    assert (held["llm_layer"] == 0).any()  # not on every half that misses the few stimuli
    pairs = heldout_pairs(out).set_index(["summary", "layer_rule"])
    for summary in ("mean", "pc1"):
        heldout = pairs.loc[(summary, "heldout"), "diff_mean"]
        full = pairs.loc[(summary, "full"), "diff_mean"]
        assert heldout < full - 0.03, (summary, heldout, full)
    summ = heldout_summary_table(out)
    assert list(summ.columns) == HELDOUT_SUMMARY_COLUMNS
    rows = summ.set_index(["summary", "layer_rule"])
    assert rows.loc[("mean", "heldout"), "median_diff"] < rows.loc[("mean", "full"), "median_diff"]
    frac_same = float(held["same_as_full"].mean())
    assert rows.loc[("mean", "heldout"), "median_frac_same_layer"] == pytest.approx(frac_same)


def test_layer_search_table_is_unchanged_by_the_heldout_pass(unbiased):
    vision, layers, _, table, _, _, _ = unbiased
    plain = al.layer_search_table(
        vision, "l", ((i, f"layers.{i}", y) for i, y in enumerate(layers)), k=5
    )
    pd.testing.assert_frame_equal(plain, table)


def test_heldout_pairs_and_summary_against_loops():
    rows = []
    # pair a: low − high = 0.1, 0.3 (held out, layers 2, 3), 0.2, 0.4 (full, layer 2)
    for split, (lo_h, lo_f, layer) in enumerate([(0.5, 0.6, 2), (0.7, 0.8, 3)]):
        for rule, low, lay in (("heldout", lo_h, layer), ("full", lo_f, 2)):
            rows.append(("a", rule, split, lay, low, 0.4, 0.45, 2e-3 if rule == "full" else 0.0))
    # pair b: one undefined split under the held-out rule
    for split, low in enumerate([0.3, np.nan]):
        for rule in ("heldout", "full"):
            value = low if rule == "heldout" else 0.35
            rows.append(("b", rule, split, 1, value, 0.4, 0.38, 0.0))
    t = pd.DataFrame(rows, columns=["vision", "layer_rule", "split", "llm_layer", "low", "high",
                                    "random_mean", "low_stability"])  # fmt: skip
    t["llm"], t["metric"], t["summary"] = "l", "cknna", "mean"
    t["high_stability"] = 0.0
    t["diff_low_high"] = t["low"] - t["high"]
    p = heldout_pairs(t).set_index(["vision", "layer_rule"])
    a = p.loc[("a", "heldout")]
    assert a.diff_mean == pytest.approx(0.2) and a.frac_splits_low_gt_high == 1.0
    assert a.diff_lo == pytest.approx(0.1 + 0.025 * 0.2) and a.diff_hi == pytest.approx(0.3 - 0.005)
    assert a.frac_same_layer == 0.5 and p.loc[("a", "full"), "frac_same_layer"] == 0.5
    assert p.loc[("a", "full"), "low_stability"] == pytest.approx(2e-3)
    b = p.loc[("b", "heldout")]
    assert np.isnan(b.diff_mean) and np.isnan(b.low_mean) and np.isnan(b.diff_lo)
    assert np.isnan(b.frac_splits_low_gt_high)  # a split undefined: n/a, as the means
    s = heldout_summary_table(t).set_index("layer_rule")
    assert (s.loc["heldout", "n_pairs"], s.loc["heldout", "n_valid"]) == (2, 1)
    assert s.loc["full", "n_valid"] == 2 and s.loc["full", "n_unstable"] == 1
    assert s.loc["full", "n_low_gt_high"] == 1  # a (0.3 > 0); b: 0.35 < 0.4
    assert s.loc["full", "n_low_gt_random_gt_high"] == 1  # a: 0.7 > 0.45 > 0.4; b: 0.35 < 0.38
    assert s.loc["heldout", "median_diff"] == pytest.approx(0.2)
    assert s.loc["full", "median_diff"] == pytest.approx(np.median([0.3, -0.05]))


def test_pipeline_refuses_heldout_sets_that_touch_half_a():
    from xmodal.pipeline import _check_halves, heldout_choices

    m, seed = 30, 2
    ids = _ids(m)
    sets = sel.heldout_sets(ids, np.arange(m), np.arange(m), 8, 3, 4, seed, knn_k=2)
    _check_halves(sets, ids, 4, seed, "heldout_sets.tsv")  # the same seed: consistent
    with pytest.raises(ValueError, match="heldout_sets.tsv: split 0 has .* stimuli in half A"):
        _check_halves(sets, ids, 4, seed + 1, "heldout_sets.tsv")
    table = pd.DataFrame({"vision": ["v", "v"], "metric": "cknna", "split": [0, 0],
                          "llm_layer": [1, 2]})  # fmt: skip
    with pytest.raises(ValueError, match="more than one held-out layer"):
        heldout_choices(table, "heldout_layers.tsv")


def test_sets_with_neighbours_over_half_of_them_are_refused_before_any_job():
    """k above half a scored set's size: CKNNA's neighbour sets cover most of the set and its
    values left [−1, 1] (reviewer: 100 stimuli, set_size 25, the default knn_k 10 and the
    held-out layer on gave sets of 13 and 236 of 480 'low' values above 1, exit 0). Every
    scored set must hold at least max(4, 2k): the main sets, the held-out sets, the drop sets."""
    from xmodal.config import ConfigError, check_against_stimuli, min_set_size

    assert [min_set_size(k) for k in (1, 2, 3, 10)] == [4, 4, 6, 20]
    ana = {"set_size": 25, "knn_k": 10, "drop_fraction": 0.25, "heldout_layer": {"enabled": True}}
    with pytest.raises(ConfigError, match=r"half B of the 100 stimuli would hold 13.*knn_k"):
        check_against_stimuli({"analysis": ana}, 100)
    check_against_stimuli({"analysis": {**ana, "heldout_layer": {"enabled": False}}}, 100)
    check_against_stimuli({"analysis": {**ana, "set_size": 40}}, 100)  # half-B sets of 20
    with pytest.raises(ConfigError, match=r"'analysis.knn_k' \(10\) is more than half"):
        check_against_stimuli({"analysis": {**ana, "set_size": 19}}, 100)
    with pytest.raises(ConfigError, match=r"drop_fraction.*keeps 10.*max\(4, 2 × knn_k\) = 12"):
        check_against_stimuli({"analysis": {**ana, "set_size": 12, "knn_k": 6,
                                            "drop_fraction": 0.75}}, 38)  # fmt: skip
