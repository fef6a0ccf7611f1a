"""Figures render from small synthetic aggregate tables and contain the panels and labels they should.

Checks look at the matplotlib objects (axes, titles, tick labels, artists), never at pixels.
"""

from __future__ import annotations

import itertools
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from xmodal.dispersion import stable_rank
from xmodal.figures import FIGURES, INPUT_NAMES, make_figure, render_figure
from xmodal.figures.synthetic import synthetic_inputs

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {
    "dispersion_sets", "sets_rank", "sets_pc1", "drop25", "loo",
    "grid_heatmap", "layerwise", "gallery", "residuals", "contrasts", "diagnostics",
    "language_dispersion", "properties", "heldout_layer",
}  # fmt: skip
VISION = ["Vision A", "Vision B", "Vision C"]
LLMS = ["Alpha 0.5b", "Alpha 3b", "Beta 1b", "Beta 7b"]  # family, then size (models.tsv `order`)
RAW_KEYS = ["vis-0", "vis-1", "vis-2", "alpha-0.5b", "alpha-3b", "beta-1b", "beta-7b"]


def test_the_registry_loads_no_plotting_library():
    """The workflow reads FIGURES at every start (each dry run, each cluster job): matplotlib
    and seaborn, seconds to import, load only when a figure is drawn. Every entry names a
    drawing function that exists."""
    import importlib
    import subprocess
    import sys

    code = (
        "import sys, xmodal.figures as f; f.figure_files('d', ['cknna', 'cka']); "
        "print(sorted(m for m in ('matplotlib', 'seaborn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    for spec in FIGURES.values():
        module, function = spec.drawer.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(f"xmodal.figures.{module}"), function))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """3 vision × 4 LLMs in 2 families, 40 stimuli, K = 10, 10 random draws, tiny PNG images."""
    return synthetic_inputs(tmp_path_factory.mktemp("tables"))


@pytest.fixture(scope="module")
def figs(inputs) -> dict[str, Figure]:
    """Every figure, rendered once."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # complete inputs: no warning of ours
        # but a library's deprecation: matplotlib 3.8 with pyparsing 3.3 warns one that is a
        # UserWarning too (PyparsingDeprecationWarning), the first time mathtext parses
        warnings.simplefilter("ignore", DeprecationWarning)
        return {name: render_figure(name, inputs) for name in FIGURES}


def table(inputs, name: str) -> pd.DataFrame:
    return pd.read_csv(inputs[name], sep="\t")


def panels(fig: Figure) -> list:
    """Data axes (colour bars excluded), in creation order."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def placeholders(ax) -> list:
    """Texts drawn on a gallery image other than its properties annotation."""
    return [t for t in ax.texts if not str(t.get_gid()).startswith("properties:")]


def all_text(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


# --------------------------------------------------------------------------- registry & captions
def test_registry_names_inputs_and_captions():
    assert set(FIGURES) == EXPECTED
    for name, spec in FIGURES.items():
        assert spec.name == name
        assert set(spec.inputs) <= INPUT_NAMES
        assert set(spec.optional) <= set(spec.inputs)
        caption = ROOT / spec.caption
        assert caption.is_file(), f"missing caption {caption}"
        assert len(caption.read_text().split()) > 30
    assert (ROOT / "workflow/report/workflow.rst").is_file()


def test_make_figure_writes_png_and_pdf_atomically(inputs, tmp_path):
    for name in ("sets_rank", "gallery"):
        png, pdf = tmp_path / "figs" / f"{name}.png", tmp_path / "figs" / f"{name}.pdf"
        make_figure(name, inputs, png, pdf)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert pdf.read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "gallery.pdf", "gallery.png", "sets_rank.pdf", "sets_rank.png",
    ]  # fmt: skip


def test_bad_names_and_missing_inputs(inputs):
    with pytest.raises(KeyError, match="unknown figure"):
        render_figure("nope", inputs)
    with pytest.raises(KeyError, match="needs input"):
        render_figure("sets_rank", {"models": inputs["models"]})
    with pytest.raises(KeyError, match="unknown input"):
        render_figure("sets_rank", {**inputs, "gridd": inputs["grid"]})


def test_labels_never_raw_keys(figs):
    for name, fig in figs.items():
        text = all_text(fig)
        for key in RAW_KEYS:
            assert not re.search(rf"(?<![\w.-]){re.escape(key)}(?![\w.-])", text), (name, key)


