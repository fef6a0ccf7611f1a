# Retry-stop check for tests/test_slurm.py, run as `snakemake --profile slurm` (copied as
# ./Snakefile into a scratch directory, next to scripts/_bootstrap.py and src/): an extraction
# whose attempt 1 fails with an error a retry repeats (xmodal.io.fail_attempt) stops its
# attempts 2 and 3 in the bootstrap, which reads the attempt from the job's resources.


localrules:
    all,


rule all:
    input:
        "out/m.h5",


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
