"""The extension figures (language-side dispersion, stimulus properties) draw what their tables
hold. Checks look at the matplotlib objects, never at pixels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer

from xmodal.figures import render_figure
from xmodal.figures.synthetic import synthetic_inputs
from xmodal.io import read_table, write_table


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return synthetic_inputs(tmp_path_factory.mktemp("ext"), images=False)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _stats(ax) -> str:
    """A scatter panel's statistics: in its title, none over its points (a box there hid the
    most dispersed stimuli, audit)."""
    assert not ax.texts, _texts(ax)
    return ax.get_title(loc="left")


def test_language_dispersion_figure(inputs):
    fig = render_figure("language_dispersion", inputs)
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title(loc="left")[:1] for ax in axes] == ["A", "B", "C", "D"]
    corr = read_table(inputs["language_correlation"]).set_index(["summary", "method"])
    sp = corr.loc[("mean", "spearman")]
    text = _stats(axes[0])
    assert f"Spearman ρ = {sp.estimate:.2f} [{sp.ci_low:.2f}, {sp.ci_high:.2f}]" in text
    assert f"n = {int(sp.n)}" in text
    assert len(axes[0].collections[0].get_offsets()) == int(sp.n)  # one point per stimulus
    cells = read_table(inputs["joint_cells"])
    for ax, summary in zip(axes[2:], ("mean", "pc1"), strict=True):
        bars = [c.patches[0] for c in ax.containers if isinstance(c, BarContainer)]
        assert [c.get_label() for c in ax.containers] == [
            f"vision {v}, language {lang}" for v in ("low", "high") for lang in ("low", "high")
        ]
        sub = cells[cells["summary"] == summary]
        order = [("low", "low"), ("low", "high"), ("high", "low"), ("high", "high")]
        for bar, (v, lang) in zip(bars, order, strict=True):
            g = sub[(sub["vision_level"] == v) & (sub["language_level"] == lang)]
            assert bar.get_height() == pytest.approx(g["value"].mean())
        assert f"n = {int(sub['n_stimuli'].iloc[0])} each" in ax.get_title(loc="left")
        band = [line for line in ax.lines if line.get_linestyle() == "--"]
        assert band and band[0].get_ydata()[0] == pytest.approx(sub["random_mean"].mean())


def test_language_dispersion_title_counts_pairs_at_a_tied_layer(inputs, tmp_path):
    """The pairs whose LLM layer the layer search could not tell from another (``layer_tied``,
    one flag per pair on all its cells) are counted once each in the title."""
    cells = read_table(inputs["joint_cells"])
    pairs = cells[["vision", "llm"]].drop_duplicates().to_numpy()
    assert len(pairs) >= 3
    title = render_figure("language_dispersion", inputs).get_suptitle()
    assert title.endswith(f"dots: {len(pairs)} vision × language pairs"), title
    tied = (cells["vision"] == pairs[0][0]) & (cells["llm"] == pairs[0][1])
    tied |= (cells["vision"] == pairs[2][0]) & (cells["llm"] == pairs[2][1])
    write_table(cells.assign(layer_tied=tied), tmp_path / "joint_cells.tsv")
    fig = render_figure(
        "language_dispersion", {**inputs, "joint_cells": tmp_path / "joint_cells.tsv"}
    )
    assert fig.get_suptitle().endswith(
        f"dots: {len(pairs)} vision × language pairs (2 at an LLM layer tied with another)"
    ), fig.get_suptitle()


def test_language_dispersion_without_cells_or_correlation(inputs):
    fig = render_figure(
        "language_dispersion",
        {k: inputs[k] for k in ("dispersion", "language_dispersion", "models")},
    )
    axes = fig.axes
    assert "Spearman ρ = n/a" in _stats(axes[0])
    assert _texts(axes[2]) == ["no 2 × 2 sets"]


def test_properties_figure(inputs):
    fig = render_figure("properties", inputs)
    ax_mean, ax_pc1, *scatters = fig.axes
    labels = [t.get_text() for t in ax_mean.get_yticklabels()]
    # token counts name their LLM by its label, in the models table's order
    assert labels[:6] == [
        "caption length (words)",
        "caption length (tokens, Alpha 0.5b)",
        "caption length (tokens, Alpha 3b)",
        "caption length (tokens, Beta 1b)",
        "caption length (tokens, Beta 7b)",
        "image size (pixels)",
    ]
    corr = read_table(inputs["property_correlations"])
    corr["model"] = corr["model"].fillna("")
    edge = corr[(corr["property"] == "edge_density") & (corr["summary"] == "mean")].iloc[0]
    row = labels.index("edge density")
    points = {int(round(ln.get_ydata()[0])): ln.get_xdata()[0] for ln in _marks(ax_mean, "o")}
    assert points[row] == pytest.approx(edge.spearman_rho)
    ends = {int(round(ln.get_ydata()[0])): list(ln.get_xdata()) for ln in _marks(ax_mean, "|")}
    assert ends[row] == pytest.approx([edge.ci_low, edge.ci_high])
    # undefined correlations (constant size and aspect) are stated, not drawn as numbers
    assert "n/a: constant property" in _texts(ax_mean)
    assert row not in {
        int(round(t.get_position()[1])) for t in ax_mean.texts if t.get_text().startswith("n/a")
    }
    assert len(scatters) == 7 and "edge density" in scatters[5].get_xlabel()
    assert _stats(scatters[5]) == f"H   ρ = {edge.spearman_rho:.2f}"
    assert "Spearman ρ with mean dispersion" in ax_mean.get_xlabel()
    assert "PC1" in ax_pc1.get_xlabel()


def _marks(ax, marker: str) -> list:
    return [ln for ln in ax.get_lines() if ln.get_marker() == marker]


def test_properties_interval_that_misses_its_estimate_is_drawn(inputs, tmp_path):
    """A percentile interval need not hold the estimate (a skewed bootstrap; n_boot 1 made one
    at [0.040, 0.040] around −0.005): the figure job crashed in matplotlib ('xerr' must not
    contain negative values). It is drawn as its two ends."""
    corr = read_table(inputs["property_correlations"])
    i = corr.index[np.isfinite(corr["spearman_rho"])][0]
    rho = corr.loc[i, "spearman_rho"]
    corr.loc[i, ["ci_low", "ci_high"]] = rho + 0.05, rho + 0.1
    path = tmp_path / "correlations.tsv"
    write_table(corr, path)
    fig = render_figure("properties", {**inputs, "property_correlations": path})
    drawn = [list(ln.get_xdata()) for ax in fig.axes[:2] for ln in _marks(ax, "|")]
    assert [pytest.approx(rho + 0.05), pytest.approx(rho + 0.1)] in drawn


def test_properties_estimate_without_interval_says_so(inputs, tmp_path):
    """A ρ with no interval because too few stimuli differ (correlate.MIN_OUTSIDE_MODE) is drawn
    with "no interval" beside it, so that it does not read as an interval too narrow to see; a
    run with analysis.n_boot 0 (no reason) draws no such note."""
    corr = read_table(inputs["property_correlations"])
    finite = corr.index[np.isfinite(corr["spearman_rho"]) & (corr["summary"] == "mean")]
    i = finite[0]
    corr.loc[i, ["ci_low", "ci_high", "n_boot"]] = np.nan, np.nan, 0
    corr.loc[i, "reason"] = "no interval: only 2 of 40 stimuli differ from the property's …"
    path = tmp_path / "correlations.tsv"
    write_table(corr, path)
    fig = render_figure("properties", {**inputs, "property_correlations": path})
    notes = [c for c in fig.axes[0].get_children() if c.get_gid() == "no_interval"]
    assert len(notes) == 1 and notes[0].get_text() == "no interval"
    assert notes[0].xy[0] == pytest.approx(corr.loc[i, "spearman_rho"])
    assert not [c for c in fig.axes[1].get_children() if c.get_gid() == "no_interval"]
    none = read_table(inputs["property_correlations"]).assign(ci_low=np.nan, ci_high=np.nan)
    write_table(none.assign(n_boot=0), path)
    fig = render_figure("properties", {**inputs, "property_correlations": path})
    assert not [c for ax in fig.axes for c in ax.get_children() if c.get_gid() == "no_interval"]


def test_properties_figure_shows_the_manifest_columns_after_the_built_in_ones(inputs, tmp_path):
    """Annotation columns (``manifest:<column>``) are labelled "<column> (manifest)", listed
    after the built-in properties in table order, and get their own scatter panels (a second
    row: at most 7 per row)."""
    props = read_table(inputs["properties"])
    corr = read_table(inputs["property_correlations"])
    ids = props.loc[props["property"] == "entropy", "stimulus_id"].tolist()
    rng = np.random.default_rng(0)
    extra_props, extra_corr = [], []
    for i, col in enumerate(["typicality", "blur"]):
        extra_props.append(pd.DataFrame({"stimulus_id": ids, "property": f"manifest:{col}",
                                         "model": "", "value": rng.uniform(size=len(ids))}))  # fmt: skip
        for summary in ("mean", "pc1"):
            row = corr.iloc[0].copy()
            row[["property", "model", "summary"]] = f"manifest:{col}", "", summary
            row[["spearman_rho", "ci_low", "ci_high"]] = 0.1 * (i + 1), 0.0, 0.2 * (i + 1)
            extra_corr.append(row)
    write_table(pd.concat([props, *extra_props], ignore_index=True), tmp_path / "p.tsv")
    write_table(pd.concat([corr, pd.DataFrame(extra_corr)], ignore_index=True), tmp_path / "c.tsv")
    fig = render_figure(
        "properties",
        {**inputs, "properties": tmp_path / "p.tsv", "property_correlations": tmp_path / "c.tsv"},
    )
    ax_mean, _, *scatters = fig.axes
    labels = [t.get_text() for t in ax_mean.get_yticklabels()]
    assert labels[-3:] == ["grey-level entropy (bits)", "typicality (manifest)", "blur (manifest)"]
    points = {int(round(ln.get_ydata()[0])): ln.get_xdata()[0] for ln in _marks(ax_mean, "o")}
    assert points[len(labels) - 1] == pytest.approx(0.2)
    assert [ax.get_xlabel() for ax in scatters[-2:]] == [
        "typicality\n(manifest)",
        "blur (manifest)",
    ]
    assert len(scatters) == 9 and scatters[-1].get_title(loc="left") == "K   ρ = 0.20"
    # two rows of panels: the eighth starts the second row, with its own y label
    assert scatters[7].get_ylabel() == "Mean dispersion" and scatters[6].get_ylabel() == ""


def test_properties_figure_without_models_table(inputs, tmp_path):
    fig = render_figure("properties", {k: v for k, v in inputs.items() if k != "models"})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "caption length (tokens, alpha-0.5b)" in labels  # raw keys when nothing better


@pytest.mark.filterwarnings("ignore:gallery")  # no images in these inputs
def test_gallery_without_properties_has_no_annotation(inputs):
    fig = render_figure("gallery", {k: inputs[k] for k in ("dispersion", "manifest")})
    assert not [
        c
        for ax in fig.axes
        for c in ax.get_children()
        if str(c.get_gid()).startswith("properties:")
    ]


@pytest.mark.filterwarnings("ignore:gallery")
def test_gallery_properties_with_missing_values(inputs, tmp_path):
    props = read_table(inputs["properties"])
    props = props[props["property"] != "caption_tokens"]
    props.loc[props["property"] == "entropy", "value"] = np.nan
    path = tmp_path / "p.tsv"
    pd.DataFrame(props).to_csv(path, sep="\t", index=False, na_rep="NaN")
    fig = render_figure(
        "gallery", {**{k: inputs[k] for k in ("dispersion", "manifest")}, "properties": path}
    )
    notes = [
        c
        for ax in fig.axes
        for c in ax.get_children()
        if str(c.get_gid()).startswith("properties:")
    ]
    assert len(notes) == 24
    lines = notes[0].get_text().split("\n")
    assert lines[0].endswith("n/a tokens") and lines[2].startswith("entropy n/a bits")


def _notes(fig) -> dict[str, str]:
    """The gallery's grey notes by stimulus id."""
    return {
        str(c.get_gid()).split(":", 1)[1]: c.get_text()
        for ax in fig.axes
        for c in ax.get_children()
        if str(c.get_gid()).startswith("properties:")
    }


