"""Rule summary: how many pairs show low > random > high, and the low/high ratio."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to
from xmodal.pipeline import write_summary

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])

write_summary(snakemake.input.contrasts, snakemake.input.grid, snakemake.output[0])
