"""Rule leave_one_model_out: partial dispersion vs held-out deviation."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_leave_one_model_out  # noqa: E402

run_leave_one_model_out(
    snakemake.input.features,
    snakemake.params.models,
    vision_layer=int(snakemake.params.vision_layer),
    tol=float(snakemake.params.tol),
    max_iter=int(snakemake.params.max_iter),
    out_table=snakemake.output.table,
    out_stimuli=snakemake.output.stimuli,
    n_permutations=int(snakemake.params.n_permutations),
    seed=int(snakemake.params.seed),
)
