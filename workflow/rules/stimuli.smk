# The stimulus manifest resources/stimuli/<dataset>/stimuli.tsv: generated (demo),
# downloaded on the submit host (hub), or provided by the user (local).

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
            n=config["stimuli"].get("n", 240),
            seed=config["stimuli"].get("seed", 0),
        script:
            "../../scripts/demo_stimuli.py"

elif config["stimuli"]["source"] == "hub":

    rule prefetch_stimuli:
        output:
            manifest=MANIFEST,
        log:
            f"logs/stimuli/{DATASET}.log",
        localrule: True
        conda:
            "../../envs/extract.yaml"
        params:
            repo=config["stimuli"].get("repo", "minhuh/prh"),
            revision=config["stimuli"].get("revision"),
            split=config["stimuli"].get("split", "train"),
            cache_dir=HUB_CACHE,
        script:
            "../../scripts/prefetch_stimuli.py"