# --------------------------------------------------------------------------- per figure
@pytest.mark.parametrize(("name", "letters"), [("sets_rank", "BCD"), ("sets_pc1", "GHI")])
def test_sets_figures(figs, inputs, name, letters):
    fig = figs[name]
    axes = panels(fig)
    assert [ax.get_title(loc="left") for ax in axes] == [
        f"{c}   {v}" for c, v in zip(letters, VISION, strict=True)
    ]
    grid = table(inputs, "grid")
    summary = "mean" if name == "sets_rank" else "pc1"
    for i, (ax, vkey) in enumerate(zip(axes, ["vis-0", "vis-1", "vis-2"], strict=True)):
        assert ticks(ax.get_xticklabels()) == LLMS
        assert ax.get_xlabel() == "Language model"
        # panels in two columns: the y axis is labelled once per row, on the left
        assert ("CKNNA" in ax.get_ylabel()) == (i % 2 == 0)
        bars = ax.patches
        assert len(bars) == 3 * len(LLMS)  # low, random, high per LLM
        pair = grid[grid["vision"] == vkey]
        low = pair[
            (pair["llm"] == "alpha-0.5b")
            & (pair["condition"] == "low")
            & (pair["summary"] == summary)
        ]
        assert bars[0].get_height() == pytest.approx(low["value"].item())
        rnd = pair[(pair["llm"] == "beta-7b") & (pair["condition"] == "random")]["value"]
        assert bars[len(LLMS) + 3].get_height() == pytest.approx(rnd.mean())
        assert any(isinstance(c, LineCollection) for c in ax.collections)  # the random 95% interval
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[0].startswith("Low dispersion") and legend[2] == "High dispersion"
    assert "95% interval of 10 draws" in legend[1]
    # a question with the summary table's counts, not the paper's claim over any data (audit)
    title = fig.get_suptitle()
    assert title.startswith("Does stimulus-specific dispersion modulate vision–language alignment?")
    summ = table(inputs, "summary").query("metric == 'cknna' and summary == @summary").iloc[0]
    assert f"\nlow > high in {summ.n_low_gt_high}/{summ.n_valid} pairs, " in title
    assert f"interval above 0 in {summ.n_diff_ci_above_zero}/{summ.n_with_ci}" in title


def test_sets_title_says_when_pairs_have_no_interval(inputs, tmp_path):
    """Where bootstrap resamples out of [−1, 1] leave a pair's interval of low − high
    undefined, the title counts over the pairs with one and says so; with none defined it
    says that, instead of dropping the clause (audit of 2026-12-06)."""
    summary = table(inputs, "summary")
    row = (summary["metric"] == "cknna") & (summary["summary"] == "mean")
    n_valid = int(summary.loc[row, "n_valid"].item())
    summary.loc[row, ["n_with_ci", "n_diff_ci_above_zero"]] = [n_valid - 1, 1]
    summary.to_csv(tmp_path / "some.tsv", sep="\t", index=False)
    fig = render_figure("sets_rank", {**inputs, "summary": tmp_path / "some.tsv"})
    want = f"interval above 0 in 1/{n_valid - 1} with an interval"
    assert want in fig.get_suptitle(), fig.get_suptitle()
    summary.loc[row, "n_with_ci"] = 0
    summary.loc[row, "n_diff_ci_above_zero"] = np.nan
    summary.to_csv(tmp_path / "none.tsv", sep="\t", index=False)
    fig = render_figure("sets_rank", {**inputs, "summary": tmp_path / "none.tsv"})
    assert "pairs, no interval of low − high" in fig.get_suptitle(), fig.get_suptitle()


def test_drop25(figs, inputs):
    axes = panels(figs["drop25"])
    assert len(axes) == 3
    assert all(ticks(ax.get_xticklabels()) == LLMS for ax in axes)
    assert all(len(ax.patches) == 4 * len(LLMS) for ax in axes)  # full, random, drop ×2
    legend = [t.get_text() for t in figs["drop25"].legends[0].get_texts()]
    assert [s.split(":")[0].split(" (")[0] for s in legend] == [
        "Full set",
        "Random sets of the drop size",
        "Drop high-dispersion",
        "Drop low-dispersion",
    ]
    assert "95% interval of 10 draws (n = 30)" in legend[1] and "(n = 30)" in legend[2]
    grid = table(inputs, "grid")
    rnd = grid.query("vision == 'vis-0' and llm == 'alpha-0.5b' and condition == 'random_drop'")
    bar = next(p for p in axes[0].patches if p.get_gid() == "bar|random_drop|vis-0|alpha-0.5b")
    assert bar.get_height() == pytest.approx(rnd["value"].mean())
    # the summary's counts, read from the drop summary table
    summ = table(inputs, "drop_summary").query("summary == 'mean'").iloc[0]
    title = figs["drop25"].get_suptitle()
    assert (
        f"drop high > random of the same size > drop low in "
        f"{summ.n_drop_high_gt_random_gt_drop_low}/{summ.n_valid} pairs" in title
    )


def test_drop25_without_the_control(inputs, tmp_path):
    grid = table(inputs, "grid")
    grid[grid["condition"] != "random_drop"].to_csv(tmp_path / "grid.tsv", sep="\t", index=False)
    fig = render_figure("drop25", {"grid": tmp_path / "grid.tsv", "models": inputs["models"]})
    assert all(len(ax.patches) == 3 * len(LLMS) for ax in panels(fig))
    assert "no size-matched random sets" in fig.get_suptitle()


