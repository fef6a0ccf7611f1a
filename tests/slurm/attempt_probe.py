"""The jobs of tests/slurm/attempt.smk: each records the attempts that get past the bootstrap,
then fails with an error a retry repeats (a bad image; a bad table), uncaught: the bootstrap
records it at exit (xmodal.attempts.fail_attempt)."""

import _bootstrap  # noqa: F401  (stops an attempt after one that failed for good)

from xmodal.io import TableError
from xmodal.stimuli import StimulusError

snakemake = globals()["snakemake"]
with open(f"out/attempts-{snakemake.rule}.txt", "a", encoding="utf-8") as fh:
    fh.write(f"{snakemake.resources.attempt}\n")
if snakemake.rule == "extract":
    raise StimulusError("stimulus 's1': cannot decode image img/s1.png")
raise TableError("results/sets.tsv: column 'set' missing")
