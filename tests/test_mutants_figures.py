"""Mutation-testing survivors of the figures' data preparation (xmodal.figures): the numbers
and orders the paper's figures show, checked against independent computations from the input
tables (xmodal.figures.synthetic) or small hand-made tables."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest

from xmodal.dispersion import stable_rank
from xmodal.figures import render_figure
from xmodal.figures._common import Models
from xmodal.figures.synthetic import synthetic_inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Complete synthetic tables (3 vision × 4 LLMs, 40 stimuli)."""
    return synthetic_inputs(tmp_path_factory.mktemp("mutfig"))


def _t(inputs, name: str) -> pd.DataFrame:
    return pd.read_csv(inputs[name], sep="\t")


def _models_without_order() -> pd.DataFrame:
    """Two families (Beta listed first), sizes out of order, one label per key."""
    return pd.DataFrame(
        {
            "model": ["b-7b", "z-0.5b", "b-1b", "a-0.8b", "z-3b"],
            "family": ["Beta", "Zeta", "Beta", "Zeta", "Zeta"],
            "size_b": [7.0, 0.5, 1.0, 0.8, 3.0],
            "label": ["B7", "Z0.5", "B1", "Z0.8", "Z3"],
        }
    )


def test_models_order_family_then_ascending_size_without_order_column():
    """Guards the display order without an ``order`` column: families in the order models.tsv
    first lists them, inside a family the smaller model first (not descending, not by key,
    sizes not truncated to whole billions), unknown keys last."""
    m = Models.from_table(_models_without_order())
    keys = ["unknown-x", "z-3b", "a-0.8b", "b-7b", "z-0.5b", "b-1b"]
    assert m.order(keys) == ["b-1b", "b-7b", "z-0.5b", "a-0.8b", "z-3b", "unknown-x"]


def test_models_order_column_wins_over_family_and_size():
    """Guards the ``order`` column: when models.tsv has one, it decides the display order."""
    t = _models_without_order()
    t["order"] = [0, 1, 2, 3, 4]
    assert Models.from_table(t).order(t["model"][::-1]) == list(t["model"])


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_sets_bars_sit_on_their_llms_tick(inputs):
    """Guards the bar positions of Fig. 2B–E: the low / random / high bars of an LLM are
    centred on that LLM's tick (offsets −w, 0, +w with w = 0.8/3), and each tick sits on its
    LLM's bars (not shifted by one, not shifted by half a bar)."""
    fig = render_figure("sets_rank", inputs)
    models = Models.from_table(_t(inputs, "models"))
    for ax in _panels(fig):
        where = {
            t.get_text(): x for t, x in zip(ax.get_xticklabels(), ax.get_xticks(), strict=True)
        }
        bars = [p for p in ax.patches if (p.get_gid() or "").startswith("bar|")]
        assert len(bars) == 12
        for p in bars:
            _, cond, _, ll = p.get_gid().split("|")
            offset = {"low": -1, "random": 0, "high": 1}[cond] * 0.8 / 3
            centre = p.get_x() + p.get_width() / 2
            assert centre == pytest.approx(where[models.label(ll)] + offset, abs=1e-9)


def test_no_whisker_for_a_pair_with_a_single_draw():
    """Guards the random baseline's whisker: a pair with one draw has no interval to show
    (only pairs with several draws get one, even when other pairs have many)."""
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from xmodal.figures.alignment import _grouped_bars, pair_cells

    rows = pd.DataFrame(
        {"vision": "v", "llm": ["a", "a", "a", "b"], "draw": [0, 1, 2, 0],
         "value": [0.1, 0.2, 0.3, 0.4], "stability": 0.0}
    )  # fmt: skip
    fig, ax = plt.subplots()
    _grouped_bars(ax, "v", ["a", "b"], [("random", pair_cells(rows), True)])
    bars = [b for b in ax.containers if isinstance(b, ErrorbarContainer)]
    assert len(bars) == 1  # pair a only
    (segment,) = bars[0].lines[2][0].get_segments()
    assert segment[0, 0] == pytest.approx(0.0)  # at a's position
    plt.close(fig)


