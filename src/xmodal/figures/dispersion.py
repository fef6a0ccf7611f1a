"""Dispersion figures: stimulus sets (Fig. 2A/F), leave-one-model-out (Supp. Fig. 2), the
stimulus gallery and the residual matrix."""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import stats

from xmodal.properties import ANNOTATION_PREFIX

from ._common import (
    COLORS,
    PLAIN_TEXT,
    FigureData,
    format_p,
    new_figure,
    panel_grid,
    panel_letter,
    pc1_caveat,
)

RESIDUAL_LABEL = "GPA residual (distance to consensus)"


# --------------------------------------------------------------------------- Fig. 2A / F
def _set_members(sets: pd.DataFrame | None, name: str, summary: str | None) -> set[str]:
    """Stimulus ids of one set (random: draw 0 only)."""
    if sets is None or sets.empty:
        return set()
    s = sets[sets["set"] == name]
    if summary is not None and "summary" in s.columns and summary in set(s["summary"]):
        s = s[s["summary"] == summary]
    elif summary is not None and name in ("low", "high"):
        return set()
    if "draw" in s.columns and len(s):
        s = s[s["draw"] == s["draw"].min()]
    return set(s["stimulus_id"].astype(str))


def _n_draws(sets: pd.DataFrame | None) -> int:
    if sets is None or sets.empty:
        return 0
    r = sets[sets["set"] == "random"]
    return int(r["draw"].nunique()) if len(r) and "draw" in r.columns else 0


def _ranked_panel(
    ax: Axes, disp: pd.DataFrame, sets: pd.DataFrame | None, score: str, rank: str, summary: str
) -> None:
    """Stimuli ordered by their dispersion score, with the low / high / random sets marked."""
    d = disp.sort_values(rank)
    ids = d["stimulus_id"].astype(str).to_numpy()
    x, yv = d[rank].to_numpy(float), d[score].to_numpy(float)
    ax.plot(x, yv, color=COLORS["point"], lw=1.0, zorder=1)
    for name in ("low", "high", "random"):
        members = _set_members(sets, name, None if name == "random" else summary)
        m = np.isin(ids, list(members))
        if not m.any():
            continue
        if name == "random":  # a rug along the bottom: where one random draw falls
            ax.vlines(
                x[m], 0, 0.05, transform=ax.get_xaxis_transform(), color=COLORS["random"], lw=0.6
            )
        else:
            ax.axvspan(x[m].min() - 0.5, x[m].max() + 0.5, color=COLORS[name], alpha=0.15, lw=0)
            ax.scatter(x[m], yv[m], s=7, color=COLORS[name], zorder=3, linewidth=0)
    ax.set_xlim(-0.5, len(x) - 0.5)


def _residual_pcs(res: pd.DataFrame, disp: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray] | None:
    """PC1/PC2 scores of the residual matrix (PC1 signed like ``pc1_score``) and explained var."""
    wide = res.pivot_table(index="stimulus_id", columns="model", values="residual")
    wide.index = wide.index.astype(str)
    wide = wide.dropna()
    if wide.shape[0] < 3 or wide.shape[1] < 2:
        return None
    rc = wide.to_numpy(float) - wide.to_numpy(float).mean(axis=0)
    u, s, vt = np.linalg.svd(rc, full_matrices=False)
    scores = rc @ vt[:2].T
    ref = disp.set_index(disp["stimulus_id"].astype(str)).reindex(wide.index)["pc1_score"]
    if np.nansum(scores[:, 0] * ref.to_numpy(float)) < 0:
        scores[:, 0] *= -1
    ev = s**2 / max(float((s**2).sum()), 1e-300)
    return pd.DataFrame(scores, index=wide.index, columns=["pc1", "pc2"]), ev[:2]


