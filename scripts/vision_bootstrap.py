"""Rule vision_bootstrap: the vision models' bootstrap structures for the low/high sets,
prepared once and read by every LLM's conditions job."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_vision_bootstrap  # noqa: E402

run_vision_bootstrap(
    snakemake.input.vision,
    snakemake.input.sets,
    snakemake.params.vision,
    vision_layer=int(snakemake.params.vision_layer),
    k=int(snakemake.params.k),
    n_boot=int(snakemake.params.n_boot),
    seed=int(snakemake.params.seed),
    out=snakemake.output[0],
)
