"""Rule demo_model: build one tiny, untrained stand-in model for the demo."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.demo.build import build_demo_model  # noqa: E402

build_demo_model(
    snakemake.params.entry,
    snakemake.output[0],
    tokenizer_dir=snakemake.input.tokenizer or None,
)
