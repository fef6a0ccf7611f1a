"""Rule demo_model: build one tiny, untrained stand-in model for the demo."""

import _bootstrap  # noqa: F401

from xmodal.demo.build import build_demo_model
from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])

build_demo_model(
    snakemake.params.entry,
    snakemake.output[0],
    tokenizer_dir=snakemake.input.tokenizer or None,
)
