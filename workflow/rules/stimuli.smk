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


# Every image decoded once: format, mode, size, EXIF orientation, the conversion applied, and
# groups of duplicate stimuli (same file, same pixels, same caption), reported with their ids.
# A leaf of the DAG: nothing upstream of the extractions depends on it.
rule stimuli_report:
    input:
        manifest=MANIFEST,
    output:
        images=f"{STIMULI}/images.tsv",
        duplicates=f"{STIMULI}/duplicates.tsv",
    log:
        "logs/stimuli/{dataset}/report.log",
    conda:
        "../../envs/analysis.yaml"
    threads: 2
    script:
        "../../scripts/stimuli_report.py"