def test_set_size_only_when_the_grid_gives_one_size():
    """Guards the legend's '(n = K)': shown only when every row of the set has the same size
    (never the first of several sizes)."""
    from xmodal.figures.alignment import _set_size

    assert _set_size(pd.DataFrame({"n_stimuli": [10, 10]})) == " (n = 10)"
    assert _set_size(pd.DataFrame({"n_stimuli": [10, 12]})) == ""


def test_grid_heatmap_colour_scale_is_symmetric_in_the_largest_absolute_difference(
    inputs, tmp_path
):
    """Guards the diverging scale of the low − high heatmaps: ±max |low − high| over both
    panels, so a large negative difference is not clipped at the largest positive one."""
    con = _t(inputs, "contrasts")
    con.loc[(con["summary"] == "pc1") & (con["vision"] == "vis-1") & (con["llm"] == "beta-1b"),
            "diff_low_high"] = -5.0  # fmt: skip
    path = tmp_path / "contrasts.tsv"
    con.to_csv(path, sep="\t", index=False)
    fig = render_figure("grid_heatmap", {**inputs, "contrasts": path})
    axes = _panels(fig)
    for ax in axes[1:]:
        assert ax.collections[0].get_clim() == pytest.approx((-5.0, 5.0))


def _layers(tmp_path, rows: list[dict]) -> dict:
    path = tmp_path / "layers.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return {"layers": path}


def test_layerwise_curve_is_the_deepest_vision_layer_by_relative_llm_depth(tmp_path):
    """Guards the layer-wise curve: without a chosen row, the deepest vision layer's values;
    x = llm_layer / deepest llm_layer (0 … 1, not / (L+1)); points in llm_layer order even
    when the table's rows are not."""
    rows = []
    for vl in (4, 12):
        for li in (3, 0, 4, 1, 2):
            rows.append({"vision": "v", "llm": "l", "vision_layer": vl, "llm_layer": li,
                         "metric": "cknna", "value": vl + li / 10, "stability": 0.0})  # fmt: skip
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    (line,) = _panels(fig)[0].lines
    assert list(line.get_xdata()) == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert list(line.get_ydata()) == pytest.approx([12.0, 12.1, 12.2, 12.3, 12.4])


def test_layerwise_no_chosen_mark_on_a_degenerate_layer(tmp_path):
    """Guards the chosen-layer mark: a chosen layer that is not valid is a cross, not also a
    chosen marker."""
    rows = [
        {"vision": "v", "llm": "l", "vision_layer": 1, "llm_layer": li, "metric": "cknna",
         "value": 0.1 * li, "stability": 0.0, "valid": li != 2, "chosen": li == 2}
        for li in range(4)
    ]  # fmt: skip
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    gids = {a.get_gid() for a in fig.findobj(lambda a: bool(a.get_gid()))}
    assert "undefined|v|l" in gids and "chosen|v|l" not in gids


def test_layerwise_a_tied_choice_is_a_diamond(tmp_path):
    """A chosen layer within the stabilities of another (``layer_tied``) is drawn as a diamond
    (gid ``tied|``), not the round chosen mark, and the legend counts it; an untied choice
    keeps the round mark and no legend entry for ties."""
    rows = [
        {"vision": "v", "llm": llm, "vision_layer": 1, "llm_layer": li, "metric": "cknna",
         "value": 0.1 + 0.01 * li, "stability": 0.0, "valid": True, "chosen": li == 3,
         "layer_tied": llm == "l" and li == 3}
        for llm in ("l", "m") for li in range(4)
    ]  # fmt: skip
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    gids = {a.get_gid() for a in fig.findobj(lambda a: bool(a.get_gid()))}
    assert {"tied|v|l", "chosen|v|m"} <= gids and not {"chosen|v|l", "tied|v|m"} & gids
    (tie,) = [c for c in _panels(fig)[0].collections if c.get_gid() == "tied|v|l"]
    np.testing.assert_allclose(tie.get_offsets(), [[1.0, 0.13]])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "chosen, tied with another layer (1)" in labels
    for r in rows:
        r["layer_tied"] = False
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert not [x for x in labels if "tied" in x]


