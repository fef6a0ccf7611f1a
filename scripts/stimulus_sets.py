"""Rule stimulus_sets: low / high / random sets and drop-fraction ablations."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from xmodal.pipeline import run_stimulus_sets  # noqa: E402

run_stimulus_sets(snakemake.input.dispersion, dict(snakemake.params), snakemake.output.sets)
