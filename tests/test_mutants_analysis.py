"""Tests that kill mutants of the analysis modules (resources, correlate, parallel,
diagnostics, language dispersion, pipeline helpers, figure data preparation).

Each test checks exact numbers from an independent computation (the formulas of the module
docstrings, scipy, brute force) or planted ground truth.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from xmodal.correlate import correlation_ci
from xmodal.resources import analysis_resources, extraction_resources, gpus_needed

# --------------------------------------------------------------------------- resources


def _reference(modality, size_b, attempt, gpu_mem_gb, num_workers, bytes_per_param, n_stimuli):
    """The resource model written out from xmodal.resources' docstrings."""
    weights = bytes_per_param * size_b
    need = weights + max(2, 0.05 * weights)
    gpu = max(1, math.ceil(need / (0.9 * gpu_mem_gb)))
    if modality == "vision":  # the decoded batches: 4 per worker, 2 in flight, 64 of 518 px
        cpus = num_workers + 1
        waiting = (4 * num_workers + 2) * 64 * 3 * 518**2 * 4 / 1e9
        mem = 8 + 8 * size_b + 0.5 * num_workers + waiting
    else:
        cpus = min(max(1, num_workers), 4)
        mem = 8 + weights
    tokens = {"vision": 1370, "language": 128}[modality]
    rate = {2: 5e13, 4: 5e12}[bytes_per_param]
    forward = math.ceil(n_stimuli * tokens * 2 * size_b * 1e9 / rate / 60)
    runtime = 30 + math.ceil(weights / 2) + forward
    return {
        "gpu": gpu,
        "mem_mb": 1024 * math.ceil(mem) * attempt,
        "runtime": runtime * attempt,
        "cpus_per_task": cpus,
    }


@pytest.mark.parametrize("modality", ["vision", "language"])
@pytest.mark.parametrize("bytes_per_param", [2, 4])
@pytest.mark.parametrize("size_b", [0.1, 1.14, 4.0, 20.0, 32.5])
@pytest.mark.parametrize(("attempt", "workers"), [(1, 0), (2, 3), (3, 8)])
def test_extraction_resources_match_the_documented_model(
    modality, bytes_per_param, size_b, attempt, workers
):
    """Guards every term of the resource model: the 2 GB activation floor (max, not min), the
    90% usable GPU memory, fp32 weights in the GPU count, host memory and the forward-pass
    runtime, workers' memory (not CPUs) and runtime from the weights' GB (not the parameters)."""
    for gpu_mem in (10, 40, 80):
        for n_stimuli in (0, 1024, 100_000):
            args = (modality, size_b, attempt, gpu_mem, workers, bytes_per_param, n_stimuli)
            ref = _reference(*args)
            if ref["gpu"] > 8:
                continue
            got = extraction_resources(
                modality,
                size_b,
                attempt,
                gpu_mem_gb=gpu_mem,
                num_workers=workers,
                bytes_per_param=bytes_per_param,
                n_stimuli=n_stimuli,
            )
            assert got == ref, args


def test_gpu_count_anchors():
    """Guards the activation floor (max(2, 5%)), the 90% usable fraction and the > max_gpus
    refusal (exactly max_gpus GPUs is allowed)."""
    # 4B in bf16: 8 GB + 2 GB floor = 10 GB > 9 GB usable of a 10 GB GPU
    assert gpus_needed(4.0, 10) == 2
    # 36B: 72 GB + 3.6 GB = 75.6 GB > 72 GB usable of an 80 GB GPU
    assert gpus_needed(36.0, 80) == 2
    # 32B: 64 + 3.2 = 67.2 GB on 9 GB usable: exactly 8 GPUs, the node's
    assert gpus_needed(32.0, 10, max_gpus=8) == 8
    with pytest.raises(ValueError, match="more than the 7"):
        gpus_needed(32.0, 10, max_gpus=7)
    # fp32 doubles the weights: 20B -> 84 GB -> 2 GPUs of 80 GB (bf16: 1)
    assert gpus_needed(20.0, 80, bytes_per_param=4) == 2
    assert gpus_needed(20.0, 80) == 1


def test_extraction_runtime_docstring_anchors():
    """Guards the runtime model: LLaMA-65B over 1024 captions 96 + 6 min, over 100,000
    96 + 557 min (the module docstring)."""
    kw = {"gpu_mem_gb": 80, "num_workers": 8}
    assert extraction_resources("language", 65.2, n_stimuli=0, **kw)["runtime"] == 96
    assert extraction_resources("language", 65.2, n_stimuli=1024, **kw)["runtime"] == 102
    assert extraction_resources("language", 65.2, n_stimuli=100_000, **kw)["runtime"] == 653


def test_vision_memory_counts_decoding_workers_not_cpus():
    """Guards 0.5 GB per decoding worker: 0 workers decode in the main process (1 CPU) and add
    no worker memory, only the two batches in flight (2 · 64 images of 518 px in float32,
    0.41 GB): 8 + 8·0.1 + 0.41 = 9.2 GB -> 10 GiB."""
    r = extraction_resources("vision", 0.1, gpu_mem_gb=80, num_workers=0)
    assert r["cpus_per_task"] == 1
    assert r["mem_mb"] == 10 * 1024


