# Everything that is Python rather than a rule: config validation, the model registry,
# wildcard constraints and input functions.
import re
import sys
from functools import partial
from pathlib import Path

from snakemake.exceptions import WorkflowError
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
    models_of,
    schema_errors,
)
from xmodal.figures import FIGURES

_CONFIG_FILES = [str(p) for p in workflow.config_settings.configfiles] or [
    "config.yaml"
]
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
        load_config_file(
            _path
        )  # refuses duplicate keys, which YAML would silently merge
    check_config(config)
except ConfigError as err:
    raise WorkflowError(
        f"Invalid configuration in {', '.join(_CONFIG_FILES)}: {err}"
    ) from None

DATASET = config["dataset"]
MODELS = config["models"]
VISION = models_of(config, "vision")
LANGUAGE = models_of(config, "language")
HUB_CACHE = config.get("hub_cache", "resources/hub")
ANALYSIS = config["analysis"]
EXTRACTION = config["extraction"]


def _alternatives(keys):
    return "|".join(re.escape(k) for k in keys)


wildcard_constraints:
    dataset=re.escape(DATASET),
    model=_alternatives(MODELS),
    vision=_alternatives(VISION),
    llm=_alternatives(LANGUAGE),


# ---------------------------------------------------------------- paths
MANIFEST = f"resources/stimuli/{DATASET}/stimuli.tsv"
DISP = "results/dispersion/{dataset}"
ALIGN = "results/alignment/{dataset}"
FIG = "results/figures/{dataset}"


def feature_file(model):
    return f"results/features/{DATASET}/{model}.h5"


def built_model_dir(model):
    """Where the demo's build rule writes a tiny locally built model."""
    return f"resources/demo/models/{model}"


def feature_spec(wildcards):
    """The registry fields that determine a model's features (labels and sizes do not):
    editing a label must not re-extract anything."""
    entry = MODELS[wildcards.model]
    return {k: entry[k] for k in ("modality", "id", "revision", "build") if k in entry}


def model_input(wildcards):
    """What the extraction of one model needs besides the stimuli: its weights."""
    entry = MODELS[wildcards.model]
    if "build" in entry:
        return built_model_dir(wildcards.model)
    if Path(entry["id"]).is_dir():
        return []
    return f"{HUB_CACHE}/.prefetched/{wildcards.model}.json"


def extraction_resource(name):
    """Per-model job resources from its size; memory and runtime grow with each retry."""
    from xmodal.resources import extraction_resources

    def get(wildcards, attempt):
        entry = MODELS[wildcards.model]
        return extraction_resources(entry["modality"], float(entry["size_b"]), attempt)[
            name
        ]

    return get


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
        "manifest": f"resources/stimuli/{dataset}/stimuli.tsv",
    }


def figure_inputs(wildcards, name):
    paths = table_paths(wildcards.dataset)
    return {key: paths[key] for key in FIGURES[name].inputs}


def pair_tables(kind):
    """Per-(vision, LLM) tables of one kind, for the aggregation rules."""

    def get(wildcards):
        return expand(
            f"results/alignment/{wildcards.dataset}/{kind}/{{vision}}/{{llm}}.tsv",
            vision=VISION,
            llm=LANGUAGE,
        )

    return get


def get_final_output():
    paths = table_paths(DATASET)
    out = [paths[k] for k in ("loo", "grid", "layers", "contrasts")]
    out.append(f"results/summary/{DATASET}.tsv")
    for name in FIGURES:
        out += [
            f"results/figures/{DATASET}/{name}.png",
            f"results/figures/{DATASET}/{name}.pdf",
        ]
    return out