@pytest.mark.filterwarnings("ignore:gallery")
def test_gallery_shows_the_manifests_numeric_columns_with_their_values(inputs, tmp_path):
    """Under the built-in properties, each stimulus's own manifest columns (``manifest:<column>``
    rows, as ``stimulus_properties`` writes them) as "column value", in the table's order (the
    manifest's), an empty field as n/a; a stimulus with no such row gets n/a for it."""
    props = read_table(inputs["properties"])
    ids = sorted(set(props["stimulus_id"].astype(str)))
    rng = np.random.default_rng(0)
    nu = rng.uniform(0, 1, len(ids))
    rating = rng.integers(1, 8, len(ids)).astype(float)
    rating[1] = np.nan  # an empty field in the manifest
    extra = [
        pd.DataFrame(
            {"stimulus_id": ids, "property": "manifest:nuisance", "model": "", "value": nu}
        ),
        pd.DataFrame(
            {
                "stimulus_id": ids[1:],
                "property": "manifest:rating",
                "model": "",
                "value": rating[1:],
            }
        ),
    ]
    path = tmp_path / "props.tsv"
    write_table(pd.concat([props, *extra], ignore_index=True), path)
    before = render_figure(
        "gallery", {k: inputs[k] for k in ("dispersion", "manifest", "properties")}
    )
    fig = render_figure(
        "gallery", {**{k: inputs[k] for k in ("dispersion", "manifest")}, "properties": path}
    )
    notes, old = _notes(fig), _notes(before)
    assert len(notes) == 24 and notes.keys() == old.keys()
    for k, sid in enumerate(ids):
        if sid not in notes:
            continue
        lines = notes[sid].replace("\N{NO-BREAK SPACE}", " ").split("\n")
        assert lines[:4] == old[sid].split("\n")  # the built-in lines unchanged
        r = "n/a" if sid in ids[:2] else f"{rating[k]:.3g}"
        assert lines[4:] == [f"nuisance {nu[k]:.3g}, rating {r}"], lines
    # room for the extra line: the figure grows by it
    assert fig.get_size_inches()[1] > before.get_size_inches()[1]


