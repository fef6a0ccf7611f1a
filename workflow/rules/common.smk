# Everything that is Python rather than a rule: config validation, the model registry,
# wildcard constraints and input functions.
import ast
import hashlib
import json
import os
import re
import sys
import time
from functools import cache, partial
from pathlib import Path
from types import SimpleNamespace

from snakemake.exceptions import WorkflowError
from snakemake.io import IOFile, apply_wildcards, get_wildcard_names
from snakemake.logging import logger
from snakemake.utils import validate

# The library lives in src/: importable here whether or not it is installed (the step
# scripts do the same through scripts/_bootstrap.py).
_SRC = str(Path(workflow.basedir) / "src")
if _SRC not in sys.path:
    sys.path.insert(0, _SRC)

try:
    from xmodal import analysis_code_digest, demo_code_digest
    from xmodal.config import (
        RUN_CONFIG_ENV,
        ConfigError,
        apply_defaults,
        changed_settings,
        check_against_stimuli,
        check_config,
        check_report_settings,
        config_json,
        recorded_settings_changes,
        load_config_file,
        normalise_integers,
        nuisance_design,
        record_run_settings,
        schema_errors,
        setting,
    )
    from xmodal.features import (
        FeatureFileError,
        check_against_stamp,
        check_against_weights,
        feature_shape,
        extraction_record,
        made_with,
    )
    from xmodal.figures import (
        DEFAULT_METRIC,
        FIGURES,
        METRIC_LABELS,
        figure_files,
        figure_metrics,
        figure_stem,
        metric_from_tag,
        metric_label,
        metric_tag_pattern,
        report_subcategory,
    )
    from xmodal.language_dispersion import LanguageDispersionSettings
    from xmodal.demo.build import demo_needs
    from xmodal.attempts import forget_failures, marked_paths, unfinished_outputs
    from xmodal.io import file_digests
    from xmodal.logs import forward_to
    from xmodal.prefetch import (
        downloaded_revision,
        model_record_path,
        read_model_record,
    )
    from xmodal.properties import annotations, check_annotations
    from xmodal.registry import Registry, built_model_dir
    from xmodal.resources import analysis_resources, loo_minutes, pair_minutes
    from xmodal.selection import DropControl, HeldOutLayer, SelfSelection
    from xmodal.stimuli import (
        DECODED_IMAGES,
        EXTRACTION_COLUMNS,
        IMAGE_DIGESTS,
        MANIFEST_CONTENT,
        MANIFEST_SETTINGS,
        StimulusError,
        check_images_decode,
        follow_manifest_content,
        manifest_settings_changed,
        manifest_stamp,
        read_manifest,
        write_manifest_stamp,
    )
except ModuleNotFoundError as _err:
    # a Snakemake of another environment (a cluster module, pipx) than the one the project
    # was installed into: it reads the workflow, but not the library's dependencies
    if (_err.name or "xmodal").split(".")[0] == "xmodal":
        raise
    raise WorkflowError(
        f"this Snakemake runs {sys.executable}, which cannot import {_err.name!r} ({_err}), "
        "needed by this workflow's library (xmodal): install the project into that Python "
        "(pip install -e '.[workflow]' in this folder; if the package is installed, it is "
        "broken: reinstall it), or run the snakemake of the environment the project is "
        "installed in (after make demo: source .venv/bin/activate first, or the VENV you "
        "gave make)"
    ) from None

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

_SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"
# 10.0 where the schema wants an integer: the same setting as 10, so the same job parameter
for _key in normalise_integers(config, load_config_file(_SCHEMA)):
    logger.info(
        f"config key '{_key}': whole number written as a float, read as an integer"
    )

try:
    # first: refuses duplicate keys, which YAML would silently merge, and names a key or
    # number YAML 1.1 reads otherwise as written (the schema would name what YAML made of it)
    for _path in _CONFIG_FILES:
        load_config_file(_path)
except ConfigError as err:  # it names the file (it was named twice, docs audit)
    raise WorkflowError(f"Invalid configuration: {err}") from None

try:
    validate(config, schema=str(_SCHEMA))
except WorkflowError:
    # one line per problem, naming the file and the key (jsonschema's report is long)
    raise WorkflowError(
        "\n".join(
            schema_errors(
                config,
                _SCHEMA,
                ", ".join(_CONFIG_FILES),
                command_line=workflow.config_settings.config,
            )
        )
    ) from None

# an absent optional key takes its default (xmodal.config.DEFAULTS), written into the config
# that the rules and the report's captions read
apply_defaults(config)


def check_config_unchanged_since_the_run_started():
    """A job started as a Snakemake process of its own (a SLURM job) reads the config files
    again: edited while the job was queued, it ran with other settings than the run scheduled
    and records (features extracted in bfloat16 recorded as the run's float32, a table made
    with another knn_k, exit 0). The run passes its config to its jobs in the environment
    (SLURM's --export=ALL, which the executor plugin sets); a job whose config differs fails.
    """
    now = config_json(config)
    if workflow.is_main_process:
        os.environ[RUN_CONFIG_ENV] = now
        return
    told = os.environ.get(RUN_CONFIG_ENV)
    if told is None or told == now:
        return
    try:
        changes = changed_settings(json.loads(told), json.loads(now))
    except ValueError:  # not the run's JSON
        changes = []
    changes = changes or ["in its JSON form"]
    if len(changes) > 6:
        changes = changes[:6] + [f"… {len(changes) - 6} more"]
    raise WorkflowError(
        f"the config changed after this run started ({'; '.join(changes)}, in "
        f"{', '.join(_CONFIG_FILES)}): this job read the edited files and would run with "
        "settings the run did not schedule and does not record. Stop the run (its queued "
        "jobs stop here too) and start it again: Snakemake then reruns what the change "
        "affects. Edit the config only between runs (docs/cluster.md)"
    )


check_config_unchanged_since_the_run_started()

try:
    check_config(config)
    # the one source of truth about every model (xmodal.registry)
    REGISTRY = Registry.from_config(config)
    LANGUAGE_DISPERSION = LanguageDispersionSettings.from_config(config)
    # the controls (docs/method.md, "Controls"): size-matched drop sets, held-out layer choice
    DROP_CONTROL = DropControl.from_config(config)
    HELDOUT = HeldOutLayer.from_config(config)
    SELF_SELECTION = SelfSelection.from_config(config)
except ConfigError as err:
    raise WorkflowError(
        f"Invalid configuration in {', '.join(_CONFIG_FILES)}: {err}"
    ) from None

# the same model twice would count twice in its modality's GPA and leave-one-model-out: the
# dispersion of a stimulus would weigh that model double, with exit code 0 (a warning before)
# (a revision left as main and the commit it resolved to, once downloaded, are one revision)
_RESOLVED = {
    e.key: downloaded_revision(e.key, e.id, e.revision)
    for e in REGISTRY.values()
    if e.source == "hub"
}
_DUPLICATES = [
    f"models '{first}' and '{second}' are the same model ({what})"
    for first, second, what in REGISTRY.duplicate_ids(_RESOLVED)
]
if _DUPLICATES:
    raise WorkflowError(
        f"Invalid configuration in {', '.join(_CONFIG_FILES)}: {'; '.join(_DUPLICATES)}: their"
        " features would be identical and count twice in their modality's GPA (and, for vision"
        " models, in leave-one-model-out); remove one of them under config key 'models'"
    )

DATASET = config["dataset"]
VISION = REGISTRY.vision
LANGUAGE = REGISTRY.language
ANALYSIS = config["analysis"]
METRICS = list(ANALYSIS["metrics"])
# the alignment jobs ask for a GPU only when the config says so (analysis.gpu)
ALIGNMENT_GPU = {"gpu": 1} if ANALYSIS.get("gpu", False) else {}
# the library code the analysis runs: a param of every analysis rule, so that an update of
# src/xmodal reruns the CPU analysis from the features on disk, and never an extraction
# (xmodal.analysis_code_digest; docs/cluster.md, "What reruns")
ANALYSIS_CODE = analysis_code_digest(Path(_SRC) / "xmodal")
# and the demo's builders, a param of the demo's rules (stimuli, scenes, tokenizer, models)
DEMO_CODE = demo_code_digest(Path(_SRC) / "xmodal")


