"""Which numbers to trust: marks for unstable values, undefined values never drawn as numbers,
the diagnostics figure, and one figure per alignment metric.

The expected marks are computed here from the tables with loops and the threshold written out
(1e-3), independently of xmodal.summary.unstable and of the figures' own helpers; the planted
values (xmodal.figures.synthetic.PLANTED) must be among them.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from _project import copy_project, job_counts, run_snakemake
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from xmodal.figures import (
    DEFAULT_METRIC,
    FIGURES,
    METRIC_LABELS,
    figure_files,
    figure_metrics,
    figure_stem,
    make_figure,
    metric_from_tag,
    metric_tag,
    metric_tag_pattern,
    render_figure,
)
from xmodal.figures._common import DAGGER, UNSTABLE_HATCH
from xmodal.figures.alignment import pair_cells
from xmodal.figures.synthetic import PLANTED, synthetic_inputs
from xmodal.io import read_table
from xmodal.summary import STABILITY_THRESHOLD

THRESHOLD = 1e-3
METRICS = ("cknna", "mutual_knn", "cka")
VISION = ["vis-0", "vis-1", "vis-2"]
LLMS = ["alpha-0.5b", "alpha-3b", "beta-1b", "beta-7b"]
PER_METRIC = {
    "sets_rank", "sets_pc1", "drop25", "grid_heatmap", "layerwise", "contrasts", "heldout_layer"
}  # fmt: skip


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict[str, Path]:
    """Synthetic tables with planted unstable, just-stable and undefined values, three metrics."""
    return synthetic_inputs(tmp_path_factory.mktemp("planted"), metrics=METRICS, plant=True)


@pytest.fixture(scope="module")
def tables(planted) -> dict[str, pd.DataFrame]:
    return {k: read_table(p) for k, p in planted.items() if k != "manifest"}


@pytest.fixture(scope="module")
def figs(planted) -> dict[tuple[str, str], Figure]:
    """Every per-metric figure for every metric, and the diagnostics figure."""
    out = {(n, m): render_figure(n, planted, m) for n in sorted(PER_METRIC) for m in METRICS}
    out[("diagnostics", DEFAULT_METRIC)] = render_figure("diagnostics", planted)
    return out


def gids(fig: Figure, prefix: str) -> set[str]:
    """gids of every artist that starts with ``prefix|`` (the prefix removed)."""
    found = fig.findobj(lambda a: (a.get_gid() or "").startswith(prefix + "|"))
    return {a.get_gid()[len(prefix) + 1 :] for a in found}


def all_text(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


# --------------------------------------------------------------------------- expectations
def expected_bars(grid: pd.DataFrame, metric: str, conditions: dict[str, str]):
    """{gid: mean value} of the bars, and the gids that are hatched or undefined, by loops over
    the grid rows (a condition's rows: one, or the random draws)."""
    values, hatched, undefined = {}, set(), set()
    for cond, summary in conditions.items():
        for v in VISION:
            for ll in LLMS:
                vals, stabs = [], []
                for r in grid.itertuples():
                    if (r.metric, r.condition, r.summary, r.vision, r.llm) == (
                        metric,
                        cond,
                        summary,
                        v,
                        ll,
                    ):
                        vals.append(r.value)
                        stabs.append(r.stability)
                if not vals:
                    continue
                gid = f"{cond}|{v}|{ll}"
                if any(math.isnan(x) for x in vals):
                    undefined.add(gid)
                    continue
                values[gid] = sum(vals) / len(vals)
                if sum(stabs) / len(stabs) > THRESHOLD:
                    hatched.add(gid)
    return values, hatched, undefined


def test_threshold_is_the_summary_modules():
    assert STABILITY_THRESHOLD == THRESHOLD


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize(
    ("name", "conditions"),
    [
        ("sets_rank", {"low": "mean", "random": "none", "high": "mean"}),
        ("sets_pc1", {"low": "pc1", "random": "none", "high": "pc1"}),
        (
            "drop25",
            {"full": "none", "random_drop": "none", "drop_high": "mean", "drop_low": "mean"},
        ),
    ],
)
def test_bars_hatched_exactly_where_unstable(figs, tables, name, conditions, metric):
    fig = figs[(name, metric)]
    values, hatched, undefined = expected_bars(tables["grid"], metric, conditions)
    bars = {
        p.get_gid()[4:]: p
        for ax in fig.axes
        for p in ax.patches
        if (p.get_gid() or "").startswith("bar|")
    }
    assert set(bars) == set(values)  # an undefined value has no bar
    for gid, bar in bars.items():
        assert bar.get_height() == pytest.approx(values[gid], rel=1e-12), gid
    assert {g for g, b in bars.items() if b.get_hatch() == UNSTABLE_HATCH} == hatched
    assert gids(fig, "undefined") == undefined
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert (
        f"stability > 0.001: nearest-neighbour sets decided by rounding or ties ({len(hatched)})"
        in legend
    ) == bool(hatched)
    assert ("not a number" in legend) == bool(undefined)
    if metric != "cka":  # the CKA metrics have no kNN sets: stability 0, nothing planted
        plant = {
            f"{c}|{v}|{ll}"
            for _, v, ll, c, s, _ in PLANTED["unstable"][:4]
            if conditions.get(c) == s
        }
        assert plant <= hatched
        stable = {
            f"{c}|{v}|{ll}" for _, v, ll, c, s, _ in PLANTED["stable"] if conditions.get(c) == s
        }
        assert not stable & hatched
        nan = {
            f"{c}|{v}|{ll}" for _, v, ll, c, s in PLANTED["undefined"][:1] if conditions.get(c) == s
        }
        assert nan == undefined
    else:
        assert not hatched


def test_planted_cases_are_covered(figs):
    """The planted set exercises every mark (a test that passes on an empty set proves nothing)."""
    fig = figs[("sets_rank", "cknna")]
    hatched = {
        p.get_gid() for ax in fig.axes for p in ax.patches if p.get_hatch() == UNSTABLE_HATCH
    }
    assert hatched == {"bar|low|vis-1|alpha-3b", "bar|random|vis-0|beta-7b"}
    assert gids(fig, "undefined") == {"high|vis-2|beta-7b"}
    assert {
        p.get_gid()
        for ax in figs[("drop25", "mutual_knn")].axes
        for p in ax.patches
        if p.get_hatch() == UNSTABLE_HATCH
    } == {"bar|full|vis-2|beta-1b", "bar|full|vis-0|beta-1b", "bar|drop_low|vis-0|alpha-0.5b"}


@pytest.mark.parametrize("metric", METRICS)
def test_heatmap_daggers_and_undefined_cells(figs, tables, metric):
    axes = [ax for ax in figs[("grid_heatmap", metric)].axes if ax.get_label() != "<colorbar>"]
    grid, con = tables["grid"], tables["contrasts"]
    labels = {"vis-0": "Vision A", "vis-1": "Vision B", "vis-2": "Vision C"}

    def cell_texts(ax) -> dict[tuple[int, int], str]:
        return {
            (round(t.get_position()[1] - 0.5), round(t.get_position()[0] - 0.5)): t.get_text()
            for t in ax.texts
        }

    full = cell_texts(axes[0])
    for a, v in enumerate(VISION):
        for b, ll in enumerate(LLMS):
            r = grid[
                (grid.metric == metric)
                & (grid.condition == "full")
                & (grid.vision == v)
                & (grid.llm == ll)
            ]
            x, s = r["value"].item(), r["stability"].item()
            assert full[(a, b)] == f"{x:.3f}" + (DAGGER if s > THRESHOLD else "")
    for ax, summary in zip(axes[1:], ("mean", "pc1"), strict=True):
        texts = cell_texts(ax)
        for a, v in enumerate(VISION):
            for b, ll in enumerate(LLMS):
                r = con[
                    (con.metric == metric)
                    & (con.summary == summary)
                    & (con.vision == v)
                    & (con.llm == ll)
                ].iloc[0]
                if math.isnan(r.diff_low_high):
                    assert texts[(a, b)] == "n/a"
                    continue
                sig = r.diff_ci_low > 0 or r.diff_ci_high < 0
                flag = r.low_stability > THRESHOLD or r.high_stability > THRESHOLD
                assert texts[(a, b)] == f"{r.diff_low_high:+.3f}" + ("*" if sig else "") + (
                    DAGGER if flag else ""
                )
    assert [t.get_text() for t in axes[0].get_yticklabels()] == list(labels.values())
    if metric != "cka":
        assert full[(2, 2)].endswith(DAGGER)  # planted: vis-2 × beta-1b full
        assert full[(0, 2)].endswith(DAGGER)  # planted: the chosen layer of vis-0 × beta-1b
        assert cell_texts(axes[1])[(1, 1)].endswith(DAGGER)  # planted low (mean)
        assert not cell_texts(axes[2])[(1, 1)].endswith(DAGGER)  # high (pc1) just stable
        assert cell_texts(axes[1])[(2, 3)] == "n/a"  # planted NaN high (mean)


@pytest.mark.parametrize("metric", METRICS)
def test_layerwise_marks_and_gaps(figs, tables, metric):
    fig = figs[("layerwise", metric)]
    lay = tables["layers"]
    axes = [ax for ax in fig.axes if ax.get_title(loc="left")]
    for ax, v in zip(axes, VISION, strict=True):
        lines = {ln.get_label(): ln for ln in ax.lines}
        for ll, label in zip(LLMS, ["Alpha 0.5b", "Alpha 3b", "Beta 1b", "Beta 7b"], strict=True):
            g = lay[(lay.metric == metric) & (lay.vision == v) & (lay.llm == ll)].sort_values(
                "llm_layer"
            )
            depth = g["llm_layer"].to_numpy(float) / g["llm_layer"].max()
            want_y, unstable_at, undefined_at, chosen_at = [], [], [], []
            for d, r in zip(depth, g.itertuples(), strict=True):
                ok = bool(r.valid) and not math.isnan(r.value)
                want_y.append(r.value if ok else np.nan)
                if not ok:
                    undefined_at.append(d)
                elif r.chosen:
                    chosen_at.append((d, r.stability > THRESHOLD))
                elif r.stability > THRESHOLD:
                    unstable_at.append(d)
            np.testing.assert_array_equal(lines[label].get_ydata(), np.array(want_y))
            coll = {c.get_gid(): c for c in ax.collections if c.get_gid()}
            got = coll.get(f"unstable|{v}|{ll}")
            assert (sorted(got.get_offsets()[:, 0]) if got else []) == pytest.approx(unstable_at)
            got = coll.get(f"undefined|{v}|{ll}")
            assert (sorted(got.get_offsets()[:, 0]) if got else []) == pytest.approx(undefined_at)
            ch = coll[f"chosen|{v}|{ll}"]
            assert ch.get_offsets()[:, 0].tolist() == pytest.approx([d for d, _ in chosen_at])
            white = [tuple(f[:3]) == (1.0, 1.0, 1.0) for f in ch.get_facecolors()]
            assert white == [u for _, u in chosen_at]
    if metric != "cka":
        assert gids(fig, "unstable") == {"vis-1|beta-1b"}
        assert gids(fig, "undefined") == {"vis-1|beta-1b", "vis-0|alpha-3b"}


@pytest.mark.parametrize("metric", METRICS)
def test_contrasts_open_markers_and_undefined(figs, tables, metric):
    fig = figs[("contrasts", metric)]
    con = tables["contrasts"]
    want_open, want_filled, want_undefined = set(), set(), set()
    for r in con[con.metric == metric].itertuples():
        tag = f"{r.vision}|{r.llm}|{r.summary}"
        if math.isnan(r.diff_low_high):
            want_undefined.add(tag)
        elif r.low_stability > THRESHOLD or r.high_stability > THRESHOLD:
            want_open.add(tag)
        else:
            want_filled.add(tag)
    assert gids(fig, "unstable") == want_open
    assert gids(fig, "diff") == want_filled
    assert gids(fig, "undefined") == want_undefined
    for ln in fig.findobj(lambda a: (a.get_gid() or "").startswith(("unstable|", "diff|"))):
        assert (ln.get_markerfacecolor() == "white") == ln.get_gid().startswith("unstable|")
    if metric == "cka":
        assert not want_open and "no bootstrap interval" in fig.axes[0].get_xlabel()
    else:
        assert want_open == {"vis-1|alpha-3b|mean"}
        assert "bootstrap 95% CI" in fig.axes[0].get_xlabel()
    summ = tables["summary"].set_index(["metric", "summary"])
    r = summ.loc[(metric, "mean")]
    title = fig.axes[0].get_title(loc="left")
    assert f"in {int(r.n_low_gt_random_gt_high)}/{int(r.n_valid)} pairs" in title
    assert ("1 undefined" in title) == (int(r.n_pairs) - int(r.n_valid) == 1)
    assert (f"{int(r.n_unstable)} unstable" in title) == (int(r.n_unstable) > 0)


@pytest.mark.parametrize("key", sorted(PER_METRIC))
def test_no_undefined_value_drawn_as_a_number(figs, key):
    for metric in METRICS:
        fig = figs[(key, metric)]
        assert not re.search(r"\bnan\b", all_text(fig), re.IGNORECASE)
        for ax in fig.axes:
            for p in ax.patches:
                assert np.isfinite([p.get_x(), p.get_y(), p.get_width(), p.get_height()]).all()


# --------------------------------------------------------------------------- diagnostics
def test_diagnostics_marks_the_planted_collapsed_model(figs, tables):
    fig = figs[("diagnostics", DEFAULT_METRIC)]
    diag = tables["diagnostics"]
    a, b, c = fig.axes[:3]
    ticks = [t for t in a.get_yticklabels()]
    used = diag[diag["used"]]
    assert len(ticks) == len(used)
    collapsed = [t.get_text() for t in ticks if t.get_text().endswith("[collapsed]")]
    assert collapsed == ["Vision C · blocks.30  [collapsed]"]  # PLANTED["collapsed"] = vis-2
    assert [t.get_color() for t in ticks if "[collapsed]" in t.get_text()] == ["#c0392b"]
    assert gids(fig, "collapsed") == {f"{PLANTED['collapsed']}|30"}
    assert gids(fig, "warn") == set()  # the warned LLM layer is not in use
    # every layer in use is a point at its table values, in each of the three panels
    for r in used.itertuples():
        gid = f"{'collapsed' if r.collapsed else 'ok'}|{r.model}|{r.layer}"
        for ax, col in ((b, "eff_dim"), (c, "frac_unresolved")):
            pts = [ln for ln in ax.lines if ln.get_gid() == gid]
            assert len(pts) == 1 and pts[0].get_xdata()[0] == pytest.approx(getattr(r, col))
    assert all_text(fig).count("Duplicate stimuli in the manifest") == 1
    assert (
        "identical pixels: 1 group(s), 2 stimuli; identical captions: 1 group(s), 3 stimuli"
        in all_text(fig)
    )


def test_diagnostics_depth_panels_cross_collapsed_llm_layers(planted, tmp_path):
    diag = read_table(planted["diagnostics"])
    hit = (diag["model"] == "beta-7b") & (diag["layer"] == 3)
    diag.loc[hit, ["collapsed", "warn"]] = True
    diag.to_csv(tmp_path / "diagnostics.tsv", sep="\t", index=False)
    fig = render_figure("diagnostics", {**planted, "diagnostics": tmp_path / "diagnostics.tsv"})
    crosses = fig.findobj(lambda a: a.get_gid() == "depth_collapsed|beta-7b")
    assert len(crosses) == 3  # one per measure across depth
    assert all(cr.get_offsets()[:, 0].tolist() == [0.6] for cr in crosses)  # layer 3 of 0..5


def test_diagnostics_without_duplicates_or_models(planted):
    inputs = {"diagnostics": planted["diagnostics"]}
    text = all_text(render_figure("diagnostics", inputs))
    assert "Duplicate stimuli" not in text and "vis-2 · blocks.30  [collapsed]" in text


@pytest.mark.parametrize("families", [{"A": [1.0]}, {"A": [1.0, 7.0], "B": [0.5, 3.0]},
                                      {f: [0.5, 1.0, 3.0, 7.0] for f in "ABC"}])  # fmt: skip
def test_diagnostics_legend_and_duplicates_note_do_not_overlap(tmp_path, families):
    """The footer's legend grows by a row per three language models: the duplicates note under
    it must stay clear of every entry (with the paper's 12 LLMs it was written across them)."""
    inputs = synthetic_inputs(tmp_path, llm_families=families, plant=True, images=False)
    fig = render_figure("diagnostics", inputs)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    (note,) = fig.findobj(lambda a: a.get_gid() == "duplicates")
    box = note.get_window_extent(renderer)
    (legend,) = fig.subfigs[-1].legends
    n_llm = sum(len(sizes) for sizes in families.values())
    assert len(legend.get_texts()) == 3 + n_llm + 2
    for entry in (*legend.get_texts(), *legend.legend_handles):
        assert not entry.get_window_extent(renderer).overlaps(box), entry
    assert box.y0 >= fig.bbox.y0  # the note stays inside the figure


# --------------------------------------------------------------------------- per metric
def test_metric_names_labels_and_file_tags():
    from xmodal.alignment import METRICS as LIBRARY_METRICS

    assert set(METRIC_LABELS) == set(LIBRARY_METRICS)
    assert {n for n, s in FIGURES.items() if s.per_metric} == PER_METRIC
    for m in LIBRARY_METRICS:
        assert metric_from_tag(metric_tag(m)) == m
    assert metric_tag("cknna") == "" and figure_stem("layerwise", "cka") == "layerwise.cka"
    assert figure_stem("gallery") == "gallery"
    assert figure_metrics("gallery", ["cknna", "cka"]) == [None]
    pattern = re.compile(metric_tag_pattern(["cknna", "mutual_knn"]))
    assert [t for t in ("", ".mutual_knn", ".cka", "cknna", ".cknna") if pattern.fullmatch(t)] == [
        "",
        ".mutual_knn",
    ]
    only = re.compile(metric_tag_pattern(["cka"]))
    assert only.fullmatch(".cka") and not only.fullmatch("")


def test_figure_files_per_metric():
    files = figure_files("results/figures/d", ["cknna", "mutual_knn"])
    for name in FIGURES:
        assert f"results/figures/d/{name}.png" in files
        assert (f"results/figures/d/{name}.mutual_knn.pdf" in files) == (name in PER_METRIC)
    assert len(files) == 2 * (len(FIGURES) + len(PER_METRIC))
    assert len(set(files)) == len(files)


def test_one_file_per_metric(planted, tmp_path):
    for metric in ("cknna", "mutual_knn"):
        stem = tmp_path / figure_stem("sets_rank", metric)
        make_figure("sets_rank", planted, f"{stem}.png", f"{stem}.pdf", metric=metric)
        assert Path(f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sets_rank.mutual_knn.pdf",
        "sets_rank.mutual_knn.png",
        "sets_rank.pdf",
        "sets_rank.png",
    ]


@pytest.mark.parametrize("name", sorted(PER_METRIC))
def test_each_figure_says_its_metric(figs, name):
    for metric in METRICS:
        fig = figs[(name, metric)]
        text = all_text(fig) + "\n".join(ax.get_ylabel() + ax.get_xlabel() for ax in fig.axes)
        for other in METRICS:
            assert (METRIC_LABELS[other] in text) == (other == metric), (metric, other)


def test_per_metric_bars_show_that_metrics_values(figs, tables):
    grid = tables["grid"]
    for metric in METRICS:
        fig = figs[("sets_rank", metric)]
        bar = next(
            p for ax in fig.axes for p in ax.patches if p.get_gid() == "bar|low|vis-0|beta-1b"
        )
        want = grid.query(
            "metric == @metric and condition == 'low' and summary == 'mean'"
            " and vision == 'vis-0' and llm == 'beta-1b'"
        )
        assert bar.get_height() == want["value"].item()


def test_metric_missing_from_the_tables_is_named(planted):
    with pytest.raises(
        ValueError,
        match=r"grid\.tsv.*'unbiased_cka'.*\['cka', 'cknna', 'mutual_knn'\].*analysis\.metrics",
    ):
        render_figure("sets_rank", planted, "unbiased_cka")
    with pytest.raises(ValueError, match="drawn once"):
        render_figure("gallery", planted, "cka")
    with pytest.raises(ValueError, match="unknown metric 'knn'"):
        render_figure("layerwise", planted, "knn")


def test_table_without_metric_column_is_cknna_only(planted, tmp_path):
    grid = read_table(planted["grid"])
    grid = grid[grid["metric"] == "cknna"].drop(columns="metric")
    grid.to_csv(tmp_path / "grid.tsv", sep="\t", index=False)
    inputs = {"grid": tmp_path / "grid.tsv", "models": planted["models"]}
    assert "CKNNA" in render_figure("drop25", inputs).axes[0].get_ylabel()
    with pytest.raises(ValueError, match="no 'metric' column"):
        render_figure("drop25", inputs, "mutual_knn")


# --------------------------------------------------------------------------- the flag rule
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["v0", "v1"]),
            st.sampled_from(["l0", "l1", "l2"]),
            st.one_of(st.floats(-1, 1), st.just(math.nan)),
            st.one_of(st.floats(0, 5e-3), st.just(math.nan)),
        ),
        min_size=1,
        max_size=30,
    )
)
def test_pair_cells_against_loops(rows):
    """Mean value (NaN if any row is NaN), mean stability, flag = mean stability > 1e-3."""
    df = pd.DataFrame(rows, columns=["vision", "llm", "value", "stability"])
    cells = pair_cells(df)
    for (v, ll), c in cells.iterrows():
        vals = [r[2] for r in rows if (r[0], r[1]) == (v, ll)]
        stabs = [r[3] for r in rows if (r[0], r[1]) == (v, ll)]
        assert c["n"] == len(vals)
        if any(math.isnan(x) for x in vals):
            assert math.isnan(c["value"])
        else:
            assert c["value"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
            assert c["lo"] <= c["value"] + 1e-12 <= c["hi"] + 2e-12
        mean_stab = sum(stabs) / len(stabs)
        assert bool(c["unstable"]) == (not math.isnan(mean_stab) and mean_stab > THRESHOLD)
    assert len(cells) == len({(r[0], r[1]) for r in rows})


# --------------------------------------------------------------------------- the workflow
@pytest.mark.slow
def test_workflow_draws_each_alignment_figure_per_metric(tmp_path):
    """A dry run of the demo with two metrics: one job per metric for each per-metric figure
    (``{name}.png``, ``{name}.mutual_knn.png``), one for the others."""
    project = copy_project(tmp_path / "project")
    cfg = yaml.safe_load((project / "config" / "demo.yaml").read_text())
    cfg["analysis"]["metrics"] = ["cknna", "mutual_knn"]
    (project / "config" / "two.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = run_snakemake(project, "-n", "--configfile", "config/two.yaml", "--cores", "1")
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    for name, spec in FIGURES.items():
        assert counts.get(f"figure_{name}") == (2 if spec.per_metric else 1), name
        assert f"results/figures/demo/{name}.png" in out
        assert (f"results/figures/demo/{name}.mutual_knn.png" in out) == spec.per_metric


# --------------------------------------------------------------------------- the controls
@pytest.mark.parametrize("metric", METRICS)
def test_contrasts_fraction_hatched_where_low_or_random_unstable(figs, tables, metric):
    """A fraction of random draws ≥ low is flagged when the low value or the draws (the mean of
    their stabilities, ``random_stability``) are unstable."""
    fig = figs[("contrasts", metric)]
    want, shown = set(), set()
    for r in tables["contrasts"].itertuples():
        if r.metric != metric or math.isnan(r.frac_random_ge_low):
            continue
        tag = f"{r.vision}|{r.llm}|{r.summary}"
        shown.add(tag)
        if r.low_stability > THRESHOLD or r.random_stability > THRESHOLD:
            want.add(tag)
    bars = {
        p.get_gid()[5:]: p
        for ax in fig.axes
        for p in ax.patches
        if (p.get_gid() or "").startswith("frac|")
    }
    assert set(bars) == shown
    assert {g for g, b in bars.items() if b.get_hatch() == UNSTABLE_HATCH} == want
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert ("fraction, low value or random draws: stability > 0.001" in legend) == bool(want)
    if (
        metric != "cka"
    ):  # planted: every random draw of vis-0 × beta-7b, the low of vis-1 × alpha-3b
        assert want == {"vis-0|beta-7b|mean", "vis-0|beta-7b|pc1", "vis-1|alpha-3b|mean"}
    else:
        assert not want


@pytest.mark.parametrize("metric", METRICS)
def test_heldout_marks(figs, tables, metric):
    """The mean over splits is an open marker when the mean low or high stability exceeds the
    threshold, "n/a" when any split is undefined (computed here with loops)."""
    fig = figs[("heldout_layer", metric)]
    groups: dict[str, list] = {}
    for r in tables["heldout"].itertuples():
        if r.metric == metric:
            groups.setdefault(f"{r.layer_rule}|{r.vision}|{r.llm}|{r.summary}", []).append(r)
    filled, open_, undefined = set(), set(), set()
    for tag, rows in groups.items():
        if any(math.isnan(r.diff_low_high) for r in rows):
            undefined.add(tag)
        elif (
            sum(r.low_stability for r in rows) / len(rows) > THRESHOLD
            or sum(r.high_stability for r in rows) / len(rows) > THRESHOLD
        ):
            open_.add(tag)
        else:
            filled.add(tag)
    found = {ln.get_gid() for ax in fig.axes for ln in ax.lines if ln.get_gid()}
    assert {g for g in found if g.split("|")[0] in ("heldout", "full")} == filled
    assert gids(fig, "unstable") == open_
    assert gids(fig, "undefined") == undefined
    for ln in fig.findobj(lambda a: (a.get_gid() or "").startswith("unstable|")):
        assert ln.get_markerfacecolor() == "white"
    if metric != "cka":
        assert open_ == {"heldout|vis-1|alpha-3b|mean"}  # planted; vis-0 × alpha-0.5b: 4e-4
        assert undefined == {"full|vis-2|beta-7b|pc1"}
    else:
        assert not open_ and not undefined
    assert not re.search(r"\bnan\b", all_text(fig), re.IGNORECASE)


def test_language_dispersion_marks(planted, tables):
    """Language dispersion high is a lighter fill (hatching means unstable, as everywhere);
    a bar is hatched when the mean of its pairs' stabilities exceeds the threshold, a pair's
    dot is open when its own does, a bar with an undefined pair is a cross."""
    from matplotlib.colors import to_rgb

    from xmodal.figures._common import COLORS
    from xmodal.figures.extensions import LIGHTEN

    fig = render_figure("language_dispersion", planted)
    cells = tables["joint_cells"]
    hatched, undefined, n_open = set(), set(), 0
    for (summary, cell), g in cells.groupby(["summary", "cell"]):
        values, stabs = list(g["value"]), list(g["stability"])
        if any(math.isnan(v) for v in values):
            undefined.add(f"{summary}|{cell}")
        elif sum(stabs) / len(stabs) > THRESHOLD:
            hatched.add(f"{summary}|{cell}")
        n_open += sum(1 for v, s in zip(values, stabs, strict=True) if s > THRESHOLD and v == v)
    bars = {p.get_gid()[4:]: p for ax in fig.axes for p in ax.patches if p.get_gid() and p.get_gid().startswith("bar|")}  # fmt: skip
    assert {g for g, b in bars.items() if b.get_hatch()} == hatched == {"pc1|vhigh_llow"}
    assert gids(fig, "undefined") == undefined == {"mean|vhigh_lhigh"}
    opened = fig.findobj(lambda a: (a.get_gid() or "").startswith("unstable|"))
    assert sum(len(c.get_offsets()) for c in opened) == n_open == 13
    for gid, bar in bars.items():
        level = "low" if gid.split("|")[1].startswith("vlow") else "high"
        base = np.array(to_rgb(COLORS[level]))
        want = base if gid.endswith("llow") else base + (1 - base) * LIGHTEN
        np.testing.assert_allclose(bar.get_facecolor()[:3], want, atol=1e-9)
    bands = {
        a.get_gid()[7:]: a for a in fig.findobj(lambda a: (a.get_gid() or "").startswith("random|"))
    }
    band_stab = cells.groupby("summary")["random_stability"].mean()
    assert (
        {s for s, b in bands.items() if b.get_hatch()}
        == {s for s in band_stab.index if band_stab[s] > THRESHOLD}
        == {"pc1"}
    )
    for patch in [*bars.values(), *bands.values()]:
        if patch.get_hatch() and hasattr(patch, "get_hatchcolor"):  # matplotlib ≥ 3.10
            assert tuple(patch.get_hatchcolor()[:3]) == (1.0, 1.0, 1.0)  # drawn white
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "stability > 0.001" in legend and "(13)" in legend and "not a number" in legend
    assert "nearest-neighbour sets decided by rounding or ties (2)" in legend  # a bar and a band


@pytest.mark.parametrize("metric", METRICS)
def test_heldout_fraction_na_where_a_split_is_undefined(figs, tables, metric):
    """The fraction of splits with low > high is "n/a" where any split's low or high is not a
    number (as the mean difference is), else a bar (held out) or tick (full-set layer) at the
    fraction computed here with loops. Before, it was drawn over the defined splits."""
    fig = figs[("heldout_layer", metric)]
    groups: dict[str, list] = {}
    for r in tables["heldout"].itertuples():
        if r.metric == metric:
            groups.setdefault(f"{r.layer_rule}|{r.vision}|{r.llm}|{r.summary}", []).append(r)
    fracs, undefined = {}, set()
    for tag, rows in groups.items():
        if any(math.isnan(r.low) or math.isnan(r.high) for r in rows):
            undefined.add(tag)
        else:
            fracs[tag] = sum(r.low > r.high for r in rows) / len(rows)
    marks = {a.get_gid()[5:]: a for a in fig.findobj(lambda a: (a.get_gid() or "").startswith("frac|"))}  # fmt: skip
    assert set(marks) == set(fracs)
    for tag, mark in marks.items():
        x = mark.get_width() if tag.startswith("heldout|") else mark.get_xdata()[0]
        assert x == pytest.approx(fracs[tag], abs=1e-12), tag
    assert gids(fig, "frac_undefined") == undefined
    for t in fig.findobj(lambda a: (a.get_gid() or "").startswith("frac_undefined|")):
        assert t.get_text() == "n/a"
    if metric != "cka":
        assert undefined == {"full|vis-2|beta-7b|pc1"}  # planted: split 0's low undefined
    else:
        assert not undefined


@pytest.mark.parametrize("metric", ["cknna", "cka"])
def test_contrasts_mark_the_sets_chosen_without_the_scored_model(planted, tables, metric, tmp_path):
    """With the self-selection table, every pair gets a second mark (a diamond and its
    interval) at the low − high of the sets chosen without its vision model; an undefined
    value is written n/a; without the table, no such mark."""
    con = tables["contrasts"]
    own = con[con["summary"].isin(["mean", "pc1"])].copy()
    own["diff_low_high"] = own["diff_low_high"] - 0.01 * np.arange(len(own))
    mine = own.index[own["metric"] == metric]
    undefined = mine[0]
    own.loc[undefined, "diff_low_high"] = np.nan
    # a diamond drawn filled black although its high value was unstable (audit), and one whose
    # PC1 sets came from a fit whose PC1 is noise: open, and grey with a title note
    own["low_stability"] = own["high_stability"] = 0.0
    shaky = mine[1]
    own.loc[shaky, "high_stability"] = 0.05
    own["pc1_oriented"] = True
    noise = own.index[(own["metric"] == metric) & (own["summary"] == "pc1")][-1]
    own.loc[noise, "pc1_oriented"] = False
    assert len({undefined, shaky, noise}) == 3
    path = tmp_path / "self_selection.tsv"
    own.to_csv(path, sep="\t", index=False, na_rep="NaN")
    fig = render_figure("contrasts", {**planted, "self_selection": path}, metric)
    want, want_na, kinds = {}, set(), {}
    for r in own[own["metric"] == metric].itertuples():
        tag = f"{r.vision}|{r.llm}|{r.summary}"
        if math.isnan(r.diff_low_high):
            want_na.add(tag)
        else:
            want[tag] = r.diff_low_high
            kinds[tag] = {shaky: "others_unstable", noise: "others_unoriented"}.get(
                r.Index, "others"
            )
    prefixes = ("others|", "others_unstable|", "others_unoriented|")
    marks = fig.findobj(lambda a: (a.get_gid() or "").startswith(prefixes))
    got = {a.get_gid().split("|", 1)[1]: float(a.get_xdata()[0]) for a in marks}
    assert {a.get_gid().split("|", 1)[1]: a.get_gid().split("|")[0] for a in marks} == kinds
    assert got.keys() == want.keys() and gids(fig, "others_undefined") == want_na
    for tag, value in want.items():
        assert got[tag] == pytest.approx(value, abs=1e-12)
    text = all_text(fig)
    assert "sets chosen without the scored vision model" in text
    # its interval only where the metric has one: the CKA metrics and n_boot 0 have none (audit)
    assert ("sets chosen without the scored vision model (its 95% CI)" in text) == (metric != "cka")
    assert "without it, low or high: stability > 0.001" in text and "(1)" in text
    assert "Grey diamonds (" in text and "low and high may be swapped" in text
    assert not gids(render_figure("contrasts", planted, metric), "others")