def test_analysis_cpus_do_not_grow_with_attempt():
    """Guards a retry asking for more CPUs than the kind's (only memory and runtime grow)."""
    for kind in ("light", "gpa", "pair", "figures"):
        assert (
            analysis_resources(kind, 3)["cpus_per_task"]
            == analysis_resources(kind)["cpus_per_task"]
        )
    assert analysis_resources("gpa", 2) == {"mem_mb": 16000, "runtime": 120, "cpus_per_task": 2}


# --------------------------------------------------------------------------- correlations


def test_correlation_leaves_out_infinite_values_of_either_variable():
    """Guards the finite filter: ±inf in y (not only NaN) drops the pair, as in x."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=30), rng.normal(size=30)
    y_bad = y.copy()
    y_bad[[2, 7]] = [np.inf, -np.inf]
    x_bad = x.copy()
    x_bad[5] = np.nan
    keep = np.ones(30, bool)
    keep[[2, 5, 7]] = False
    for method, fn in (("spearman", scipy.stats.spearmanr), ("pearson", scipy.stats.pearsonr)):
        out = correlation_ci(x_bad, y_bad, method=method, n_boot=0)
        ref = fn(x[keep], y[keep])
        assert out["n"] == 27
        assert out["estimate"] == pytest.approx(ref.statistic, abs=1e-12)
        assert out["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)


def test_correlation_needs_three_stimuli():
    """Guards the n ≥ 3 floor: two pairs always correlate ±1, which is no estimate."""
    out = correlation_ci([1.0, 2.0, np.nan], [3.0, 1.0, 0.0], n_boot=10)
    assert out["n"] == 2
    assert math.isnan(out["estimate"]) and math.isnan(out["p_value"])
    assert out["reason"] == "2 stimuli with finite values (need 3)"


def test_spearman_on_three_stimuli_is_scipys():
    """Guards the method dispatch at the smallest n (Spearman, not Pearson, for n = 3)."""
    x, y = np.array([0.0, 1.0, 10.0]), np.array([0.0, 2.0, 1.0])
    sp = correlation_ci(x, y, method="spearman", n_boot=0)
    assert sp["estimate"] == pytest.approx(0.5)
    pe = correlation_ci(x, y, method="pearson", n_boot=0)
    assert pe["estimate"] == pytest.approx(scipy.stats.pearsonr(x, y).statistic)


def _exact_permutation_p(x, y, statistic):
    """Two-sided exact permutation p of ``statistic(x, y[perm])`` over every permutation,
    in exact rational arithmetic (ties of the statistic are exact here)."""
    import itertools
    from fractions import Fraction

    observed = statistic(x, y)
    values = [statistic(x, [y[i] for i in perm]) for perm in itertools.permutations(range(len(y)))]
    ge = sum(v >= observed for v in values)
    le = sum(v <= observed for v in values)
    return min(Fraction(1), 2 * Fraction(min(ge, le), len(values)))


def _rational_covariance(x, y):
    from fractions import Fraction

    xs = [Fraction(v) for v in x]
    mean = sum(xs) / len(xs)
    return sum((a - mean) * Fraction(b) for a, b in zip(xs, y, strict=True))


def test_exact_spearman_p_with_tied_half_ranks_on_x():
    """Guards the doubled ranks of x (tied ranks are halves: truncated, the p was 1.0 where the
    exact permutation p over all 5! orderings is 0.8667)."""
    x, y = [1.0, 2.0, 0.0, 0.0, 2.0], [4.0, 0.0, 0.0, 3.0, 1.0]
    rx = scipy.stats.rankdata(x).tolist()
    ry = scipy.stats.rankdata(y).tolist()
    want = _exact_permutation_p(rx, ry, _rational_covariance)
    got = correlation_ci(np.array(x), np.array(y), method="spearman", n_boot=0)["p_value"]
    assert got == pytest.approx(float(want), abs=1e-12) and float(want) < 0.9


def test_exact_pearson_p_counts_ties_that_differ_by_rounding():
    """Guards the tolerance of the exact Pearson p: decimal data whose permuted statistics tie
    exactly (in rational arithmetic) but differ in float rounding; without it 0.8333 was given
    where the exact p is 0.85."""
    xs, ys = ["3.8", "1.5", "1.8", "2.7", "3.7"], ["0.8", "0.7", "1.4", "3.8", "2.2"]
    want = _exact_permutation_p(xs, ys, _rational_covariance)
    got = correlation_ci(np.array(xs, float), np.array(ys, float), method="pearson", n_boot=0)
    assert got["p_value"] == pytest.approx(float(want), abs=1e-12) and float(want) == 0.85


# --------------------------------------------------------------------------- diagnostics


def _diag(m, cos_mean, n_unresolved):
    from xmodal.diagnostics import LayerDiagnostics

    return LayerDiagnostics(
        m=m,
        dim=8,
        k=2,
        tau=0.0,
        cos_mean=cos_mean,
        cos_sd=0.0,
        eff_dim=1.0,
        unresolved=np.arange(n_unresolved, dtype=np.int64),
        duplicate_groups=(),
    )


def test_collapse_and_warning_thresholds_are_inclusive_as_documented():
    """Guards the comparisons: cos_mean ≥ 0.999 collapses (equality included); a warning needs
    more than 5% unresolved (exactly 5% is ok); ≥ COLLAPSED_UNRESOLVED collapses."""
    from xmodal.diagnostics import COLLAPSED_COS, COLLAPSED_UNRESOLVED, WARN_UNRESOLVED

    assert _diag(100, COLLAPSED_COS, 0).collapsed
    assert not _diag(100, np.nextafter(COLLAPSED_COS, 0), 0).collapsed
    at_warn = _diag(100, 0.1, round(WARN_UNRESOLVED * 100))
    assert at_warn.frac_unresolved == WARN_UNRESOLVED
    assert not at_warn.warn and not at_warn.collapsed
    assert _diag(100, 0.1, round(WARN_UNRESOLVED * 100) + 1).warn
    n_col = math.ceil(COLLAPSED_UNRESOLVED * 1000)
    assert _diag(1000, 0.1, n_col).collapsed
    assert not _diag(1000, 0.1, n_col - 1).collapsed


def test_a_boundary_gap_equal_to_tau_is_unresolved():
    """Guards gap ≤ τ (not <): orthogonal rows tie every off-diagonal cosine at 0, so with
    τ = 0 every row's kNN set is decided by the tie; distinct cosines leave none."""
    from xmodal.diagnostics import diagnose

    tied = diagnose(np.eye(5, dtype=np.float32), k=1, tau=0.0)
    assert tied.unresolved.tolist() == [0, 1, 2, 3, 4]
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 1, 0], [0, 0, 1], [0.6, 0, 0.8]], dtype=np.float32)
    assert diagnose(x, k=1, tau=0.0).unresolved.tolist() == []
    # gaps: rows 0, 1, 4 have 0.2; rows 2 and 3 have 0.6 and 0.8
    assert diagnose(x, k=1, tau=0.3).unresolved.tolist() == [0, 1, 4]


