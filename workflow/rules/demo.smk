# The embedded demo (config/demo.yaml): evaluation stimuli and a larger, disjoint set of
# training scenes drawn from one synthetic world, a tokenizer, and tiny models of the paper's
# families built locally and, with a `train` block, trained briefly on the training scenes.
from xmodal.demo.build import build_priority

DEMO_SCENES = f"resources/demo/training/{DATASET}/scenes.npz"
DEMO_TOKENIZER = f"resources/demo/tokenizer/{DATASET}"


if config["stimuli"]["source"] == "demo":

    rule demo_stimuli:
        output:
            manifest=MANIFEST,
        log:
            f"logs/stimuli/{DATASET}.log",
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        params:
            **MANIFEST_SOURCE,
            code=DEMO_CODE,
        script:
            "../../scripts/demo_stimuli.py"


rule demo_training_scenes:
    output:
        scenes=DEMO_SCENES,
    log:
        f"logs/demo/{DATASET}/training_scenes.log",
    benchmark:
        f"results/benchmarks/{DATASET}/demo/training_scenes.tsv"
    localrule: True
    conda:
        "../../envs/analysis.yaml"
    params:
        **named_params(
            n=DEMO_N_TRAIN,
            seed=DEMO_TRAIN_SEED,
        ),
        code=DEMO_CODE,
    script:
        "../../scripts/demo_training_scenes.py"


rule demo_tokenizer:
    output:
        directory(DEMO_TOKENIZER),
    log:
        f"logs/demo/{DATASET}/tokenizer.log",
    localrule: True
    conda:
        "../../envs/extract.yaml"
    params:
        **named_params(
            n=DEMO_N_TRAIN,
            seed=DEMO_TRAIN_SEED,
        ),
        code=DEMO_CODE,
    script:
        "../../scripts/demo_tokenizer.py"


rule demo_model:
    input:
        tokenizer=lambda wildcards: (
            DEMO_TOKENIZER if needs_of(wildcards).tokenizer else []
        ),
        scenes=lambda wildcards: DEMO_SCENES if needs_of(wildcards).scenes else [],
        init=lambda wildcards: (
            built_model_dir(needs_of(wildcards).init)
            if needs_of(wildcards).init
            else []
        ),
    output:
        directory(built_model_dir("{model}")),
    log:
        "logs/demo/models/{model}.log",
    benchmark:
        f"results/benchmarks/{DATASET}/demo/{{model}}.tsv"
    # a model that others start from (CLIP for CLIP+FT) is built first: the chain is the
    # longest path through the demo's training
    priority: lambda wildcards: build_priority(config["models"], wildcards.model)
    localrule: True
    conda:
        "../../envs/extract.yaml"
    threads: 1
    params:
        code=DEMO_CODE,
        # what the build and training depend on (not dtype or max_tokens, which only the
        # extraction uses)
        entry=lambda wildcards: {
            k: v
            for k, v in feature_spec(wildcards).items()
            if k in ("modality", "id", "build")
        },
    script:
        "../../scripts/demo_model.py"
