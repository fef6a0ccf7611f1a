# Retry-with-more-memory check for tests/test_slurm.py, run as `snakemake --profile slurm`
# (copied as ./Snakefile into a scratch directory). The job needs about 1.2 GB: attempt 1 asks
# SLURM for 1000 MB and is killed for exceeding it (or, on a cluster that does not enforce
# memory, fails its own check); attempt 2 asks for 2000 MB and succeeds.


localrules:
    all,


rule all:
    input:
        "out/grown.txt",


rule grow:
    output:
        "out/grown.txt",
    resources:
        mem_mb=lambda wildcards, attempt: 1000 * attempt,
        runtime=5,
    params:
        need_mb=1200,
    shell:
        """
        python -c 'import sys, time; b = bytearray(b"x") * ({params.need_mb} << 20); time.sleep(4); sys.exit(0 if {resources.mem_mb} > {params.need_mb} else "asked for {resources.mem_mb} MB, need {params.need_mb} MB")'
        echo {resources.mem_mb} > {output}
        """