def test_heldout_layer(figs, inputs):
    fig = figs["heldout_layer"]
    axes = panels(fig)
    assert len(axes) == 6  # (contrast, fraction low > high, fraction same layer) × mean, PC1
    labels = ticks(axes[0].get_yticklabels())
    assert labels[0] == "Vision A × Alpha 0.5b" and len(labels) == len(VISION) * len(LLMS)
    held = table(inputs, "heldout").query(
        "vision == 'vis-0' and llm == 'beta-1b' and summary == 'mean' and layer_rule == 'heldout'"
    )
    point = next(ln for ln in axes[0].lines if ln.get_gid() == "heldout|vis-0|beta-1b|mean")
    assert point.get_xdata()[0] == pytest.approx(held["diff_low_high"].mean())
    frac = next(p for p in axes[1].patches if p.get_gid() == "frac|heldout|vis-0|beta-1b|mean")
    assert frac.get_width() == pytest.approx((held["low"] > held["high"]).mean())
    choice = table(inputs, "heldout_layers").query("vision == 'vis-0' and llm == 'beta-1b'")
    same = next(p for p in axes[2].patches if p.get_gid() == "same|vis-0|beta-1b|mean")
    assert same.get_width() == pytest.approx(
        choice.query("metric == 'cknna'")["same_as_full"].mean()
    )
    summ = table(inputs, "heldout_summary").set_index(["summary", "layer_rule"])
    r = summ.loc[("mean", "heldout")]
    assert f"held-out layer: low > high in {r.n_low_gt_high}/{r.n_valid} pairs" in axes[
        0
    ].get_title(loc="left")
    assert "5 random splits" in fig.get_suptitle() and "sets of 5" in fig.get_suptitle()


def test_dispersion_sets(figs):
    axes = panels(figs["dispersion_sets"])
    # the paper's Fig. 2A and 2F; F′ is the residual space 2F's PC1 comes from
    assert [ax.get_title(loc="left").split()[0] for ax in axes] == ["A", "F", "F′"]
    assert "Mean dispersion" in axes[0].get_ylabel()
    assert "PC1" in axes[1].get_ylabel() and "PC1" in axes[2].get_xlabel()
    legend = [t.get_text() for t in figs["dispersion_sets"].legends[0].get_texts()]
    assert legend == [
        "Low dispersion (K = 10)", "High dispersion", "Random (draw 1 of 10; rings in F′)"
    ]  # fmt: skip
    # F′: the random draw is drawn last, every one of its K stimuli as a ring over the sets
    # (drawn under them, most of it was hidden, audit)
    *_, low, high, random = axes[2].collections
    assert len(random.get_offsets()) == 10 and len(random.get_facecolors()) == 0
    assert len(low.get_offsets()) == len(high.get_offsets()) == 10


def test_loo(figs, inputs):
    axes = panels(figs["loo"])
    assert [ax.get_title(loc="left").split("\n")[0] for ax in axes] == [
        f"{c}   Held out: {v}" for c, v in zip("ABC", VISION, strict=True)
    ]
    loo = table(inputs, "loo").set_index("held_out")
    for ax, key in zip(axes, ["vis-0", "vis-1", "vis-2"], strict=True):
        # the statistics in the title: a box over the axes hid the highest points (audit)
        assert not ax.texts
        txt = "\n".join(ax.get_title(loc="left").split("\n")[1:])
        assert f"r = {loo.at[key, 'pearson_r']:.2f}" in txt and "ρ = " in txt and "p " in txt
        # the baseline of the model's rows shuffled across stimuli, from the table
        b = loo.loc[key]
        assert txt.endswith(f"shuffled: r = {b.perm_pearson_r:.2f}, p = {b.perm_pearson_p:.3f}"), (
            txt
        )
        assert len(ax.collections[0].get_offsets()) == 40  # one point per stimulus
        assert len(ax.lines) == 1  # the linear fit
        assert "Partial dispersion" in ax.get_xlabel() and "deviation" in ax.get_ylabel()
    # a question and the count of held-out models with r > 0, not the paper's claim (audit)
    title = figs["loo"].get_suptitle()
    assert title.startswith("Does dispersion from the other vision models predict")
    beyond, shuffles = (loo["perm_pearson_p"] < 0.05).sum(), loo["n_permutations"].iloc[0]
    assert title.endswith(
        f"\nr > 0 for {(loo['pearson_r'] > 0).sum()} of 3 held-out models; above its shuffled"
        f" rows' r (p < 0.05, {shuffles} shuffles) for {beyond} of 3"
    )


