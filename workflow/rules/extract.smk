# One extraction job per model: a GPU job on a cluster, sized from the model's registry entry.


rule extract:
    input:
        manifest=MANIFEST,
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
        gpu=extraction_resource("gpu"),
        mem_mb=extraction_resource("mem_mb"),
        runtime=extraction_resource("runtime"),
        cpus_per_task=extraction_resource("cpus_per_task"),
    params:
        entry=feature_spec,
        cache_dir=HUB_CACHE,
        dtype=EXTRACTION.get("dtype", "auto"),
        batch_size=lambda wildcards: MODELS[wildcards.model].get(
            "batch_size",
            EXTRACTION.get("batch_size", {}).get(MODELS[wildcards.model]["modality"]),
        ),
        num_workers=EXTRACTION.get("num_workers", 4),
        allow_pickle=lambda wildcards: MODELS[wildcards.model].get(
            "allow_pickle", EXTRACTION.get("allow_pickle", False)
        ),
    script:
        "../../scripts/extract.py"
