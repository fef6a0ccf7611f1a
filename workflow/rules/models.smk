# Model weights: downloaded into the project-local hub cache on the submit host (compute
# nodes are often offline); the demo builds its tiny models locally (demo.smk).


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
