"""Rule demo_tokenizer: a BPE tokenizer trained on the demo captions."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.demo.models import train_tokenizer  # noqa: E402
from xmodal.stimuli import read_manifest  # noqa: E402

captions = read_manifest(snakemake.input.manifest)["caption"].tolist()
train_tokenizer(captions, snakemake.output[0])
