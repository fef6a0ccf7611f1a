"""Rule heldout_summary: the low - high contrast inside held-out halves, at both layers."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import write_heldout_summary  # noqa: E402

write_heldout_summary(snakemake.input[0], snakemake.output[0])
