"""Rule demo_tokenizer: a BPE tokenizer trained on the demo captions."""

import _bootstrap  # noqa: F401

from xmodal.demo.models import train_tokenizer
from xmodal.logs import log_to
from xmodal.stimuli import read_manifest

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])

captions = read_manifest(snakemake.input.manifest)["caption"].tolist()
train_tokenizer(captions, snakemake.output[0])