def test_layerwise_a_value_between_degenerate_layers_is_drawn(tmp_path):
    """A valid layer whose neighbours are degenerate (or the line's end) is a line of one point,
    which matplotlib draws as nothing: the figure must show it as a dot at its value, in the
    line's colour. Layers 0 and 2 here (1 and 3 degenerate, 4 valid next to 5) — and not the
    points a line already joins, nor a chosen or unstable layer, which have their own marks."""
    from matplotlib.colors import to_rgba

    valid = [True, False, True, False, True, True, False, True]
    unstable_at, chosen_at = 7, 4
    rows = [
        {"vision": "v", "llm": "l", "vision_layer": 1, "llm_layer": li, "metric": "cknna",
         "value": 0.1 + 0.01 * li, "stability": 0.5 if li == unstable_at else 0.0,
         "valid": ok, "chosen": li == chosen_at}
        for li, ok in enumerate(valid)
    ]  # fmt: skip
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    ax = _panels(fig)[0]
    (dots,) = [c for c in ax.collections if c.get_gid() == "isolated|v|l"]
    np.testing.assert_allclose(dots.get_offsets(), [[0.0, 0.10], [2 / 7, 0.12]])
    assert tuple(dots.get_facecolors()[0]) == pytest.approx(to_rgba(ax.lines[0].get_color()))
    rows[1]["valid"] = True  # layers 0, 1, 2 now one line: no dot
    fig = render_figure("layerwise", _layers(tmp_path, rows))
    assert not [c for c in _panels(fig)[0].collections if c.get_gid() == "isolated|v|l"]


def test_properties_name_models_as_every_figure_draws_them(inputs, tmp_path):
    """A label with one ``$`` is drawn with its ``$`` and a math label as math, in the
    properties figure's token rows as in the layer-wise legend (the properties figure drew the
    first with a stray backslash and the second as raw TeX); a manifest column's ``$`` stays."""
    models = _t(inputs, "models")
    labels = {"alpha-0.5b": "BLOOM $10", "alpha-3b": r"$\alpha$-BLOOM"}
    models["label"] = models["model"].map(labels).fillna(models["label"])
    corr = _t(inputs, "property_correlations")
    column = corr[corr["property"] == "colourfulness"].assign(property="manifest:cost $")
    paths = {**inputs, "models": tmp_path / "models.tsv",
             "property_correlations": tmp_path / "corr.tsv"}  # fmt: skip
    models.to_csv(paths["models"], sep="\t", index=False)
    pd.concat([corr, column]).to_csv(paths["property_correlations"], sep="\t", index=False)

    def drawn(texts) -> set[tuple[str, bool]]:  # (the text as drawn, set as math)
        return {t._preprocess_math(t.get_text()) for t in texts if t.get_text()}

    ticks = drawn(render_figure("properties", paths).axes[0].get_yticklabels())
    assert ("caption length (tokens, BLOOM $10)", False) in ticks
    assert (r"caption length (tokens, $\alpha$-BLOOM)", True) in ticks
    assert ("cost $ (manifest)", False) in ticks
    legend = drawn(render_figure("layerwise", paths).legends[0].get_texts())
    assert {("BLOOM $10", False), (r"$\alpha$-BLOOM", True)} <= legend


def test_contrast_interval_touching_zero_is_not_significant(inputs, tmp_path):
    """Guards the forest plot's colour: an interval whose lower end is exactly 0 includes 0
    (grey, as xmodal.summary counts 'CI above 0' with a strict >), only lo > 0 is blue."""
    from matplotlib.colors import to_rgba

    from xmodal.figures._common import COLORS

    con = _t(inputs, "contrasts")
    at = (con["summary"] == "mean") & (con["vision"] == "vis-0") & (con["llm"] == "alpha-3b")
    con.loc[at, "diff_ci_low"] = 0.0
    con.loc[at, "diff_low_high"] = 0.02
    con.loc[at, "diff_ci_high"] = 0.04
    path = tmp_path / "contrasts.tsv"
    con.to_csv(path, sep="\t", index=False)
    fig = render_figure("contrasts", {**inputs, "contrasts": path})
    (mark,) = fig.findobj(lambda a: a.get_gid() == "diff|vis-0|alpha-3b|mean")
    assert to_rgba(mark.get_markeredgecolor()) == to_rgba(COLORS["random"])