def test_loo_labels_of_neighbouring_panels_do_not_overlap(tmp_path):
    """With the paper's four vision models each panel's x label ran into the next panel's y
    label (captions audit), and a title's last line into the next panel's title (the
    shuffled rows' r with its count: seen in the demo's figure)."""
    four = synthetic_inputs(tmp_path, n_vision=4, images=False)
    fig = render_figure("loo", four)
    fig.canvas.draw()  # the layout is made at drawing
    renderer = fig.canvas.get_renderer()
    axes = panels(fig)
    assert len(axes) == 4
    for left, right in itertools.pairwise(axes):
        a = left.xaxis.label.get_window_extent(renderer)
        b = right.yaxis.label.get_window_extent(renderer)
        assert not a.overlaps(b), (a, b)
        # the titles' last line (the shuffled rows' r) ran into the next panel's title
        t_left = left._left_title.get_window_extent(renderer)
        t_right = right._left_title.get_window_extent(renderer)
        assert t_left.x1 < t_right.x0, (t_left, t_right)


def test_loo_title_counts_the_held_out_models_with_positive_r(inputs, tmp_path):
    loo = table(inputs, "loo")
    loo.loc[loo["held_out"] == "vis-1", "pearson_r"] = -0.096
    loo.to_csv(tmp_path / "loo.tsv", sep="\t", index=False)
    fig = render_figure("loo", {**inputs, "loo": tmp_path / "loo.tsv"})
    want = int((loo["pearson_r"] > 0).sum())
    assert want == 2 and f"r > 0 for {want} of 3 held-out models;" in fig.get_suptitle()


def test_loo_title_counts_the_held_out_models_above_their_shuffled_rows(inputs, tmp_path):
    """A model whose r does not exceed that of its rows shuffled across stimuli (permutation
    p ≥ 0.05) is not counted, whatever its r and its p against 0 (coverage audit: on the
    demo, shuffled rows gave the same r as the model for 3 of 4); a table without the
    baseline (n_random 0 is refused, but a table from elsewhere) draws no such count."""
    loo = table(inputs, "loo")
    loo["perm_pearson_p"] = [0.01, 0.04, 0.05]
    loo.to_csv(tmp_path / "loo.tsv", sep="\t", index=False)
    fig = render_figure("loo", {**inputs, "loo": tmp_path / "loo.tsv"})
    assert fig.get_suptitle().endswith(
        "above its shuffled rows' r (p < 0.05, 10 shuffles) for 2 of 3"
    )
    bare = loo.drop(columns=[c for c in loo.columns if c.startswith("perm_")])
    bare.to_csv(tmp_path / "bare.tsv", sep="\t", index=False)
    fig = render_figure("loo", {**inputs, "loo": tmp_path / "bare.tsv"})
    assert fig.get_suptitle().endswith("held-out models")
    assert all("shuffled" not in ax.get_title(loc="left") for ax in panels(fig))


def test_grid_heatmap(figs, inputs):
    axes = panels(figs["grid_heatmap"])
    assert len(axes) == 3  # full set, low − high (mean), low − high (PC1)
    grid = table(inputs, "grid")
    full = grid.query("vision == 'vis-0' and llm == 'alpha-0.5b' and condition == 'full'")[
        "value"
    ].item()
    for ax in axes:
        assert ticks(ax.get_yticklabels()) == VISION
        assert ticks(ax.get_xticklabels()) == LLMS
        assert len(ax.texts) == len(VISION) * len(LLMS)
    assert axes[0].texts[0].get_text() == f"{full:.3f}"
    assert "Low − high" in axes[1].get_title(loc="left") and "PC1" in axes[2].get_title(loc="left")
    assert all(t.get_text().startswith(("+", "-")) for t in axes[1].texts)


def test_grid_heatmap_leaves_a_gap_where_a_table_has_no_row(inputs, tmp_path):
    """A pair without a row (a contrasts row or the grid's full-set rows left out, as in a
    table edited by hand) was drawn as "n/a" and counted as undefined, which the marks
    contract keeps for values that are not numbers: it is a white gap now, as in the other
    figures; the other cells and the legend's count are unchanged."""
    con, grid = table(inputs, "contrasts"), table(inputs, "grid")
    con = con[~((con.vision == "vis-0") & (con.llm == "alpha-3b") & (con.summary == "mean"))]
    grid = grid[
        ~((grid.vision == "vis-1") & (grid.llm == "alpha-0.5b") & (grid.condition == "full"))
    ]
    paths = dict(inputs)
    for name, df in (("contrasts", con), ("grid", grid)):
        paths[name] = tmp_path / f"{name}.tsv"
        df.to_csv(paths[name], sep="\t", index=False, na_rep="NaN")
    before, after = render_figure("grid_heatmap", inputs), render_figure("grid_heatmap", paths)
    gids = [[str(a.get_gid()) for a in ax.get_children()] for ax in panels(after)]
    assert "missing|vis-1|alpha-0.5b" in gids[0] and "missing|vis-0|alpha-3b" in gids[1]
    assert sum(g.startswith("missing|") for g in gids[0] + gids[1]) == 2
    assert not any(g.startswith("missing|") for g in gids[2])
    undefined = [[g for g in gg if g.startswith("undefined|")] for gg in gids]
    was = [[str(t.get_gid()) for t in ax.texts if str(t.get_gid()).startswith("undefined|")]
           for ax in panels(before)]  # fmt: skip
    assert undefined == was
    legend = [t.get_text() for t in after.legends[0].get_texts()] if after.legends else []
    assert legend == ([t.get_text() for t in before.legends[0].get_texts()] if before.legends
                      else [])  # fmt: skip


