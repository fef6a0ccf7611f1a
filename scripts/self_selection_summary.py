"""Rule self_selection_summary: the low - high contrast on sets chosen with and without the
scored vision model."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import write_self_selection_summary  # noqa: E402

write_self_selection_summary(
    snakemake.input.self_selection, snakemake.input.contrasts, snakemake.output[0]
)
