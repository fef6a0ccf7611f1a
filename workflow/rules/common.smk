# Everything that is Python rather than a rule: config validation, the model registry,
# wildcard constraints and input functions.
import re
import sys
from functools import partial
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# The library lives in src/: importable here whether or not it is installed (the step
# scripts do the same through scripts/_bootstrap.py).
_SRC = str(Path(workflow.basedir) / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from xmodal.config import (
    ConfigError,
    check_config,
    load_config_file,
    schema_errors,
)
from xmodal.figures import (
    DEFAULT_METRIC,
    FIGURES,
    figure_files,
    metric_from_tag,
    metric_label,
    metric_tag_pattern,
    report_subcategory,
)
from xmodal.language_dispersion import LanguageDispersionSettings
from xmodal.registry import Registry

_CONFIG_FILES = [str(p) for p in workflow.config_settings.configfiles] or [
    "config.yaml"
]
for _path in _CONFIG_FILES:
    if not Path(_path).is_file():
        raise WorkflowError(
            f"Config file {_path} not found (looked in {Path.cwd()}). With "
            "--directory/-d, give --configfile as a path that exists from where you run "
            "snakemake, or run snakemake from the project folder."
        )

try:
    validate(config, schema="../schemas/config.schema.yaml")
except WorkflowError:
    # one line per problem, naming the file and the key (jsonschema's report is long)
    _schema = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
    raise WorkflowError(
        "\n".join(schema_errors(config, _schema, ", ".join(_CONFIG_FILES)))
    ) from None

try:
    for _path in _CONFIG_FILES:
        # refuses duplicate keys, which YAML would silently merge
        load_config_file(_path)
    check_config(config)
    # the one source of truth about every model (xmodal.registry)
    REGISTRY = Registry.from_config(config)
    LANGUAGE_DISPERSION = LanguageDispersionSettings.from_config(config)
except ConfigError as err:
    raise WorkflowError(
        f"Invalid configuration in {', '.join(_CONFIG_FILES)}: {err}"
    ) from None

for _first, _second, _what in REGISTRY.duplicate_ids():
    logger.warning(
        f"models '{_first}' and '{_second}' are the same model ({_what}): their features "
        "will be identical and count twice in GPA and leave-one-model-out; remove one of them"
    )

DATASET = config["dataset"]
VISION = REGISTRY.vision
LANGUAGE = REGISTRY.language
HUB_CACHE = config.get("hub_cache", "resources/hub")
ANALYSIS = config["analysis"]
METRICS = list(ANALYSIS.get("metrics", ["cknna"]))
# the alignment jobs ask for a GPU only when the config says so (analysis.gpu)
ALIGNMENT_GPU = {"gpu": 1} if ANALYSIS.get("gpu", False) else {}
# changes which stimuli every model's features hold: a feature-defining setting
DROP_DUPLICATES = bool(config["stimuli"].get("drop_duplicates", False))


def _alternatives(keys):
    return "|".join(re.escape(k) for k in keys)


wildcard_constraints:
    dataset=re.escape(DATASET),
    model=_alternatives(REGISTRY),
    vision=_alternatives(VISION),
    llm=_alternatives(LANGUAGE),


# ---------------------------------------------------------------- paths
MANIFEST = f"resources/stimuli/{DATASET}/stimuli.tsv"
STIMULI = "results/stimuli/{dataset}"
DISP = "results/dispersion/{dataset}"
ALIGN = "results/alignment/{dataset}"
DIAG = "results/diagnostics/{dataset}"
FIG = "results/figures/{dataset}"
LANG = "results/language/{dataset}"
PROPS = "results/properties/{dataset}"


def feature_file(model):
    return f"results/features/{DATASET}/{model}.h5"


def vision_features(wildcards):
    """The feature files of every vision model (GPA, and each LLM's alignment jobs)."""
    return [feature_file(v) for v in VISION]


def built_model_dir(model):
    """Where the demo's build rule writes a tiny locally built model."""
    return f"resources/demo/models/{model}"


def feature_spec(wildcards):
    """The registry fields that define a model's features (the extraction's rerun trigger):
    labels, sizes, batch sizes, workers and GPUs are not among them (docs/cluster.md).
    """
    return REGISTRY[wildcards.model].feature_spec()


def prefetch_spec(wildcards):
    """What a model's download depends on: its repository and revision."""
    return REGISTRY[wildcards.model].prefetch_spec()


def model_input(wildcards):
    """What the extraction of one model needs besides the stimuli: its weights."""
    entry = REGISTRY[wildcards.model]
    if entry.source == "built":
        return built_model_dir(wildcards.model)
    if entry.source == "local":
        return []
    return f"{HUB_CACHE}/.prefetched/{wildcards.model}.json"


def extraction_resource(name):
    """One resource of a model's extraction job (xmodal.registry: size and site settings);
    memory and runtime grow with each retry."""

    def get(wildcards, attempt):
        return REGISTRY[wildcards.model].resources(attempt)[name]

    return get


def gpu_model_resource():
    """``gpu_model`` (sbatch --gpus=<model>:<n>) when extraction.gpu_model is set."""
    return (
        {"gpu_model": extraction_resource("gpu_model")}
        if config.get("extraction", {}).get("gpu_model")
        else {}
    )


# ---------------------------------------------------------------- tables read by figures
def table_paths(dataset):
    return {
        "dispersion": f"results/dispersion/{dataset}/dispersion.tsv",
        "residuals": f"results/dispersion/{dataset}/residuals.tsv",
        "sets": f"results/dispersion/{dataset}/sets.tsv",
        "loo": f"results/dispersion/{dataset}/loo.tsv",
        "loo_stimuli": f"results/dispersion/{dataset}/loo_stimuli.tsv",
        "layers": f"results/alignment/{dataset}/layers.tsv",
        "grid": f"results/alignment/{dataset}/grid.tsv",
        "contrasts": f"results/alignment/{dataset}/contrasts.tsv",
        "models": f"results/alignment/{dataset}/models.tsv",
        "summary": f"results/summary/{dataset}.tsv",
        "images": f"results/stimuli/{dataset}/images.tsv",
        "duplicates": f"results/stimuli/{dataset}/duplicates.tsv",
        "diagnostics": f"results/diagnostics/{dataset}/diagnostics.tsv",
        "manifest": f"resources/stimuli/{dataset}/stimuli.tsv",
        "language_dispersion": f"results/language/{dataset}/dispersion.tsv",
        "language_correlation": f"results/language/{dataset}/correlation.tsv",
        "joint_cells": f"results/language/{dataset}/joint_cells.tsv",
        "properties": f"results/properties/{dataset}/properties.tsv",
        "property_correlations": f"results/properties/{dataset}/correlations.tsv",
    }


def figure_inputs(wildcards, name):
    paths = table_paths(wildcards.dataset)
    return {key: paths[key] for key in FIGURES[name].inputs}


def llm_tables(kind):
    """Per-LLM tables of one kind, for the aggregation rules."""

    def get(wildcards):
        return expand(
            f"results/alignment/{wildcards.dataset}/{kind}/{{llm}}.tsv", llm=LANGUAGE
        )

    return get


def get_final_output():
    paths = table_paths(DATASET)
    keys = ("loo", "grid", "layers", "contrasts", "summary", "images", "duplicates")
    keys += ("diagnostics", "properties", "property_correlations")
    if LANGUAGE_DISPERSION.enabled:
        keys += ("language_correlation", "joint_cells")
    out = [paths[k] for k in keys]
    # a figure of alignment values once per metric ({name}.png, {name}.{metric}.png), the
    # others once (xmodal.figures.figure_files)
    skip = () if LANGUAGE_DISPERSION.enabled else ("language_dispersion",)
    return out + figure_files(f"results/figures/{DATASET}", METRICS, skip=skip)
