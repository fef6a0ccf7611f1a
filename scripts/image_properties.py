"""Rule image_properties: size, aspect, bytes per pixel, colourfulness, edge density and
entropy of every stimulus image."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_image_properties  # noqa: E402

run_image_properties(
    snakemake.input.manifest,
    snakemake.input.images,
    out_table=snakemake.output[0],
    workers=int(snakemake.threads),
)
