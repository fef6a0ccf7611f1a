# Cross-modal alignment, one job per LLM and stage: each job reads its LLM's feature file once
# and computes each LLM layer's kernel once for every vision model. The full-set layer search
# does not depend on GPA; the subset/ablation conditions at the chosen layers do.


rule layer_search:
    input:
        vision=vision_features,
        llm="results/features/{dataset}/{llm}.h5",
    output:
        layers=f"{ALIGN}/layers/{{llm}}.tsv",
        diagnostics=f"{DIAG}/layers/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/layers/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/layers/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **ALIGNMENT_GPU,
    params:
        vision=VISION,
        vision_layer=ANALYSIS["vision_layer"],
        k=ANALYSIS["knn_k"],
        metrics=METRICS,
    script:
        "../../scripts/layer_search.py"


rule conditions:
    input:
        vision=vision_features,
        llm="results/features/{dataset}/{llm}.h5",
        layers=f"{ALIGN}/layers/{{llm}}.tsv",
        sets=f"{DISP}/sets.tsv",
    output:
        conditions=f"{ALIGN}/conditions/{{llm}}.tsv",
        contrasts=f"{ALIGN}/contrasts/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/conditions/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/conditions/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **ALIGNMENT_GPU,
    params:
        vision=VISION,
        vision_layer=ANALYSIS["vision_layer"],
        k=ANALYSIS["knn_k"],
        n_boot=ANALYSIS["n_boot"],
        seed=ANALYSIS["seed"],
        metrics=METRICS,
    script:
        "../../scripts/conditions.py"


rule aggregate:
    input:
        layers=llm_tables("layers"),
        conditions=llm_tables("conditions"),
        contrasts=llm_tables("contrasts"),
    output:
        layers=f"{ALIGN}/layers.tsv",
        grid=f"{ALIGN}/grid.tsv",
        contrasts=f"{ALIGN}/contrasts.tsv",
    log:
        "logs/alignment/{dataset}/aggregate.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    script:
        "../../scripts/aggregate.py"


rule models_table:
    output:
        f"{ALIGN}/models.tsv",
    log:
        "logs/alignment/{dataset}/models.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        models=REGISTRY.table().to_dict("records"),
    script:
        "../../scripts/models_table.py"


rule summary:
    input:
        contrasts=f"{ALIGN}/contrasts.tsv",
        grid=f"{ALIGN}/grid.tsv",
    output:
        report(
            "results/summary/{dataset}.tsv",
            caption="../report/summary_table.rst",
            category="Tables",
        ),
    log:
        "logs/summary/{dataset}.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    script:
        "../../scripts/summary.py"