def test_summary_line_notes_undefined_pairs_only_when_there_are_some():
    """Guards the contrasts title: '(k undefined)' only when n_pairs > n_valid."""
    from xmodal.figures.alignment import _summary_line

    stats = pd.DataFrame(
        {"n_valid": [12, 10], "n_pairs": [12, 12], "n_low_gt_random_gt_high": [5, 4],
         "median_ratio_low_high": [1.5, 1.2], "n_unstable": [0, 0]},
        index=pd.Index(["mean", "pc1"], name="summary"),
    )  # fmt: skip
    assert "undefined" not in _summary_line(stats, "mean")
    assert "5/12 pairs" in _summary_line(stats, "mean")
    assert "(2 undefined)" in _summary_line(stats, "pc1")


def _span(patch) -> tuple[float, float]:
    xy = np.asarray(patch.get_xy() if hasattr(patch, "get_xy") else patch.get_path().vertices)
    if xy.ndim == 1:  # a Rectangle: its corner
        return patch.get_x(), patch.get_x() + patch.get_width()
    return float(xy[:, 0].min()), float(xy[:, 0].max())


def test_dispersion_sets_bands_cover_their_sets_ranks(inputs):
    """Guards Fig. 2A/F's bands: from the lowest to the highest rank of the set's members,
    half a rank beyond each (the members' own ranks inside, no neighbour's)."""
    fig = render_figure("dispersion_sets", inputs)
    disp = _t(inputs, "dispersion").set_index("stimulus_id")
    sets = _t(inputs, "sets")
    for ax, summary, rank in zip(_panels(fig)[:2], ("mean", "pc1"), ("rank_mean", "rank_pc1"),
                                 strict=True):  # fmt: skip
        want = []
        for name in ("low", "high"):
            ids = sets.loc[(sets["set"] == name) & (sets["summary"] == summary), "stimulus_id"]
            r = disp.loc[ids, rank]
            want.append((r.min() - 0.5, r.max() + 0.5))
        got = [_span(p) for p in ax.patches]
        assert np.ravel(sorted(got)) == pytest.approx(np.ravel(sorted(want)))


def test_residual_space_is_the_centred_svd_signed_like_pc1(inputs):
    """Guards F′: the scores of the column-centred residual matrix on its first two right
    singular vectors, PC1 signed to agree with pc1_score, and the explained variance from
    squared singular values."""
    fig = render_figure("dispersion_sets", inputs)
    ax = _panels(fig)[2]
    res = _t(inputs, "residuals")
    wide = res.pivot(index="stimulus_id", columns="model", values="residual").sort_index()
    x = wide.to_numpy(float)
    x = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    sc = x @ vt[:2].T
    pc1 = _t(inputs, "dispersion").set_index("stimulus_id").loc[wide.index, "pc1_score"]
    if np.corrcoef(sc[:, 0], pc1)[0, 1] < 0:
        sc[:, 0] *= -1
    got = np.asarray(ax.collections[0].get_offsets())
    assert got == pytest.approx(sc, abs=1e-9)
    ev = s**2 / (s**2).sum()
    assert ax.get_xlabel() == f"PC1 of residual space ({100 * ev[0]:.0f}% var.)"
    assert ax.get_ylabel() == f"PC2 ({100 * ev[1]:.0f}% var.)"


