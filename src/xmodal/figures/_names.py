"""How figures and their files name the alignment metrics; no plotting library, so that the
workflow can read the figure registry (:data:`xmodal.figures.FIGURES`) at every start cheaply."""

from __future__ import annotations

import re
from collections.abc import Iterable

#: How each alignment metric (xmodal.alignment.METRICS, config ``analysis.metrics``) is named in
#: axis labels, titles and legends.
METRIC_LABELS: dict[str, str] = {
    "cknna": "CKNNA",
    "mutual_knn": "mutual kNN",
    "unbiased_cka": "unbiased CKA",
    "cka": "CKA",
}
#: The metric whose figures carry no metric in their file name (the config's default).
DEFAULT_METRIC = "cknna"


def metric_label(metric: str) -> str:
    """How ``metric`` is named in figures ('CKNNA', 'mutual kNN', ...)."""
    return METRIC_LABELS.get(metric, metric)


def metric_tag(metric: str | None) -> str:
    """What a figure file name carries for ``metric``: nothing for the default metric (or a
    figure drawn once), ``.<metric>`` for the others (``sets_rank.mutual_knn.png``)."""
    return "" if metric is None or metric == DEFAULT_METRIC else f".{metric}"


def metric_from_tag(tag: str) -> str:
    """The metric of a file-name tag made by :func:`metric_tag` ('' → the default metric)."""
    return tag[1:] if tag.startswith(".") else (tag or DEFAULT_METRIC)


def metric_tag_pattern(metrics: Iterable[str]) -> str:
    """Regular expression of the tags of ``metrics`` (the workflow's wildcard constraint): the
    empty tag when the default metric is among them, ``.<metric>`` for each other one."""
    alts = [re.escape(metric_tag(m)) for m in dict.fromkeys(metrics)]
    return "(?:" + "|".join(alts) + ")"
