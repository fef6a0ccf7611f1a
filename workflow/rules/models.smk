# Model weights: downloaded into the project-local hub cache on the submit host (compute
# nodes are often offline); the demo builds its tiny models locally (demo.smk).


# The hub cache (config key hub_cache) is read by the scripts, not passed as a param, and the
# record's path does not follow it: moving the cache reruns nothing (docs/cluster.md).
rule prefetch_model:
    output:
        record=model_record_path("{model}"),
    log:
        "logs/prefetch/{model}.log",
    localrule: True
    conda:
        "../../envs/extract.yaml"
    params:
        spec=prefetch_spec,
    script:
        "../../scripts/prefetch_model.py"
