"""Rule demo_training_scenes: the scenes the demo's models train on (never the stimuli)."""

from pathlib import Path

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.demo.stimuli import generate_training_scenes  # noqa: E402

generate_training_scenes(
    Path(snakemake.output.scenes), n=int(snakemake.params.n), seed=int(snakemake.params.seed)
)