def test_loo_without_summary_recomputes_on_finite_pairs(inputs, tmp_path):
    """Guards Supp. Fig. 2 without loo.tsv: points, fit, Pearson r and Spearman ρ over the
    stimuli whose partial dispersion and deviation are both numbers."""
    from scipy import stats

    pts = _t(inputs, "loo_stimuli")
    g = pts["held_out"] == "vis-0"
    # monotone but far from linear: Spearman's ρ is 1, Pearson's r is not
    pts.loc[g, "deviation"] = np.exp(40 * pts.loc[g, "partial_dispersion"])
    pts.loc[pts.index[g][:3], "deviation"] = np.nan
    path = tmp_path / "loo_stimuli.tsv"
    pts.to_csv(path, sep="\t", index=False)
    fig = render_figure("loo", {"loo_stimuli": path, "models": inputs["models"]})
    ax = _panels(fig)[0]
    mine = pts[g].dropna(subset=["partial_dispersion", "deviation"])
    x, y = mine["partial_dispersion"].to_numpy(float), mine["deviation"].to_numpy(float)
    assert len(ax.collections[0].get_offsets()) == len(x) == 37
    slope, icpt = np.polyfit(x, y, 1)
    assert list(ax.lines[0].get_ydata()) == pytest.approx([icpt + slope * x.min(),
                                                           icpt + slope * x.max()])  # fmt: skip
    text = ax.get_title(loc="left")
    assert f"r = {stats.pearsonr(x, y)[0]:.2f}" in text
    assert f"ρ = {stats.spearmanr(x, y)[0]:.2f}" in text
    assert "ρ = 1.00" in text and f"r = {stats.pearsonr(x, y)[0]:.2f}" != "r = 1.00"
    assert "n = 37" in text


def test_gallery_with_few_stimuli_shows_each_stimulus_once(tmp_path):
    """Guards the gallery's n: at most half the stimuli per group, so the lowest and highest
    groups never show the same stimulus (10 stimuli: the 5 lowest and the 5 highest)."""
    small = synthetic_inputs(tmp_path, n_stimuli=10, set_size=3, n_random=3)
    fig = render_figure("gallery", small)
    disp = _t(small, "dispersion").sort_values("rank_mean")["stimulus_id"].tolist()
    got = [ax.get_gid() for ax in _panels(fig)]
    assert got == [f"lowest:{s}" for s in disp[:5]] + [f"highest:{s}" for s in disp[::-1][:5]]


def test_gallery_image_size_is_width_by_height():
    """Guards the gallery's 'W×H px' from pixels = W·H and aspect = W/H (not H×W)."""
    from xmodal.figures.dispersion import _image_size

    assert _image_size(300 * 100, 3.0) == "300×100 px"


def test_gallery_token_span_is_min_to_max_over_tokenizers():
    """Guards the gallery's token count: the range over the LLMs' tokenizers, min–max."""
    from xmodal.figures.dispersion import _property_lines

    props = pd.DataFrame(
        {"stimulus_id": "s1", "model": ["m1", "m2", "m3", ""],
         "property": ["caption_tokens"] * 3 + ["caption_words"],
         "value": [9.0, 5.0, 6.0, 4.0]}
    )  # fmt: skip
    assert _property_lines(props)["s1"].split("\n")[0] == "4 words, 5–9 tokens"


def test_residual_correlations_and_distance_rho(inputs, tmp_path):
    """Guards the residuals figure: panel B is the Pearson r of the residual columns, labelled
    in display order (models.tsv order, here not alphabetical); panel C's ρ is the Spearman
    correlation of each stimulus's mean residual and mean distance."""
    from scipy import stats

    models = _t(inputs, "models")
    order = {"vis-0": 2, "vis-1": 0, "vis-2": 1}
    models["order"] = [order.get(k, 10 + i) for i, k in enumerate(models["model"])]
    path = tmp_path / "models.tsv"
    models.to_csv(path, sep="\t", index=False)
    fig = render_figure("residuals", {"residuals": inputs["residuals"], "models": path})
    _, ax2, ax3 = _panels(fig)
    res = _t(inputs, "residuals")
    keys = ["vis-1", "vis-2", "vis-0"]
    labels = Models.from_table(models).labels(keys)
    assert [t.get_text() for t in ax2.get_xticklabels()] == labels
    wide = res.pivot(index="stimulus_id", columns="model", values="residual")[keys]
    r = np.corrcoef(wide.to_numpy(float).T)
    assert [t.get_text() for t in ax2.texts] == [f"{x:.2f}" for x in r.ravel()]
    per = res.groupby("stimulus_id")[["residual", "distance"]].mean()
    rho = stats.spearmanr(per["residual"], per["distance"])[0]
    assert ax3.get_title(loc="left").endswith(f"\nSpearman ρ = {rho:.2f}") and not ax3.texts


