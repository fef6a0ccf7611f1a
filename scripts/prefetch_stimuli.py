"""Rule prefetch_stimuli: download the stimulus set on the submit host."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from pathlib import Path  # noqa: E402

from xmodal.prefetch import prefetch_stimuli  # noqa: E402

prefetch_stimuli(
    repo=snakemake.params.repo,
    revision=snakemake.params.revision,
    split=snakemake.params.split,
    out_dir=Path(snakemake.output.manifest).parent,
)
