# Representation diagnostics (docs/method.md, "Diagnostics"): for every model and layer, how
# far its stimuli are apart (pairwise cosines, effective dimensionality) and how many stimuli have
# a nearest-neighbour set that the kernel's rounding decides. The LLM layers are diagnosed in
# their layer-search jobs (each layer is read once); the vision layers here.


rule vision_diagnostics:
    input:
        vision=vision_features,
    output:
        f"{DIAG}/vision.tsv",
    log:
        "logs/diagnostics/{dataset}/vision.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        **retry_resources("scan"),
    params:
        **named_params(
            vision=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            k=ANALYSIS["knn_k"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/vision_diagnostics.py"


rule diagnostics:
    input:
        vision=f"{DIAG}/vision.tsv",
        llm=lambda wildcards: expand(
            f"results/diagnostics/{wildcards.dataset}/layers/{{llm}}.tsv", llm=LANGUAGE
        ),
        layers=f"{ALIGN}/layers.tsv",
    output:
        report(
            f"{DIAG}/diagnostics.tsv",
            caption="../report/diagnostics_table.rst",
            category="Tables",
        ),
    log:
        "logs/diagnostics/{dataset}/diagnostics.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        # the tables' rows follow the LLMs' order: reordering them reruns this (cluster.md)
        **named_params(llms=LANGUAGE),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/diagnostics.py"