def test_heldout_title_counts_the_splits_made_not_the_fewest_of_a_pair(inputs, tmp_path):
    """Guards the held-out figure's title: the number of splits is the largest any pair has
    (one pair missing a split does not lower it)."""
    held = _t(inputs, "heldout")
    gone = (held["vision"] == "vis-0") & (held["llm"] == "alpha-0.5b") & (held["split"] == 4)
    path = tmp_path / "heldout.tsv"
    held[~gone].to_csv(path, sep="\t", index=False)
    fig = render_figure("heldout_layer", {"heldout": path, "models": inputs["models"]})
    assert f"each of {held['split'].nunique()} random splits" in fig.get_suptitle()


def test_grid_heatmap_counts_unstable_cells_only_where_a_value_is_shown(inputs, tmp_path):
    """Guards the legend's unstable count: a low − high cell that is not a number is counted
    as undefined, never also as unstable (its stabilities are not shown)."""
    con = _t(inputs, "contrasts")
    pair = (con["summary"] == "mean") & (con["vision"] == "vis-0")
    con.loc[pair & (con["llm"] == "alpha-0.5b"), ["diff_low_high", "low_stability"]] = [
        np.nan, 0.5,
    ]  # fmt: skip
    con.loc[pair & (con["llm"] == "beta-7b"), "high_stability"] = 0.5
    path = tmp_path / "contrasts.tsv"
    con.to_csv(path, sep="\t", index=False, na_rep="NaN")
    fig = render_figure("grid_heatmap", {**inputs, "contrasts": path})
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [s for s in legend if s.startswith("stability >")][0].endswith("(1)")
    assert [s for s in legend if s.startswith("n/a")][0].endswith("(1)")


def test_figure_metrics_once_each_in_config_order():
    """Guards the per-metric figure list: a metric named twice in the config gives one figure
    file (no duplicate outputs), in the config's order."""
    from xmodal.figures import figure_files, figure_metrics

    assert figure_metrics("sets_rank", ["cka", "cknna", "cka"]) == ["cka", "cknna"]
    files = figure_files("d", ["cka", "cknna", "cka"])
    assert len(files) == len(set(files))


def test_grid_heatmap_draws_a_summarys_contrasts_without_its_grid_rows(inputs, tmp_path):
    """Guards the heatmap's panels: a summary is drawn when the contrasts table holds it, even
    when the grid has no low / high rows of that summary (its differences come from the
    contrasts)."""
    grid = _t(inputs, "grid")
    keep = ~(grid["condition"].isin(["low", "high"]) & (grid["summary"] == "pc1"))
    path = tmp_path / "grid.tsv"
    grid[keep].to_csv(path, sep="\t", index=False)
    fig = render_figure("grid_heatmap", {**inputs, "grid": path})
    axes = _panels(fig)
    assert len(axes) == 3 and "PC1" in axes[2].get_title(loc="left")
    con = _t(inputs, "contrasts").query("summary == 'pc1' and vision == 'vis-0'")
    want = con.set_index("llm").loc["alpha-0.5b", "diff_low_high"]
    assert axes[2].texts[0].get_text().startswith(f"{want:+.3f}")


def test_loo_panel_reads_the_summary_table(inputs, tmp_path):
    """Guards Supp. Fig. 2's statistics: read from loo.tsv when it has the held-out model,
    never recomputed from the points (which may be fewer than the summary's stimuli)."""
    loo = _t(inputs, "loo")
    loo.loc[loo["held_out"] == "vis-1", ["pearson_r", "spearman_rho", "n"]] = [0.123, -0.456, 99]
    path = tmp_path / "loo.tsv"
    loo.to_csv(path, sep="\t", index=False)
    fig = render_figure("loo", {**inputs, "loo": path})
    text = _panels(fig)[1].get_title(loc="left")
    assert "r = 0.12," in text and "ρ = -0.46," in text and "n = 99" in text