def test_diagnostics_row_names_the_first_unresolved_stimuli():
    """Guards the named ids: the first N_NAMED unresolved stimuli in row order (a JSON list),
    while n_unresolved counts them all."""
    import json

    from xmodal.diagnostics import N_NAMED

    d = _diag(40, 0.1, 15)
    ids = [f"s{i:02d}" for i in range(40)]
    row = d.row("vit", 3, "blocks.3", ids)
    assert json.loads(row["unresolved_ids"]) == ids[:N_NAMED]
    assert row["n_unresolved"] == 15 and row["frac_unresolved"] == 15 / 40
    assert json.loads(d.row("vit", 3, "blocks.3")["unresolved_ids"]) == []


# --------------------------------------------------------------------------- language dispersion


def _disp(ids, mean, pc1) -> pd.DataFrame:
    return pd.DataFrame(
        {"stimulus_id": ids, "mean_dispersion": mean, "pc1_score": pc1, "position": range(len(ids))}
    )


def _stable_ranks(x):
    r = np.empty(x.size, dtype=int)
    r[np.argsort(x, kind="stable")] = np.arange(x.size)
    return r


def _reference_cells(v, lang, set_size):
    """The 2 × 2 sets from the docstring of joint_sets, by brute force over stimuli."""
    m = v.shape[0]
    half = m // 2
    cells = {}
    for s, c in (("mean", 0), ("pc1", 1)):
        rv, rl = _stable_ranks(v[:, c]), _stable_ranks(lang[:, c])
        for name, vl, ll in (
            ("vlow_llow", "low", "low"),
            ("vlow_lhigh", "low", "high"),
            ("vhigh_llow", "high", "low"),
            ("vhigh_lhigh", "high", "high"),
        ):
            sel = [j for j in range(m) if (rv[j] >= half) == (vl == "high")]
            sel = [j for j in sel if (rl[j] >= half) == (ll == "high")]
            dv = {j: rv[j] if vl == "high" else m - 1 - rv[j] for j in sel}
            dl = {j: rl[j] if ll == "high" else m - 1 - rl[j] for j in sel}
            cells[(s, name)] = sorted(sel, key=lambda j, dv=dv, dl=dl: (-(dv[j] + dl[j]), j))
    n = min(set_size, *(len(x) for x in cells.values()))
    return n, {key: sel[:n] for key, sel in cells.items()}