def draw_dispersion_sets(data: FigureData) -> Figure:
    """Fig. 2A/F: stimuli by mean dispersion and by PC1 score; F′: the residual (PC1, PC2)
    space that PC1 comes from."""
    disp, sets = data["dispersion"], data.get("sets")
    fig = new_figure(11.0, 3.3)
    axes = panel_grid(fig, 3, 3)
    k_low = len(_set_members(sets, "low", "mean"))
    _ranked_panel(axes[0], disp, sets, "mean_dispersion", "rank_mean", "mean")
    axes[0].set_title("A   Rank-based selection", loc="left")
    axes[0].set_xlabel("Stimulus rank (least → most dispersed)")
    axes[0].set_ylabel("Mean dispersion (mean GPA residual)")
    _ranked_panel(axes[1], disp, sets, "pc1_score", "rank_pc1", "pc1")
    axes[1].set_title("F   PCA-based selection", loc="left")
    caveat = pc1_caveat(disp)
    if caveat:  # docs/method.md, "Dispersion"
        axes[1].set_title(textwrap.fill(caveat, 48), loc="right", color="#b2182b", fontsize=7)
    axes[1].set_xlabel("Stimulus rank along PC1")
    axes[1].set_ylabel("PC1 score of dispersion")

    ax = axes[2]
    pcs = _residual_pcs(data["residuals"], disp) if data.get("residuals") is not None else None
    if pcs is None:
        ax.text(0.5, 0.5, "residual space needs ≥ 2 models", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    else:
        sc, ev = pcs
        ax.scatter(sc["pc1"], sc["pc2"], s=5, color="#d9d9d9", linewidth=0)
        # the random draw last, as rings: most of its stimuli are in the low or high set too,
        # and drawn under them the draw looked like middle stimuli only (audit)
        for name in ("low", "high", "random"):
            m = sc.index.isin(list(_set_members(sets, name, None if name == "random" else "pc1")))
            ring = {"facecolors": "none", "edgecolors": COLORS[name], "linewidths": 0.6}
            fill = {"color": COLORS[name], "linewidth": 0}
            ax.scatter(sc.loc[m, "pc1"], sc.loc[m, "pc2"], s=12 if name == "random" else 8,
                       **(ring if name == "random" else fill))  # fmt: skip
        ax.axhline(0, color="#bbbbbb", lw=0.5, zorder=0)
        ax.axvline(0, color="#bbbbbb", lw=0.5, zorder=0)
        ax.set_xlabel(f"PC1 of residual space ({100 * ev[0]:.0f}% var.)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.0f}% var.)" if len(ev) > 1 else "PC2")
    ax.set_title("F′   Residual space (PC1-based sets)", loc="left")

    n_draws = _n_draws(sets)
    handles = [
        Line2D([], [], marker="o", ls="", color=COLORS["low"], label=f"Low dispersion (K = {k_low})"),
        Line2D([], [], marker="o", ls="", color=COLORS["high"], label="High dispersion"),
        Line2D(
            [], [], marker="o", ls="", color=COLORS["random"], markerfacecolor="none",
            label=f"Random (draw 1 of {n_draws}; rings in F′)" if n_draws else "Random",
        ),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside lower center", ncols=3)
    return fig


# --------------------------------------------------------------------------- Supp. Fig. 2
def draw_loo(data: FigureData) -> Figure:
    """Supp. Fig. 2: partial dispersion vs held-out deviation, per held-out vision model."""
    pts = data["loo_stimuli"]
    summ = data.get("loo")
    summ = summ.set_index(summ["held_out"].astype(str)) if summ is not None and len(summ) else None
    models = data.models
    held = models.order(pts["held_out"].astype(str).unique())
    ncols = min(len(held), 4)
    nrows = math.ceil(len(held) / ncols)
    fig = new_figure(3.0 * ncols, 2.9 * nrows + 0.3)
    axes = panel_grid(fig, len(held), ncols)
    n_positive = 0  # held-out models whose panel shows r > 0
    n_beyond = 0  # … and whose r lies above its shuffled rows' (permutation p < 0.05)
    shuffled = summ is not None and "perm_pearson_p" in summ.columns
    n_shuffles = set()
    for i, (ax, h) in enumerate(zip(axes, held, strict=True)):
        g = pts[pts["held_out"].astype(str) == h]
        x, y = g["partial_dispersion"].to_numpy(float), g["deviation"].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        ax.scatter(
            x, y, s=6, color=COLORS["point"], alpha=0.5 if len(x) > 200 else 0.8, linewidth=0
        )
        if len(x) >= 2 and np.ptp(x) > 0:
            slope, icpt = np.polyfit(x, y, 1)
            xs = np.array([x.min(), x.max()])
            ax.plot(xs, icpt + slope * xs, color=COLORS["fit"], lw=1.5)
        if summ is not None and h in summ.index:
            r = summ.loc[h]
            pr, pp, sr, sp, n = r.pearson_r, r.pearson_p, r.spearman_rho, r.spearman_p, int(r.n)
        elif len(x) >= 3:
            pr, pp = stats.pearsonr(x, y)
            sr, sp = stats.spearmanr(x, y)
            n = len(x)
        else:
            pr = pp = sr = sp = float("nan")
            n = len(x)
        n_positive += bool(pr > 0)
        # the held-out model's rows shuffled across stimuli (docs/method.md, "Leave-one-model-
        # out against shuffled stimuli"): r > 0 alone does not show a shared property
        base = ""
        if shuffled and summ is not None and h in summ.index:
            b = summ.loc[h]
            n_beyond += bool(b.perm_pearson_p < 0.05)
            n_shuffles.add(int(b.n_permutations))
            # as short as the lines above: a longer one ran into the next panel's title
            base = f"\nshuffled: r = {b.perm_pearson_r:.2f}, {format_p(b.perm_pearson_p)}"
        # in the title, not in a box over the axes, which hid the highest points (audit)
        ax.set_title(
            f"{panel_letter(i)}   Held out: {models.label(h)}\n"
            f"r = {pr:.2f}, {format_p(pp)}\nρ = {sr:.2f}, {format_p(sp)}; n = {n}{base}",
            loc="left",
        )
        # on two lines: one line ran into the next panel's label (captions audit)
        ax.set_xlabel("Partial dispersion\n(GPA on the other models)")
        ax.set_ylabel("Held-out model's deviation\nfrom the consensus")
    # a question and the count: the paper's claim as the title stood over any data (audit)
    shuffles = f", {'/'.join(map(str, sorted(n_shuffles)))} shuffles" if n_shuffles else ""
    beyond = (
        f"; above its shuffled rows' r (p < 0.05{shuffles}) for {n_beyond} of {len(held)}"
        if shuffled
        else ""
    )
    fig.suptitle(
        "Does dispersion from the other vision models predict the held-out model's deviation?"
        f"\nr > 0 for {n_positive} of {len(held)} held-out models{beyond}"
    )
    return fig


# --------------------------------------------------------------------------- gallery
def _placeholder(size: int = 64) -> np.ndarray:
    img = np.full((size, size, 3), 0.85)
    img[::8, :, :] = 0.78
    return img


def _load_thumb(path: Path, stimulus_id: str, size: int = 160) -> np.ndarray | None:
    """An RGB thumbnail of the pixels the models saw (decoded and converted by
    :func:`xmodal.stimuli.load_rgb`, so 16-bit and float images are scaled as for extraction),
    or None when the image is missing or unreadable."""
    from xmodal.stimuli import StimulusError, load_rgb

    try:
        im = load_rgb(path, stimulus_id, log_conversions=False)
    except StimulusError:
        return None
    im.thumbnail((size, size))
    return np.asarray(im)


#: the gallery's captions: characters at most (longer ones are cut, ending " …")
CAPTION_CHARS = 90


def _shorten(text: str, width: int) -> str:
    """``text`` with its whitespace collapsed, cut to at most ``width`` characters ending " …"
    when longer: at the last space of the cut when there is one in its last quarter, else
    mid-word, since Chinese or Japanese captions have no spaces (``textwrap.shorten`` left
    only "…" of them)."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    cut = text[: width - 2]
    space = cut.rfind(" ")
    if space >= 0.75 * len(cut):
        cut = cut[:space]
    return cut.rstrip() + " …"


#: the gallery's manifest columns: characters per line, and lines at most
ANNOTATION_WIDTH, ANNOTATION_LINES = 38, 3
#: font size (points) of the gallery's grey notes
NOTE_SIZE = 5.2


def _num(v: float, fmt: str) -> str:
    """A property value in the gallery's notes: ``format(v, fmt)``, or n/a when not finite."""
    return format(v, fmt) if np.isfinite(v) else "n/a"


def _annotation_value(v: float) -> str:
    """A manifest column's value in the notes: 3 significant digits, but whole digits from 1000
    up to a million, where ``.3g`` wrote years as 2.02e+03 (2016 and 2024 alike)."""
    return f"{v:.0f}" if np.isfinite(v) and 1000 <= abs(v) < 1e6 else _num(v, ".3g")


def _annotation_text(values: pd.Series) -> str:
    """The manifest's numeric columns of one stimulus as "name value, …", in the table's column
    order, wrapped to at most :data:`ANNOTATION_LINES` lines (" …" where more did not fit); a
    no-break space keeps each name on the line of its value."""
    pairs = [
        f"{name[len(ANNOTATION_PREFIX) :]}\N{NO-BREAK SPACE}{_annotation_value(v)}"
        for name, v in values.items()
    ]
    return "\n".join(
        textwrap.wrap(
            ", ".join(pairs),
            width=ANNOTATION_WIDTH,
            max_lines=ANNOTATION_LINES,
            placeholder=" …",
            break_on_hyphens=False,
        )
    )


def _property_lines(props: pd.DataFrame | None) -> dict[str, str]:
    """Per stimulus, its properties in a few short lines (the gallery's annotation): the built-in
    image and caption properties, then the manifest's own numeric columns with their values."""
    if props is None or props.empty:
        return {}
    p = props.assign(
        stimulus_id=props["stimulus_id"].astype(str),
        model=props["model"].fillna("").astype(str) if "model" in props.columns else "",
    )
    tokens = p[p["property"] == "caption_tokens"].groupby("stimulus_id")["value"]
    t_lo, t_hi = tokens.min(), tokens.max()
    wide = p[p["model"] == ""].pivot_table(
        index="stimulus_id", columns="property", values="value", aggfunc="first"
    )
    # the manifest's columns in the table's order (the manifest's); an empty field is NaN
    annotated = [c for c in pd.unique(p["property"]) if str(c).startswith(ANNOTATION_PREFIX)]
    notes = wide.reindex(columns=annotated)

    def get(sid: str, prop: str) -> float:
        if sid in wide.index and prop in wide.columns:
            return float(wide.at[sid, prop])
        return float("nan")

    out = {}
    for sid in set(wide.index) | set(t_lo.index):
        lo, hi = float(t_lo.get(sid, np.nan)), float(t_hi.get(sid, np.nan))
        tok = _num(lo, ".0f") if lo == hi or not np.isfinite(hi) else f"{lo:.0f}–{hi:.0f}"
        out[sid] = "\n".join(
            [
                f"{_num(get(sid, 'caption_words'), '.0f')} words, {tok} tokens",
                f"colour {_num(get(sid, 'colourfulness'), '.0f')}, "
                f"edges {_num(get(sid, 'edge_density'), '.2g')}",  # a fraction, often below 0.01
                f"entropy {_num(get(sid, 'entropy'), '.1f')} bits, "
                f"{_num(get(sid, 'bytes_per_pixel'), '.2f')} B/px",
                _image_size(get(sid, "image_pixels"), get(sid, "aspect_ratio")),
            ]
            + ([_annotation_text(notes.loc[sid])] if annotated and sid in notes.index else [])
        )
    return out


def _image_size(pixels: float, aspect: float) -> str:
    """'W×H px' from width·height and width/height (both as stored)."""
    if not (np.isfinite(pixels) and np.isfinite(aspect) and pixels > 0 and aspect > 0):
        return "size n/a"
    return f"{round(np.sqrt(pixels * aspect))}×{round(np.sqrt(pixels / aspect))} px"


def draw_gallery(data: FigureData, n: int = 12, ncols: int = 6) -> Figure:
    """The ``n`` lowest and ``n`` highest mean-dispersion stimuli: thumbnail, caption, scores,
    and (with the ``properties`` table) each stimulus's properties under its caption."""
    disp = data["dispersion"].sort_values("rank_mean")
    props = _property_lines(data.get("properties"))
    man = data["manifest"].copy()
    man["stimulus_id"] = man["stimulus_id"].astype(str)
    man = man.set_index("stimulus_id")
    root = data.paths["manifest"].parent if "manifest" in data.paths else Path(".")
    n = max(1, min(n, len(disp) // 2 if len(disp) >= 2 else len(disp)))
    ncols = min(ncols, n)
    rows_per = math.ceil(n / ncols)
    groups = [("Lowest", disp.head(n)), ("Highest", disp.tail(n).iloc[::-1])]
    # the grey notes hang below the captions, outside the constrained layout: room for their
    # lines between the rows, and below the last row
    lines = max((s.count("\n") + 1 for s in props.values()), default=0)
    height = (2.25 + 0.15 * lines) * rows_per * 2 + 0.7
    fig = new_figure(1.75 * ncols, height)
    below = lines * NOTE_SIZE * 1.2 / 72  # inches
    fig.get_layout_engine().set(rect=(0, below / height, 1, 1 - below / height))
    gs = fig.add_gridspec(2 * rows_per, ncols)
    missing: list[str] = []
    m_total = len(disp)
    for gi, (word, sub) in enumerate(groups):
        for j, r in enumerate(sub.itertuples(index=False)):
            sid = str(r.stimulus_id)
            ax = fig.add_subplot(gs[gi * rows_per + j // ncols, j % ncols])
            img = None
            caption = ""
            if sid in man.index:
                caption = str(man.at[sid, "caption"]) if "caption" in man.columns else ""
                if "image" in man.columns and isinstance(man.at[sid, "image"], str):
                    img = _load_thumb(root / man.at[sid, "image"], sid)
            if img is None:
                missing.append(sid)
                ax.imshow(_placeholder())
                ax.text(0.5, 0.5, "image\nmissing", ha="center", va="center",
                        transform=ax.transAxes, fontsize=7, color="#555555")  # fmt: skip
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(True)
                sp.set_color(COLORS["low" if gi == 0 else "high"])
                sp.set_linewidth(1.5)
            rank = int(r.rank_mean) + 1
            ax.set_title(
                f"#{rank}/{m_total}  d = {r.mean_dispersion:.3g}\nPC1 = {r.pc1_score:.3g}",
                fontsize=6.5, fontweight="normal", loc="center",
            )  # fmt: skip
            short = _shorten(caption, CAPTION_CHARS)
            ax.set_xlabel(textwrap.fill(short, width=30), fontsize=6, **PLAIN_TEXT)
            ax.set_gid(f"{word.lower()}:{sid}")
            if sid in props:  # under the caption, in grey
                note = ax.annotate(
                    props[sid], xy=(0.5, 0), xycoords=ax.xaxis.label, xytext=(0, -1.5),
                    textcoords="offset points", ha="center", va="top", fontsize=NOTE_SIZE,
                    color="#555555", annotation_clip=False, **PLAIN_TEXT,
                )  # fmt: skip
                note.set_gid(f"properties:{sid}")
    fig.suptitle(
        f"{n} lowest (blue frames, top) and {n} highest (orange frames, bottom) mean-dispersion stimuli"
    )
    if missing:
        warnings.warn(
            f"gallery: {len(missing)} image(s) missing or unreadable (placeholder drawn): "
            + ", ".join(missing[:10])
            + (" …" if len(missing) > 10 else ""),
            stacklevel=2,
        )
    return fig


# --------------------------------------------------------------------------- residuals
def _distance_panel(ax: Axes, res: pd.DataFrame) -> None:
    """Each stimulus's mean residual against its mean distance from the models' centres, with
    their Spearman ρ (docs/method.md, "Dispersion and distance from the centre")."""
    ax.set_title("C   Dispersion and distance from the centre", loc="left")
    if "distance" not in res:
        ax.text(0.5, 0.5, "residuals.tsv has no distances\n(a run before they were recorded)",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        return
    per = res.groupby("stimulus_id")[["residual", "distance"]].mean()
    ax.scatter(per["distance"], per["residual"], s=6, color="#4d4d4d", linewidth=0)
    rho = per["residual"].corr(per["distance"], method="spearman")
    ax.set_title(f"{ax.get_title(loc='left')}\nSpearman ρ = {rho:.2f}", loc="left")
    ax.set_xlabel("Mean distance from the models' centres")
    ax.set_ylabel("Mean dispersion (mean GPA residual)")


def draw_residuals(data: FigureData) -> Figure:
    """Per-model residual distributions, the model × model correlation of residual columns, and
    each stimulus's mean residual against its mean distance from the models' centres."""
    res = data["residuals"].copy()
    res["model"] = res["model"].astype(str)
    models = data.models
    order = models.order(res["model"].unique())
    labels = models.labels(order)
    fig = new_figure(max(10.5, 1.6 * len(order) + 6.5), 3.4)
    ax1, ax2, ax3 = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1, 1]})
    # one violin per model key, labelled afterwards: grouped by label, two models that share one
    # would be pooled into a distribution of neither
    sns.violinplot(
        data=res, x="model", y="residual", order=order, ax=ax1, color="#a6c8e0",
        inner="quart", cut=0, linewidth=0.8, density_norm="width",
    )  # fmt: skip
    ax1.set_xticks(range(len(order)), labels)
    ax1.set_title("A   Residual distribution per model", loc="left")
    ax1.set_xlabel("Vision model")
    ax1.set_ylabel(RESIDUAL_LABEL)
    ax1.tick_params(axis="x", rotation=30)

    wide = res.pivot_table(index="stimulus_id", columns="model", values="residual")[order]
    corr = wide.corr(method="pearson")
    corr.index, corr.columns = labels, labels
    sns.heatmap(
        corr, ax=ax2, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1,
        square=True, annot_kws={"fontsize": 7}, cbar_kws={"label": "Pearson r"},
    )  # fmt: skip
    ax2.set_title("B   Correlation of residual columns", loc="left")
    ax2.set_xlabel("Vision model")
    ax2.set_ylabel("Vision model")
    ax2.tick_params(axis="x", rotation=30)
    ax2.tick_params(axis="y", rotation=0)
    _distance_panel(ax3, res)
    fig.suptitle(f"Residual matrix R ({wide.shape[0]} stimuli × {wide.shape[1]} models)")
    return fig
