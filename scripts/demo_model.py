"""Rule demo_model: build one tiny demo model and, if its recipe says so, train it."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

import torch  # noqa: E402

from xmodal.demo.build import build_demo_model  # noqa: E402

# training is deterministic for a given thread count; the rule fixes it (threads: 1)
torch.set_num_threads(snakemake.threads)
torch.use_deterministic_algorithms(True)
build_demo_model(
    snakemake.params.entry,
    snakemake.output[0],
    tokenizer_dir=snakemake.input.tokenizer or None,
    scenes_path=snakemake.input.scenes or None,
    init_dir=snakemake.input.init or None,
)
