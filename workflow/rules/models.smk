# Model weights: downloaded into the project-local hub cache on the submit host (compute
# nodes are often offline), or, for the demo, tiny untrained models built locally.


rule prefetch_model:
    output:
        record=f"{HUB_CACHE}/.prefetched/{{model}}.json",
    log:
        "logs/prefetch/{model}.log",
    localrule: True
    conda:
        "../../envs/extract.yaml"
    params:
        spec=prefetch_spec,
        cache_dir=lambda wildcards, output: str(Path(output.record).parent.parent),
    script:
        "../../scripts/prefetch_model.py"


rule demo_tokenizer:
    input:
        manifest=MANIFEST,
    output:
        directory("resources/demo/tokenizer/{dataset}"),
    log:
        "logs/demo/{dataset}/tokenizer.log",
    localrule: True
    conda:
        "../../envs/extract.yaml"
    script:
        "../../scripts/demo_tokenizer.py"


rule demo_model:
    input:
        tokenizer=lambda wildcards: (
            f"resources/demo/tokenizer/{DATASET}"
            if REGISTRY[wildcards.model].modality == "language"
            else []
        ),
    output:
        directory(built_model_dir("{model}")),
    log:
        "logs/demo/models/{model}.log",
    localrule: True
    conda:
        "../../envs/extract.yaml"
    params:
        entry=lambda wildcards: {
            k: v
            for k, v in feature_spec(wildcards).items()
            if k in ("modality", "id", "build")
        },
    script:
        "../../scripts/demo_model.py"