def test_p_values_below_one_in_a_thousand_only():
    """Guards the p-value text: 'p < 0.001' only below 0.001; 0.001 itself is written out."""
    from xmodal.figures._common import format_p

    assert format_p(0.001) == "p = 0.001"
    assert format_p(0.000999) == "p < 0.001"


def test_random_draw_count_is_the_largest_of_any_pair():
    """Guards the sets legend's number of draws: the pair with the most draws, not the fewest
    (a pair missing draws does not lower it)."""
    from xmodal.figures.alignment import _n_draws

    rows = pd.DataFrame({"vision": "v", "llm": ["a", "a", "a", "b"], "value": 0.1})
    assert _n_draws(rows) == 3


def test_heldout_open_marker_when_only_the_high_value_is_unstable(inputs, tmp_path):
    """Guards the held-out forest plot's marks: a mean whose high-set stability exceeds the
    threshold is open, even when the low set's is stable."""
    held = _t(inputs, "heldout")
    at = (
        (held["vision"] == "vis-0")
        & (held["llm"] == "beta-1b")
        & (held["summary"] == "mean")
        & (held["layer_rule"] == "heldout")
    )
    held.loc[at, "high_stability"] = 0.5
    held.loc[at, "low_stability"] = 0.0
    path = tmp_path / "heldout.tsv"
    held.to_csv(path, sep="\t", index=False)
    fig = render_figure("heldout_layer", {"heldout": path, "models": inputs["models"]})
    gids = {a.get_gid() for a in fig.findobj(lambda a: bool(a.get_gid()))}
    assert "unstable|heldout|vis-0|beta-1b|mean" in gids
    assert "heldout|vis-0|beta-1b|mean" not in gids


def test_heldout_title_names_each_rules_counts():
    """Guards the held-out panel title: the held-out layer's counts under 'held-out layer',
    the full-set layer's under 'full-set layer'."""
    from xmodal.figures.alignment import _heldout_line

    stats = pd.DataFrame(
        {"summary": ["mean", "mean"], "layer_rule": ["heldout", "full"],
         "n_low_gt_high": [7, 11], "n_valid": [12, 12], "median_diff": [0.01, 0.05]}
    ).set_index(["summary", "layer_rule"])  # fmt: skip
    assert _heldout_line(stats, "mean") == (
        "\nheld-out layer: low > high in 7/12 pairs, median Δ +0.010"
        "\nfull-set layer: low > high in 11/12 pairs, median Δ +0.050"
    )
    # pairs left out of the counts (a split's value not a number) and flagged ones are said,
    # as in the contrasts titles: "11/11" alone over 12 drawn rows read as every pair
    stats = stats.assign(n_pairs=[12, 12], n_valid=[11, 12], n_unstable=[2, 0])
    assert _heldout_line(stats, "mean") == (
        "\nheld-out layer: low > high in 7/11 pairs, median Δ +0.010\n    (1 undefined, 2 unstable)"
        "\nfull-set layer: low > high in 11/12 pairs, median Δ +0.050"
    )


def test_contrasts_title_says_how_many_pairs_layer_choice_was_tied():
    """The summary's n_layer_tied is said next to the other flags of the counts; a summary
    table without the column (an older run's) says nothing of ties."""
    from xmodal.figures.alignment import _summary_line

    row = {"n_low_gt_random_gt_high": 9, "n_valid": 12, "n_pairs": 12, "n_unstable": 1,
           "median_ratio_low_high": 1.5, "n_ratio": 12}  # fmt: skip
    stats = pd.DataFrame([{"summary": "mean", **row, "n_layer_tied": 2}]).set_index("summary")
    assert _summary_line(stats, "mean").startswith(
        "\nlow > random > high in 9/12 pairs (1 unstable, 2 layer tied)\n"
    )
    stats = pd.DataFrame([{"summary": "mean", **row}]).set_index("summary")
    assert "tied" not in _summary_line(stats, "mean")