def retry_resources(kind):
    """Memory (MB) and runtime (minutes) of a CPU analysis job of `kind`
    (xmodal.resources.ANALYSIS_KINDS), growing with each retry (`attempt`, the profile's
    `retries`), and its threads as CPUs (so `--set-threads` reaches SLURM). Set in the rules,
    not in a workflow profile: a workflow profile's `set-resources` replaced the whole
    `set-resources` of the user's profile (docs/cluster.md), which can override these per
    rule."""
    sized = lambda attempt: analysis_resources(kind, attempt)
    return {
        "mem_mb": lambda wildcards, attempt: sized(attempt)["mem_mb"],
        "runtime": lambda wildcards, attempt: sized(attempt)["runtime"],
        "cpus_per_task": lambda wildcards, threads: threads,
    }


def sized_resources(kind, name, files, need):
    """retry_resources(kind), with resource `name` (growing with the attempt) raised to
    need(shapes, threads) where that is more: `shapes` are xmodal.features.feature_shape of
    the job's input files that files(input) names, `threads` the job's. Until they exist (a
    dry run before the extractions) Snakemake shows <TBD> and sizes the job when it is ready;
    an unreadable file keeps the base, and the job's own reader names it."""

    def value(wildcards, input, threads, attempt):
        base = analysis_resources(kind, attempt)[name]
        try:  # FileNotFoundError: Snakemake's signal to size the job once the files are made
            shapes = [feature_shape(path) for path in files(input)]
        except FeatureFileError:
            return base
        return max(base, need(shapes, threads) * attempt)

    return {**retry_resources(kind), name: value}


def gpa_resources(leave_one_out=False):
    """The GPA rules' memory (input `features`): xmodal.gpa.gpa_memory_mb, whose peak grows
    with the stimuli and the widths (the language GPA: 46 GiB at 5,000 stimuli), and for
    leave-one-model-out with its threads (one fit each at once)."""

    def need(shapes, threads):
        # here, not at the top: the extraction's environment, which parses this file too,
        # need not hold what xmodal.gpa imports (scipy, threadpoolctl)
        from xmodal.gpa import gpa_memory_mb

        workers = min(threads, len(shapes)) if leave_one_out else 0  # xmodal.parallel
        return gpa_memory_mb(shapes[0][1], [dim for _, _, dim in shapes], workers)

    return sized_resources("gpa", "mem_mb", lambda input: input.features, need)


def loo_resources():
    """The leave-one-model-out job's memory (gpa_resources) and runtime: xmodal.resources.
    loo_minutes, the baseline of shuffled rows (analysis.n_random shuffles of each model)
    growing as m·k² (2.7 hours at 20,000 stimuli of the paper's widths)."""

    def need(shapes, threads):
        m, widths = shapes[0][1], [dim for _, _, dim in shapes]
        return loo_minutes(m, widths, int(ANALYSIS["n_random"]), threads)

    runtime = sized_resources("gpa", "runtime", lambda input: input.features, need)
    return {**gpa_resources(leave_one_out=True), "runtime": runtime["runtime"]}


def pair_resources(kind):
    """A per-LLM alignment job's runtime (input `llm`): xmodal.resources.pair_minutes, the work
    growing as the square of the stimuli (a layer search of 81 LLM layers took about 85
    minutes at 9,000)."""

    def need(shapes, threads):
        from xmodal.metrics import DENSE_MAX_M

        n_layers, m, width = shapes[0]
        layers = n_layers if kind == "layer_search" else 1
        return pair_minutes(kind, m, width, layers, blocked=m > DENSE_MAX_M)

    return sized_resources("pair", "runtime", lambda input: [input.llm], need)


def check_memory_resources():
    """Refuse `mem_mb_per_cpu` in default-resources (the profile's, or --default-resources):
    the SLURM plugin prefers it to `mem_mb`, so every job would get mem_mb_per_cpu times its
    CPUs instead of the memory the workflow computes for it (an extraction's from its model's
    size: 8 GB instead of 139 GiB for LLaMA-65B with 2000 per CPU), failing on every retry.
    """
    defaults = workflow.resource_settings.default_resources
    if defaults is None or "mem_mb_per_cpu" not in defaults.keys():
        return
    raise WorkflowError(
        "default-resources sets mem_mb_per_cpu (in your profile, or with --default-resources): "
        "the SLURM plugin then asks every job for mem_mb_per_cpu × its CPUs and ignores the "
        "memory the workflow computes for it (mem_mb: an extraction's from its model's size, "
        "the analysis jobs' growing with each retry; docs/cluster.md), so a large model's job "
        "runs out of memory on every retry. Remove mem_mb_per_cpu from default-resources; to "
        "change one rule's memory, give it mem_mb with set-resources"
    )


check_memory_resources()


def named_params(**params):
    """A rule's params plus `settings`, the same values by name. Snakemake records a job's
    params as the set of their values, without names: two settings of equal value, or two
    swapped, hid a change (knn_k 10 and n_random 20 swapped reran nothing; nor did n_boot
    0 -> 10 with knn_k 10). The dict's record holds the names, so any change reruns the job.
    Plain values only: Snakemake would not evaluate a function inside the dict (pass one as
    its own param, outside named_params)."""
    functions = sorted(k for k, v in params.items() if callable(v))
    if functions:
        raise WorkflowError(
            f"named_params: {functions} are functions, which Snakemake does not evaluate inside "
            "the settings dict; pass them as params of their own"
        )
    return {**params, "settings": dict(params)}


# changes which stimuli every model's features hold: a feature-defining setting
DROP_DUPLICATES = bool(config["stimuli"]["drop_duplicates"])
# what the held-out layer choice adds to each layer-search job (nothing when it is off, so
# that the seed does not rerun the layer searches then)
HELDOUT_PARAMS = (
    {"n_splits": HELDOUT.n_splits, "seed": ANALYSIS["seed"]} if HELDOUT.enabled else {}
)


def _alternatives(keys):
    return "|".join(re.escape(k) for k in keys)


wildcard_constraints:
    dataset=re.escape(DATASET),
    model=_alternatives(REGISTRY),
    vision=_alternatives(VISION),
    llm=_alternatives(LANGUAGE),
    modality=_alternatives(EXTRACTION_COLUMNS),


# ---------------------------------------------------------------- paths
MANIFEST = f"resources/stimuli/{DATASET}/stimuli.tsv"
STIMULI = "results/stimuli/{dataset}"
# what each modality's extraction reads from the manifest (rule manifest_stamp)
MANIFEST_STAMP = f"{STIMULI}/extract_{{modality}}.json"
# the rule of this workflow that makes the manifest and the settings it makes it from (its
# params, recorded next to the manifest); none for a manifest the user provides
_STIMULI = config["stimuli"]
MANIFEST_RULE, MANIFEST_SOURCE = None, {}
if _STIMULI["source"] == "hub":
    MANIFEST_RULE = "prefetch_stimuli"
    MANIFEST_SOURCE = {
        "repo": _STIMULI.get("repo", "minhuh/prh"),
        "revision": _STIMULI.get("revision"),
        "split": _STIMULI.get("split", "train"),
    }
elif _STIMULI["source"] == "demo":
    MANIFEST_RULE = "demo_stimuli"
    MANIFEST_SOURCE = {"n": _STIMULI.get("n", 240), "seed": _STIMULI.get("seed", 0)}
    # recorded only when set, so that the manifests made before the key stay valid
    if "nuisance_beta" in _STIMULI:
        MANIFEST_SOURCE["nuisance_beta"] = list(
            nuisance_design(_STIMULI["nuisance_beta"])
        )
# Whether the stamp job reads the manifest by time (not `ancient`), the demo's: a rerun of the
# job that makes the manifest then remakes the stamps and re-extracts in the same run
# (stimuli.smk); for a hub manifest it does not.
STAMPS_FOLLOW_MANIFEST_RULE = _STIMULI["source"] == "demo"
DISP = "results/dispersion/{dataset}"
ALIGN = "results/alignment/{dataset}"
DIAG = "results/diagnostics/{dataset}"
FIG = "results/figures/{dataset}"
LANG = "results/language/{dataset}"
PROPS = "results/properties/{dataset}"


# each local model file's SHA-256 with its size, times and inode: read again only when changed
WEIGHT_DIGESTS = f"results/features/{DATASET}/.weights_digests.json"


def feature_file(model):
    return f"results/features/{DATASET}/{model}.h5"