def test_layerwise(figs, inputs):
    fig = figs["layerwise"]
    axes = panels(fig)
    assert [ax.get_title(loc="left") for ax in axes] == [
        f"{c}   {v}" for c, v in zip("ABC", VISION, strict=True)
    ]
    for ax in axes:
        assert [ln.get_label() for ln in ax.lines] == LLMS
        assert len(ax.lines[0].get_xdata()) == 6  # every LLM layer
        assert "relative depth" in ax.get_xlabel() and "CKNNA" in ax.get_ylabel()
        assert len(ax.collections) == len(LLMS)  # chosen layer marked per LLM
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*LLMS, "chosen layer"]


def test_gallery(figs, inputs):
    axes = panels(figs["gallery"])
    assert len(axes) == 24
    disp = table(inputs, "dispersion").sort_values("rank_mean")
    man = table(inputs, "manifest").set_index("stimulus_id")
    first, last = disp.iloc[0], disp.iloc[-1]
    assert axes[0].get_gid() == f"lowest:{first.stimulus_id}"
    assert (
        axes[0].get_title().startswith("#1/40")
        and f"{first.mean_dispersion:.3g}" in axes[0].get_title()
    )
    assert axes[12].get_gid() == f"highest:{last.stimulus_id}" and axes[12].get_title().startswith(
        "#40/40"
    )
    assert axes[0].get_xlabel().replace("\n", " ") == man.at[first.stimulus_id, "caption"]
    assert all(len(ax.images) == 1 and not placeholders(ax) for ax in axes)  # none needed
    # each stimulus's properties under its caption
    props = table(inputs, "properties")
    mine = props[props["stimulus_id"] == first.stimulus_id].fillna({"model": ""})
    value = mine.set_index(["property", "model"])["value"]
    tokens = mine[mine["property"] == "caption_tokens"]["value"]
    notes = [c for c in axes[0].get_children() if c.get_gid() == f"properties:{first.stimulus_id}"]
    assert len(notes) == 1
    lines = notes[0].get_text().split("\n")
    span = f"{tokens.min():.0f}" + (f"–{tokens.max():.0f}" if tokens.max() > tokens.min() else "")
    assert lines[0] == f"{value[('caption_words', '')]:.0f} words, {span} tokens"
    assert lines[1] == (
        f"colour {value[('colourfulness', '')]:.0f}, edges {value[('edge_density', '')]:.2g}"
    )
    assert lines[2] == (
        f"entropy {value[('entropy', '')]:.1f} bits, {value[('bytes_per_pixel', '')]:.2f} B/px"
    )
    assert lines[3] == "24×24 px"  # the synthetic images: 576 pixels, aspect 1


