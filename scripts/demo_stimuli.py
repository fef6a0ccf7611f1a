"""Rule demo_stimuli: synthetic scene stimuli for the embedded demo."""

from pathlib import Path

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.demo.stimuli import generate_stimuli  # noqa: E402

generate_stimuli(
    Path(snakemake.output.manifest).parent,
    n=int(snakemake.params.n),
    seed=int(snakemake.params.seed),
    nuisance_beta=snakemake.params.get("nuisance_beta"),
)
