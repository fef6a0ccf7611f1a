# One extraction job per model: a GPU job on a cluster, sized from the model's registry entry
# (xmodal.registry). Only the fields that define features are params (the rerun trigger); speed
# settings (batch sizes, workers) are read by the job from the registry at run time. The
# manifest's modification time is not a trigger: its stamp for the model's modality is
# (stimuli.smk), so that an edit reruns only the extractions whose stimuli it changes.


rule extract:
    input:
        manifest=ancient(MANIFEST),
        stamp=manifest_stamp_input,
        model=model_input,
    output:
        features="results/features/{dataset}/{model}.h5",
    log:
        "logs/extract/{dataset}/{model}.log",
    benchmark:
        "results/benchmarks/{dataset}/extract/{model}.tsv"
    wildcard_constraints:
        model=_alternatives(EXTRACTED) or "(?!)",
    conda:
        "../../envs/extract.yaml"
    resources:
        **gpu_model_resource(),
        gpu=extraction_resource("gpu"),
        # one process: its GPUs on one node (sbatch --gpus=N alone may spread them over
        # nodes, and the job sees only its own node's; docs/cluster.md)
        nodes=1,
        mem_mb=extraction_resource("mem_mb"),
        runtime=extraction_resource("runtime"),
        cpus_per_task=extraction_resource("cpus_per_task"),
        # read by the job: a retry of an attempt that failed with an error a retry repeats
        # stops before loading the model (scripts/_bootstrap.py, xmodal.attempts.fail_attempt)
        attempt=lambda wildcards, attempt: attempt,
    params:
        features=feature_spec,
        drop_duplicates=DROP_DUPLICATES,
    script:
        "../../scripts/extract.py"


# A feature file the user supplies (models.<key>.features): checked and copied into results/
# (rows in manifest order, without the duplicates stimuli.drop_duplicates leaves out), never
# extracted, so that no stamp schedules an extraction of it; a supplied file newer than its
# copy, or with other content (its digest, a param), is imported again (README, "Bringing your
# own features").
rule import_features:
    input:
        manifest=ancient(MANIFEST),
        features=lambda wildcards: REGISTRY[wildcards.model].features,
    output:
        features="results/features/{dataset}/{model}.h5",
    log:
        "logs/extract/{dataset}/{model}.log",
    wildcard_constraints:
        model=_alternatives(SUPPLIED) or "(?!)",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        code=ANALYSIS_CODE,
        modality=lambda wildcards: REGISTRY[wildcards.model].modality,
        drop_duplicates=DROP_DUPLICATES,
        sha256=supplied_digest,
    script:
        "../../scripts/import_features.py"
