"""The job of tests/slurm/attempt.smk: records the attempts that get past the bootstrap, then
fails as an extraction with a bad image does (an error a retry repeats)."""

import _bootstrap  # noqa: F401  (stops an attempt after one that failed for good)

from xmodal.io import fail_attempt
from xmodal.stimuli import StimulusError

snakemake = globals()["snakemake"]
with open("out/attempts.txt", "a", encoding="utf-8") as fh:
    fh.write(f"{snakemake.resources.attempt}\n")
try:
    raise StimulusError("stimulus 's1': cannot decode image img/s1.png")
except StimulusError as err:
    fail_attempt(snakemake.output.features, err)
    raise
