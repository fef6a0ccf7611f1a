"""Language-side dispersion: layer choice, GPA across LLMs on planted per-caption noise, the
correlation with vision dispersion against scipy, and the 2 × 2 sets (sizes, membership,
alignment against a direct CKNNA)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
from _planted import planted_reps
from hypothesis import given, settings
from hypothesis import strategies as st

from xmodal import gpa
from xmodal.config import ConfigError
from xmodal.dispersion import dispersion_table, stable_rank
from xmodal.features import write_features
from xmodal.io import read_table, write_table
from xmodal.language_dispersion import (
    CELLS,
    LanguageDispersionSettings,
    cell_table,
    chosen_llm_layer,
    correlation_table,
    joint_sets,
    language_layers,
    relative_depth_layer,
)
from xmodal.metrics import cknna, prepare_layer, threshold_from_quantiles
from xmodal.pipeline import (
    run_joint_conditions,
    run_joint_sets,
    run_language_correlation,
    run_language_gpa,
)

LLMS = ["lm-a", "lm-b", "lm-c"]


# ---------------------------------------------------------------- settings and layers


def _config(n_llm: int = 2, **ld) -> dict:
    models = {f"v{i}": {"modality": "vision"} for i in range(3)}
    models |= {f"l{i}": {"modality": "language"} for i in range(n_llm)}
    analysis = {"language_dispersion": ld} if ld else {}
    return {"models": models, "analysis": analysis}


def test_settings_defaults_and_errors():
    s = LanguageDispersionSettings.from_config(_config())
    assert s.enabled and s.layer == "chosen" and s.uses_chosen
    s = LanguageDispersionSettings.from_config(_config(layer=0.66))
    assert s.layer == 0.66 and not s.uses_chosen
    assert LanguageDispersionSettings.from_config(_config(layer=1)).layer == 1.0
    for bad in (1.5, -0.1, "last", True):
        with pytest.raises(ConfigError, match="analysis.language_dispersion.layer"):
            LanguageDispersionSettings.from_config(_config(layer=bad))
    with pytest.raises(ConfigError, match="at least 2"):
        LanguageDispersionSettings.from_config(_config(n_llm=1))
    assert not LanguageDispersionSettings.from_config(_config(n_llm=1, enabled=False)).enabled


@given(st.integers(0, 1000), st.integers(1, 120))
def test_relative_depth_layer_rounds_the_written_depth_half_up(thousandths, n_layers):
    """⌊d·L + ½⌋ of d as written: in floats 0.58 · 25 = 14.499999…, and a depth halfway between
    two hidden states (0.58 of 26, 0.7 of 46) picked the lower one."""
    from fractions import Fraction

    d = thousandths / 1000
    exact = Fraction(thousandths, 1000) * (n_layers - 1) + Fraction(1, 2)
    assert relative_depth_layer(d, n_layers) == exact.numerator // exact.denominator
    assert relative_depth_layer(0.58, 26) == 15 and relative_depth_layer(0.7, 46) == 32


def test_relative_depth_layer_values():
    # 5 hidden states (embeddings + 4 blocks): index floor(d * 4 + 1/2)
    assert [relative_depth_layer(d, 5) for d in (0, 0.1, 0.125, 0.5, 0.66, 0.875, 1)] == [
        0, 0, 1, 2, 3, 4, 4,
    ]  # fmt: skip
    assert relative_depth_layer(0.66, 1) == 0
    with pytest.raises(ValueError):
        relative_depth_layer(1.2, 5)


@given(st.floats(0, 1), st.integers(1, 200))
def test_relative_depth_layer_is_the_nearest_index(d, n):
    i = relative_depth_layer(d, n)
    assert 0 <= i < n
    # no other index is strictly nearer to d·(n − 1)
    target = d * (n - 1)
    assert all(abs(i - target) <= abs(j - target) + 1e-12 for j in range(n))


def _layers_table(llm: str, chosen: dict[str, int], n_layers: int = 4) -> pd.DataFrame:
    rows = []
    for vision, layer in chosen.items():
        for metric in ("cknna", "mutual_knn"):
            for i in range(n_layers):
                rows.append(
                    {"vision": vision, "llm": llm, "vision_layer": 5, "llm_layer": i,
                     "layer_name": f"layers.{i}", "metric": metric, "value": 0.1,
                     "stability": 0.0, "valid": True, "reason": "",
                     # mutual_knn always "chooses" layer 0: must be ignored
                     "chosen": i == (layer if metric == "cknna" else 0)}
                )  # fmt: skip
    return pd.DataFrame(rows)


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_chosen_llm_layer_is_the_mode_ties_to_lower(choices):
    table = _layers_table("lm", {f"v{i}": c for i, c in enumerate(choices)}, n_layers=6)
    layer, votes, n_vision = chosen_llm_layer(table, "lm")
    counts = Counter(choices)
    best = max(counts.values())
    assert votes == best and n_vision == len(choices)
    assert layer == min(c for c in counts if counts[c] == best)


def test_chosen_llm_layer_without_rows_names_the_file():
    table = _layers_table("lm", {"v0": 1})
    with pytest.raises(ValueError, match="x.tsv.*'other'.*layer_search"):
        chosen_llm_layer(table, "other", path="x.tsv")


# ---------------------------------------------------------------- GPA across planted LLMs


def _write_lm(path: Path, key: str, layers: list[np.ndarray], ids: list[str], modality="language"):
    write_features(
        path,
        np.stack(layers).astype(np.float32),
        ids,
        ["embeddings"] + [f"layers.{i}" for i in range(len(layers) - 1)],
        {"model_key": key, "modality": modality, "model_id": f"local/{key}"},
    )
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3 LLM files whose layer 2 of 4 holds rotated copies of one configuration, each caption
    perturbed by its own planted noise level sigma; other layers are unrelated noise."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("planted")
    m = 300
    ids = [f"{j:04d}" for j in range(m)]  # text ids that look like numbers
    reps, sigma = planted_reps(rng, m, 48, [48, 56, 64], 0.3)
    paths = []
    for key, x in zip(LLMS, reps, strict=True):
        other = [rng.standard_normal((m, x.shape[1])) for _ in range(3)]
        paths.append(_write_lm(root / f"{key}.h5", key, [other[0], other[1], x, other[2]], ids))
    tables = []
    for key in LLMS:
        p = root / f"layers_{key}.tsv"
        write_table(_layers_table(key, {"v0": 2, "v1": 2, "v2": 0, "v3": 3}), p)
        tables.append(p)
    return {
        "root": root,
        "ids": ids,
        "reps": reps,
        "sigma": sigma,
        "paths": paths,
        "tables": tables,
    }


@pytest.mark.parametrize("layer", ["chosen", 0.66])
def test_language_gpa_ranks_planted_caption_noise(planted, tmp_path, layer):
    out = {k: tmp_path / f"{k}.tsv" for k in ("residuals", "dispersion", "layers")}
    run_language_gpa(
        planted["paths"], LLMS, layer, 1e-10, 1000,
        out_residuals=out["residuals"], out_dispersion=out["dispersion"],
        out_layers=out["layers"], out_summary=tmp_path / "gpa.json",
        layer_tables=planted["tables"] if layer == "chosen" else (),
    )  # fmt: skip
    used = read_table(out["layers"])
    # chosen: layer 2 is the choice of 2 of 4 vision models; depth 0.66 of 4 states: index 2
    assert used["llm_layer"].tolist() == [2, 2, 2]
    assert used["layer_name"].tolist() == ["layers.1"] * 3
    assert used["rule"].iloc[0] == ("chosen" if layer == "chosen" else "depth 0.66")
    disp = read_table(out["dispersion"])
    assert disp["stimulus_id"].tolist() == planted["ids"]
    rho = scipy.stats.spearmanr(disp["mean_dispersion"], planted["sigma"]).statistic
    assert rho > 0.95, rho
    # exactly the GPA of those layers
    direct = gpa.gpa(planted["reps"])
    table, _ = dispersion_table(planted["ids"], direct.residuals)
    np.testing.assert_allclose(disp["mean_dispersion"], table["mean_dispersion"], atol=1e-6)
    res = read_table(out["residuals"])
    assert len(res) == 3 * len(planted["ids"]) and res["model"].tolist()[:3] == LLMS


def test_language_gpa_refuses_a_vision_file(planted, tmp_path):
    ids = planted["ids"]
    bad = _write_lm(tmp_path / "v.h5", "lm-c", [np.ones((len(ids), 4))] * 2, ids, "vision")
    with pytest.raises(ValueError, match="modality"):
        run_language_gpa([*planted["paths"][:2], bad], LLMS, 0.5, 1e-10, 10, *(tmp_path / "o",) * 4)


def test_language_gpa_constant_layer_names_the_key(planted, tmp_path):
    ids = planted["ids"]
    flat = _write_lm(tmp_path / "c.h5", "lm-c", [np.ones((len(ids), 4))] * 2, ids)
    with pytest.raises(ValueError, match="analysis.language_dispersion.layer"):
        run_language_gpa(
            [*planted["paths"][:2], flat], LLMS, 1.0, 1e-10, 10, *(tmp_path / "o",) * 4
        )


# ---------------------------------------------------------------- correlation with vision


def _disp(ids, mean, pc1) -> pd.DataFrame:
    return pd.DataFrame(
        {"stimulus_id": ids, "position": range(len(ids)), "mean_dispersion": mean,
         "pc1_score": pc1, "rank_mean": stable_rank(mean), "rank_pc1": stable_rank(pc1)}
    )  # fmt: skip


def test_correlation_against_scipy_and_a_brute_force_bootstrap(tmp_path):
    rng = np.random.default_rng(3)
    m, n_boot, seed = 60, 300, 7
    ids = [f"s{j}" for j in range(m)]
    v_mean, v_pc1 = rng.gamma(2, 1, m), rng.normal(size=m)
    l_mean = v_mean + rng.normal(0, 1.5, m)
    l_pc1 = -0.5 * v_pc1 + rng.normal(0, 1, m)
    vision = _disp(ids, v_mean, v_pc1)
    order = rng.permutation(m)  # the language table in another order: matched by id
    language = _disp([ids[j] for j in order], l_mean[order], l_pc1[order])
    write_table(vision, tmp_path / "v.tsv")
    write_table(language, tmp_path / "l.tsv")
    run_language_correlation(
        tmp_path / "v.tsv", tmp_path / "l.tsv", n_boot, seed, tmp_path / "c.tsv"
    )
    table = read_table(tmp_path / "c.tsv").set_index(["summary", "method"])
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    for summary, x, y in (("mean", v_mean, l_mean), ("pc1", v_pc1, l_pc1)):
        for method, fn in (("spearman", scipy.stats.spearmanr), ("pearson", scipy.stats.pearsonr)):
            row = table.loc[(summary, method)]
            ref = fn(x, y)
            assert row["estimate"] == pytest.approx(ref.statistic, abs=1e-12)
            assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
            boot = np.array([fn(x[i], y[i]).statistic for i in idx])
            lo, hi = np.quantile(boot, [0.025, 0.975])
            assert row["ci_low"] == pytest.approx(lo, abs=1e-10)
            assert row["ci_high"] == pytest.approx(hi, abs=1e-10)
            assert row["n"] == m and row["n_boot"] == n_boot and row["reason"] == ""


def test_correlation_refuses_different_stimuli():
    a = _disp(["a", "b", "c"], [1, 2, 3], [1, 2, 3])
    b = _disp(["a", "b", "d"], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="different stimuli"):
        correlation_table(a, b, 10, 0)


# ---------------------------------------------------------------- the 2 x 2 sets


def _halves(scores: np.ndarray) -> np.ndarray:
    """True for the high half of a stable ascending sort (the first floor(m/2) are low)."""
    order = np.argsort(scores, kind="stable")
    high = np.zeros(scores.size, dtype=bool)
    high[order[scores.size // 2 :]] = True
    return high


def _ranks(scores: np.ndarray) -> np.ndarray:
    r = np.empty(scores.size, dtype=int)
    r[np.argsort(scores, kind="stable")] = np.arange(scores.size)
    return r


@settings(max_examples=40, deadline=None)
@given(
    st.integers(24, 90),
    st.floats(-0.9, 0.9),
    st.integers(5, 40),
    st.integers(0, 2**16),
    st.booleans(),
)
def test_joint_sets_sizes_and_membership(m, corr, set_size, seed, ties):
    rng = np.random.default_rng(seed)
    ids = [f"{j:03d}" for j in range(m)]
    v = rng.normal(size=(m, 2))
    lang = corr * v + np.sqrt(1 - corr**2) * rng.normal(size=(m, 2))
    if ties:  # rounded scores: ties resolved by manifest order
        v, lang = np.round(v, 0), np.round(lang, 0)
    vision, language = _disp(ids, v[:, 0], v[:, 1]), _disp(ids, lang[:, 0], lang[:, 1])
    cols = {"mean": 0, "pc1": 1}
    # brute force: cell members per summary, n = min(set_size, smallest cell)
    members, depth = {}, {}
    for s, c in cols.items():
        hv, hl = _halves(v[:, c]), _halves(lang[:, c])
        rv, rl = _ranks(v[:, c]), _ranks(lang[:, c])
        for name, vl, ll in CELLS:
            sel = [j for j in range(m) if hv[j] == (vl == "high") and hl[j] == (ll == "high")]
            members[(s, name)] = sel
            depth[(s, name)] = {
                j: (rv[j] if vl == "high" else m - 1 - rv[j])
                + (rl[j] if ll == "high" else m - 1 - rl[j])
                for j in sel
            }
    n = min(set_size, *(len(x) for x in members.values()))
    if n < 20:  # knn_k = 10: a set needs at least 2k stimuli (xmodal.config.min_set_size)
        with pytest.raises(ConfigError, match="analysis.knn_k"):
            joint_sets(vision, language, set_size, 5, 10, seed)
        return
    sets = joint_sets(vision, language, set_size, 5, 10, seed)
    for (s, name), sel in members.items():
        got = sets[(sets["set"] == name) & (sets["summary"] == s)]["stimulus_id"].tolist()
        assert len(got) == n and len(set(got)) == n
        # the n deepest in the corner, ties by manifest order
        want = sorted(sel, key=lambda j, d=depth[(s, name)]: (-d[j], j))[:n]
        assert got == [ids[j] for j in want]
    rand = sets[sets["set"] == "random"]
    assert rand["draw"].nunique() == 5 and (rand.groupby("draw").size() == n).all()
    assert (rand.groupby("draw")["stimulus_id"].nunique() == n).all()
    assert set(sets["summary"]) == {"mean", "pc1", "none"}


def test_joint_sets_independent_dispersions_use_set_size(tmp_path):
    rng = np.random.default_rng(1)
    m = 400
    ids = [str(j) for j in range(m)]
    write_table(_disp(ids, *rng.normal(size=(2, m))), tmp_path / "v.tsv")
    write_table(_disp(ids, *rng.normal(size=(2, m))), tmp_path / "l.tsv")
    run_joint_sets(tmp_path / "v.tsv", tmp_path / "l.tsv", 40, 3, 10, 0, tmp_path / "s.tsv")
    sets = read_table(tmp_path / "s.tsv")
    sizes = sets.groupby(["set", "summary", "draw"]).size()
    assert (sizes == 40).all() and len(sizes) == 8 + 3  # 4 cells x 2 summaries + 3 draws


def test_joint_sets_too_small_when_dispersions_agree():
    m = 100
    ids = [str(j) for j in range(m)]
    x = np.arange(m, dtype=float)
    # language = vision: the off-diagonal cells are empty
    with pytest.raises(ConfigError, match="vlow_lhigh.*strongly related"):
        joint_sets(_disp(ids, x, x), _disp(ids, x, x), 20, 3, 10, 0)


def test_cell_table_against_the_random_draws():
    rng = np.random.default_rng(2)
    rows = []
    rand = rng.normal(0.2, 0.02, 50)
    for d, v in enumerate(rand):
        rows.append(("v", "l", 3, "random", "none", d, 12, "cknna", v, 0.0))
    for name, _, _ in CELLS:
        for s in ("mean", "pc1"):
            rows.append(("v", "l", 3, name, s, 0, 12, "cknna", rng.normal(0.2, 0.05), 0.0))
    rows.append(("v", "l", 3, "full", "none", 0, 200, "cknna", 0.3, 0.0))
    cond = pd.DataFrame(
        rows,
        columns=["vision", "llm", "llm_layer", "condition", "summary", "draw", "n_stimuli",
                 "metric", "value", "stability"],
    )  # fmt: skip
    cells = cell_table(cond)
    assert len(cells) == 8
    for r in cells.itertuples():
        assert r.random_mean == pytest.approx(rand.mean())
        assert r.random_ci_low == pytest.approx(np.quantile(rand, 0.025))
        assert r.random_ci_high == pytest.approx(np.quantile(rand, 0.975))
        assert r.frac_random_ge == pytest.approx(np.mean(rand >= r.value))
        assert (r.vision_level, r.language_level) == {c[0]: c[1:] for c in CELLS}[r.cell]
        assert r.n_stimuli == 12 and r.n_random == 50


def test_joint_conditions_equal_cknna_on_each_set(tmp_path):
    """The per-LLM job: every 2 x 2 set's value is CKNNA of the prepared features restricted
    to it, at the LLM layer chosen for that vision model."""
    rng = np.random.default_rng(4)
    m, k = 120, 5
    ids = [f"id{j}" for j in range(m)]
    z = rng.normal(size=(m, 6))
    vision_paths, vision, vision_layers = [], ["va", "vb", "vc"], {}
    for key in vision:
        layers = [z @ rng.normal(size=(6, 16)) + 0.5 * rng.normal(size=(m, 16)) for _ in range(3)]
        vision_layers[key] = layers
        vision_paths.append(_write_lm(tmp_path / f"{key}.h5", key, layers, ids, "vision"))
    llm_layers = [z @ rng.normal(size=(6, 10)) + s * rng.normal(size=(m, 10)) for s in (2, 0.3, 1)]
    llm_path = _write_lm(tmp_path / "lm.h5", "lm", llm_layers, ids)
    chosen = {"va": 1, "vb": 2, "vc": 1}
    layers_table = _layers_table("lm", chosen, n_layers=3)
    # the layer search could not tell vb's CKNNA layer from another; va's mutual-kNN choice is
    # tied too, but the 2 x 2 sets use the CKNNA layer
    layers_table["layer_tied"] = layers_table["chosen"] & (
        ((layers_table["vision"] == "vb") & (layers_table["metric"] == "cknna"))
        | ((layers_table["vision"] == "va") & (layers_table["metric"] == "mutual_knn"))
    )
    write_table(layers_table, tmp_path / "layers.tsv")
    vdisp = _disp(ids, rng.normal(size=m), rng.normal(size=m))
    ldisp = _disp(ids, rng.normal(size=m), rng.normal(size=m))
    sets = joint_sets(vdisp, ldisp, 20, 4, k, 0)
    write_table(sets, tmp_path / "sets.tsv")
    # the config's draws: the 2 x 2 sets hold the main random draws and no drop control's
    for n_random in (5, 4):
        run = functools.partial(
            run_joint_conditions, vision_paths, llm_path, tmp_path / "layers.tsv",
            tmp_path / "sets.tsv", vision, "lm", vision_layer=-2, k=k, seed=0,
            out_conditions=tmp_path / "c.tsv", out_cells=tmp_path / "x.tsv",
            draws={"random": n_random, "random_drop": 7},
        )  # fmt: skip
        if n_random != 4:  # the sets were drawn with 4
            with pytest.raises(ValueError, match=r"lacks draw\(s\) \[4\] .*n_random is 5"):
                run()
            continue
        run()
    cond, cells = read_table(tmp_path / "c.tsv"), read_table(tmp_path / "x.tsv")
    assert len(cells) == 3 * 8

    def prepared(layers, i):
        stack = np.stack(layers).astype(np.float32)
        q = np.quantile(np.abs(stack).transpose(1, 0, 2).reshape(m, -1), 0.95, axis=1)
        return prepare_layer(stack[i], threshold_from_quantiles(q))

    lookup = {s: i for i, s in enumerate(ids)}
    for r in cells.itertuples():
        members = sets[(sets["set"] == r.cell) & (sets["summary"] == r.summary)]["stimulus_id"]
        pos = np.array([lookup[s] for s in members])
        x = prepared(vision_layers[r.vision], 1)[pos]  # vision_layer -2 of 3 blocks
        y = prepared(llm_layers, chosen[r.vision])[pos]
        assert r.llm_layer == chosen[r.vision]
        assert r.layer_tied == (r.vision == "vb")
        assert r.value == pytest.approx(cknna(x, y, k), abs=2e-6)
        rand = cond[(cond["vision"] == r.vision) & (cond["condition"] == "random")]["value"]
        assert r.random_mean == pytest.approx(rand.mean()) and r.n_random == 4


def test_joint_random_sets_are_random_sets_of_the_seed():
    """The size-matched random sets are ``random_sets(m, n, n_random, seed)``: row r is the r-th
    ``default_rng(seed).choice(m, n, replace=False)`` (written out here), in the order of the
    vision table."""
    rng = np.random.default_rng(0)
    m = 40
    ids = [f"s{i}" for i in range(m)]
    v = _disp(ids, rng.standard_normal(m), rng.standard_normal(m))
    lang = _disp(ids, rng.standard_normal(m), rng.standard_normal(m))
    t = joint_sets(v, lang, 8, 2, 2, 3)
    n = int(((t.set == "vlow_llow") & (t.summary == "mean")).sum())
    gen = np.random.default_rng(3)
    for draw in range(2):
        want = [ids[j] for j in gen.choice(m, n, replace=False)]
        assert t[(t.set == "random") & (t.draw == draw)].stimulus_id.tolist() == want


def test_a_chosen_layer_past_the_last_is_refused_naming_the_file(tmp_path):
    """A layer search that chose layer 3 of an LLM whose feature file has 3 layers (0–2) is
    older than the file: refused with that message, not an IndexError."""
    path = tmp_path / "l.tsv"
    write_table(_layers_table("lm", {"v1": 3}), path)
    with pytest.raises(
        ValueError, match=r"chosen layer 3 of 'lm' is not among its 3 layers.*rerun"
    ):
        language_layers(["lm"], {"lm": ["a", "b", "c"]}, "chosen", {"lm": path})
    got = language_layers(["lm"], {"lm": ["a", "b", "c", "d"]}, "chosen", {"lm": path})
    assert got["llm_layer"].tolist() == [3] and got["layer_name"].tolist() == ["d"]


def test_relative_depth_of_no_layers_is_refused():
    with pytest.raises(ValueError, match="n_layers must be ≥ 1, got 0"):
        relative_depth_layer(0.9, 0)
    assert relative_depth_layer(0.9, 1) == 0


def test_n_vision_counts_the_vision_models_that_voted_for_this_llm():
    """A layers table holding another LLM's search with a third vision model: n_vision is the
    2 vision models that chose a layer of this LLM."""
    table = pd.concat([_layers_table("lm", {"v0": 1, "v1": 2}), _layers_table("other", {"v9": 0})])
    assert chosen_llm_layer(table, "lm") == (1, 1, 2)


def test_small_cells_of_a_quarter_are_not_called_strongly_related():
    """Cells of 14, 6, 6, 14 of 40: the smallest (6) is not below m/8 = 5, so the reason given is
    the cells' size (a quarter of m), not a strong relation of the dispersions."""
    m = 40
    ids = [f"s{i}" for i in range(m)]
    x = np.arange(m, dtype=float)
    order = list(range(14)) + list(range(20, 26)) + list(range(14, 20)) + list(range(26, 40))
    y = np.empty(m)
    y[order] = np.arange(m)
    with pytest.raises(ConfigError, match=r"has 6 of 40: cells of a quarter of 40 stimuli\)"):
        joint_sets(_disp(ids, x, x), _disp(ids, y, y), 20, 0, 4, 0)
