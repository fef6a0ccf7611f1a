"""Rule demo_tokenizer: a BPE tokenizer trained on the captions of the training scenes."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.demo.models import train_tokenizer  # noqa: E402
from xmodal.demo.stimuli import sample_scenes  # noqa: E402

scenes = sample_scenes(int(snakemake.params.n), int(snakemake.params.seed), split="train")
train_tokenizer([s.caption for s in scenes], snakemake.output[0])
