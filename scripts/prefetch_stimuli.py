"""Rule prefetch_stimuli: download the stimulus set on the submit host."""

from pathlib import Path

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.config import hub_cache_dir  # noqa: E402
from xmodal.prefetch import prefetch_stimuli  # noqa: E402

# no network or a missing revision end in one logged line saying what to do (xmodal.logs)
prefetch_stimuli(
    repo=snakemake.params.repo,
    revision=snakemake.params.revision,
    split=snakemake.params.split,
    out_dir=Path(snakemake.output.manifest).parent,
    cache_dir=hub_cache_dir(snakemake.config),
)