def test_gallery_picks_by_mean_dispersion_not_pc1(inputs, tmp_path):
    """Guards the gallery's choice: the lowest and highest stimuli by rank of mean dispersion,
    whatever the PC1 ranks say (here reversed)."""
    disp = _t(inputs, "dispersion")
    disp["pc1_score"] = -disp["mean_dispersion"]
    disp["rank_pc1"] = stable_rank(disp["pc1_score"].to_numpy())  # as the GPA writes it
    path = tmp_path / "dispersion.tsv"
    disp.to_csv(path, sep="\t", index=False)
    fig = render_figure("gallery", {"dispersion": path, "manifest": inputs["manifest"]})
    ids = disp.sort_values("rank_mean")["stimulus_id"].tolist()
    got = [ax.get_gid() for ax in _panels(fig)]
    assert got == [f"lowest:{s}" for s in ids[:12]] + [f"highest:{s}" for s in ids[::-1][:12]]


def test_figure_files_leave_out_skipped_figures():
    """Guards figure_files' skip: a figure whose step the config turns off has no file."""
    from xmodal.figures import figure_files

    files = figure_files("d", ["cknna", "cka"], skip=["loo", "sets_rank"])
    assert not [f for f in files if f.startswith(("d/loo.", "d/sets_rank."))]
    assert "d/sets_pc1.png" in files and "d/sets_pc1.cka.pdf" in files


def test_gallery_shortens_long_captions_without_spaces_too():
    """A caption longer than CAPTION_CHARS is cut to that many characters ending " …": at a
    space near the end when there is one, mid-word otherwise. textwrap.shorten cut a Chinese
    caption (no spaces) to "…" alone."""
    from xmodal.figures.dispersion import CAPTION_CHARS, _shorten

    chinese = "一只狗坐在沙发上" * 15
    assert _shorten(chinese, CAPTION_CHARS) == chinese[: CAPTION_CHARS - 2] + " …"
    english = "A large yellow circle at the bottom, a small purple triangle on the left and a large orange one."
    short = _shorten(english, CAPTION_CHARS)
    assert (
        short
        == "A large yellow circle at the bottom, a small purple triangle on the left and a large …"
    )
    assert len(short) <= CAPTION_CHARS
    assert _shorten("  a   dog ", CAPTION_CHARS) == "a dog"
    assert _shorten("x" * CAPTION_CHARS, CAPTION_CHARS) == "x" * CAPTION_CHARS


# ------------------------------------------------------------ titles from the summary (mutation audit)


def test_sets_title_without_intervals_names_the_pairs_left_out(inputs, tmp_path):
    """No pair with an interval: no interval count; a pair not valid: named beside the counts."""
    summary = _t(inputs, "summary")
    summary["n_with_ci"] = 0
    summary["n_diff_ci_above_zero"] = 0
    summary["n_pairs"] = summary["n_valid"] + 1
    summary.to_csv(tmp_path / "summary.tsv", sep="\t", index=False)
    fig = render_figure("sets_rank", {**inputs, "summary": tmp_path / "summary.tsv"})
    title = fig.get_suptitle()
    assert "interval above 0" not in title and "(1 undefined" in title, title


def test_sets_pc1_without_the_summary_table_has_no_counts(inputs):
    fig = render_figure("sets_pc1", {k: v for k, v in inputs.items() if k != "summary"})
    assert "low > high in" not in fig.get_suptitle()


def test_loo_title_does_not_count_an_undefined_r(inputs, tmp_path):
    loo = _t(inputs, "loo")
    loo.loc[loo["held_out"] == "vis-1", "pearson_r"] = np.nan
    loo.to_csv(tmp_path / "loo.tsv", sep="\t", index=False)
    fig = render_figure("loo", {**inputs, "loo": tmp_path / "loo.tsv"})
    want = int((loo.groupby("held_out")["pearson_r"].first() > 0).sum())
    title = fig.get_suptitle()
    assert want < 3 and f"r > 0 for {want} of 3 held-out models;" in title, title