def test_gallery_missing_images_placeholder_and_warning(inputs, tmp_path):
    man_dir = tmp_path / "stimuli"
    shutil.copytree(Path(inputs["manifest"]).parent, man_dir)
    disp = table(inputs, "dispersion").sort_values("rank_mean")
    lost = disp.iloc[0].stimulus_id
    (man_dir / "images" / f"{lost}.png").unlink()
    (man_dir / "images" / f"{disp.iloc[-1].stimulus_id}.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"2 image\(s\) missing or unreadable"):
        fig = render_figure("gallery", {**inputs, "manifest": man_dir / "stimuli.tsv"})
    axes = panels(fig)
    assert axes[0].texts[0].get_text() == "image\nmissing"
    assert axes[12].texts[0].get_text() == "image\nmissing"
    assert not placeholders(axes[1])


def test_gallery_thumbnails_are_the_pixels_the_models_saw(inputs, tmp_path):
    """A 16-bit greyscale image: the thumbnail is scaled as for extraction (v >> 8), not
    clipped to white as a plain 8-bit conversion would."""
    from PIL import Image

    man_dir = tmp_path / "stimuli"
    shutil.copytree(Path(inputs["manifest"]).parent, man_dir)
    sid = table(inputs, "dispersion").sort_values("rank_mean").iloc[0].stimulus_id
    grey = (np.arange(24 * 24, dtype=np.int64).reshape(24, 24) * 113) % 65536
    image = Image.fromarray(grey.astype(np.uint16))
    assert image.mode == "I;16"
    image.save(man_dir / "images" / f"{sid}.png")
    fig = render_figure("gallery", {**inputs, "manifest": man_dir / "stimuli.tsv"})
    shown = np.asarray(panels(fig)[0].images[0].get_array())
    want = np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(shown, want)


def test_residuals(figs, inputs):
    ax1, ax2, ax3 = panels(figs["residuals"])
    assert ticks(ax1.get_xticklabels()) == VISION
    assert "residual" in ax1.get_ylabel()
    assert ticks(ax2.get_xticklabels()) == VISION and ticks(ax2.get_yticklabels()) == VISION
    diag = [t.get_text() for t in ax2.texts][:: len(VISION) + 1]
    assert diag == ["1.00"] * len(VISION)
    # C: one point per stimulus at (mean distance, mean dispersion), with their Spearman ρ
    assert ax3.get_title(loc="left").startswith("C   Dispersion and distance")
    disp = table(inputs, "dispersion").set_index("stimulus_id").sort_index()
    xy = ax3.collections[0].get_offsets()
    np.testing.assert_allclose(np.sort(xy[:, 0]), np.sort(disp["mean_distance"]), rtol=1e-6)
    np.testing.assert_allclose(np.sort(xy[:, 1]), np.sort(disp["mean_dispersion"]), rtol=1e-6)
    rho = disp["mean_dispersion"].corr(disp["mean_distance"], method="spearman")
    assert not ax3.texts  # in the title: over the points it hid some (audit)
    assert ax3.get_title(loc="left").endswith(f"\nSpearman ρ = {rho:.2f}")


def test_residual_violins_are_one_per_model_even_under_one_label(inputs, tmp_path):
    """Two models under one label (a models table from elsewhere: the registry refuses it) are
    two violins, each the model's own residuals; grouped by label they were pooled into one."""
    models = table(inputs, "models")
    vision = models[models["modality"] == "vision"].sort_values("order")
    first, second = vision["model"].iloc[:2]
    models.loc[models["model"] == second, "label"] = vision["label"].iloc[0]
    path = tmp_path / "models.tsv"
    models.to_csv(path, sep="\t", index=False)
    ax1 = panels(render_figure("residuals", {**inputs, "models": path}))[0]
    violins = [c for c in ax1.collections if "PolyCollection" in type(c).__name__]
    assert len(violins) == len(VISION)
    res = table(inputs, "residuals")
    for k, model in enumerate(vision["model"].iloc[:2]):
        ys = violins[k].get_paths()[0].vertices[:, 1]
        r = res.loc[res["model"] == model, "residual"]
        np.testing.assert_allclose([ys.min(), ys.max()], [r.min(), r.max()], rtol=1e-6)


def test_residuals_from_a_run_without_distances(inputs, tmp_path):
    """Residual tables written before distances were recorded still draw, and say so."""
    old = tmp_path / "residuals.tsv"
    table(inputs, "residuals").drop(columns="distance").to_csv(old, sep="\t", index=False)
    ax3 = panels(render_figure("residuals", {**inputs, "residuals": old}))[2]
    assert "no distances" in ax3.texts[0].get_text()
    assert not ax3.collections


def test_contrasts(figs, inputs):
    axes = panels(figs["contrasts"])
    assert len(axes) == 4  # (forest, fraction of random ≥ low) for mean and PC1
    labels = ticks(axes[0].get_yticklabels())
    assert len(labels) == len(VISION) * len(LLMS)
    assert labels[0] == "Vision A × Alpha 0.5b" and labels[-1] == "Vision C × Beta 7b"
    assert "bootstrap 95% CI" in axes[0].get_xlabel()
    assert "random" in axes[1].get_xlabel() and "low" in axes[1].get_xlabel()
    assert re.search(r"low > random > high in \d+/12 pairs", axes[0].get_title(loc="left"))
    con = table(inputs, "contrasts").query("summary == 'mean'").set_index(["vision", "llm"])
    fr = con.loc[("vis-0", "alpha-0.5b"), "frac_random_ge_low"]
    assert axes[1].patches[0].get_width() == pytest.approx(fr)


# --------------------------------------------------------------------------- robustness
def test_few_draws_one_family_no_models_table(tmp_path):
    """Demo shape (4 vision × 3 LLMs), one family, a single random draw, no models.tsv."""
    inp = synthetic_inputs(
        tmp_path, n_vision=4, llm_families={"Solo": [0.1, 0.2, 0.4]}, n_stimuli=12, set_size=3,
        n_random=1, n_llm_layers=3, images=False,
    )  # fmt: skip
    del inp["models"]
    with pytest.warns(UserWarning, match="missing or unreadable"):
        figs = {name: render_figure(name, inp) for name in FIGURES}
    axes = panels(figs["sets_rank"])
    assert len(axes) == 4
    assert ticks(axes[0].get_xticklabels()) == ["solo-0.1b", "solo-0.2b", "solo-0.4b"]  # raw keys
    assert not any(isinstance(c, LineCollection) for c in axes[0].collections)  # no interval
    assert "1 draw" in figs["sets_rank"].legends[0].get_texts()[1].get_text()
    assert len(panels(figs["gallery"])) == 12


def test_missing_conditions_leave_gaps(inputs, tmp_path):
    grid = table(inputs, "grid")
    grid = grid[~((grid["condition"] == "high") & (grid["llm"] == "beta-7b"))]
    grid = grid[grid["condition"] != "random"]
    grid.to_csv(tmp_path / "grid.tsv", sep="\t", index=False)
    fig = render_figure("sets_rank", {"grid": tmp_path / "grid.tsv", "models": inputs["models"]})
    ax = panels(fig)[0]
    bars = [p.get_gid() for p in ax.patches]
    assert len(bars) == 2 * len(LLMS) - 1  # low and high; no random; no high for Beta 7b
    assert "bar|high|vis-0|beta-7b" not in bars and "bar|high|vis-0|beta-1b" in bars
    assert not any(ln.get_gid() for ln in ax.lines)  # a missing row is a gap, not "undefined"
    assert "no draws" in fig.legends[0].get_texts()[1].get_text()


def test_contrasts_title_gives_the_ratio_and_its_pairs(inputs, tmp_path):
    """The median low/high in the panel title is the summary's, with the number of pairs it is
    taken over (low > 0 and high > 0). Two pairs of the mean sets made negative here: 10 of 12."""
    from xmodal.summary import summary_table

    con = table(inputs, "contrasts")
    neg = (
        (con["summary"] == "mean")
        & con["vision"].eq("vis-0")
        & con["llm"].isin(["alpha-0.5b", "beta-1b"])
    )
    con.loc[neg, "low"] = -0.05
    con["diff_low_high"] = con["low"] - con["high"]
    con.to_csv(tmp_path / "contrasts.tsv", sep="\t", index=False)
    summary_table(con, table(inputs, "grid")).to_csv(
        tmp_path / "summary.tsv", sep="\t", index=False
    )
    fig = render_figure(
        "contrasts",
        {"contrasts": tmp_path / "contrasts.tsv", "summary": tmp_path / "summary.tsv",
         "models": inputs["models"]},
    )  # fmt: skip
    ratios = []
    for r in con[con["summary"] == "mean"].itertuples():
        if r.low > 0 and r.high > 0:
            ratios.append(r.low / r.high)
    assert len(ratios) == 10
    title = panels(fig)[0].get_title(loc="left")
    want = f"median low/high = {np.median(ratios):.2f}× (n = 10 pairs with low, high > 0)"
    assert want in title
    pc1 = con[con["summary"] == "pc1"]
    want = f"median low/high = {np.median(pc1['low'] / pc1['high']):.2f}× (n = 12 pairs"
    assert want in panels(fig)[2].get_title(loc="left")


def test_drop25_title_names_the_mean_dispersion(inputs, tmp_path):
    """The drop sets drawn are those of the mean dispersion (preferred when the grid also holds
    PC1's, as the pipeline's does): the title says so, and says PC1 for a grid that holds only
    PC1's drop sets."""
    grid = table(inputs, "grid")
    drop = grid["condition"].isin(["drop_high", "drop_low"])
    assert set(grid.loc[drop, "summary"]) == {"mean"}  # the synthetic grid's drop sets
    both = pd.concat([grid, grid[drop].assign(summary="pc1", value=grid["value"] + 1)])
    only_pc1 = grid.assign(summary=grid["summary"].mask(drop, "pc1"))
    figs = {}
    for name, g in (("both", both), ("pc1", only_pc1)):
        g.to_csv(tmp_path / f"{name}.tsv", sep="\t", index=False)
        figs[name] = render_figure(
            "drop25", {"grid": tmp_path / f"{name}.tsv", "models": inputs["models"]}
        )
    assert (
        figs["both"]
        .get_suptitle()
        .startswith("Dropping the stimuli of highest vs lowest mean dispersion (CKNNA)")
    )
    assert (
        figs["pc1"]
        .get_suptitle()
        .startswith("Dropping the stimuli of highest vs lowest PC1 score of dispersion (CKNNA)")
    )
    want = grid.query("condition == 'drop_high' and vision == 'vis-0' and llm == 'alpha-0.5b'")
    bars = panels(figs["both"])[0].patches
    bar = next(p for p in bars if p.get_gid() == "bar|drop_high|vis-0|alpha-0.5b")
    assert bar.get_height() == pytest.approx(want["value"].item())  # the mean set's value


def test_random_whiskers_span_the_interval_even_when_the_mean_lies_outside_it():
    """The bar is the draws' mean, the whisker their central 95% interval; with one far draw
    the mean falls below the interval, and errorbar refused the negative length measured from
    the mean (diff review). The whisker is drawn from the interval's ends."""
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from xmodal.figures.alignment import _grouped_bars, pair_cells

    values = np.r_[-0.9, np.full(99, 0.1) + np.linspace(0, 1e-3, 99)]
    rows = pd.DataFrame({"vision": "v", "llm": "l", "draw": np.arange(100), "value": values,
                         "stability": 0.0})  # fmt: skip
    cells = pair_cells(rows)
    c = cells.loc[("v", "l")]
    assert c["value"] < c["lo"] < c["hi"]  # the mean is outside its own interval
    fig, ax = plt.subplots()
    _grouped_bars(ax, "v", ["l"], [("random", cells, True)])
    (bars,) = [b for b in ax.containers if isinstance(b, ErrorbarContainer)]
    (segment,) = bars.lines[2][0].get_segments()
    assert sorted(segment[:, 1]) == pytest.approx([c["lo"], c["hi"]])
    plt.close(fig)


def test_pc1_figures_say_when_pc1_does_not_follow_the_mean_dispersion(figs, inputs, tmp_path):
    """A PC1 nearly uncorrelated with the mean dispersion (a contrast between camps of models)
    has a sign set by noise: the PC1 panels said nothing; now they say so, in red, and only
    then."""
    assert "hardly follows" not in all_text(figs["dispersion_sets"])
    assert "hardly follows" not in figs["sets_pc1"].get_suptitle()
    disp = table(inputs, "dispersion")
    mean = disp["mean_dispersion"].to_numpy(float)
    noise = np.random.default_rng(0).standard_normal(mean.size)
    c = mean - mean.mean()
    disp["pc1_score"] = noise - (noise @ c) / (c @ c) * c  # r = 0 with the mean
    disp["rank_pc1"] = stable_rank(disp["pc1_score"].to_numpy())  # as the GPA writes it
    disp.to_csv(tmp_path / "dispersion.tsv", sep="\t", index=False)
    unoriented = {**inputs, "dispersion": tmp_path / "dispersion.tsv"}
    fig = render_figure("sets_pc1", unoriented)
    assert "PC1 hardly follows the mean dispersion (r = " in fig.get_suptitle()
    assert "low and high may be swapped" in render_figure("dispersion_sets", unoriented).axes[
        1
    ].get_title(loc="right").replace("\n", " ")
    assert "hardly follows" not in render_figure("sets_rank", unoriented).get_suptitle()
    for name in ("contrasts", "grid_heatmap", "heldout_layer"):  # one PC1 panel each
        titles = [ax.get_title(loc="left") for ax in render_figure(name, unoriented).axes]
        flagged = [t for t in titles if "low and high may be swapped" in t.replace("\n", " ")]
        assert len(flagged) == 1 and "PC1" in flagged[0].split("\n")[0], (name, titles)
        assert "hardly follows" not in all_text(figs[name]), name
    # the drop figure says it only when its sets were ranked by PC1
    assert "hardly follows" not in render_figure("drop25", unoriented).get_suptitle()
    grid = table(inputs, "grid")
    drop = grid["condition"].isin(["drop_high", "drop_low"])
    grid.loc[drop, "summary"] = "pc1"  # a grid of PC1 drop sets only
    grid.to_csv(tmp_path / "grid.tsv", sep="\t", index=False)
    pc1_drop = render_figure("drop25", {**unoriented, "grid": tmp_path / "grid.tsv"})
    assert "PC1 score of dispersion" in pc1_drop.get_suptitle()
    assert "low and high may be swapped" in pc1_drop.get_suptitle().replace("\n", " ")
    # the properties' correlations with PC1 (B) have a noise sign too (the figures audit)
    titles = [ax.get_title(loc="left") for ax in render_figure("properties", unoriented).axes]
    flagged = [t for t in titles if "the sign of every ρ here is noise" in t.replace("\n", " ")]
    assert [t[0] for t in flagged] == ["B"], titles
    assert "hardly follows" not in all_text(figs["properties"])
    # the language-side figure: both sides' PC1, in the PC1 panels (B, D) only
    lang = render_figure("language_dispersion", unoriented)
    titles = [ax.get_title(loc="left") for ax in lang.axes]
    titles = [t.replace("\n", " ") for t in titles]
    assert [t[0] for t in titles if "Vision PC1 hardly follows" in t] == ["B", "D"], titles
    assert "hardly follows" not in all_text(figs["language_dispersion"])
    lang_disp = table(inputs, "language_dispersion")
    lang_disp["pc1_score"] = lang_disp["pc1_score"].sample(frac=1, random_state=0).to_numpy()
    lang_disp["rank_pc1"] = stable_rank(lang_disp["pc1_score"].to_numpy())
    lang_disp.to_csv(tmp_path / "language.tsv", sep="\t", index=False)
    lang = render_figure(
        "language_dispersion", {**inputs, "language_dispersion": tmp_path / "language.tsv"}
    )
    titles = [ax.get_title(loc="left").replace("\n", " ") for ax in lang.axes]
    flagged = [t for t in titles if "Language PC1 hardly follows the language mean" in t]
    assert [t[0] for t in flagged] == ["B", "D"], titles