@pytest.mark.filterwarnings("ignore:gallery")
def test_dollar_signs_in_captions_and_column_names_are_drawn_as_written(inputs, tmp_path):
    """Words from the data are never mathtext: matplotlib reads text between two "$" as math, so
    a caption "a $5 and a $10 bill" lost its dollars and "$\\frac{$" stopped the figure job with
    a ParseException. Captions, gallery notes and the properties figure's labels keep the text."""
    import io

    from xmodal.stimuli import read_manifest, write_manifest

    man = read_manifest(inputs["manifest"], check_images=False)
    disp = read_table(inputs["dispersion"]).sort_values("rank_mean")
    lo, hi = str(disp.iloc[0]["stimulus_id"]), str(disp.iloc[-1]["stimulus_id"])
    captions = {lo: "A $5 and a $10 bill.", hi: "A sign: $\\frac{a}{b$ and $x^2$."}
    man["caption"] = [
        captions.get(s, c) for s, c in zip(man["stimulus_id"], man["caption"], strict=True)
    ]
    path = tmp_path / "stimuli.tsv"
    write_manifest(man, path)
    props = read_table(inputs["properties"])
    ids = sorted(set(props["stimulus_id"].astype(str)))
    odd = ["price $usd$", "$\\frac{$"]
    extra = [
        pd.DataFrame(
            {"stimulus_id": ids, "property": f"manifest:{c}", "model": "",
             "value": np.linspace(0, 1, len(ids)) ** (i + 1)}
        )
        for i, c in enumerate(odd)
    ]  # fmt: skip
    props_path = tmp_path / "props.tsv"
    write_table(pd.concat([props, *extra], ignore_index=True), props_path)
    corr_path = tmp_path / "corr.tsv"
    from xmodal.properties import property_correlations

    write_table(
        property_correlations(read_table(props_path), read_table(inputs["dispersion"]), 50, 0),
        corr_path,
    )
    gallery = render_figure(
        "gallery",
        {"dispersion": inputs["dispersion"], "manifest": path, "properties": props_path},
    )
    shown = {ax.get_gid(): ax.get_xlabel().replace("\n", " ") for ax in gallery.axes}
    assert shown[f"lowest:{lo}"] == captions[lo] and shown[f"highest:{hi}"] == captions[hi]
    note = _notes(gallery)[lo].replace("\N{NO-BREAK SPACE}", " ").split("\n")[4:]
    x = np.linspace(0, 1, len(ids))[ids.index(lo)]
    assert " ".join(note) == f"price $usd$ {x:.3g}, $\\frac{{$ {x**2:.3g}"
    figure = render_figure(
        "properties", {**inputs, "properties": props_path, "property_correlations": corr_path}
    )
    # the properties figure parses math (a model label may be math) and escapes the column's $
    labels = {t._preprocess_math(t.get_text()) for t in figure.axes[0].get_yticklabels()}
    assert {(f"{c} (manifest)", False) for c in odd} <= labels
    for fig in (gallery, figure):
        fig.savefig(io.BytesIO(), format="png", dpi=40)  # lays out every text: no ParseException
        texts = [t for ax in fig.axes for t in ax.findobj(lambda a: hasattr(a, "get_parse_math"))]
        drawn = [t._preprocess_math(t.get_text()) for t in texts if "$" in t.get_text()]
        assert drawn and not any(is_math for _, is_math in drawn)


