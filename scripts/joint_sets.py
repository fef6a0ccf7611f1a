"""Rule joint_sets: the 2 x 2 sets (low/high vision x low/high language dispersion) and
size-matched random sets."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_joint_sets  # noqa: E402

run_joint_sets(
    snakemake.input.vision,
    snakemake.input.language,
    set_size=int(snakemake.params.set_size),
    n_random=int(snakemake.params.n_random),
    knn_k=int(snakemake.params.knn_k),
    seed=int(snakemake.params.seed),
    out_sets=snakemake.output[0],
)