def supplied_digest(wildcards):
    """The SHA-256 of a supplied feature file (models.<key>.features): a param of its import,
    so that a file replaced by other content is imported again whatever its modification time
    (cp -p, rsync -a and tar keep an older one, and Snakemake compares times)."""
    return file_digests([REGISTRY[wildcards.model].features], WEIGHT_DIGESTS)[0] or ""


# models whose features the user supplies (imported, rule import_features) and the others
SUPPLIED = [k for k in REGISTRY if REGISTRY[k].source == "supplied"]
EXTRACTED = [k for k in REGISTRY if k not in SUPPLIED]
for _key in SUPPLIED:
    if Path(REGISTRY[_key].features).resolve() == Path(feature_file(_key)).resolve():
        raise WorkflowError(
            f"config key 'models.{_key}.features': {REGISTRY[_key].features} is where the"
            " pipeline writes this model's features; keep your file elsewhere (for example"
            f" resources/features/{_key}.h5) and name that path"
        )


def extracted_feature_files(modality):
    """The feature files of a modality's models that the pipeline extracts (a supplied file is
    imported, and the user's to vouch for)."""
    models = {"vision": VISION, "language": LANGUAGE}[modality]
    return [feature_file(m) for m in models if m in EXTRACTED]


def unfinished_feature_files():
    """Feature files whose last job failed or was killed (xmodal.attempts.begin_attempt): Snakemake
    records a failed job's output as made, so the next run said "Nothing to be done" and kept
    the results made from the earlier file, with the setting that triggered the job not
    applied. The default target makes them again; a start-up warning names them."""
    paths = [str(p) for p in unfinished_outputs(feature_file(m) for m in REGISTRY)]
    if workflow.is_main_process:
        for path in paths:
            logger.warning(
                f"{path}: the last job that made it failed or was killed (see "
                f"logs/extract/{DATASET}/{Path(path).stem}.log), and what was made from an"
                " earlier file, if there was one, is still in place: the default target makes"
                f" it again; with other targets, name it too (`snakemake <your options> -- {path}`)"
            )
    return paths


UNFINISHED_FEATURES = unfinished_feature_files()


def vision_features(wildcards):
    """The feature files of every vision model (GPA, and each LLM's alignment jobs)."""
    return [feature_file(v) for v in VISION]


@cache
def _made_with(model):
    """How the model's features on disk were loaded (None: none yet)."""
    return made_with(feature_file(model))


def feature_spec(wildcards):
    """The registry fields that define a model's features (the extraction's rerun trigger):
    labels, sizes, batch sizes, workers and GPUs are not among them (docs/cluster.md); a
    revision pinned to the commit the features came from is the revision asked for then.
    A --touch of a feature file extracted otherwise is refused here, whatever the targets
    (features_made_otherwise).
    """
    args = _command_line()
    if workflow.is_main_process and args is not None and args.touch:
        # the touch would record the file as made with this config: no run would extract it
        # again (audit: max_tokens 8 over features of 512)
        own = features_made_otherwise(args, [wildcards.model])
        if own:
            others = [s for s in features_made_otherwise(args) if s not in own]
            also = (
                f" (other feature files this config would extract otherwise: {'; '.join(others)})"
                if others
                else ""
            )
            raise WorkflowError(
                f"a --touch would record {feature_file(wildcards.model)} as made with this"
                " config, so that no run would extract it again, but it was extracted"
                f" otherwise than this config says: {own[0]}{also}. {_EXTRACT_AGAIN}"
            )
    return REGISTRY[wildcards.model].feature_spec(_made_with(wildcards.model))


def prefetch_spec(wildcards):
    """What a model's download depends on: its repository and revision. Its record is one
    per model key for every dataset of the project: the spec the record was made with is
    kept where this config names the same weights (ModelEntry.prefetch_spec)."""
    return REGISTRY[wildcards.model].prefetch_spec(
        _made_with(wildcards.model),
        recorded=_recorded_param(model_record_path(wildcards.model)),
        record=read_model_record(wildcards.model),
    )


def _recorded_param(path):
    """The one param Snakemake recorded for the job that made ``path`` (a dict), None
    without a record or where it cannot be read."""
    try:
        params = workflow.persistence.params(IOFile(path))
        value = ast.literal_eval(params[0]) if params and len(params) == 1 else None
    except Exception:
        return None
    return value if isinstance(value, dict) else None


def model_input(wildcards):
    """What the extraction of one model needs besides the stimuli: its weights."""
    entry = REGISTRY[wildcards.model]
    if entry.source == "built":
        return built_model_dir(wildcards.model)
    if entry.source == "local":
        return []
    return model_record_path(wildcards.model)


def manifest_stamp_path(modality):
    """The stamp of the manifest columns that ``modality``'s extractions read."""
    return MANIFEST_STAMP.format(dataset=DATASET, modality=modality)


def manifest_stamp_input(wildcards):
    """The stamp for this model's modality (the extraction's rerun trigger for the manifest)."""
    return manifest_stamp_path(REGISTRY[wildcards.model].modality)