def test_gallery_manifest_columns_wrap_to_three_lines():
    """Many or long columns wrap at ANNOTATION_WIDTH characters into at most ANNOTATION_LINES
    lines, the rest cut with " …" (never dropped silently mid-number)."""
    from xmodal.figures.dispersion import ANNOTATION_LINES, ANNOTATION_WIDTH, _annotation_text

    values = pd.Series({f"manifest:column_{i}": 0.123456 * i for i in range(12)})
    text = _annotation_text(values).replace("\N{NO-BREAK SPACE}", " ")
    lines = text.split("\n")
    assert len(lines) == ANNOTATION_LINES and all(len(s) <= ANNOTATION_WIDTH for s in lines)
    # a name stays on the line of its value
    assert lines[0] == "column_0 0, column_1 0.123,"
    assert lines[1].startswith("column_2 0.247,") and text.endswith(" …")
    assert _annotation_text(pd.Series({"manifest:typicality": np.nan})) == "typicality\xa0n/a"
    assert _annotation_text(pd.Series({"manifest:n": 1234567.0})) == "n\xa01.23e+06"
    # years and other whole numbers in the thousands in full (.3g wrote 2016 as 2.02e+03, so
    # 2016 and 2024 looked alike); below 1000, 3 significant digits as before
    for v, shown in ((2016.0, "2016"), (2024.0, "2024"), (-1500.4, "-1500"), (999.0, "999"),
                     (999999.0, "999999"), (0.5, "0.5"), (123.456, "123")):  # fmt: skip
        assert _annotation_text(pd.Series({"manifest:year": v})) == f"year\xa0{shown}", v


