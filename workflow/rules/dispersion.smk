# Intra-modal dispersion: GPA across the vision models, per-stimulus dispersion, stimulus
# sets, and the leave-one-model-out check.


rule gpa:
    input:
        features=lambda wildcards: [feature_file(v) for v in VISION],
    output:
        residuals=f"{DISP}/residuals.tsv",
        dispersion=f"{DISP}/dispersion.tsv",
        summary=f"{DISP}/gpa.json",
    log:
        "logs/dispersion/{dataset}/gpa.log",
    benchmark:
        "results/benchmarks/{dataset}/gpa.tsv"
    conda:
        "../../envs/analysis.yaml"
    # the per-model fits run on parallel threads, one per CPU (xmodal.parallel)
    threads: 2
    resources:
        **gpa_resources(),
    params:
        **named_params(
            models=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            tol=ANALYSIS["gpa"].get("tol", 1e-10),
            max_iter=ANALYSIS["gpa"].get("max_iter", 1000),
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/gpa.py"


rule stimulus_sets:
    input:
        dispersion=f"{DISP}/dispersion.tsv",
    output:
        sets=f"{DISP}/sets.tsv",
    log:
        "logs/dispersion/{dataset}/sets.log",
    conda:
        "../../envs/analysis.yaml"
    resources:
        **retry_resources("light"),
    params:
        **named_params(
            set_size=ANALYSIS["set_size"],
            n_random=ANALYSIS["n_random"],
            drop_fraction=ANALYSIS["drop_fraction"],
            knn_k=ANALYSIS["knn_k"],
            seed=ANALYSIS["seed"],
            # the size-matched control of the drop sets (0 draws: off; docs/method.md, "Controls")
            drop_control={"n_random": DROP_CONTROL.draws(ANALYSIS)},
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/stimulus_sets.py"


rule heldout_sets:
    input:
        dispersion=f"{DISP}/dispersion.tsv",
    output:
        f"{DISP}/heldout_sets.tsv",
    log:
        "logs/dispersion/{dataset}/heldout_sets.log",
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            set_size=ANALYSIS["set_size"],
            n_random=ANALYSIS["n_random"],
            knn_k=ANALYSIS["knn_k"],
            seed=ANALYSIS["seed"],
            heldout={"n_splits": HELDOUT.n_splits},
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/heldout_sets.py"


rule leave_one_model_out:
    input:
        features=lambda wildcards: [feature_file(v) for v in VISION],
    output:
        table=f"{DISP}/loo.tsv",
        stimuli=f"{DISP}/loo_stimuli.tsv",
    log:
        "logs/dispersion/{dataset}/loo.log",
    benchmark:
        "results/benchmarks/{dataset}/loo.tsv"
    conda:
        "../../envs/analysis.yaml"
    # the per-model fits run on parallel threads, one per CPU (xmodal.parallel)
    threads: 2
    resources:
        **loo_resources(),
    params:
        **named_params(
            models=VISION,
            vision_layer=ANALYSIS["vision_layer"],
            tol=ANALYSIS["gpa"].get("tol", 1e-10),
            max_iter=ANALYSIS["gpa"].get("max_iter", 1000),
            # the baseline of the held-out model's rows shuffled (docs/method.md)
            n_permutations=ANALYSIS["n_random"],
            seed=ANALYSIS["seed"],
        ),
        code=ANALYSIS_CODE,
    script:
        "../../scripts/leave_one_model_out.py"
