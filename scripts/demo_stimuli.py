"""Rule demo_stimuli: synthetic scene stimuli for the embedded demo."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from pathlib import Path  # noqa: E402

from xmodal.demo.stimuli import generate_stimuli  # noqa: E402

generate_stimuli(
    Path(snakemake.output.manifest).parent,
    n=int(snakemake.params.n),
    seed=int(snakemake.params.seed),
)
