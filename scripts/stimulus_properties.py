"""Rule stimulus_properties: every property of every stimulus, with each LLM's token counts."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_stimulus_properties  # noqa: E402

run_stimulus_properties(
    snakemake.input.manifest,
    snakemake.input.images,
    snakemake.input.llms,
    snakemake.params.llms,
    out_table=snakemake.output[0],
    annotations=snakemake.params.annotations,
)
