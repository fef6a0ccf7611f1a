"""Mutation audit of the summary tables, properties, language-side dispersion, diagnostics and
pipeline tables (2026-12-06): 105 planted changes, 16 of which moved a number or a count in a
table while every test passed; each test here fails on the mutant its docstring names. The
summaries' tests stand beside their twins in test_summary.py and test_controls.py."""

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