@pytest.mark.parametrize(("m", "set_size", "seed"), [(201, 30, 0), (201, 999, 1), (151, 999, 5)])
def test_joint_sets_cells_are_the_deepest_in_their_halves(m, set_size, seed):
    """Guards the median split (low = ranks < ⌊m/2⌋ on both sides, odd m included), the depth
    of a low-language member (m − 1 − rank) and ties by manifest order, with cells larger than
    the set size so that the order inside a cell decides membership."""
    from xmodal.language_dispersion import joint_sets

    rng = np.random.default_rng(seed)
    ids = [f"s{j:03d}" for j in range(m)]
    v = np.round(rng.normal(size=(m, 2)), 1)  # ties: broken by manifest order
    lang = np.round(rng.normal(size=(m, 2)), 1)
    n, want = _reference_cells(v, lang, set_size)
    sets = joint_sets(_disp(ids, v[:, 0], v[:, 1]), _disp(ids, lang[:, 0], lang[:, 1]),
                      set_size, 2, 10, 0)  # fmt: skip
    for (s, name), sel in want.items():
        got = sets[(sets["set"] == name) & (sets["summary"] == s)]["stimulus_id"].tolist()
        assert got == [ids[j] for j in sel], (s, name)
    assert (sets[sets["set"] == "random"].groupby("draw").size() == n).all()


def test_joint_sets_odd_m_smallest_cell_decides_n():
    """Guards the low-language half (rank < ⌊m/2⌋): with m = 41 the stimulus of language rank
    20 is high; counting it low would grow the smallest cell and n from 5 to 6."""
    from xmodal.language_dispersion import joint_sets

    m = 41
    ids = [f"s{j:02d}" for j in range(m)]
    v = np.arange(m, dtype=float)  # vision rank = position; low: 0..19
    # language: the first 15 of vision-low get high ranks, position 15..19 low ranks 0..4,
    # position 0 gets rank 20 (the median stimulus, high)
    lang_rank = np.empty(m, dtype=int)
    lang_rank[0] = 20
    lang_rank[1:15] = np.arange(21, 35)
    lang_rank[15:20] = np.arange(0, 5)
    lang_rank[20:] = np.r_[np.arange(5, 20), np.arange(35, 41)]
    lang = lang_rank.astype(float)
    n, want = _reference_cells(np.c_[v, v], np.c_[lang, lang], 99)
    assert n == 5
    sets = joint_sets(_disp(ids, v, v), _disp(ids, lang, lang), 99, 1, 2, 0)
    assert (sets.groupby(["set", "summary", "draw"]).size() == n).all()
    for (s, name), sel in want.items():
        got = sets[(sets["set"] == name) & (sets["summary"] == s)]["stimulus_id"].tolist()
        assert got == [ids[j] for j in sel]


def test_joint_sets_refuse_cells_below_the_four_stimulus_floor():
    """Guards min_set_size (max(4, 2k)): with k = 1, cells of 3 stimuli are refused, not
    scored (2k = 2 would let them through)."""
    from xmodal.config import ConfigError
    from xmodal.language_dispersion import joint_sets

    m = 12
    ids = [str(j) for j in range(m)]
    v = np.arange(m, dtype=float)
    lang = v.copy()
    lang[[0, 1, 2, 6, 7, 8]] = lang[[6, 7, 8, 0, 1, 2]]  # 3 of 6 swap halves: cells of 3
    with pytest.raises(ConfigError, match="n = 3"):
        joint_sets(_disp(ids, v, v), _disp(ids, lang, lang), 50, 1, 1, 0)


def test_language_layers_relative_depth_of_the_index():
    """Guards relative_depth = index / (n − 1) (0 = embeddings, 1 = last state)."""
    from xmodal.language_dispersion import language_layers

    names = {"a": [f"h{i}" for i in range(5)], "b": [f"h{i}" for i in range(9)]}
    t = language_layers(["a", "b"], names, 0.5)
    assert t["llm_layer"].tolist() == [2, 4]
    assert t["layer_name"].tolist() == ["h2", "h4"]
    assert t["relative_depth"].tolist() == [0.5, 0.5]
    t1 = language_layers(["a"], names, 1.0)
    assert t1["relative_depth"].tolist() == [1.0] and t1["llm_layer"].tolist() == [4]


def test_paired_refuses_a_repeated_stimulus():
    """Guards the repeated-id check: a vision table repeating a stimulus (same id set) would
    pair one caption's dispersion twice and correlate n + 1 values; with both tables repeating
    it, the ids and lengths agree and only this check refuses them, naming the stimulus."""
    from xmodal.language_dispersion import correlation_table

    vision = _disp(["a", "a", "b", "c"], [1.0, 1.0, 2.0, 3.0], [1.0, 1.0, 2.0, 3.0])
    language = _disp(["a", "b", "c"], [3.0, 1.0, 2.0], [3.0, 1.0, 2.0])
    with pytest.raises(
        ValueError,
        match=r"the vision dispersion table holds 1 \(stimulus_id\) key\(s\) more than once: \[\('a',\)\]",
    ):
        correlation_table(vision, language, 0, 0)
    # both tables repeating it: same ids, same length, still refused, naming the stimulus
    language = _disp(["a", "a", "b", "c"], [3.0, 3.0, 1.0, 2.0], [3.0, 3.0, 1.0, 2.0])
    with pytest.raises(
        ValueError,
        match=r"dispersion table holds 1 \(stimulus_id\) key\(s\) more than once: \[\('a',\)\]",
    ):
        correlation_table(vision, language, 0, 0)


