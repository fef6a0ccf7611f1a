"""Rule heldout_sets: low / high / random sets inside half B of each held-out split."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_heldout_sets  # noqa: E402

params = dict(snakemake.params)
n_splits = int(params.pop("heldout")["n_splits"])
run_heldout_sets(snakemake.input.dispersion, params, n_splits, snakemake.output[0])