def test_language_dispersion_random_band_is_labelled_as_an_average_of_intervals(inputs):
    """The grey band spans the mean over pairs of the random sets' lower and upper 95% ends, the
    dashed line the mean of their means; the legend says so (before: "size-matched random sets
    (mean, 95%)", as if the band were one 95% interval)."""
    fig = render_figure("language_dispersion", inputs)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "size-matched random sets: mean of the pairs' 95% intervals" in legend
    assert "size-matched random sets: mean of the pairs' means" in legend
    assert not any("(mean, 95%)" in t for t in legend)
    cells = read_table(inputs["joint_cells"])
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    for ax, summary in zip(axes[2:], ("mean", "pc1"), strict=True):
        sub = cells[cells["summary"] == summary]
        band = next(p for p in ax.patches if p.get_gid() == f"random|{summary}")
        # y in data coordinates: a Rectangle (matplotlib ≥ 3.9) or a Polygon
        if hasattr(band, "get_y"):
            ys = np.array([band.get_y(), band.get_y() + band.get_height()])
        else:
            ys = np.asarray(band.get_xy())[:, 1]
        lo, hi = sub["random_ci_low"].mean(), sub["random_ci_high"].mean()
        assert (ys.min(), ys.max()) == (pytest.approx(lo), pytest.approx(hi))


