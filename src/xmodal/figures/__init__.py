"""Every figure of the report, drawn from the aggregate tables only (re-renders in seconds).

``FIGURES`` is the registry the workflow iterates over; ``make_figure(name, inputs, png, pdf,
metric=...)`` reads the tables a figure needs, draws it in the single report style and writes
PNG and PDF atomically. ``render_figure`` returns the matplotlib ``Figure`` instead (tests,
notebooks).

A figure with ``per_metric`` shows alignment values and is drawn once per metric of
``analysis.metrics``: ``{name}.png`` for CKNNA (the default), ``{name}.{metric}.png`` for the
others (:func:`figure_stem`). The others are drawn once.

Input names (keys of ``inputs``): ``dispersion``, ``residuals``, ``sets``, ``loo_stimuli``,
``loo``, ``layers``, ``grid``, ``contrasts``, ``models``, ``summary``, ``manifest``,
``diagnostics``, ``duplicates``, and for the extensions ``language_dispersion``,
``language_correlation``, ``joint_cells``, ``properties``, ``property_correlations``, and for
the controls ``drop``, ``drop_summary``, ``heldout_layers``, ``heldout``, ``heldout_summary``,
``self_selection`` (see docs/contracts.md).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xmodal.io import atomic_path

from ._names import (
    DEFAULT_METRIC,
    METRIC_LABELS,
    metric_from_tag,
    metric_label,
    metric_tag,
    metric_tag_pattern,
)

# The registry below is read by the workflow at every start (and by every cluster job that
# re-reads the workflow): matplotlib and seaborn, seconds to import, load only to draw.
if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ._common import FigureData, Models

log = logging.getLogger(__name__)

INPUT_NAMES = frozenset(
    {"dispersion", "residuals", "sets", "loo_stimuli", "loo", "layers", "grid", "contrasts", "models", "manifest", "summary",
     "diagnostics", "duplicates",
     "language_dispersion", "language_correlation", "joint_cells", "properties", "property_correlations",
     "drop", "drop_summary", "heldout_layers", "heldout", "heldout_summary", "self_selection"}
)  # fmt: skip


@dataclass(frozen=True)
class FigureSpec:
    """One figure: what it shows, the tables it reads and the function that draws it.

    ``inputs`` are all the tables the workflow should pass; those in ``optional`` may be left
    out (``models`` missing: raw model keys are shown instead of labels). ``per_metric``: the
    figure shows alignment values and is drawn once per configured metric.
    """

    name: str
    title: str
    inputs: tuple[str, ...]
    #: the drawing function, ``module.function`` in this package (imported when drawn)
    drawer: str
    optional: tuple[str, ...] = ("models",)
    per_metric: bool = False

    def draw(self, data: FigureData) -> Figure:
        """Draw this figure from its tables."""
        module, function = self.drawer.rsplit(".", 1)
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(data)

    @property
    def required(self) -> tuple[str, ...]:
        """Inputs that must be given."""
        return tuple(i for i in self.inputs if i not in self.optional)

    @property
    def caption(self) -> str:
        """Caption file for the Snakemake report, relative to the repository root."""
        return f"workflow/report/{self.name}.rst"


def _spec(
    name: str,
    title: str,
    inputs: tuple[str, ...],
    drawer: str,
    optional=("models",),
    per_metric=False,
) -> FigureSpec:
    return FigureSpec(name, title, inputs, drawer, optional, per_metric)


FIGURES: dict[str, FigureSpec] = {
    s.name: s
    for s in (
        _spec(
            "dispersion_sets",
            "Fig. 2A/F: stimulus selection by mean dispersion and by PC1",
            ("dispersion", "sets", "residuals", "models"),
            "dispersion.draw_dispersion_sets",
            ("models", "residuals"),
        ),
        _spec(
            "sets_rank",
            "Fig. 2B–E: alignment of low / random / high sets (rank by mean dispersion)",
            ("grid", "summary", "models"),
            "alignment.draw_sets_rank",
            ("models", "summary"),
            per_metric=True,
        ),
        _spec(
            "sets_pc1",
            "Fig. 2G–J: alignment of low / random / high sets (PC1 of dispersion)",
            ("grid", "summary", "models", "dispersion"),
            "alignment.draw_sets_pc1",
            ("models", "summary", "dispersion"),
            per_metric=True,
        ),
        _spec(
            "drop25",
            "Supp. Fig. 1: dropping the most / least dispersed 25%, against random sets of "
            "the same size",
            ("grid", "drop_summary", "models", "dispersion"),
            "alignment.draw_drop25",
            ("models", "drop_summary", "dispersion"),
            per_metric=True,
        ),
        _spec(
            "loo",
            "Supp. Fig. 2: leave-one-model-out dispersion vs held-out deviation",
            ("loo_stimuli", "loo", "models"),
            "dispersion.draw_loo",
            ("models", "loo"),
        ),
        _spec(
            "grid_heatmap",
            "Full-set alignment grid and low − high difference grids",
            ("grid", "contrasts", "models", "dispersion"),
            "alignment.draw_grid_heatmap",
            ("models", "contrasts", "dispersion"),
            per_metric=True,
        ),
        _spec(
            "layerwise",
            "Layer-wise alignment of each vision model with every LLM layer",
            ("layers", "models"),
            "alignment.draw_layerwise",
            per_metric=True,
        ),
        _spec(
            "gallery",
            "Lowest- and highest-dispersion stimuli, with their properties",
            ("dispersion", "manifest", "properties"),
            "dispersion.draw_gallery",
            ("properties",),
        ),
        _spec(
            "residuals",
            "Residual matrix: per-model distributions and correlations",
            ("residuals", "models"),
            "dispersion.draw_residuals",
        ),
        _spec(
            "contrasts",
            "Low − high difference per pair with bootstrap 95% CI; fraction of random ≥ low",
            ("contrasts", "summary", "models", "self_selection", "dispersion"),
            "alignment.draw_contrasts",
            ("models", "summary", "self_selection", "dispersion"),
            per_metric=True,
        ),
        _spec(
            "heldout_layer",
            "Layer choice without selection bias: the low − high contrast inside held-out halves",
            ("heldout", "heldout_summary", "models", "dispersion"),
            "alignment.draw_heldout",
            ("models", "heldout_summary", "dispersion"),
            per_metric=True,
        ),
        _spec(
            "diagnostics",
            "Representation diagnostics: which alignment values the data decide",
            ("diagnostics", "duplicates", "models"),
            "diagnostics.draw_diagnostics",
            ("models", "duplicates"),
        ),
        _spec(
            "language_dispersion",
            "Language-side dispersion: correlation with vision dispersion, 2 × 2 sets",
            ("dispersion", "language_dispersion", "language_correlation", "joint_cells", "models"),
            "extensions.draw_language_dispersion",
            ("models", "language_correlation", "joint_cells"),
        ),
        _spec(
            "properties",
            "Stimulus properties vs dispersion (Spearman ρ, bootstrap 95% CI)",
            ("property_correlations", "properties", "dispersion", "models"),
            "extensions.draw_properties",
        ),
    )
}


def figure_metrics(name: str, metrics: Sequence[str]) -> list[str | None]:
    """The metrics figure ``name`` is drawn for: each of ``metrics`` for a per-metric figure,
    ``[None]`` (drawn once) for the others."""
    return list(dict.fromkeys(metrics)) if FIGURES[name].per_metric else [None]


def figure_stem(name: str, metric: str | None = None) -> str:
    """File name of figure ``name`` for ``metric`` without extension: ``sets_rank`` (CKNNA, or a
    figure drawn once), ``sets_rank.mutual_knn`` (another metric)."""
    return name + metric_tag(metric)


def report_subcategory(name: str, tag: str = "") -> str:
    """Where figure ``name`` (file-name metric tag ``tag``) sits in the Snakemake report."""
    if FIGURES[name].per_metric:
        return f"Alignment: {metric_label(metric_from_tag(tag))}"
    return "Diagnostics" if name == "diagnostics" else "Stimuli and dispersion"


def figure_files(directory: str, metrics: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """Every figure file (PNG and PDF) under ``directory`` for the configured ``metrics``, but
    for the figures named in ``skip`` (those whose step the config turns off)."""
    return [
        f"{directory}/{figure_stem(name, metric)}.{ext}"
        for name in FIGURES
        if name not in skip
        for metric in figure_metrics(name, metrics)
        for ext in ("png", "pdf")
    ]


def load_inputs(
    name: str, inputs: Mapping[str, str | os.PathLike], metric: str | None = None
) -> FigureData:
    """Read the tables figure ``name`` needs from ``inputs`` (name → path), for ``metric``
    (None: the default metric; only per-metric figures take another)."""
    try:
        spec = FIGURES[name]
    except KeyError:
        raise KeyError(f"unknown figure {name!r}; known: {sorted(FIGURES)}") from None
    metric = metric or DEFAULT_METRIC
    if metric not in METRIC_LABELS:
        raise ValueError(
            f"figure {name!r}: unknown metric {metric!r}; known: {list(METRIC_LABELS)}"
        )
    if metric != DEFAULT_METRIC and not spec.per_metric:
        raise ValueError(
            f"figure {name!r} shows no alignment values: it is drawn once, not per metric"
        )
    unknown = set(inputs) - INPUT_NAMES
    if unknown:
        raise KeyError(f"figure {name!r}: unknown input name(s) {sorted(unknown)}")
    missing = [i for i in spec.required if i not in inputs]
    if missing:
        raise KeyError(f"figure {name!r} needs input(s) {missing}; got {sorted(inputs)}")
    from ._common import FigureData, Models, read_tsv

    paths = {k: Path(inputs[k]) for k in spec.inputs if k in inputs}
    tables = {k: read_tsv(p, k) for k, p in paths.items()}
    models = Models.from_table(tables.get("models"))
    return FigureData(tables=tables, paths=paths, models=models, metric=metric)


def render_figure(
    name: str, inputs: Mapping[str, str | os.PathLike], metric: str | None = None
) -> Figure:
    """Draw figure ``name`` for ``metric`` from its tables and return it (nothing is written)."""
    from ._common import _style

    data = load_inputs(name, inputs, metric)
    with _style():
        return FIGURES[name].draw(data)


def save_figure(fig: Figure, out_png: str | os.PathLike, out_pdf: str | os.PathLike) -> None:
    """Write ``fig`` as PNG and PDF, each atomically (no partial file on failure)."""
    from ._common import _style, missing_glyphs_reported

    with _style(), missing_glyphs_reported(fig, Path(out_png).name):
        for out, fmt in ((out_png, "png"), (out_pdf, "pdf")):
            meta = {"Software": None} if fmt == "png" else {"CreationDate": None, "Producer": None}
            with atomic_path(out) as tmp:
                fig.savefig(tmp, format=fmt, metadata=meta)


def make_figure(
    name: str,
    inputs: Mapping[str, str | os.PathLike],
    out_png: str | os.PathLike,
    out_pdf: str | os.PathLike,
    metric: str | None = None,
) -> None:
    """Read the tables figure ``name`` needs, draw it for ``metric`` and write ``out_png`` and
    ``out_pdf``."""
    fig = render_figure(name, inputs, metric)
    save_figure(fig, out_png, out_pdf)
    log.info(
        "figure %s (%s) written to %s and %s", name, metric or DEFAULT_METRIC, out_png, out_pdf
    )


def __getattr__(name: str) -> Any:
    """``FigureData`` and ``Models`` from the drawing side, imported on first use."""
    if name in ("FigureData", "Models"):
        from . import _common

        return getattr(_common, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_METRIC",
    "FIGURES",
    "INPUT_NAMES",
    "METRIC_LABELS",
    "FigureData",
    "FigureSpec",
    "Models",
    "figure_files",
    "figure_metrics",
    "figure_stem",
    "load_inputs",
    "make_figure",
    "metric_from_tag",
    "metric_label",
    "metric_tag",
    "metric_tag_pattern",
    "render_figure",
    "report_subcategory",
    "save_figure",
]
