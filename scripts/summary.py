"""Rule summary: how many pairs show low > random > high, and the low/high ratio."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import write_summary  # noqa: E402

write_summary(snakemake.input.contrasts, snakemake.input.grid, snakemake.output[0])