def test_chosen_llm_layer_counts_one_vote_per_vision_model():
    """Bug: a layer-search table repeating a chosen row for one vision model counted it twice
    (layer 5 with "2 votes of 2 models" below, where v1 and v2 tie 1-1 and the lower layer 3
    wins); it is refused, naming the LLM and the vision model."""
    from xmodal.language_dispersion import chosen_llm_layer

    t = pd.DataFrame(
        {"vision": ["v1", "v1", "v2"], "llm": "g", "metric": "cknna", "llm_layer": [5, 5, 3],
         "chosen": True}
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"chosen for LLM 'g' by 'cknna'\) table holds 1 \(vision\) key\(s\) more than once: \[\('v1',\)\]",
    ):
        chosen_llm_layer(t, "g", path="g.tsv")
    assert chosen_llm_layer(t.iloc[1:], "g") == (3, 1, 2)


def test_cell_random_stability_is_nan_when_a_draw_has_none():
    """Guards mean_stability: a random draw whose stability is NaN makes the baseline's
    stability NaN (never the mean of the other draws)."""
    from xmodal.language_dispersion import cell_table

    rows = [("v", "l", 3, "random", "none", d, 12, "cknna", 0.2 + 0.01 * d, s)
            for d, s in enumerate([0.01, np.nan, 0.03])]  # fmt: skip
    rows.append(("v", "l", 3, "vlow_llow", "mean", 0, 12, "cknna", 0.25, 0.02))
    cond = pd.DataFrame(rows, columns=["vision", "llm", "llm_layer", "condition", "summary",
                                       "draw", "n_stimuli", "metric", "value", "stability"])  # fmt: skip
    cells = cell_table(cond)
    assert len(cells) == 1
    assert math.isnan(cells["random_stability"].iloc[0])
    assert cells["stability"].iloc[0] == 0.02
    rows[1] = (*rows[1][:-1], 0.02)
    cells = cell_table(pd.DataFrame(rows, columns=cond.columns))
    assert cells["random_stability"].iloc[0] == pytest.approx(0.02)


# --------------------------------------------------------------------------- pipeline helpers


def _diag_rows(model, layers):
    return pd.DataFrame(
        {
            "model": model,
            "layer": layers,
            "layer_name": [f"h{i}" for i in layers],
            "m": 50,
            "cos_mean": 0.2,
            "n_unresolved": 0,
            "collapsed": False,
            "warn": False,
            "unresolved_ids": "[]",
        }
    )


def test_gather_diagnostics_marks_only_chosen_llm_layers_used(tmp_path):
    """Guards the ``chosen`` filter: an LLM layer the search scored but chose for no vision
    model is not 'in use' (the figure's top row shows only layers in use)."""
    from xmodal.io import read_table, write_table
    from xmodal.pipeline import gather_diagnostics

    write_table(_diag_rows("vit", [7]), tmp_path / "v.tsv")
    write_table(_diag_rows("gpt", [0, 1, 2, 3]), tmp_path / "l.tsv")
    layers = pd.DataFrame(
        {
            "vision": ["vit"] * 4 + ["deit"] * 4,
            "llm": "gpt",
            "metric": "cknna",
            "llm_layer": [0, 1, 2, 3] * 2,
            "chosen": [False, False, True, False, False, True, False, False],
        }
    )
    write_table(layers, tmp_path / "layers.tsv")
    gather_diagnostics(tmp_path / "v.tsv", [tmp_path / "l.tsv"], tmp_path / "layers.tsv",
                       tmp_path / "out.tsv")  # fmt: skip
    out = read_table(tmp_path / "out.tsv")
    used = {(r.model, int(r.layer)) for r in out.itertuples() if str(r.used) == "True"}
    assert used == {("vit", 7), ("gpt", 1), ("gpt", 2)}
    assert out["modality"].tolist() == ["vision"] + ["language"] * 4


def test_tied_layers_read_the_chosen_row_whatever_row_comes_last():
    """Guards the chosen-row filter of tied_layers: the tie flag of the chosen layer, not of the
    last row of the pair (the fixtures chose the last layer)."""
    from xmodal.pipeline import tied_layers

    rows = [
        {"vision": "v", "llm": "l", "metric": "cknna", "llm_layer": i, "chosen": i == 0,
         "layer_tied": i == 0, "value": 0.3, "valid": True}
        for i in range(3)
    ]  # fmt: skip
    assert tied_layers(pd.DataFrame(rows)) == {("v", "cknna"): True}