def _n_stimuli(input):
    """Stimuli an extraction reads: its manifest stamp's count, else the manifest's lines (a
    bound), else the demo's n, else 0. Snakemake evaluates resources again once the inputs
    exist, before it submits the job; the fallbacks only show in dry runs."""
    try:
        return int(json.loads(Path(input.stamp).read_text())["n_stimuli"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        with open(input.manifest, "rb") as fh:
            return max(sum(1 for _ in fh) - 1, 0)
    except (OSError, AttributeError):
        return int(MANIFEST_SOURCE.get("n") or 0)


def extraction_resource(name):
    """One resource of a model's extraction job (xmodal.registry: size and site settings; the
    runtime also from the number of stimuli); memory and runtime grow with each retry.
    """

    def get(wildcards, input, attempt):
        return REGISTRY[wildcards.model].resources(attempt, _n_stimuli(input))[name]

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
        "drop": f"results/alignment/{dataset}/drop.tsv",
        "drop_summary": f"results/summary/{dataset}_drop.tsv",
        "heldout_layers": f"results/alignment/{dataset}/heldout_layers.tsv",
        "heldout": f"results/alignment/{dataset}/heldout.tsv",
        "heldout_summary": f"results/summary/{dataset}_heldout.tsv",
        "self_selection": f"results/alignment/{dataset}/self_selection.tsv",
        "self_selection_summary": f"results/summary/{dataset}_self_selection.tsv",
        "provenance": f"results/summary/{dataset}_provenance.tsv",
    }


def _switches():
    """Each switch of the config, with the tables (table_paths keys) and the analysis rules it
    turns off: (settings with `enabled`, tables, rules)."""
    return (
        (DROP_CONTROL, {"drop", "drop_summary"}, {"drop_summary"}),
        (
            HELDOUT,
            {"heldout_layers", "heldout", "heldout_summary"},
            {"heldout_sets", "heldout_summary"},
        ),
        (
            SELF_SELECTION,
            {"self_selection", "self_selection_summary"},
            {"self_selection_summary"},
        ),
        (
            LANGUAGE_DISPERSION,
            {"language_dispersion", "language_correlation", "joint_cells"},
            {
                "language_gpa",
                "language_correlation",
                "joint_sets",
                "joint_conditions",
                "joint_aggregate",
            },
        ),
    )


def disabled_tables():
    """Tables that the config's switches turn off (never asked for, never a figure input)."""
    return set().union(*(tables for s, tables, _ in _switches() if not s.enabled))


def switched_off_rules():
    """The analysis rules that the config's switches turn off."""
    return set().union(*(rules for s, _, rules in _switches() if not s.enabled))


def figure_inputs(wildcards, name):
    paths = table_paths(wildcards.dataset)
    off = disabled_tables()
    return {key: paths[key] for key in FIGURES[name].inputs if key not in off}


def control_outputs(kind, per_llm=True, switched_off=False):
    """The outputs (name: path) that the controls add to a per-LLM alignment job (``per_llm``)
    or to the aggregation: ``kind`` "search" (the layer search) or "conditions";
    ``switched_off``: instead those that the controls the config turns off would add."""
    names = []
    if kind == "search" and HELDOUT.enabled != switched_off:
        names.append("heldout_layers")
    if kind == "conditions":
        names += ["drop"] if DROP_CONTROL.enabled != switched_off else []
        names += ["heldout"] if HELDOUT.enabled != switched_off else []
        names += ["self_selection"] if SELF_SELECTION.enabled != switched_off else []
    if per_llm:
        return {name: f"{ALIGN}/{name}/{{llm}}.tsv" for name in names}
    return {name: f"{ALIGN}/{name}.tsv" for name in names}


def condition_control_inputs():
    """What a conditions job reads for the held-out layer choice and the sets chosen without
    the scored model (nothing for a control that is off)."""
    inputs = {}
    if HELDOUT.enabled:
        inputs["heldout_layers"] = f"{ALIGN}/heldout_layers/{{llm}}.tsv"
        inputs["heldout_sets"] = f"{DISP}/heldout_sets.tsv"
    if SELF_SELECTION.enabled:
        inputs["loo_stimuli"] = f"{DISP}/loo_stimuli.tsv"
    return inputs


def llm_tables(kind):
    """Per-LLM tables of one kind, for the aggregation rules."""

    def get(wildcards):
        return expand(
            f"results/alignment/{wildcards.dataset}/{kind}/{{llm}}.tsv", llm=LANGUAGE
        )

    return get


def control_tables():
    """The per-LLM tables of the controls that the aggregation concatenates (name: function)."""
    names = [*control_outputs("search"), *control_outputs("conditions")]
    return {name: llm_tables(name) for name in names}


def figures_off(off):
    """The figures drawn from a table of ``off`` (disabled_tables()): not made, not reported."""
    return [name for name, spec in FIGURES.items() if set(spec.required) & off]


#: rules whose missing outputs the default target leaves missing: the feature files (GPU work,
#: removed on purpose to save space; a failed job's are marked, unfinished_feature_files), the
#: downloads, the manifest stamps (made again, they would re-extract every model), the demo's
#: models (their settings are the extraction's params) and the figures (targets themselves)
NOT_REMADE = ("all", "extract", "import_features", "prefetch_model", "prefetch_stimuli")
NOT_REMADE += ("manifest_stamp", "demo_", "figure_")


def analysis_output_patterns():
    """(name, output pattern) of each analysis step that this config runs (the steps not in
    NOT_REMADE and not switched off, switched_off_rules)."""
    off = switched_off_rules()
    return [
        (step.name, str(pattern))
        for step in workflow.rules
        if not (step.name.startswith(NOT_REMADE) or step.name in off)
        for pattern in step.output
    ]


def missing_analysis_outputs(wildcards):
    """The analysis outputs that are missing, for the default target. Snakemake does not make
    a file that only other jobs read again while what was made from it is in place, so after
    a job failed or was killed (Snakemake deletes its output) or a file was deleted by hand,
    the next run said "Nothing to be done" and kept the tables made with the earlier settings;
    asked for, they and everything made from them are made again."""
    paths = set()
    for name, pattern in analysis_output_patterns():
        names = get_wildcard_names(pattern)
        unknown = names - {"dataset", "llm"}
        if unknown:
            raise WorkflowError(
                f"output {pattern} of {name} has wildcards {sorted(unknown)}"
                " that missing_analysis_outputs (common.smk) cannot fill"
            )
        for llm in LANGUAGE if "llm" in names else [None]:
            paths.add(apply_wildcards(pattern, {"dataset": DATASET, "llm": llm}))
    missing = sorted(p for p in paths if not Path(p).exists())
    # named when they were made before (a new model's or switch's tables are only new)
    lost = [p for p in missing if made_before(p)]
    args = _command_line()
    # not where this run makes nothing, or leaves some of it out
    narrowed = _no_job_option(args) or (
        args is not None and (args.omit_from or args.until)
    )
    if lost and workflow.is_main_process and not narrowed:
        more = f" and {len(lost) - 3} more" if len(lost) > 3 else ""
        logger.warning(
            f"{', '.join(lost[:3])}{more}: made by an earlier run and missing now (a job that"
            " failed or was killed, or a file deleted by hand): made again, with every table"
            " and figure made from them"
        )
    if workflow.is_main_process and not narrowed:
        check_results_have_records(args, paths)
    return missing


def made_before(path):
    """Whether Snakemake holds a record of an earlier job that made ``path`` (False when its
    records cannot be read)."""
    return bool(_record_of(path))


def _record_of(path):
    """What Snakemake's record of the job that made ``path`` names as its step (None without
    a record, False when the records cannot be read)."""
    try:
        return workflow.persistence.rule(IOFile(path))
    except Exception:
        return False


def check_results_have_records(args, outputs):
    """Stop, or warn, when results on disk (``outputs``: every analysis output; the feature
    files) have no Snakemake record of the job that made them (.snakemake/metadata deleted,
    results copied in, or `--cleanup-metadata` of some, which Snakemake suggests after a
    changed param: an LLM's layer search kept k = 10 under k = 7, exit 0, when its records
    alone were cleaned, audit). Snakemake reruns a job for a changed setting by comparing its
    params with that record, so without one the run says "Nothing to be done" and every table
    keeps the numbers of the earlier settings. Where the run-settings
    record (RUN_SETTINGS) names settings that differ from this config, stop; otherwise warn.
    A run that forces the analysis's first steps makes them again, and passes. A feature file
    without a record whose own attributes say it was extracted otherwise than this config
    would extract it (another id, revision, dtype or token limit) stops the run, unless the
    run makes it again."""
    check_bare_features_match_the_config(args)
    if args is not None and forces_the_analysis(args):
        return
    # (the provenance table reads the features and the manifest only: no forced step remakes it)
    tables = sorted(
        set(outputs) - {table_paths(DATASET)[k] for k in ("manifest", "provenance")}
    )
    features = [feature_file(m) for m in [*VISION, *LANGUAGE]]
    bare = [
        p for p in [*tables, *features] if Path(p).exists() and _record_of(p) is None
    ]
    if not bare:
        return
    shown = ", ".join(bare[:3]) + (
        f" and {len(bare) - 3} more" if len(bare) > 3 else ""
    )
    why = (
        f"{shown}: Snakemake holds no record of the jobs that made them (.snakemake/metadata"
        " deleted, results copied in, or records cleaned with --cleanup-metadata), so a"
        " setting changed since they were made reruns nothing"
    )
    again = (
        "`snakemake <your options> --forcerun"
        f" {' '.join(FIRST_ANALYSIS_STEPS)}` (no extraction is redone)"
    )
    changed = recorded_settings_changes(RUN_SETTINGS, config)
    if changed and set(bare) & set(tables):
        raise WorkflowError(
            f"{why}, and the settings record says they were not made with this config"
            f" ({'; '.join(changed)}; {RUN_SETTINGS}): this run would keep them. Make the"
            f" analysis again with this config: {again}"
        )
    extraction = " (extraction settings included)" if set(bare) & set(features) else ""
    logger.warning(
        f"{why}{extraction}. If they were made with this config, record them as such with"
        " `snakemake <your options> --touch --forceall` (it marks every result as made now,"
        f" with this config); to make the analysis again, {again}; an extraction,"
        " `--forcerun extract`"
    )


_EXTRACT_AGAIN = (
    "Extract them again: `snakemake <your options> --forcerun <those files>`, or set the config"
    " to what they were made with"
)


def check_bare_features_match_the_config(args):
    """Stop when a feature file without a Snakemake record (check_results_have_records) says
    it was extracted with other settings than this config's: no run would extract it again,
    and the analysis would report the config's settings over its features. (Not called in a
    --touch run, which runs no job: feature_spec checks what a touch would record.)"""
    stale = features_made_otherwise(args)
    if stale:
        raise WorkflowError(
            "feature files without a Snakemake record of the job that made them (.snakemake/"
            "metadata deleted, or copied in) were extracted otherwise than this config says,"
            f" and no run would extract them again: {'; '.join(stale)}. {_EXTRACT_AGAIN}"
        )


def features_made_otherwise(args, keys=None):
    """``<file>: <differences>`` for each feature file (of the models ``keys``; None: every
    model) that says it was extracted otherwise than this config would extract it
    (ModelEntry.differs_from), and that no job of this run makes again: files without a
    Snakemake record, and under --touch every file (a touch records them as made with this
    config). Supplied features are the user's."""
    # (--touch records files as made with this config: forced, it extracts nothing)
    touch = args is not None and bool(args.touch)
    forced = set(args.forcerun or ()) if args is not None and not touch else set()
    # a relative path as Snakemake reads it (./results/... is results/...); not an absolute one
    forced = {f if os.path.isabs(f) else os.path.normpath(f) for f in forced}
    if args is not None and not touch and (args.forceall or "extract" in forced):
        return []
    stale = []
    for key in [*VISION, *LANGUAGE] if keys is None else keys:
        path = feature_file(key)
        if (
            key in SUPPLIED
            or path in forced
            or (not touch and _record_of(path) is not None)
        ):
            continue
        made = extraction_record(path)  # None: no file (yet)
        differ = REGISTRY[key].differs_from(made) if made is not None else []
        stale += [f"{path}: {'; '.join(differ)}"] if differ else []
    return stale


#: The tables of the default target (table_paths' keys), those of a control when it is on.
FINAL_TABLES = (
    "loo", "grid", "layers", "contrasts", "summary", "images", "duplicates", "diagnostics",
    "properties", "property_correlations", "language_correlation", "joint_cells", "drop",
    "drop_summary", "heldout_layers", "heldout", "heldout_summary", "self_selection",
    "self_selection_summary", "provenance",
)  # fmt: skip


def get_final_output():
    paths = table_paths(DATASET)
    off = disabled_tables()
    out = UNFINISHED_FEATURES + [paths[k] for k in FINAL_TABLES if k not in off]
    # a figure of alignment values once per metric ({name}.png, {name}.{metric}.png), the
    # others once (xmodal.figures.figure_files); none of a step the config turns off
    return out + figure_files(
        f"results/figures/{DATASET}", METRICS, skip=figures_off(off)
    )


def leftover_results():
    """The results on disk that this config does not make: the tables and figures of a
    control switched off (its jobs' tables too, per-LLM ones of any LLM), the figures of a
    metric taken out of analysis.metrics, the per-LLM tables of a language model taken out of
    the config (its feature file stays unnamed: adding the model back extracts nothing). As
    (what to show, number of files): a path, or a folder's pattern for per-LLM tables.
    """
    paths = table_paths(DATASET)
    every = [paths[k] for k in FINAL_TABLES]
    every += figure_files(f"results/figures/{DATASET}", list(METRIC_LABELS))
    current = set(get_final_output())
    left = {p: 1 for p in every if p not in current and Path(p).is_file()}
    off = switched_off_rules()
    patterns = [
        str(o) for step in workflow.rules if step.name in off for o in step.output
    ]
    for kind in ("search", "conditions"):
        patterns += control_outputs(kind, switched_off=True).values()
    for pattern in patterns:
        shown = apply_wildcards(pattern, {"dataset": DATASET, "llm": "*"})
        found = [
            f
            for f in Path().glob(shown)
            if f.is_file() and not f.name.startswith(".") and str(f) not in left
        ]  # not a killed job's hidden temporary (review)
        if found:
            left[str(found[0]) if shown == str(found[0]) else shown] = len(found)
    # the per-LLM tables of an LLM no longer in the config
    for _, pattern in analysis_output_patterns():
        if "llm" not in get_wildcard_names(pattern):
            continue
        head, tail = apply_wildcards(pattern, {"dataset": DATASET, "llm": "\0"}).split(
            "\0"
        )
        for f in Path().glob(f"{head}*{tail}"):
            llm = str(f)[len(head) : len(str(f)) - len(tail)]
            if f.is_file() and not f.name.startswith(".") and llm not in LANGUAGE:
                left.setdefault(str(f), 1)
    return list(left.items())


def warn_of_leftover_results():
    """Name the results of an earlier run that this config no longer makes
    (leftover_results). They stay on disk, next to the current ones, and are not updated
    (audit: a self-selection summary of an earlier set size read as this run's; a warning that
    named the final tables only left two thirds of a control's tables unnamed). A dry run
    warns too; a run of chosen targets does not."""
    if not workflow.is_main_process:
        return
    args = _command_line()
    if args is None or getattr(args, "targets", None):
        return
    left = leftover_results()
    if left:
        # a folder's pattern always with its count: one file alone read like a file's name
        shown = [f"{p} ({n} file{'s' * (n != 1)})" if "*" in p else p for p, n in left]
        logger.warning(
            f"{sum(n for _, n in left)} results of an earlier run that this config does not "
            "make (a control switched off, a metric not in analysis.metrics, a language model"
            f" taken out of the config) are left as they were and not updated: "
            f"{', '.join(shown)}. Delete them, or move them aside, so that they are not read"
            " as this config's"
        )


# ---------------------------------------------------------------- manifest stamps
#: command-line options under which snakemake runs no job (inspection and maintenance; a dry
#: run, also one a profile asks for, is read from the output settings)
_NO_JOBS = ("touch", "unlock", "lint", "list_rules", "list_target_rules", "summary",
            "detailed_summary", "report", "cleanup_metadata", "cleanup_shadow", "list_changes",
            "list_input_changes", "list_params_changes", "list_untracked", "delete_all_output",
            "delete_temp_output", "dag", "rulegraph", "filegraph", "d3dag", "containerize",
            "export_cwl", "print_compilation", "archive", "generate_unit_tests",
            "list_conda_envs", "conda_cleanup_envs", "conda_create_envs_only")  # fmt: skip


def _started_in(directory):
    """Where snakemake was started, to read relative profile paths from (it moves into
    --directory before reading this file): here without --directory; for a relative one, the
    folder it is relative to ($PWD, or this folder or one above it) that leads here; for an
    absolute one, $PWD (the shell's, unchecked). Empty when none is known."""
    here = Path.cwd()
    if directory is None:
        return [here]
    pwd = [Path(os.environ.get("PWD"))] if os.environ.get("PWD") else []
    if Path(directory).is_absolute():
        return pwd
    leads_here = [
        a
        for a in [*pwd, here, *here.parents]
        if (a / directory).resolve() == here.resolve()
    ]
    return leads_here[:1]


@cache
def _command_line():
    """snakemake's own reading of this process's command line, with the profiles' settings
    (a profile's `until:` or `report:` counts as given); without them, and a warning, when
    the profiles cannot be found again; None when it is not a command line of snakemake's.
    """
    from contextlib import redirect_stderr
    from io import StringIO

    from snakemake.cli import get_argument_parser, parse_args

    argv = sys.argv[1:]
    try:
        plain = get_argument_parser().parse_known_args(argv)[0]
    except (Exception, SystemExit):
        return None
    here = os.getcwd()
    profiles = [*(plain.profile or []), plain.workflow_profile]
    profiles = [str(p) for p in profiles if p and str(p) != "none"]
    folders = _started_in(plain.directory)
    if all(Path(p).is_absolute() for p in profiles):  # found from any folder
        folders = list(dict.fromkeys([*folders, Path(here)]))
    for where in folders:
        try:
            os.chdir(where)
            # without its "Using profile ..." line, said once already
            with redirect_stderr(StringIO()):
                return parse_args(argv)[1]
        except (Exception, SystemExit):
            continue
        finally:
            os.chdir(here)
    if workflow.is_main_process and profiles:
        logger.warning(
            "could not read the profiles of this command line again (run snakemake from the"
            " folder you gave --directory relative to): the checks of --report and of runs of"
            " some targets only see the options given on the command line"
        )
    return plain


def _runs_no_job():
    """This process is a dry run, or a command that runs no job (_NO_JOBS)."""
    # workflow.dryrun is not set yet while this file is read; the output settings are
    if getattr(workflow.output_settings, "dryrun", False):
        return True
    args = _command_line()
    return _no_job_option(args)


def _no_job_option(args):
    """The command line (_command_line()) names an option under which no job runs (--report
    with --report-after-run runs the workflow first)."""
    if args is None:
        return False
    names = [
        n for n in _NO_JOBS if n != "report" or not getattr(args, "report_after_run", 0)
    ]
    return any(getattr(args, name, None) for name in names)


def stale_figures():
    """Each figure the report would show that is older than one of the tables it is drawn
    from, as 'figure (older than table)': Snakemake would redraw it, and the report would show
    the old one (a label, a count or a value the tables no longer hold)."""
    skip = figures_off(disabled_tables())
    stale = []
    for name in FIGURES:
        if name in skip:
            continue
        tables = figure_inputs(SimpleNamespace(dataset=DATASET), name).values()
        for metric in figure_metrics(name, METRICS):
            png = Path(f"results/figures/{DATASET}/{figure_stem(name, metric)}.png")
            if not png.is_file():
                continue  # a missing figure: Snakemake's report names it itself
            drawn = png.stat().st_mtime
            newer = [
                t
                for t in tables
                if Path(t).is_file()
                and Path(t).stat().st_mtime > drawn
                and not drawn_from_this(png, t)
            ]
            if newer:
                stale.append(f"{png} (older than {newer[0]})")
    return stale


def drawn_from_this(output, table):
    """Whether Snakemake's record of the job that made ``output`` holds the checksum ``table``
    has now: a table written again with the same content (a forced or touched step) then
    leaves the output as it is, and so does a run (Snakemake compares these checksums).
    """
    try:
        record = _metadata_record(output)
        # the record of the output on disk: Snakemake notes its time when the job ends (a
        # run with --drop-metadata or the database backend leaves an older file record, and
        # the output is then later); a copy onto whole or even seconds cuts up to 2 s off
        if not 0 <= record["endtime"] - Path(output).stat().st_mtime < 2:
            return False
        recorded = (record.get("input_checksums") or {}).get(str(table))
        if not recorded:
            return False
        algorithm, _, digest = recorded.rpartition(":")
        return _file_digest(str(table), algorithm or "sha256") == digest
    except Exception:
        return False  # unreadable records: count the table as newer


@cache
def _file_digest(path, algorithm):
    """A table's digest, read once however many figures are drawn from it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _metadata_record(output):
    """Snakemake's record of the job that made ``output`` (a dict; empty where none is read):
    its file persistence's .snakemake/metadata/<the path in URL-safe base64, split into
    '@'-prefixed folders where longer than a file name may be>, read directly because the
    report's checks run before Snakemake opens its records."""
    from base64 import urlsafe_b64encode

    root = Path(".snakemake") / "metadata"
    name = urlsafe_b64encode(str(output).encode()).decode()
    step = max(1, (os.pathconf(root, "PC_NAME_MAX") or 255) - 1)
    parts = [name[i : i + step] for i in range(0, len(name), step)]
    record = json.loads(
        root.joinpath(*[f"@{p}" for p in parts[:-1]], parts[-1]).read_text()
    )
    return record if isinstance(record, dict) else {}


def check_report_inputs():
    """Refuse --report while outputs are marked incomplete: a run killed with SIGKILL leaves
    files Snakemake will redo, and --report showed them as results (the interruption review).
    Snakemake's file persistence marks them in .snakemake/incomplete/, one file each, named by
    the output's path in URL-safe base64 (split into '@'-prefixed folders when long)."""
    args = _command_line()
    if (
        args is None
        or not getattr(args, "report", None)
        or not workflow.is_main_process
    ):
        return
    if getattr(args, "report_after_run", False):
        # the checks below read the results the run would make (docs/troubleshooting.md)
        raise WorkflowError(
            "--report-after-run: the report's checks (of the settings the results were made"
            " with, of figures older than their tables, of unfinished outputs) need the results"
            " the run makes; run the workflow, then make the report with --report alone"
        )
    from base64 import urlsafe_b64decode

    root = Path(".snakemake") / "incomplete"
    marked = []
    for path in sorted(root.rglob("*")) if root.is_dir() else ():
        if path.is_file() and path.name != "migration_underway":
            name = "".join(part.lstrip("@") for part in path.relative_to(root).parts)
            try:
                marked.append(urlsafe_b64decode(name).decode())
            except ValueError:
                marked.append(str(path))
    if marked:
        shown = ", ".join(marked[:5]) + (" ..." if len(marked) > 5 else "")
        raise WorkflowError(
            f"--report: {len(marked)} output(s) are marked incomplete by an interrupted run"
            f" ({shown}); run the workflow first (the profiles' --rerun-incomplete redoes"
            " them), then make the report"
        )
    stale = stale_figures()
    if stale:
        shown = "; ".join(stale[:3]) + (" ..." if len(stale) > 3 else "")
        raise WorkflowError(
            f"--report: {len(stale)} figure(s) are older than the tables they are drawn from"
            f" ({shown}): a run of some targets left them out of date; run the workflow"
            " first (a dry run lists what it redraws), then make the report"
        )
    try:
        check_report_settings(RUN_SETTINGS, config, FIRST_ANALYSIS_STEPS)
    except ConfigError as err:
        raise WorkflowError(str(err)) from None


#: The settings the last runs made their results with, which the report's captions state
#: (xmodal.config.record_run_settings)
RUN_SETTINGS = f"results/report/{DATASET}_run_settings.json"


#: results of an earlier run were on disk when this run started: without a record of their
#: settings, a run of some targets cannot vouch for them (record_run_settings)
EARLIER_RESULTS = any(
    Path(p).exists() for k, p in table_paths(DATASET).items() if k != "manifest"
)


#: the analysis steps that read only the feature files and the stimuli: forced
#: (`--forcerun` with these), every table and figure is made again, and no extraction
#: (language_gpa reads the features alone where analysis.language_dispersion.layer is a
#: number: without it, its tables stayed those of the earlier layer, review)
FIRST_ANALYSIS_STEPS = (
    "gpa",
    "leave_one_model_out",
    "layer_search",
    "vision_diagnostics",
)
FIRST_ANALYSIS_STEPS += (
    "image_properties",
    "stimuli_report",
    "models_table",
    "language_gpa",
)


def forces_the_analysis(args):
    """The command line (_command_line()) makes the analysis again from its first steps:
    `--forceall`, or `--forcerun` with every one of FIRST_ANALYSIS_STEPS."""
    return bool(args.forceall) or set(FIRST_ANALYSIS_STEPS) <= set(args.forcerun or ())


def record_settings_of_this_run(succeeded):
    """After a run that ran jobs (not a dry run, not 'Nothing to be done'): record its
    settings, noting a run of some targets only (docs/troubleshooting.md, --report)."""
    args = _command_line()
    if args is None or not workflow.is_main_process:
        return
    limits = (args.until, args.omit_from, args.allowed_rules, args.target_jobs)
    # --touch marks results as made, --immediate-submit calls the hook before jobs ran
    limits += (args.touch, args.immediate_submit)
    last_batch = args.batch is None or (
        args.batch.rulename == "all" and args.batch.idx == args.batch.batches
    )
    # without the params trigger a changed setting reruns nothing: the run made whatever it
    # ran with these settings, but not every result (a partial run, as far as the record goes)
    params = any(
        getattr(t, "name", str(t)).lower() == "params" for t in args.rerun_triggers
    )
    whole = (
        set(args.targets or ()) <= {"all"} and not any(limits) and last_batch and params
    )
    # the analysis made again from its first steps (what clears a --touch run's note)
    forced = forces_the_analysis(args)
    try:
        record_run_settings(
            RUN_SETTINGS,
            config,
            whole,
            succeeded,
            bool(args.touch),
            forced,
            EARLIER_RESULTS,
        )
    except Exception as err:
        # the run's results stand without the record; --report then checks less
        logger.warning(f"could not record the run's settings in {RUN_SETTINGS}: {err}")


check_report_inputs()


def _only_target_is_the_manifest():
    """The command line's one target is the stimulus manifest (to be made alone), also when
    written with `./` or through a symbolic link."""
    args = _command_line()
    targets = {os.path.realpath(t) for t in (args.targets or ())} if args else set()
    return targets == {os.path.realpath(MANIFEST)}


def check_manifest_settings():
    """Stop a run that would make the manifest again from other settings (config stimuli.*)
    together with the rest: Snakemake 9 does not rerun a job downstream of a rerunning job
    through an `ancient` input (the manifest is one for every extraction), so that run would
    extract nothing and mix the new stimuli with the old features (docs/cluster.md, "What
    reruns"). A run whose only target is the manifest passes, and so do the commands that run
    no job (dry runs warn)."""
    if not MANIFEST_SOURCE or not workflow.is_main_process:
        return
    made_from = manifest_settings_changed(MANIFEST, MANIFEST_SOURCE)
    if made_from is None:
        return
    what = (
        f"the manifest {MANIFEST} was made from stimuli settings {made_from}, and the config"
        f" now says {MANIFEST_SOURCE} (config keys stimuli.*): it must be made again. Make it"
        f" alone first (`snakemake <your options> --forcerun {MANIFEST_RULE} -- {MANIFEST}`),"
        " then run as before"
        + (
            ": in one run Snakemake would make it but not re-extract the features from it"
            if not STAMPS_FOLLOW_MANIFEST_RULE
            else ""
        )
        + " (docs/cluster.md, 'What reruns')"
    )
    if _only_target_is_the_manifest():
        return
    if _runs_no_job():
        logger.warning(f"a run stops here: {what}")
        return
    raise WorkflowError(what)


check_manifest_settings()


@cache
def manifest_at_start():
    """The manifest as it is while this file is read, read once for the start-up steps
    (stamps, set sizes); StimulusError as read_manifest."""
    return read_manifest(MANIFEST, check_images=False)


# Unchanged demo stamps older than an edited manifest: their time is moved on once the feature
# files have passed check_feature_files (see update_manifest_stamps).
_STAMPS_TO_TOUCH = []


def check_stimulus_images():
    """Decode, once per image file, the manifest's images as the vision extraction will: a
    missing or damaged image stops the run before any GPU job is submitted (found by the
    extraction, it failed every vision model's job, once per retry). Dry runs and the commands
    that run no job warn; a run whose only target is the manifest passes (it makes a
    rule-made manifest again, and its stamp job checks the new images)."""
    if not workflow.is_main_process or not Path(MANIFEST).is_file():
        return
    if not (REGISTRY.vision or DROP_DUPLICATES) or _only_target_is_the_manifest():
        return  # nothing will decode the images, or they are being made again
    try:
        manifest = manifest_at_start()
    except StimulusError:  # the jobs that read the manifest report it
        return
    stamps = Path(manifest_stamp_path("vision")).parent
    try:
        with forward_to(logger.info):
            check_images_decode(
                manifest, Path(MANIFEST).parent, stamps / DECODED_IMAGES,
                stamps / IMAGE_DIGESTS,
            )  # fmt: skip
    except StimulusError as err:
        if MANIFEST_RULE:  # made by a workflow step, which may make them again whole
            redo = f"--forcerun {MANIFEST_RULE} -- {MANIFEST}"
            err = f"{err}; or make them again (`snakemake <your options> {redo}`)"
        if _runs_no_job():
            logger.warning(f"a run stops here: {err}")
            return
        raise WorkflowError(f"{err} (found before any job ran)") from None


check_stimulus_images()


def update_manifest_stamps():
    """Bring every stamp up to the manifest (the main process only: the jobs, which parse this
    file again, leave them alone): write the missing ones (a stamp deleted after the analysis
    was never made again, and the stimuli went unchecked) and rewrite those whose content
    changed. The demo's stamp job reads its manifest by time (see stimuli.smk), so an
    unchanged demo stamp older than an edited manifest is noted, to be given the current time
    once the feature files are checked, so that the edit reruns no stamp job (which would
    re-extract every model: docs/cluster.md, "What reruns")."""
    if not workflow.is_main_process or not Path(MANIFEST).is_file():
        return
    follow_manifest()
    stamps = [(m, manifest_stamp_path(m)) for m in EXTRACTION_COLUMNS]
    try:
        manifest = manifest_at_start()
    except StimulusError as err:  # the jobs that read the manifest report it
        logger.warning(f"manifest stamps left as they are: {err}")
        return
    edited = Path(MANIFEST).stat().st_mtime_ns
    for modality, path in stamps:
        missing = not Path(path).is_file()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # the library's messages (images read for their digests, a stamp carried over, rows
        # only reordered)
        with forward_to(logger.info):
            changed = write_manifest_stamp(
                MANIFEST, path, modality, DROP_DUPLICATES, manifest, check_images=False,
                features=extracted_feature_files(modality),  # re-extracted if reordered
            )  # fmt: skip
        if missing:
            logger.info(f"{path} written (what the {modality} extractions read)")
        elif changed:
            logger.info(
                f"{MANIFEST}: what the {modality} extractions read changed (manifest"
                f" columns, image file contents, or stimuli.drop_duplicates, now"
                f" {DROP_DUPLICATES}); {path} updated"
            )
        elif STAMPS_FOLLOW_MANIFEST_RULE and Path(path).stat().st_mtime_ns < edited:
            # same content: Snakemake compares its checksum, so the extractions do not rerun
            _STAMPS_TO_TOUCH.append(path)


def manifest_readers():
    """The outputs of the steps that read the manifest by its modification time: the stimuli
    report, the image and stimulus properties, the provenance and the figures drawn from it
    (tested against the inputs of every job Snakemake plans)."""
    paths = table_paths(DATASET)
    tables = [paths[k] for k in ("images", "duplicates", "properties", "provenance")]
    without = [name for name, spec in FIGURES.items() if "manifest" not in spec.inputs]
    figures = figure_files(f"results/figures/{DATASET}", METRICS, skip=without)
    return [*tables, f"results/properties/{DATASET}/images.tsv", *figures]


def follow_manifest(touch=True):
    """A manifest whose content changed since the last call gets the current time (xmodal.
    stimuli.follow_manifest_content), so that the steps reading it by time rerun even when the
    edit came with an older time (cp -p, rsync -a); before the stamps, whose demo rule reads it
    by time and whose unchanged stamps are then noted to be touched. At the end of a run
    (touch False) only its content is recorded: a manifest the run made has a new time.
    """
    record = Path(STIMULI.format(dataset=DATASET)) / MANIFEST_CONTENT
    if not workflow.is_main_process or not Path(MANIFEST).is_file():
        return
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        # a manifest whose time cannot be set is let through when it is newer than these
        with forward_to(logger.info):
            followed = follow_manifest_content(
                MANIFEST, record, touch, manifest_readers()
            )
        if followed:
            logger.info(
                f"{MANIFEST}: its content changed since the last run, so the steps that read"
                " it run again"
            )
    except StimulusError as err:  # its time cannot be set
        raise WorkflowError(str(err)) from None
    except OSError as err:  # no record: the next call tries again
        logger.warning(f"{record}: the manifest's content is not recorded ({err})")


update_manifest_stamps()


def check_set_sizes():
    """Refuse set sizes that do not fit the stimuli before any job runs: the demo's stimuli.n,
    or the rows of an existing manifest (an upper bound when stimuli.drop_duplicates removes
    some, so a refusal here is never wrong). Before, stimulus_sets refused them after every
    extraction (xmodal.config.check_against_stimuli)."""
    if not workflow.is_main_process:
        return
    args = _command_line()
    targets = [os.path.normpath(t) for t in (getattr(args, "targets", None) or ())]
    upstream = tuple(
        f"{os.path.join(*part)}{os.sep}"
        for part in (("resources",), ("results", "features"), ("results", "stimuli"))
    )
    if targets and all(t.startswith(upstream) for t in targets):
        return  # manifests, models and features only: no set is made
    if config["stimuli"]["source"] == "demo":
        n = int(MANIFEST_SOURCE["n"])
    elif Path(MANIFEST).is_file():
        try:
            n = len(manifest_at_start())
        except StimulusError:  # the jobs that read the manifest report it
            return
    else:
        return
    try:
        check_against_stimuli(config, n)
    except ConfigError as err:
        raise WorkflowError(
            f"Invalid configuration in {', '.join(_CONFIG_FILES)} for {n} stimuli: {err}"
        ) from None


check_set_sizes()


def check_annotation_columns():
    """Refuse chosen annotation columns (analysis.annotations) that an existing manifest lacks
    or that hold other text than numbers before any job runs (before: stimulus_properties
    refused them after every extraction). With every numeric column chosen (null), warn now
    of columns the properties job will leave out or take for ids (under SLURM its log is
    a file few read)."""
    columns = setting(config, "analysis.annotations")
    if not (workflow.is_main_process and columns != [] and Path(MANIFEST).is_file()):
        return
    try:
        manifest = manifest_at_start()
    except StimulusError:  # the jobs that read the manifest report it
        return
    if columns is None:
        annotations(manifest)  # its warnings only
        return
    try:
        check_annotations(manifest, columns, MANIFEST)
    except ConfigError as err:
        raise WorkflowError(
            f"Invalid configuration in {', '.join(_CONFIG_FILES)}: {err}"
        ) from None


check_annotation_columns()


def check_feature_files():
    """Refuse stale feature files that Snakemake would not re-extract: extracted from other
    stimuli than the manifest's stamp describes, yet not older than it (touched or copied in),
    or from other weights than a local model's folder holds now."""
    if not workflow.is_main_process:
        return
    try:
        _check_against_stamps()
        for key in [*VISION, *LANGUAGE]:
            if REGISTRY[key].source == "local":  # files the DAG does not track
                with forward_to(logger.info):  # reading new weights for their digests
                    check_against_weights(
                        feature_file(key), REGISTRY[key].id, WEIGHT_DIGESTS
                    )
    except FeatureFileError as err:
        raise WorkflowError(str(err)) from None


def _check_against_stamps(run_started=None):
    """Each extracted feature file against its modality's manifest stamp
    (xmodal.features.check_against_stamp)."""
    for modality in ("vision", "language"):
        check_against_stamp(
            extracted_feature_files(modality),
            manifest_stamp_path(modality),
            run_started=run_started,
        )


def _made_at():
    """When the workflow last made the manifest: the time of the settings record its maker
    writes after it (xmodal.stimuli.write_manifest_settings); None without one."""
    try:
        return (Path(MANIFEST).parent / MANIFEST_SETTINGS).stat().st_mtime_ns
    except OSError:
        return None


def _stimuli_at_start():
    """The manifest's bytes, when the workflow last made it, and each stamp's digest (written
    by update_manifest_stamps, above), as this run found them (main process)."""
    if not workflow.is_main_process or not Path(MANIFEST).is_file():
        return None, None, {}
    stamps = {}
    for modality in EXTRACTION_COLUMNS:
        try:
            stamps[modality] = json.loads(
                Path(manifest_stamp_path(modality)).read_text(encoding="utf-8")
            )["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # none: nothing to compare with at the end
    return file_digests([MANIFEST])[0], _made_at(), stamps


RUN_STARTED = time.time()
_MANIFEST_AT_START, _MADE_AT_START, _STAMPS_AT_START = _stimuli_at_start()


def check_stimuli_of_this_run():
    """At the end of a run that ran jobs: the stimuli are those the run started with. A
    manifest (or an image) edited while the run was going gave feature files extracted before
    and after the edit, and tables mixing them (or image properties of the new images beside
    dispersions of the old), with exit code 0 (audit): the run fails instead, saying what
    changed; the next run makes again what the edit concerns. A feature file that no job of
    this run wrote (a --touch run) is named as in check_feature_files."""
    if not workflow.is_main_process:
        return
    if _MANIFEST_AT_START is None and not Path(MANIFEST).is_file():
        return  # none when the run started and none now: a run that needed no stimuli
    # a manifest (and images) made again by the workflow during this run is not an edit; the
    # next run brings the stamps up to it and re-extracts (the maker named as the target)
    if MANIFEST_RULE is not None and _made_at() != _MADE_AT_START:
        manifest, changed = None, []
    else:
        changed = (
            [f"{MANIFEST} was edited"]
            if _MANIFEST_AT_START is not None
            and file_digests([MANIFEST])[0] != _MANIFEST_AT_START
            else []
        )
        try:
            manifest = read_manifest(MANIFEST, check_images=False)
        except (StimulusError, OSError) as err:
            manifest = None
            changed.append(f"{MANIFEST} cannot be read now ({err})")
    for modality, told in _STAMPS_AT_START.items() if manifest is not None else ():
        stamp = Path(manifest_stamp_path(modality))
        with forward_to(logger.info):  # images read again for their digests
            now = manifest_stamp(
                manifest, modality, DROP_DUPLICATES, Path(MANIFEST).parent,
                digest_cache=stamp.with_name(IMAGE_DIGESTS),
            )["sha256"]  # fmt: skip
        if now != told:
            changed.append(f"what the {modality} extractions read differs from {stamp}")
    if changed:
        raise WorkflowError(
            f"the stimuli changed while this run was going ({'; '.join(changed)}): the tables"
            " it made may mix the stimuli before and after the edit. Run again: Snakemake"
            " makes again what the edit concerns. Edit the manifest and the images only"
            " between runs (docs/cluster.md)"
        )
    try:
        _check_against_stamps(run_started=RUN_STARTED)
    except FeatureFileError as err:
        raise WorkflowError(str(err)) from None


check_feature_files()


def forget_earlier_failures():
    """A new run retries every job, whatever an earlier run's attempts failed with (the user
    may have fixed it): their records in the attempt marks of the feature files and the logs
    go (xmodal.attempts.fail_attempt, forget_failures), also where this run's first attempt dies
    before it writes its own mark. Called on start (onstart: once this run holds the lock,
    with jobs to run; never in a dry run), so that a run refused by another's lock leaves that
    run's records.
    """
    if workflow.is_main_process:
        forget_failures(feature_file(m) for m in REGISTRY)
        forget_failures(marked_paths("logs"))


def touch_unchanged_stamps():
    """Give the noted demo stamps the current time (update_manifest_stamps), only once the
    feature files passed check_feature_files."""
    for path in _STAMPS_TO_TOUCH:
        os.utime(path)


touch_unchanged_stamps()


#: characters that split or end an unquoted word in a shell, or expand in it (a glob
#: character without a match is kept as it is)
_SHELL_SPECIAL = re.compile(r"[ \t\n'\"\\$`;&|<>()]")


def check_python_path(local_exec=None, touch=None):
    """Refuse a run whose jobs Snakemake would start with this Python's path unquoted: a step
    script (script:) runs as `<python> <script>`, and a cluster job as `<python> -m snakemake`,
    so a path with a space (a venv under "My Project/") fails every job with "No such file or
    directory" naming half the path (snakemake/snakemake#2645, open). A script run in a conda
    environment or container (--software-deployment-method) uses that one's `python` (read in
    Snakemake's code; untested here, without conda), and a project folder with spaces works
    (tested, also under SLURM). On start (onstart), when the executor is known; a --touch run
    starts no script. ``local_exec``, ``touch``: read from the command line where onstart does
    not run (check_python_path_without_hooks)."""
    from snakemake.settings.types import DeploymentMethod

    exe = sys.executable
    local_exec = workflow.local_exec if local_exec is None else local_exec
    touch = workflow.touch if touch is None else touch
    if not workflow.is_main_process or touch or not _SHELL_SPECIAL.search(exe):
        return
    methods = workflow.deployment_settings.deployment_method

    def own_python(rule):
        return (DeploymentMethod.CONDA in methods and rule.conda_env) or (
            DeploymentMethod.APPTAINER in methods and rule.container_img
        )

    local_ok = local_exec and all(own_python(r) for r in workflow.rules if r.script)
    if not local_ok:
        raise WorkflowError(
            f"The Python running Snakemake is at a path with a space or shell character "
            f"({exe!r}). Snakemake starts every step script and cluster job with that path "
            "unquoted, so each would fail with 'No such file or directory' "
            "(snakemake/snakemake#2645). Create the environment at a path without them "
            "(for the demo: make demo VENV=$HOME/.venvs/xmodal). The project folder itself "
            "may have spaces."
        )


def check_python_path_without_hooks():
    """check_python_path for a run with --no-hooks, where onstart does not run: once every
    rule is defined (the Snakefile calls it), the executor read from the command line.
    """
    args = _command_line()
    if not workflow.is_main_process or args is None or not args.no_hooks or args.dryrun:
        return
    check_python_path(args.executor in (None, "local"), bool(args.touch))


onstart:
    check_python_path()
    forget_earlier_failures()


onsuccess:
    try:
        check_stimuli_of_this_run()
    except WorkflowError:
        # a run whose stimuli changed under it did not make its results (recorded as mixed
        # where its settings changed); the edited manifest's content is left unrecorded, so
        # that the next run remakes what reads it by time
        record_settings_of_this_run(succeeded=False)
        raise
    record_settings_of_this_run(succeeded=True)
    follow_manifest(touch=False)


onerror:
    record_settings_of_this_run(succeeded=False)
    follow_manifest(touch=False)


# ----------------------------------------------------------------- the demo's builds (demo.smk)
DEMO_TRAIN = config["stimuli"].get("train", {})
DEMO_N_TRAIN = DEMO_TRAIN.get("n", 3000)
DEMO_TRAIN_SEED = DEMO_TRAIN.get("seed", 0)


def needs_of(wildcards):
    """What demo model ``wildcards.model``'s build reads (xmodal.demo.build.demo_needs)."""
    return demo_needs(config["models"], wildcards.model, DEMO_N_TRAIN)


def check_demo_builds():
    """Refuse a demo model's build that cannot be made as written (an init only clip_ft reads,
    more training scenes than there are) at start-up, naming the key, not in the input
    functions, where the error came with a traceback."""
    for key, entry in config["models"].items():
        if entry.get("build") is None:
            continue
        try:
            demo_needs(config["models"], key, DEMO_N_TRAIN)
        except ValueError as err:
            raise WorkflowError(
                f"Invalid configuration in {', '.join(_CONFIG_FILES)}: config key {err}"
            ) from None


check_demo_builds()
