# Retry-stop check for tests/test_slurm.py, run as `snakemake --profile slurm` (copied as
# ./Snakefile into a scratch directory, next to scripts/_bootstrap.py and src/): a job whose
# attempt 1 fails with an error a retry repeats (xmodal.attempts.fail_attempt) stops its
# attempts 2 and 3 in the bootstrap, which reads the attempt from the job's resources: the
# extraction's own, and the profile's default-resources for the analysis job.


localrules:
    all,


rule all:
    input:
        "out/m.h5",
        "out/s.tsv",


rule extract:
    output:
        features="out/m.h5",
    log:
        "out/m.log",
    resources:
        attempt=lambda wildcards, attempt: attempt,
        mem_mb=500,
        runtime=5,
    script:
        "scripts/attempt_probe.py"


rule summary:
    output:
        "out/s.tsv",
    log:
        "out/s.log",
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "scripts/attempt_probe.py"