def test_the_drop_table_carries_the_layer_tie_of_the_pairs_choice(tmp_path):
    """Guards run_conditions' wiring of the layer search's ties into the drop table (it was
    tested on drop_table alone): a tied choice is flagged in the drop table as in contrasts."""
    from test_language_dispersion import _layers_table, _write_lm

    from xmodal.io import read_table, write_table
    from xmodal.pipeline import run_conditions
    from xmodal.selection import make_sets

    rng = np.random.default_rng(5)
    m = 90
    ids = [f"id{j}" for j in range(m)]
    z = rng.normal(size=(m, 6))

    def layers(width):
        return [z @ rng.normal(size=(6, width)) + rng.normal(size=(m, width)) for _ in range(3)]

    vision = [_write_lm(tmp_path / f"{v}.h5", v, layers(16), ids, "vision") for v in ("va", "vb")]
    llm = _write_lm(tmp_path / "lm.h5", "lm", layers(10), ids)
    table = _layers_table("lm", {"va": 1, "vb": 2}, n_layers=3)
    table["layer_tied"] = table["chosen"] & (table["vision"] == "vb")
    write_table(table, tmp_path / "layers.tsv")
    sets = make_sets(ids, rng.normal(size=m), rng.normal(size=m), 20, n_random=5,
                     drop_fraction=0.25, seed=0, n_drop_random=10)  # fmt: skip
    write_table(sets, tmp_path / "sets.tsv")
    run_conditions(
        vision, llm, tmp_path / "layers.tsv", tmp_path / "sets.tsv", ["va", "vb"], "lm",
        vision_layer=-2, k=5, n_boot=0, seed=0, out_conditions=tmp_path / "c.tsv",
        out_contrasts=tmp_path / "x.tsv", out_drop=tmp_path / "d.tsv",
    )  # fmt: skip
    for name in ("x.tsv", "d.tsv"):
        tied = read_table(tmp_path / name).groupby("vision")["layer_tied"].agg(["all", "any"])
        assert tied.loc["vb", "all"] and not tied.loc["va", "any"], (name, tied)


def test_chosen_layers_refuse_two_choices_for_one_pair():
    """Guards the one-choice-per-(vision, metric) check: a second chosen row would silently
    replace the first."""
    from xmodal.pipeline import chosen_layers

    layers = pd.DataFrame(
        {"vision": ["vit", "vit", "vit", "deit"], "metric": "cknna", "llm_layer": [1, 2, 3, 2],
         "chosen": [True, False, True, True]}
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"my.tsv: more than one chosen layer for \('vit'"):
        chosen_layers(layers, "my.tsv")
    assert chosen_layers(layers.iloc[[0, 1, 3]]) == {("vit", "cknna"): 1, ("deit", "cknna"): 2}


def test_n_workers_never_exceeds_the_tasks(monkeypatch):
    """Guards min(n_tasks, cores): one thread per task at most, whatever the cores."""
    from xmodal import parallel

    monkeypatch.setattr(parallel, "available_cores", lambda: 16)
    assert parallel.n_workers(1) == 1
    assert parallel.n_workers(3) == 3
    assert parallel.n_workers(40) == 16
    assert parallel.n_workers(3, n_jobs=0) == 1
    assert parallel.n_workers(3, n_jobs=7) == 7


# --------------------------------------------------------------------------- figure data


def test_diagnostics_rows_in_use_vision_first_then_llm_layers_by_depth():
    """Guards the row order of the diagnostics figure: vision models first (display order),
    then each LLM's layers in use by depth, whatever the table's order."""
    from xmodal.figures._common import FigureData, Models
    from xmodal.figures.diagnostics import _used_rows

    diag = pd.DataFrame(
        {
            "model": ["gpt", "vit", "gpt", "bert", "deit", "gpt"],
            "modality": ["language", "vision", "language", "language", "vision", "language"],
            "layer": [5, 11, 2, 3, 11, 4],
            "used": ["True", "True", "True", "True", "True", "False"],
        }
    )
    models = Models.from_table(
        pd.DataFrame({"model": ["deit", "vit", "bert", "gpt"], "order": [0, 1, 2, 3]})
    )
    data = FigureData(tables={}, paths={}, models=models)
    rows = _used_rows(diag, data)
    got = list(zip(rows["model"], rows["layer"].astype(int), strict=True))
    assert got == [("deit", 11), ("vit", 11), ("bert", 3), ("gpt", 2), ("gpt", 5)]


def test_figure_interval_is_the_central_95_percent():
    """Guards the percentile levels of a baseline's whiskers: 2.5 and 97.5, not 5 and 95."""
    from xmodal.figures._common import interval

    v = np.arange(201, dtype=float)
    assert interval(v) == pytest.approx((100.0, 5.0, 195.0))
    assert all(math.isnan(a) for a in interval([1.0, np.nan]))


def test_pair_cells_stability_is_the_mean_of_the_draws():
    """Guards the baseline's stability: the mean of the draws' (a bound on the mean's move),
    not the largest draw's."""
    from xmodal.figures.alignment import pair_cells

    rows = pd.DataFrame(
        {"vision": "v", "llm": "l", "draw": [0, 1, 2, 3],
         "value": [0.1, 0.2, 0.3, 0.4], "stability": [0.0, 0.0, 0.0, 0.04]}
    )  # fmt: skip
    cell = pair_cells(rows).loc[("v", "l")]
    assert cell["value"] == pytest.approx(0.25)
    assert cell["stability"] == pytest.approx(0.01)
    assert cell["n"] == 4


