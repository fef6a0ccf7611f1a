"""Rule diagnostics: every model's diagnostics in one table; warnings for the layers in use."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import gather_diagnostics  # noqa: E402

gather_diagnostics(
    snakemake.input.vision, snakemake.input.llm, snakemake.input.layers, snakemake.output[0]
)
