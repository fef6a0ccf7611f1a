"""Rule prefetch_stimuli: download the stimulus set on the submit host."""

from pathlib import Path

import _bootstrap  # noqa: F401

from xmodal.logs import log_to
from xmodal.prefetch import prefetch_stimuli

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])

prefetch_stimuli(
    repo=snakemake.params.repo,
    revision=snakemake.params.revision,
    split=snakemake.params.split,
    out_dir=Path(snakemake.output.manifest).parent,
)