def test_condition_rows_prefer_mean_dispersion_rows():
    """Guards the preference for mean-dispersion drop sets when no summary is asked."""
    from xmodal.figures.alignment import condition_rows

    grid = pd.DataFrame(
        {"condition": ["drop_high"] * 3 + ["full"], "summary": ["pc1", "mean", "none", "none"],
         "value": [1.0, 2.0, 3.0, 4.0]}
    )  # fmt: skip
    assert condition_rows(grid, "drop_high")["value"].tolist() == [2.0]
    assert condition_rows(grid, "drop_high", "pc1")["value"].tolist() == [1.0]
    assert condition_rows(grid, "full", "pc1")["value"].tolist() == [4.0]


def test_set_members_of_random_sets_are_one_draw():
    """Guards the rug of the dispersion figure: the members of the first random draw only."""
    from xmodal.figures.dispersion import _set_members

    sets = pd.DataFrame(
        {"set": ["random"] * 4 + ["low"] * 2, "summary": ["none"] * 4 + ["mean"] * 2,
         "draw": [1, 1, 2, 2, 0, 0], "stimulus_id": ["a", "b", "c", "d", "e", "f"]}
    )  # fmt: skip
    assert _set_members(sets, "random", None) == {"a", "b"}
    assert _set_members(sets, "low", "mean") == {"e", "f"}
    assert _set_members(sets, "low", "pc1") == set()


def test_layerwise_invalid_layers_are_not_drawn_as_values():
    """Guards the ``valid`` column: a finite value of an invalid (degenerate) layer is not a
    point of the layerwise curve."""
    from xmodal.figures.alignment import _defined

    g = pd.DataFrame({"value": [0.1, np.nan, 0.3, 0.4], "valid": ["True", "True", "False", "1"]})
    assert _defined(g).tolist() == [True, False, False, True]


def test_metric_rows_without_a_metric_column_hold_only_cknna():
    """Guards the refusal to draw another metric's figure from a CKNNA-only table."""
    from xmodal.figures._common import metric_rows

    df = pd.DataFrame({"value": [0.1]})
    assert metric_rows(df, "cknna", "grid") is df
    with pytest.raises(ValueError, match="grid table has no 'metric' column"):
        metric_rows(df, "cka", "grid")


def _heatmap_data(tables):
    from xmodal.figures._common import FigureData, Models

    return FigureData(tables=tables, paths={}, models=Models.from_table(None))


def test_diff_matrix_from_contrasts_significance_either_side():
    """Guards the significance mark: an interval wholly below 0 is significant, as one wholly
    above; one that straddles 0 is not."""
    from xmodal.figures.alignment import _diff_matrix

    con = pd.DataFrame(
        {"vision": ["v1", "v2", "v3"], "llm": "l", "summary": "mean",
         "diff_low_high": [0.2, -0.2, 0.01], "diff_ci_low": [0.1, -0.3, -0.05],
         "diff_ci_high": [0.3, -0.1, 0.07], "low_stability": 0.0, "high_stability": 0.0}
    )  # fmt: skip
    diff, sig, flag, present = _diff_matrix(_heatmap_data({"contrasts": con}), pd.DataFrame(),
                                            "mean", ["v1", "v2", "v3", "v4"], ["l"])  # fmt: skip
    assert diff["l"].tolist()[:3] == [0.2, -0.2, 0.01]
    assert sig["l"].tolist() == [True, True, False, False]
    assert not flag.to_numpy().any()
    assert present["l"].tolist() == [True, True, True, False]  # v4: no row, a gap


def test_diff_matrix_from_the_grid_is_low_minus_high():
    """Guards the sign of the heatmap without a contrasts table: low − high."""
    from xmodal.figures.alignment import _diff_matrix

    grid = pd.DataFrame(
        {"vision": "v", "llm": "l", "condition": ["low", "high"], "summary": "mean",
         "value": [0.5, 0.2], "stability": [0.0, 0.0]}
    )  # fmt: skip
    diff, sig, _, present = _diff_matrix(_heatmap_data({}), grid, "mean", ["v", "w"], ["l"])
    assert diff.loc["v", "l"] == pytest.approx(0.3)
    assert not sig.to_numpy().any()
    assert present["l"].tolist() == [True, False]


def test_language_scatter_panel_points_and_coefficients_of_its_summary():
    """Guards the scatter's data: x = vision, y = language (matched by stimulus id, not row
    order) and the Spearman and Pearson rows of the panel's own summary in its text."""
    from matplotlib.figure import Figure

    from xmodal.figures.extensions import _scatter_panel

    vision = _disp(["a", "b", "c"], [1.0, 2.0, 3.0], [10.0, 20.0, 30.0])
    language = _disp(["c", "a", "b"], [7.0, 5.0, 6.0], [70.0, 50.0, 60.0])
    corr = pd.DataFrame(
        {"summary": ["mean", "mean", "pc1", "pc1"],
         "method": ["spearman", "pearson", "spearman", "pearson"],
         "estimate": [0.11, 0.22, 0.33, 0.44], "ci_low": [0.01, 0.02, 0.03, 0.04],
         "ci_high": [0.91, 0.92, 0.93, 0.94], "n": 3, "reason": ""}
    )  # fmt: skip
    ax = Figure().add_subplot()
    text = _scatter_panel(ax, vision, language, "pc1_score", corr, "pc1")  # title lines
    xy = ax.collections[0].get_offsets()
    assert np.asarray(xy).tolist() == [[10.0, 50.0], [20.0, 60.0], [30.0, 70.0]]
    assert not ax.texts  # the statistics go above the axes: a box over them hid points
    assert "Spearman ρ = 0.33 [0.03, 0.93]" in text
    assert "Pearson r = 0.44 [0.04, 0.94]" in text
    assert "n = 3" in text


