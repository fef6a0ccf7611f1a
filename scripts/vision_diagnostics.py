"""Rule vision_diagnostics: representation diagnostics of each vision model's analysed layer."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_vision_diagnostics  # noqa: E402

run_vision_diagnostics(
    snakemake.input.vision,
    snakemake.params.vision,
    vision_layer=int(snakemake.params.vision_layer),
    k=int(snakemake.params.k),
    out_table=snakemake.output[0],
)
