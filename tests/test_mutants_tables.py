"""Mutation audit of the summary tables, properties, language-side dispersion, diagnostics and
pipeline tables (2026-12-06): 105 planted changes, 16 of which moved a number or a count in a
table while every test passed; each test here fails on the mutant its docstring names."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from PIL import Image

from xmodal.dispersion import stable_rank
from xmodal.features import write_features
from xmodal.io import read_table, write_table
from xmodal.language_dispersion import correlation_table, joint_sets
from xmodal.pipeline import _gpa_and_dispersion, run_stimulus_properties
from xmodal.properties import grey_entropy, image_properties
from xmodal.summary import (
    STABILITY_THRESHOLD,
    drop_summary_table,
    heldout_pairs,
    heldout_summary_table,
    self_selection_summary_table,
    summary_table,
    unstable,
)


def contrasts(rows: list[tuple], **columns) -> pd.DataFrame:
    """(vision, low, high, random_mean) → contrasts rows of CKNNA, mean dispersion, one LLM,
    with an interval above 0 and the fraction of random sets ≥ low 0; ``columns`` added."""
    df = pd.DataFrame(rows, columns=["vision", "low", "high", "random_mean"])
    df = df.assign(
        llm="l",
        metric="cknna",
        summary="mean",
        diff_ci_low=0.01,
        diff_ci_high=0.2,
        frac_random_ge_low=0.0,
    )
    df["diff_low_high"] = df["low"] - df["high"]
    return df.assign(**columns)


def heldout(rows: list[tuple], **columns) -> pd.DataFrame:
    """(vision, split, low, high, random_mean) → held-out rows (CKNNA, mean, rule heldout,
    layer 1, stabilities 0 unless ``columns`` say otherwise)."""
    t = pd.DataFrame(rows, columns=["vision", "split", "low", "high", "random_mean"])
    t = t.assign(llm="l", metric="cknna", summary="mean", layer_rule="heldout", llm_layer=1,
                 low_stability=0.0, high_stability=0.0)  # fmt: skip
    t["diff_low_high"] = t["low"] - t["high"]
    return t.assign(**columns)


# ---------------------------------------------------------------- summary_table


def test_a_stability_equal_to_the_threshold_is_not_unstable():
    """Docs: flagged when the stability *exceeds* 1e-3. Kills S02 (``>=``), which flagged a
    stability of exactly 1e-3."""
    con = contrasts([("a", 0.5, 0.3, 0.4), ("b", 0.5, 0.3, 0.4), ("c", 0.5, 0.3, 0.4)])
    con["low_stability"] = [STABILITY_THRESHOLD, np.nextafter(STABILITY_THRESHOLD, 1), 0.0]
    con["high_stability"] = 0.0
    assert unstable(con, ("low_stability",)).tolist() == [False, True, False]
    assert summary_table(con).iloc[0].n_unstable == 1


@pytest.mark.parametrize("flags", [[1, 0, 1], ["1", "0", "1"], ["True", "False", "true"]])
def test_layer_tied_counts_a_true_written_as_1(flags):
    """``layer_tied`` as written or read back (True, true, 1) counts. Kills S04 (only
    ``true`` read as True: a column of 1/0 gave n_layer_tied 0)."""
    con = contrasts([("a", 0.5, 0.3, 0.4), ("b", 0.5, 0.3, 0.4), ("c", 0.5, 0.3, np.nan)])
    con["layer_tied"] = flags
    # pair c is not valid (no random mean): only a is counted
    assert summary_table(con).iloc[0].n_layer_tied == 1


def test_a_grid_pair_with_an_undefined_random_draw_is_not_valid():
    """A pair filled from the grid whose random draws include a NaN has no random mean (never
    averaged over the other draws): it is not valid and not counted. Kills S05 (the grid's
    random mean over the finite draws: 0.3, so the pair counted as low > random > high)."""
    grid = pd.DataFrame(
        [
            ("v", "l", "low", "mean", 0, 0.4),
            ("v", "l", "high", "mean", 0, 0.2),
            ("v", "l", "random", "none", 0, 0.3),
            ("v", "l", "random", "none", 1, np.nan),
        ],
        columns=["vision", "llm", "condition", "summary", "draw", "value"],
    ).assign(metric="cknna")
    r = summary_table(contrasts([]), grid).iloc[0]
    assert (r.n_pairs, r.n_valid, r.n_low_gt_random_gt_high, r.n_low_gt_high) == (1, 0, 0, 0)


def test_low_equal_to_random_or_to_high_is_not_above_it():
    """Strict orders: low = random (0.4) is not low > random > high, and low = high (0.3) is
    not low > high. Kills S11 (``low >= rnd``) and S12 (``low >= high``)."""
    con = contrasts([("a", 0.4, 0.2, 0.4), ("b", 0.3, 0.3, 0.3), ("c", 0.5, 0.2, 0.3)])
    r = summary_table(con).iloc[0]
    assert r.n_low_gt_random_gt_high == 1  # c only
    assert r.n_low_gt_high == 2  # a and c


def test_median_fraction_is_over_the_valid_pairs_only():
    """``median_frac_random_ge_low`` is over the n_valid pairs: a pair without a high value has
    a finite fraction (0.9) that must be left out. Kills S18 (the fraction of every pair: the
    median of 0.1, 0.3 and 0.9 is 0.3, not 0.2)."""
    con = contrasts([("a", 0.5, 0.3, 0.4), ("b", 0.5, 0.3, 0.4), ("c", 0.5, np.nan, 0.4)])
    con["frac_random_ge_low"] = [0.1, 0.3, 0.9]
    r = summary_table(con).iloc[0]
    assert r.n_valid == 2
    assert r.median_frac_random_ge_low == pytest.approx(0.2)


def test_self_selection_summary_keeps_the_metrics_of_the_self_selection_table():
    """The ``all`` rows are the main contrasts restricted to the self-selection table's metrics
    and summaries. Kills S35 (the metric filter lost: the contrasts' CKA rows appeared as
    ``all`` rows without an ``others`` row beside them)."""
    con = pd.concat(
        [contrasts([("a", 0.5, 0.3, 0.4)]), contrasts([("a", 0.2, 0.3, 0.25)], metric="cka")],
        ignore_index=True,
    )
    own = contrasts([("a", 0.45, 0.35, 0.4)])
    out = self_selection_summary_table(own, con)
    assert out[["sets", "metric", "summary"]].values.tolist() == [
        ["all", "cknna", "mean"],
        ["others", "cknna", "mean"],
    ]
    assert out["n_low_gt_high"].tolist() == [1, 1]


# ---------------------------------------------------------------- drop and held-out summaries


def test_drop_low_on_the_interval_end_is_not_below_it():
    """Drop low equal to the draws' lower interval end (0.25) is inside the interval, not below
    it. Kills S21 (``<=``)."""
    row = dict(vision=["a", "b"], llm="l", metric="cknna", summary="mean", full=0.3,
               drop_high=0.5, drop_low=[0.25, 0.2], random_mean=0.3, random_ci_low=0.25,
               random_ci_high=0.35, frac_random_ge_drop_high=0.0, frac_random_ge_drop_low=1.0)  # fmt: skip
    r = drop_summary_table(pd.DataFrame(row)).iloc[0]
    assert r.n_drop_low_below_random_ci == 1  # b only


def test_heldout_unstable_counts_the_high_side():
    """``n_unstable`` of the held-out summary: valid pairs whose mean low *or high* stability
    exceeds 1e-3. Kills S32 (the low side only: 0 instead of 1)."""
    t = heldout([("a", 0, 0.5, 0.3, 0.4), ("a", 1, 0.5, 0.3, 0.4)], high_stability=[0.0, 0.004])
    assert heldout_pairs(t).iloc[0].high_stability == pytest.approx(0.002)
    assert heldout_summary_table(t).iloc[0].n_unstable == 1


def test_heldout_mean_stability_is_nan_when_a_split_has_none():
    """A pair's low_stability is the mean of its splits' (docs: ``mean_stability``, NaN when a
    draw's is), never the mean over the splits that have one. Kills S33 (``np.nanmean``:
    0.002)."""
    t = heldout([("a", 0, 0.5, 0.3, 0.4), ("a", 1, 0.5, 0.3, 0.4)], low_stability=[0.002, np.nan])
    assert np.isnan(heldout_pairs(t).iloc[0].low_stability)


def test_heldout_random_equal_to_high_is_not_between():
    """Mean random 0.3 equal to mean high 0.3 is not low > random > high. Kills S36
    (``rnd >= high``)."""
    t = heldout([("a", 0, 0.5, 0.3, 0.3), ("b", 0, 0.5, 0.3, 0.4)])
    s = heldout_summary_table(t).iloc[0]
    assert (s.n_low_gt_high, s.n_low_gt_random_gt_high) == (2, 1)


# ---------------------------------------------------------------- properties


def test_a_flat_image_has_entropy_plus_zero():
    """A one-level histogram gives −(1·log₂ 1) = −0.0, written ``-0.0`` in the properties
    table; the entropy is 0 (docs: a flat grey image has entropy 0). Kills P19 (the
    ``max(0.0, ·)`` dropped)."""
    flat = np.full((8, 8, 3), 128, dtype=np.uint8)
    e = grey_entropy(flat)
    assert e == 0.0 and math.copysign(1.0, e) == 1.0


# ---------------------------------------------------------------- language-side dispersion


def _disp(ids: list[str], mean: np.ndarray, pc1: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"stimulus_id": ids, "position": range(len(ids)), "mean_dispersion": mean,
         "pc1_score": pc1, "rank_mean": stable_rank(mean), "rank_pc1": stable_rank(pc1)}
    )  # fmt: skip


def test_joint_sets_of_exactly_the_smallest_size_are_accepted():
    """Docs: n < max(4, 2k) is an error, so n = 2k = 6 (k = 3) is accepted. Kills L13 (``n <=
    min_set_size``: a ConfigError)."""
    rng = np.random.default_rng(0)
    m = 60
    ids = [f"s{j}" for j in range(m)]
    sets = joint_sets(
        _disp(ids, *rng.normal(size=(2, m))), _disp(ids, *rng.normal(size=(2, m))), 6, 2, 3, 0
    )
    assert (sets.groupby(["set", "summary", "draw"]).size() == 6).all()


def test_the_correlation_reason_names_the_constant_modality():
    """A constant language dispersion has no correlation; the reason names it, not the vision
    side. Kills L16 (vision and language passed to the correlation swapped: the numbers are
    symmetric, the reason said "constant vision dispersion")."""
    rng = np.random.default_rng(1)
    m = 12
    ids = [f"s{j}" for j in range(m)]
    vision = _disp(ids, *rng.normal(size=(2, m)))
    language = _disp(ids, np.ones(m), np.ones(m))
    t = correlation_table(vision, language, n_boot=0, seed=0)
    assert t["estimate"].isna().all()
    assert (t["reason"] == "constant language dispersion").all()


# ---------------------------------------------------------------- pipeline tables


def test_rho_of_dispersion_and_distance_uses_average_ranks_of_ties(tmp_path):
    """gpa.json's ``rho_dispersion_distance`` is Spearman's ρ (Pearson's r of average ranks, as
    scipy.stats.spearmanr). Repeated stimuli tie both columns exactly. Kills PL03 (ranks by
    order of appearance, ``rank(method="first")``: −0.678 instead of −0.714)."""
    rng = np.random.default_rng(0)
    z = rng.standard_normal((6, 4))
    reps = []
    for w in (5, 6, 7):
        r = z @ rng.standard_normal((4, w)) + 0.3 * rng.standard_normal((6, w))
        reps.append(np.vstack([r, r]))  # stimulus j + 6 repeats stimulus j in every model
    ids = [f"s{j}" for j in range(12)]
    out = [tmp_path / n for n in ("r.tsv", "d.tsv", "g.json")]
    _gpa_and_dispersion(ids, ["a", "b", "c"], reps, 1e-10, 500, *out, "vision")
    t = read_table(out[1])
    assert t.duplicated(["mean_dispersion", "mean_distance"]).sum() == 6  # the ties are there
    want = scipy.stats.spearmanr(t["mean_dispersion"], t["mean_distance"])[0]
    got = json.loads(out[2].read_text())["rho_dispersion_distance"]
    assert got == pytest.approx(want, abs=1e-12)


def test_a_stimulus_missing_from_the_feature_file_has_no_token_count(tmp_path):
    """Docs: a stimulus left out of extraction (stimuli.drop_duplicates) has NaN token counts,
    the others the file's, in manifest order. Kills PL05 (0 tokens for the missing stimulus,
    which entered the correlation with dispersion as a caption of length 0)."""
    rng = np.random.default_rng(0)
    lines = ["stimulus_id\timage\tcaption"]
    for j in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / f"{j}.png")
        lines.append(f"s{j}\t{j}.png\tcaption {j}")
    manifest = tmp_path / "manifest.tsv"
    manifest.write_text("\n".join(lines) + "\n")
    man = pd.DataFrame({"stimulus_id": ["s0", "s1", "s2"], "image": ["0.png", "1.png", "2.png"]})
    write_table(image_properties(man, tmp_path), tmp_path / "images.tsv")
    feats = rng.normal(size=(2, 2, 4)).astype(np.float32)
    attrs = {"model_key": "lm", "modality": "language"}
    lm = write_features(
        tmp_path / "lm.h5", feats, ["s2", "s0"], ["e", "l0"], attrs, n_tokens=[9, 5]
    )
    run_stimulus_properties(manifest, tmp_path / "images.tsv", [lm], ["lm"], tmp_path / "p.tsv")
    table = read_table(tmp_path / "p.tsv")
    tokens = table[table["property"] == "caption_tokens"]
    assert tokens["stimulus_id"].tolist() == ["s0", "s1", "s2"]
    np.testing.assert_array_equal(tokens["value"].to_numpy(float), [5.0, np.nan, 9.0])