# ------------------------------------------------------------ session 39's checks (mutation audit)


def _stale_feature_file(tmp_path, created: str | None):
    """A feature file whose stimuli digest differs from its stamp's, ``created`` as given."""
    import json

    from xmodal.features import STIMULI_DIGEST, write_features

    stamp = tmp_path / "extract_vision.json"
    stamp.write_text(json.dumps({"modality": "vision", "sha256": "b" * 64}))
    attrs = {"model_key": "m", "modality": "vision", STIMULI_DIGEST: "a" * 64}
    if created is not None:
        attrs["created"] = created
    x = np.ones((1, 3, 2), np.float32)
    path = write_features(tmp_path / "m.h5", x, ["a", "b", "c"], ["l0"], attrs)
    if created is None:  # write_features fills it in: a file of an older writer has none
        import h5py

        with h5py.File(path, "r+") as f:
            del f.attrs["created"]
    return path, stamp


@pytest.mark.parametrize(("before", "this_run"), [(30, True), (120, False), (300, False)])
def test_a_file_written_within_a_minute_of_the_start_counts_as_this_runs(
    tmp_path, before, this_run
):
    """The end-of-run check blames an edit during the run only for files created at most 60 s
    before the run started (clocks of compute nodes); older ones are stale (--touch)."""
    import datetime as dt
    import time

    from xmodal.features import FeatureFileError, check_against_stamp

    started = float(int(time.time()))
    created = dt.datetime.fromtimestamp(started - before, dt.UTC).isoformat(timespec="seconds")
    path, stamp = _stale_feature_file(tmp_path, created)
    with pytest.raises(FeatureFileError) as err:
        check_against_stamp([path], stamp, run_started=started)
    assert ("this run started with" in str(err.value)) == this_run, str(err.value)
    assert ("holds features of other stimuli" in str(err.value)) != this_run


@pytest.mark.parametrize("created", ["not a time", "", None])
def test_a_file_without_a_readable_creation_time_is_stale(tmp_path, created):
    import time

    from xmodal.features import FeatureFileError, check_against_stamp

    path, stamp = _stale_feature_file(tmp_path, created)
    with pytest.raises(FeatureFileError, match="holds features of other stimuli"):
        check_against_stamp([path], stamp, run_started=time.time())


def _two_stored_sides(tmp_path):
    import torch

    from xmodal import stats

    rng = np.random.default_rng(0)
    plan = stats.BootstrapPlan(np.arange(20), 50, np.random.default_rng(0), k=4)
    cache: dict = {}
    for _ in range(2):
        x = rng.standard_normal((40, 7))
        plan.side(x @ x.T, cache=cache)
    assert len(cache) == 2
    path = tmp_path / "vision_bootstrap.pt"
    stats.save_sides(cache, path)
    return path, torch.load(path, weights_only=True)


@pytest.mark.parametrize("field", ["order", "values", "rec", "self_hsic"])
@pytest.mark.parametrize("which", [0, 1])
def test_any_field_of_any_stored_side_damaged_is_refused(tmp_path, field, which):
    """The SHA-256 covers every tensor of every side (one ulp or one index off)."""
    import torch

    from xmodal import stats

    path, payload = _two_stored_sides(tmp_path)
    t = payload["sides"][sorted(payload["sides"])[which]][field]
    flat = t.reshape(-1)
    if t.is_floating_point():
        flat[1] = torch.nextafter(flat[1], torch.tensor(np.inf, dtype=t.dtype))
    else:
        flat[1] += 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="sides are damaged"):
        stats.load_sides(path)


def test_a_stored_side_of_another_shape_or_not_a_tensor_is_refused(tmp_path):
    import torch

    from xmodal import stats

    path, payload = _two_stored_sides(tmp_path)
    side = payload["sides"][sorted(payload["sides"])[0]]
    values = side["values"]
    side["values"] = values.reshape(values.shape[1], values.shape[0])  # the same bytes
    torch.save(payload, path)
    with pytest.raises(ValueError, match="sides are damaged"):
        stats.load_sides(path)
    side["values"] = values.tolist()
    torch.save(payload, path)
    with pytest.raises(ValueError, match="sides are damaged"):
        stats.load_sides(path)


def test_the_conditions_pool_gives_torch_its_threads_back(monkeypatch):
    """_one_thread_per_worker restores torch's own thread count (not through threadpoolctl,
    which restores it in some builds only)."""
    import contextlib

    import torch

    from xmodal import alignment

    monkeypatch.setattr(alignment, "threadpool_limits", lambda **_: contextlib.nullcontext())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with alignment._one_thread_per_worker(2):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
