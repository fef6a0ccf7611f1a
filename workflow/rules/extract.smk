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
    conda:
        "../../envs/extract.yaml"
    resources:
        **gpu_model_resource(),
        gpu=extraction_resource("gpu"),
        mem_mb=extraction_resource("mem_mb"),
        runtime=extraction_resource("runtime"),
        cpus_per_task=extraction_resource("cpus_per_task"),
    params:
        features=feature_spec,
        drop_duplicates=DROP_DUPLICATES,
    script:
        "../../scripts/extract.py"
