"""Rule summary: how many pairs show low > random > high, and the low/high ratio."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from xmodal.pipeline import write_summary  # noqa: E402

write_summary(snakemake.input.contrasts, snakemake.input.grid, snakemake.output[0])