def test_no_interval_is_announced_without_resamples(inputs, tmp_path):
    """With analysis.n_boot: 0 the correlations have no interval (NaN ends), and the figures
    said "(95% bootstrap CI)" all the same."""
    scatter_ax = render_figure("language_dispersion", inputs).axes[0]
    forest_ax = render_figure("properties", inputs).axes[0]
    assert "(95% bootstrap CI)" in _stats(scatter_ax)
    assert "(95% bootstrap CI)" in forest_ax.get_xlabel()
    paths = dict(inputs)
    for name in ("language_correlation", "property_correlations"):
        t = read_table(inputs[name]).assign(ci_low=np.nan, ci_high=np.nan, n_boot=0)
        write_table(t, tmp_path / f"{name}.tsv")
        paths[name] = tmp_path / f"{name}.tsv"
    text = _stats(render_figure("language_dispersion", paths).axes[0])
    assert "Spearman ρ = " in text and "CI" not in text and "[" not in text
    assert "CI" not in render_figure("properties", paths).axes[0].get_xlabel()


def _gallery_with_captions(inputs, tmp_path, captions: dict[int, str]):
    """The gallery with the captions of the lowest-ranked stimuli (by position) replaced."""
    from xmodal.stimuli import read_manifest, write_manifest

    man = read_manifest(inputs["manifest"], check_images=False)
    disp = read_table(inputs["dispersion"]).sort_values("rank_mean")
    by_id = {str(disp.iloc[i]["stimulus_id"]): c for i, c in captions.items()}
    man["caption"] = [
        by_id.get(s, c) for s, c in zip(man["stimulus_id"], man["caption"], strict=True)
    ]
    path = tmp_path / "stimuli.tsv"
    write_manifest(man, path)
    return render_figure("gallery", {"dispersion": inputs["dispersion"], "manifest": path})


