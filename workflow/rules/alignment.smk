# Cross-modal alignment (CKNNA) per (vision, LLM) pair: the full-set layer search, which does
# not depend on GPA, and the subset/ablation conditions at the chosen layer, which do.


rule layer_search:
    input:
        vision="results/features/{dataset}/{vision}.h5",
        llm="results/features/{dataset}/{llm}.h5",
    output:
        f"{ALIGN}/layers/{{vision}}/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/layers/{vision}/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/layers/{vision}/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        vision_layer=ANALYSIS["vision_layer"],
        k=ANALYSIS["knn_k"],
    script:
        "../../scripts/layer_search.py"


rule conditions:
    input:
        vision="results/features/{dataset}/{vision}.h5",
        llm="results/features/{dataset}/{llm}.h5",
        layers=f"{ALIGN}/layers/{{vision}}/{{llm}}.tsv",
        sets=f"{DISP}/sets.tsv",
    output:
        conditions=f"{ALIGN}/conditions/{{vision}}/{{llm}}.tsv",
        contrasts=f"{ALIGN}/contrasts/{{vision}}/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/conditions/{vision}/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/conditions/{vision}/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    params:
        vision_layer=ANALYSIS["vision_layer"],
        k=ANALYSIS["knn_k"],
        n_boot=ANALYSIS["n_boot"],
        seed=ANALYSIS["seed"],
    script:
        "../../scripts/conditions.py"


rule aggregate:
    input:
        layers=pair_tables("layers"),
        conditions=pair_tables("conditions"),
        contrasts=pair_tables("contrasts"),
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
        models=MODELS,
    script:
        "../../scripts/models_table.py"


rule summary:
    input:
        contrasts=f"{ALIGN}/contrasts.tsv",
        grid=f"{ALIGN}/grid.tsv",
    output:
        "results/summary/{dataset}.tsv",
    log:
        "logs/summary/{dataset}.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    script:
        "../../scripts/summary.py"
