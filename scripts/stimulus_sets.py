"""Rule stimulus_sets: low / high / random sets and drop-fraction ablations."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_stimulus_sets  # noqa: E402

params = dict(snakemake.params)
n_drop_random = int(params.pop("drop_control")["n_random"])
run_stimulus_sets(snakemake.input.dispersion, params, snakemake.output.sets, n_drop_random)
