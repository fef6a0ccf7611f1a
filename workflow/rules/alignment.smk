# Cross-modal alignment, one job per LLM and stage: each job reads its LLM's feature file once
# and computes each LLM layer's kernel once for every vision model. The full-set layer search
# does not depend on GPA; the subset/ablation conditions at the chosen layers do.
#
# The controls (docs/method.md, "Controls") live in the same per-LLM jobs: the size-matched
# random sets of the drop ablation are sets of sets.tsv (the conditions job evaluates them,
# analysis.drop_control); the held-out layer choice picks a layer on half A of each random split
# in the layer search (which reads every layer once) and evaluates the sets inside half B in the
# conditions job (analysis.heldout_layer). Each vision model is also scored on low and high
# sets chosen by the GPA of the other vision models (analysis.self_selection; the fits of
# leave_one_model_out). No job per pair or per split.
#
# The vision models' bootstrap structures (the same for every LLM) are prepared once by
# vision_bootstrap; each conditions job checks them by content key and rebuilds any that differ.


rule layer_search:
    input:
        vision=vision_features,
        llm="results/features/{dataset}/{llm}.h5",
    output:
        **control_outputs("search"),
        layers=f"{ALIGN}/layers/{{llm}}.tsv",
        diagnostics=f"{DIAG}/layers/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/layers/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/layers/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **pair_resources("layer_search"),
        **ALIGNMENT_GPU,
    params:
        **named_params(
            vision=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            k=ANALYSIS["knn_k"],
            metrics=METRICS,
            heldout=HELDOUT_PARAMS,
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/layer_search.py"


rule vision_bootstrap:
    input:
        vision=vision_features,
        sets=f"{DISP}/sets.tsv",
    output:
        f"{ALIGN}/vision_bootstrap.pt",
    log:
        "logs/alignment/{dataset}/vision_bootstrap.log",
    benchmark:
        "results/benchmarks/{dataset}/vision_bootstrap.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **retry_resources("pair"),
        **ALIGNMENT_GPU,
    params:
        **named_params(
            vision=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            k=ANALYSIS["knn_k"],
            n_boot=ANALYSIS["n_boot"],
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/vision_bootstrap.py"


rule conditions:
    input:
        **condition_control_inputs(),
        vision=vision_features,
        vision_bootstrap=f"{ALIGN}/vision_bootstrap.pt",
        llm="results/features/{dataset}/{llm}.h5",
        layers=f"{ALIGN}/layers/{{llm}}.tsv",
        sets=f"{DISP}/sets.tsv",
    output:
        **control_outputs("conditions"),
        conditions=f"{ALIGN}/conditions/{{llm}}.tsv",
        contrasts=f"{ALIGN}/contrasts/{{llm}}.tsv",
    log:
        "logs/alignment/{dataset}/conditions/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/conditions/{llm}.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **pair_resources("conditions"),
        **ALIGNMENT_GPU,
    params:
        **named_params(
            vision=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            k=ANALYSIS["knn_k"],
            n_boot=ANALYSIS["n_boot"],
            seed=ANALYSIS["seed"],
            metrics=METRICS,
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/conditions.py"


rule aggregate:
    input:
        **control_tables(),
        layers=llm_tables("layers"),
        conditions=llm_tables("conditions"),
        contrasts=llm_tables("contrasts"),
    output:
        **control_outputs("search", per_llm=False),
        **control_outputs("conditions", per_llm=False),
        layers=f"{ALIGN}/layers.tsv",
        grid=f"{ALIGN}/grid.tsv",
        contrasts=f"{ALIGN}/contrasts.tsv",
    log:
        "logs/alignment/{dataset}/aggregate.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        # the tables' rows follow the LLMs' order: reordering them reruns this (cluster.md)
        **named_params(llms=LANGUAGE),
        code=ANALYSIS_CODE,
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
        code=ANALYSIS_CODE,
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
    params:
        code=ANALYSIS_CODE,
    script:
        "../../scripts/summary.py"


rule drop_summary:
    input:
        f"{ALIGN}/drop.tsv",
    output:
        report(
            "results/summary/{dataset}_drop.tsv",
            caption="../report/drop_summary_table.rst",
            category="Tables",
        ),
    log:
        "logs/summary/{dataset}_drop.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        code=ANALYSIS_CODE,
    script:
        "../../scripts/drop_summary.py"


rule heldout_summary:
    input:
        f"{ALIGN}/heldout.tsv",
    output:
        report(
            "results/summary/{dataset}_heldout.tsv",
            caption="../report/heldout_summary_table.rst",
            category="Tables",
        ),
    log:
        "logs/summary/{dataset}_heldout.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        code=ANALYSIS_CODE,
    script:
        "../../scripts/heldout_summary.py"


rule self_selection_summary:
    input:
        self_selection=f"{ALIGN}/self_selection.tsv",
        contrasts=f"{ALIGN}/contrasts.tsv",
    output:
        report(
            "results/summary/{dataset}_self_selection.tsv",
            caption="../report/self_selection_summary_table.rst",
            category="Tables",
        ),
    log:
        "logs/summary/{dataset}_self_selection.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        code=ANALYSIS_CODE,
    script:
        "../../scripts/self_selection_summary.py"


# What the numbers were computed from, to cite: the stimuli's digest (and hub commit) and each
# feature file's model id, resolved revision, weights digest, dtype and library versions.
rule provenance:
    input:
        manifest=MANIFEST,
        features=[feature_file(k) for k in REGISTRY],
    output:
        report(
            "results/summary/{dataset}_provenance.tsv",
            caption="../report/provenance_table.rst",
            category="Tables",
        ),
    log:
        "logs/summary/{dataset}_provenance.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            stimuli_source=config["stimuli"]["source"],
            # the config's labels: a feature file keeps the label it was extracted under
            labels={k: REGISTRY[k].label for k in REGISTRY},
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/provenance.py"
