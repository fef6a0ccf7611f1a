# Beyond the paper (docs/method.md, "Language-side dispersion" and "Stimulus properties").
#
# Language-side dispersion: GPA across the LLMs (one layer each), its correlation with vision
# dispersion, and alignment on the 2 x 2 sets (low/high vision x low/high language dispersion).
# It depends on every LLM by nature: adding an LLM reruns language_gpa, language_correlation,
# joint_sets, every LLM's joint_conditions job (the sets change) and joint_aggregate, besides
# that LLM's own work. Behind analysis.language_dispersion.enabled.
#
# Stimulus properties: image properties (one job, from the manifest), then every property with
# each LLM's token counts read from its feature file (cheap), and their correlation with vision
# dispersion. Adding an LLM reruns the last two only.


rule language_gpa:
    input:
        features=lambda wildcards: [feature_file(m) for m in LANGUAGE],
        layers=lambda wildcards: (
            llm_tables("layers")(wildcards) if LANGUAGE_DISPERSION.uses_chosen else []
        ),
    output:
        residuals=f"{LANG}/residuals.tsv",
        dispersion=f"{LANG}/dispersion.tsv",
        layers=f"{LANG}/layers.tsv",
        summary=f"{LANG}/gpa.json",
    log:
        "logs/language/{dataset}/gpa.log",
    benchmark:
        "results/benchmarks/{dataset}/language_gpa.tsv"
    conda:
        "../../envs/analysis.yaml"
    resources:
        **gpa_resources(),
    params:
        **named_params(
            llms=LANGUAGE,
            layer=LANGUAGE_DISPERSION.layer,
            tol=ANALYSIS["gpa"].get("tol", 1e-10),
            max_iter=ANALYSIS["gpa"].get("max_iter", 1000),
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/language_gpa.py"


rule language_correlation:
    input:
        vision=f"{DISP}/dispersion.tsv",
        language=f"{LANG}/dispersion.tsv",
    output:
        f"{LANG}/correlation.tsv",
    log:
        "logs/language/{dataset}/correlation.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            n_boot=ANALYSIS["n_boot"],
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/language_correlation.py"


rule joint_sets:
    input:
        vision=f"{DISP}/dispersion.tsv",
        language=f"{LANG}/dispersion.tsv",
    output:
        f"{LANG}/joint_sets.tsv",
    log:
        "logs/language/{dataset}/joint_sets.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            set_size=ANALYSIS["set_size"],
            n_random=ANALYSIS["n_random"],
            knn_k=ANALYSIS["knn_k"],
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/joint_sets.py"


rule joint_conditions:
    input:
        vision=vision_features,
        llm="results/features/{dataset}/{llm}.h5",
        layers=f"{ALIGN}/layers/{{llm}}.tsv",
        sets=f"{LANG}/joint_sets.tsv",
    output:
        conditions=f"{LANG}/joint/{{llm}}.tsv",
        cells=f"{LANG}/joint_cells/{{llm}}.tsv",
    log:
        "logs/language/{dataset}/joint/{llm}.log",
    benchmark:
        "results/benchmarks/{dataset}/joint/{llm}.tsv"
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
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/joint_conditions.py"


rule joint_aggregate:
    input:
        conditions=lambda wildcards: expand(
            f"{LANG}/joint/{{llm}}.tsv", dataset=wildcards.dataset, llm=LANGUAGE
        ),
        cells=lambda wildcards: expand(
            f"{LANG}/joint_cells/{{llm}}.tsv", dataset=wildcards.dataset, llm=LANGUAGE
        ),
    output:
        conditions=f"{LANG}/joint.tsv",
        cells=f"{LANG}/joint_cells.tsv",
    log:
        "logs/language/{dataset}/joint_aggregate.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        # the tables' rows follow the LLMs' order: reordering them reruns this (cluster.md)
        **named_params(llms=LANGUAGE),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/joint_aggregate.py"


rule image_properties:
    input:
        manifest=MANIFEST,
        images=f"{STIMULI}/images.tsv",
    output:
        f"{PROPS}/images.tsv",
    log:
        "logs/properties/{dataset}/images.log",
    benchmark:
        "results/benchmarks/{dataset}/image_properties.tsv"
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    resources:
        **retry_resources("scan"),
    params:
        code=ANALYSIS_CODE,
    script:
        "../../scripts/image_properties.py"


rule stimulus_properties:
    input:
        manifest=MANIFEST,
        images=f"{PROPS}/images.tsv",
        llms=lambda wildcards: [feature_file(m) for m in LANGUAGE],
    output:
        f"{PROPS}/properties.tsv",
    log:
        "logs/properties/{dataset}/properties.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            llms=LANGUAGE,
            annotations=setting(config, "analysis.annotations"),
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/stimulus_properties.py"


rule property_correlations:
    input:
        properties=f"{PROPS}/properties.tsv",
        dispersion=f"{DISP}/dispersion.tsv",
    output:
        f"{PROPS}/correlations.tsv",
    log:
        "logs/properties/{dataset}/correlations.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            n_boot=ANALYSIS["n_boot"],
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/property_correlations.py"