def _tiny_font(path, family: str, chars: str) -> None:
    """A TrueType font named ``family`` whose only glyphs (squares) are ``chars``."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef", *(f"u{ord(c):04X}" for c in chars)]
    pen = TTGlyphPen(None)
    for x, y in ((100, 0), (100, 700), (600, 700), (600, 0)):
        (pen.lineTo if x != 100 or y != 0 else pen.moveTo)((x, y))
    pen.closePath()
    box = pen.glyph()
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    fb.setupCharacterMap({ord(c): f"u{ord(c):04X}" for c in chars})
    fb.setupGlyf({n: box for n in names})
    fb.setupHorizontalMetrics({n: (700, 100) for n in names})
    fb.setupHorizontalHeader(ascent=800, descent=-200)
    fb.setupNameTable({"familyName": family, "styleName": "Regular"})
    fb.setupOS2()
    fb.setupPost()
    fb.save(str(path))


@pytest.mark.filterwarnings("ignore:gallery")
def test_characters_no_font_has_are_one_warning_naming_them_and_a_fallback_is_used(
    inputs, tmp_path, monkeypatch
):
    """Chinese captions in the gallery: DejaVu Sans has no such glyphs, and matplotlib warned
    once per character and file format (dozens of lines) while drawing empty boxes. Now one
    warning names the characters, a caption that holds them and the fonts to install; with a
    font installed that has them (built here, named as one of FALLBACK_FONTS), the figures take
    the glyphs from it and nothing is warned."""
    import warnings

    from matplotlib import font_manager

    from xmodal.figures import _common, save_figure

    captions = {0: "一只狗坐在沙发上。", 1: "A dog on a sofa."}
    fig = _gallery_with_captions(inputs, tmp_path, captions)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_figure(fig, tmp_path / "g.png", tmp_path / "g.pdf")
    said = [str(w.message) for w in caught]
    assert len(said) == 1, said
    assert said[0].startswith(
        "g.png: 9 character(s) that no installed font has are drawn as empty boxes (一只狗坐在沙发上。)"
        " in 1 text(s), e.g. '一只狗坐在沙发上。'; install a font that has them (Noto Sans CJK"
    ), said
    assert said[0].endswith("that is installed (none is)"), said

    family = _common.FALLBACK_FONTS[0]
    _tiny_font(tmp_path / "fallback.ttf", family, "一只狗坐在沙发")
    font_manager.fontManager.addfont(str(tmp_path / "fallback.ttf"))
    try:
        assert _common.installed_fallbacks() == [family]
        fig = _gallery_with_captions(inputs, tmp_path, captions)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            save_figure(fig, tmp_path / "h.png", tmp_path / "h.pdf")
        said = [str(w.message) for w in caught]
        # 上 and 。 are not in the font built: the only characters still missing
        assert len(said) == 1 and "2 character(s)" in said[0] and "(上。)" in said[0], said
        assert said[0].endswith(f"that is installed ({[family]})"), said
    finally:
        font_manager.fontManager.ttflist = [
            f for f in font_manager.fontManager.ttflist if f.name != family
        ]
        font_manager.fontManager._findfont_cached.cache_clear()
    assert _common.installed_fallbacks() == []


def test_every_llm_gets_its_own_colour_beyond_eight_families():
    """Each family has a sequential palette; FAMILY_PALETTES has 8, and the ninth family's
    models took the first family's colours (F0 0.5b and F8 0.5b drawn alike). The first
    family's colours are as before."""
    import seaborn as sns

    from xmodal.figures._common import FAMILY_PALETTES, Models

    rows = [
        {"model": f"f{f}-{s}", "modality": "language", "label": f"F{f} {s}b", "family": f"F{f}",
         "size_b": float(s), "order": 5 * f + s}
        for f in range(10) for s in range(1, 6)
    ]  # fmt: skip
    models = Models.from_table(pd.DataFrame(rows))
    keys = [r["model"] for r in rows]
    colours = models.colors(keys)
    rgb = np.array(list(colours.values()), dtype=float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(len(keys), 1)]
    # no two alike (BuGn, the eighth palette, also ended in Greens' dark greens: now RdPu)
    assert gaps.min() > 0.03, gaps.min()
    first = sns.color_palette(FAMILY_PALETTES[0], 7)
    assert [colours[f"f0-{s}"] for s in range(1, 6)] == list(first[2:])


def test_model_labels_with_one_dollar_sign_stay_text_when_joined_into_pair_labels(inputs, tmp_path):
    """The config allows a label with one "$" (plain text to matplotlib) but the pair ticks
    join two labels: "CLIP $5 × BLOOM $10" was read as math (both "$" lost, the text between
    in italics) and "CLIP $\\frac{" × "BLOOM $m" stopped the figure job with a mathtext
    ParseException (audit). Such labels are escaped when drawn; a math label stays math."""
    import io

    from xmodal.figures._common import Models

    models = read_table(inputs["models"])
    vision = models.loc[models["modality"] == "vision", "model"].astype(str).tolist()
    language = models.loc[models["modality"] == "language", "model"].astype(str).tolist()
    labels = {vision[0]: "CLIP $5", language[0]: "BLOOM $10", vision[1]: "$\\alpha$-ViT"}
    labels[language[1]] = "LM $\\frac{"
    models["label"] = [labels.get(str(m), lab) for m, lab in models[["model", "label"]].values]
    path = tmp_path / "models.tsv"
    write_table(models, path)
    table = Models.from_table(read_table(path))
    assert table.label(vision[0]) == "CLIP \\$5" and table.label(vision[1]) == "$\\alpha$-ViT"
    for name in ("contrasts", "heldout_layer"):
        fig = render_figure(name, {**inputs, "models": path})
        fig.savefig(io.BytesIO(), format="png", dpi=40)  # lays out every text: no ParseException
        ticks = [t for t in fig.axes[0].get_yticklabels() if "CLIP" in t.get_text()]
        pair = [t for t in ticks if "BLOOM" in t.get_text()]
        assert pair, [t.get_text() for t in ticks]
        text, math = pair[0]._preprocess_math(pair[0].get_text())
        assert not math and text == "CLIP $5 × BLOOM $10", (text, math)
