"""Checks on a pipeline config beyond its JSON schema, with errors that name the key at fault."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from xmodal.logs import preview

#: Model keys become path components and wildcard values: lower-case, no separators. Matched
#: with ``fullmatch``: ``$`` alone also matches before a trailing newline (YAML ``key: |``).
MODEL_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: The dataset name is a path component too.
DATASET_KEY = MODEL_KEY
#: What the SLURM executor plugin accepts as a GPU model (the schema's pattern, matched whole).
GPU_MODEL = re.compile(r"[A-Za-z0-9_.]+")
#: The unbiased HSIC (docs/method.md, "Alignment") divides by m(m − 3): sets need m ≥ 4.
MIN_SET_SIZE = 4


#: The fewest bootstrap resamples that give an interval (0 turns the bootstrap off): with fewer,
#: a 95% percentile interval's ends are the extreme resamples, or one resample (n_boot 1 gave
#: "intervals above 0" in 10 of 12 pairs where 200 gave none).
MIN_BOOT = 100
#: The fewest random sets (``analysis.n_random``, ``analysis.drop_control.n_random``): the
#: tables and figures place the low, high and drop sets against the 95% interval of the random
#: sets' scores, and a set drawn like n others lies beyond all of them with probability
#: 1/(n + 1), more than 1 in 20 below 19 draws (1 or 2 draws counted drop sets "outside the
#: random interval" in 2 of 3 pairs of sets with no effect, where 100 counted 0 and 1).
MIN_RANDOM = 20


def min_set_size(knn_k: int) -> int:
    """The fewest stimuli a scored set may hold with ``knn_k`` neighbours: at least twice k.

    With neighbour sets of more than half of a set, CKNNA stops measuring local structure: on
    the untrained demo's features it left [−1, 1] in up to 48% of random sets (k/n = 0.6–0.8)
    and approached unbiased CKA, which it equals at k = n − 1 (docs/method.md, "Alignment"). The
    paper's sets have k/n = 10/256.
    """
    return max(MIN_SET_SIZE, 2 * int(knn_k))


#: The hub cache when the config names none (config key ``hub_cache``).
DEFAULT_HUB_CACHE = "resources/hub"
#: Where the prefetch records (``<model>.json``) live, whatever ``hub_cache`` says: the
#: extraction jobs take them as input, so a path that followed ``hub_cache`` would re-extract
#: every hub model when the cache moves (docs/cluster.md, "What reruns"). It is the default
#: cache's record folder, so that projects from before this rule keep their records.
PREFETCH_RECORDS = f"{DEFAULT_HUB_CACHE}/.prefetched"


def hub_cache_dir(config: Mapping[str, Any]) -> str:
    """The configured hub cache (``hub_cache``), or :data:`DEFAULT_HUB_CACHE`."""
    return str(config.get("hub_cache") or DEFAULT_HUB_CACHE)


class ConfigError(ValueError):
    """A config value that the pipeline cannot run with; the message names the key."""


def models_of(config: Mapping[str, Any], modality: str) -> list[str]:
    """Model keys of one modality (``vision`` or ``language``), in config order."""
    return [k for k, m in config["models"].items() if m["modality"] == modality]


#: ``stimuli`` keys that only one source reads (any other source would silently ignore them)
SOURCE_KEYS = {
    "n": "demo",
    "seed": "demo",
    "nuisance_beta": "demo",
    "train": "demo",
    "repo": "hub",
    "revision": "hub",
    "split": "hub",
}


def nuisance_design(value: Any) -> tuple[float, float]:
    """The demo stimuli's nuisance design (config ``stimuli.nuisance_beta``): the two positive
    finite numbers (a, b) of Beta(a, b), as floats; ValueError for anything else."""
    if (
        isinstance(value, Sequence)
        and not isinstance(value, str)
        and len(value) == 2
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < math.inf
            for v in value
        )
    ):
        return float(value[0]), float(value[1])
    raise ValueError(
        f"{value!r} is not two positive finite numbers [a, b] (the stimuli's nuisance levels "
        "are drawn from Beta(a, b))"
    )


def non_finite_numbers(value: Any, key: str = "") -> list[tuple[str, float]]:
    """Every NaN or infinite number in a config (YAML's ``.nan``, ``.inf``), with its dotted key
    (``models.tiny-mae.build.train.lr``; list items as ``key[i]``), in the config's order."""
    if isinstance(value, float) and not math.isfinite(value):
        return [(key, value)]
    found: list[tuple[str, float]] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            found += non_finite_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found += non_finite_numbers(v, f"{key}[{i}]")
    return found


def _is_integer_type(node: Mapping[str, Any]) -> bool:
    kind = node.get("type")
    kinds = kind if isinstance(kind, list) else [kind]
    return "integer" in kinds and "number" not in kinds


def normalise_integers(config: dict, schema: Mapping[str, Any]) -> list[str]:
    """Turn whole-number floats (``10.0``) into ints where the schema asks for an integer, in
    place; returns the dotted keys changed.

    JSON Schema counts 10.0 as an integer, so the config would pass; but ``10.0`` and ``10`` are
    different job parameters to Snakemake, and writing one for the other would rerun every job
    that takes it (and a check that wants an int would refuse it).
    """
    changed: list[str] = []
    defs = schema.get("$defs", {})

    def resolve(node: Mapping[str, Any]) -> Mapping[str, Any]:
        ref = node.get("$ref", "")
        return defs.get(ref.rsplit("/", 1)[-1], node) if ref.startswith("#/$defs/") else node

    def walk(value: Any, node: Mapping[str, Any], key: str) -> Any:
        node = resolve(node)
        if isinstance(value, float) and value.is_integer() and _is_integer_type(node):
            changed.append(key)
            return int(value)
        if isinstance(value, dict):
            props = node.get("properties", {})
            extra = node.get("additionalProperties")
            for k in list(value):
                sub = props.get(k, extra if isinstance(extra, Mapping) else None)
                if sub is not None:
                    value[k] = walk(value[k], sub, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and isinstance(node.get("items"), Mapping):
            for i, item in enumerate(value):
                value[i] = walk(item, node["items"], f"{key}[{i}]")
        return value

    walk(config, schema, "")
    return changed


def check_config(config: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for values the schema cannot express.

    Checks: no number is NaN or infinite (:func:`non_finite_numbers`; JSON Schema's bounds let
    NaN through, and ``.inf`` where a key has no upper bound); dataset and model keys are
    filesystem-safe, a GPU model is one sbatch accepts (all three matched whole: the schema's
    ``$`` lets a trailing newline through); ``stimuli`` keys of another source
    (:data:`SOURCE_KEYS`) are absent; the demo's ``stimuli.nuisance_beta`` is two positive
    finite numbers (:func:`nuisance_design`, for a config that bypassed the schema); at least
    3 vision models (GPA and leave-one-model-out need 3) and 1 language model; set size K,
    neighbour count k, n_boot, the random draws (``n_random``, ``drop_control.n_random``) and
    the drop fraction are valid and consistent with each other. K against the number of stimuli is
    checked when the manifest is read (it is not known before); the vision layer index against
    each model's layers when its features are read (:func:`resolve_layer`) and when its
    extraction starts.
    """
    bad = non_finite_numbers(config)
    if bad:
        key, value = bad[0]
        others = f"; so are {preview(k for k, _ in bad[1:])}" if len(bad) > 1 else ""
        raise ConfigError(
            f"config key '{key}': {value} is not a finite number (YAML reads .nan and .inf as "
            f"numbers, and the schema's bounds let them through){others}. Give a finite number"
        )
    stimuli = config.get("stimuli") or {}
    source = stimuli.get("source")
    for key, only in SOURCE_KEYS.items():
        if key in stimuli and source != only:
            raise ConfigError(
                f"config key 'stimuli.{key}' is read only with 'stimuli.source: {only}', and "
                f"this config has source {source!r}, which would ignore it; remove it"
                + (" (to analyse fewer stimuli, list fewer in the manifest)" if key == "n" else "")
            )
    if stimuli.get("nuisance_beta") is not None:
        try:
            nuisance_design(stimuli["nuisance_beta"])
        except ValueError as err:
            raise ConfigError(f"config key 'stimuli.nuisance_beta': {err}") from None
    gpu_model = (config.get("extraction") or {}).get("gpu_model")
    if gpu_model is not None and not GPU_MODEL.fullmatch(str(gpu_model)):
        raise ConfigError(
            f"config key 'extraction.gpu_model': {gpu_model!r} is not a GPU model name for "
            "sbatch --gpus=<model>:<n> (letters, digits, '_' and '.' only, as the SLURM "
            "executor plugin accepts)"
        )
    dataset = str(config.get("dataset", ""))
    if not DATASET_KEY.fullmatch(dataset):
        raise ConfigError(
            f"config key 'dataset': {dataset!r} is not a safe name "
            f"(use lower-case letters, digits, '.', '_' or '-'; pattern {DATASET_KEY.pattern})"
        )
    models = config.get("models") or {}
    for key in models:
        if not isinstance(key, str):
            kind = (
                "null" if key is None
                else "boolean" if isinstance(key, bool)
                else "number" if isinstance(key, int | float)
                else type(key).__name__
            )  # fmt: skip
            raise ConfigError(
                f"config key 'models.{key}': YAML read this model key as a {kind} ({key!r}), "
                f"and model keys are names (pattern {MODEL_KEY.pattern}): write the model's "
                "name, in quotes if YAML reads it as something else"
            )
        if not MODEL_KEY.fullmatch(str(key)):
            raise ConfigError(
                f"config key 'models.{key}': model keys become file names and must match "
                f"{MODEL_KEY.pattern} (e.g. 'llama-65b', 'dinov2-g')"
            )
    vision = models_of(config, "vision")
    language = models_of(config, "language")
    if len(vision) < 3:
        raise ConfigError(
            f"config key 'models': GPA and leave-one-model-out need at least 3 vision models, "
            f"found {len(vision)} ({', '.join(vision) or 'none'}); add vision models under "
            "'models' (modality: vision)"
        )
    if not language:
        raise ConfigError(
            "config key 'models': no language model (modality: language) is configured"
        )
    ana = config["analysis"]
    k, set_size = int(ana["knn_k"]), int(ana["set_size"])
    if set_size < MIN_SET_SIZE:
        raise ConfigError(
            f"config key 'analysis.set_size' ({set_size}) is too small: the unbiased HSIC inside "
            f"CKNNA needs at least {MIN_SET_SIZE} stimuli per set; use a set size of at least "
            f"{min_set_size(k)}"
        )
    if set_size < min_set_size(k):
        raise ConfigError(
            f"config key 'analysis.knn_k' ({k}) is more than half of 'analysis.set_size' "
            f"({set_size}): CKNNA's neighbour sets would cover most of each set, and it no longer "
            f"measures local alignment (values beyond ±1). Use a set size of at least "
            f"{min_set_size(k)} or knn_k of at most {set_size // 2}"
        )
    n_boot = int(ana["n_boot"])
    if 0 < n_boot < MIN_BOOT:
        raise ConfigError(
            f"config key 'analysis.n_boot' ({n_boot}) is too few resamples for a 95% interval: "
            f"use 0 (no bootstrap intervals) or at least {MIN_BOOT} (the paper setup: 1000)"
        )
    drop_draws = (ana.get("drop_control") or {}).get("n_random")
    for key, n in (
        ("analysis.n_random", ana.get("n_random")),
        ("analysis.drop_control.n_random", drop_draws),
    ):
        if isinstance(n, int) and not isinstance(n, bool) and n < MIN_RANDOM:
            raise ConfigError(
                f"config key '{key}' ({n}) is too few random sets for the 95% interval of their "
                f"scores that the low, high and drop sets are compared with: use at least "
                f"{MIN_RANDOM} (the paper setup: 100)"
            )
    if not 0 < float(ana["drop_fraction"]) < 1:
        raise ConfigError(
            f"config key 'analysis.drop_fraction' must be in (0, 1), got {ana['drop_fraction']}"
        )


def heldout_set_size(set_size: int, m: int) -> int:
    """Size K_B of the low / high / random sets inside half B: ⌊K·|B|/m + ½⌋, |B| = m − ⌊m/2⌋,
    at most ⌊|B|/2⌋ so that low and high stay disjoint.

    The sets keep the fraction K/m of their pool (128 of 512 for K = 256 of m = 1024); the cap
    acts only for K = m/2 with K odd (rounding up would share a stimulus between low and high).
    """
    n_b = int(m) - int(m) // 2
    return min(int(math.floor(int(set_size) * n_b / int(m) + 0.5)), n_b // 2)


def check_against_stimuli(config: Mapping[str, Any], n_stimuli: int) -> None:
    """Raise :class:`ConfigError` if the set sizes do not fit ``n_stimuli`` stimuli."""
    ana = config["analysis"]
    set_size, k = int(ana["set_size"]), int(ana["knn_k"])
    if set_size > n_stimuli // 2:
        raise ConfigError(
            f"config key 'analysis.set_size' ({set_size}) is larger than half the {n_stimuli} "
            f"stimuli: the low and high sets would overlap; set it to at most {n_stimuli // 2} "
            "or use more stimuli"
        )
    fraction = float(ana["drop_fraction"])
    n_drop = int(round(fraction * n_stimuli))
    n_keep = n_stimuli - n_drop
    need = min_set_size(k)
    if n_drop < 1 or n_keep < need:
        raise ConfigError(
            f"config key 'analysis.drop_fraction' ({fraction}) drops {n_drop} of the "
            f"{n_stimuli} stimuli and keeps {n_keep}; the drop sets need at least one dropped "
            f"stimulus and at least max({MIN_SET_SIZE}, 2 × knn_k) = {need} kept ones; choose a "
            f"fraction between {1 / n_stimuli:.3g} and {(n_stimuli - need) / n_stimuli:.3g}"
        )
    if set_size < need:
        raise ConfigError(
            f"config key 'analysis.knn_k' ({k}) is more than half of 'analysis.set_size' "
            f"({set_size}); lower 'analysis.knn_k' or raise 'analysis.set_size' to at least {need}"
        )
    held = ana.get("heldout_layer") or {}
    if held.get("enabled", False):
        k_b = heldout_set_size(set_size, n_stimuli)
        if k_b < need:
            raise ConfigError(
                f"analysis.heldout_layer: the sets inside half B of the {n_stimuli} stimuli "
                f"would hold {k_b} (analysis.set_size {set_size}, halved), fewer than "
                f"max({MIN_SET_SIZE}, 2 × analysis.knn_k) = {need}; raise analysis.set_size, "
                "lower analysis.knn_k or turn off analysis.heldout_layer"
            )


def resolve_layer(
    index: int, n_layers: int, where: str | os.PathLike, key: str = "analysis.vision_layer"
) -> int:
    """Turn a possibly negative layer index (-2 = penultimate block) into 0..n_layers-1.

    An index the model does not have is a :class:`ConfigError` naming ``where`` (the feature
    file or model) and the config ``key`` to change.
    """
    resolved = index + n_layers if index < 0 else index
    if not 0 <= resolved < n_layers:
        raise ConfigError(
            f"config key '{key}': layer {index} does not exist in {where}, which has {n_layers} "
            f"layers (valid: {-n_layers}..{n_layers - 1}); change '{key}'"
        )
    return resolved


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses duplicate keys (PyYAML silently keeps the last one)."""


#: Numbers YAML 1.1 reads in another base than the one they seem to be written in: a leading
#: zero (``0120``: octal, 80) and colons (``1:10``: base 60, 70), integers or floats.
_OTHER_BASE = re.compile(r"[-+]?(0[0-9_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def _check_number_text(loader: _StrictLoader, key: Any, node: yaml.Node) -> None:
    """ConfigError for a number that YAML 1.1 reads as octal or base 60 (:data:`_OTHER_BASE`),
    naming the file, line and key: ``set_size: 0120`` became 80 with no error."""
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for item in nodes:
        if (
            isinstance(item, yaml.ScalarNode)
            and item.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
            and _OTHER_BASE.fullmatch(item.value)
        ):
            read = loader.construct_object(item)
            if ":" not in item.value and read == float(item.value.replace("_", "")):
                continue  # 007: octal and decimal agree
            raise ConfigError(
                f"{loader.name}: key {key!r} at line {item.start_mark.line + 1}: YAML 1.1 reads "
                f"{item.value} as {read} ({'octal' if ':' not in item.value else 'base 60'}); "
                "write the number without a leading zero or colon, or in quotes for text"
            )


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: construct_mapping merges it (its keys checked where defined)
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, bool | int | float):  # no key of the config is a number
            raise ConfigError(
                f"{loader.name}: key {key_node.value} at line {key_node.start_mark.line + 1}: "
                f"YAML 1.1 reads it as the {'boolean' if isinstance(key, bool) else 'number'} "
                f"{key!r}, and keys are names: put it in quotes ('{key_node.value}')"
            )
        _check_number_text(loader, key, value_node)
        if key in seen:
            raise ConfigError(
                f"{loader.name}: duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                f"(first defined at line {seen[key] + 1}); each key, model keys included, "
                "may appear only once"
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config_file(path: str | os.PathLike) -> dict:
    """Read a YAML config file, refusing duplicate keys with an error naming file and line (and
    any file YAML cannot read: Snakemake reads a ``--configfile`` as JSON first, which allows
    tabs that YAML refuses)."""
    with open(path, encoding="utf-8") as fh:
        loader = _StrictLoader(fh)
        loader.name = str(path)
        try:
            return loader.get_single_data() or {}
        except yaml.YAMLError as err:
            said = "; ".join(line.strip() for line in str(err).splitlines())
            raise ConfigError(f"{path}: not a YAML file this workflow can read ({said})") from None
        finally:
            loader.dispose()


#: A decimal number as text, its exponent optional (group 2; not 'nan' or 'inf'), in ASCII
#: digits as YAML and the number readers take them (not '１２'): one pattern for the config's
#: hints and the feature files' numeric-looking ids (xmodal.features).
NUMBER_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)


def _yaml11_hint(value: Any) -> str | None:
    """The advice for a number YAML 1.1 reads as text (1e-10, 5e-1: an exponent without a
    decimal point or sign; 08: a leading zero and a digit that is not octal), None for any
    other value."""
    if isinstance(value, str) and re.fullmatch(r"0[0-9_]*[89][0-9_]*", value.strip()):
        return (
            f"YAML 1.1 reads {value.strip()} as text: a leading zero makes a number octal, and "
            "8 and 9 are no octal digits; write the number without the leading zero"
        )
    number = NUMBER_TEXT.fullmatch(value.strip()) if isinstance(value, str) else None
    if not (number and number[2]):  # an exponent
        return None
    return (
        f"YAML 1.1 reads {value} as text: write the number with a decimal point and a signed "
        "exponent, e.g. 1.0e-10, or in full"
    )


_ABSENT = object()


def _node_at(tree: Any, path: Sequence[Any]) -> Any:
    """The value at ``path`` in nested mappings and lists, ``_ABSENT`` where there is none."""
    node: Any = tree
    for part in path:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            return _ABSENT
    return node


def _given_on_command_line(
    command_line: Mapping[str, Any], path: Sequence[Any], value: Any
) -> bool:
    """Whether ``--config`` gave ``value`` at ``path`` (a section it gave only part of is the
    config file's, merged)."""
    node = _node_at(command_line, path)
    return node is not _ABSENT and node == value


def _unexpected_keys(err: Any) -> list[str]:
    """The keys an ``additionalProperties`` violation is about (none for other violations)."""
    if err.validator != "additionalProperties" or not isinstance(err.instance, Mapping):
        return []
    known = err.schema.get("properties", {})
    patterns = err.schema.get("patternProperties", {})
    return [
        k
        for k in err.instance
        if k not in known and not any(re.search(p, str(k)) for p in patterns)
    ]


def _schema_homes(schema: Mapping[str, Any], name: str, prefix: str = "") -> list[str]:
    """Dotted keys of the schema's nested sections that hold a property ``name``."""
    homes = []
    for key, sub in (schema.get("properties") or {}).items():
        here = f"{prefix}{key}"
        if key == name and prefix:
            homes.append(here)
        if isinstance(sub, Mapping):
            homes += _schema_homes(sub, name, here + ".")
    return homes


def schema_errors(
    config: Mapping[str, Any],
    schema_path: str | os.PathLike,
    source: str = "the config",
    command_line: Mapping[str, Any] | None = None,
) -> list[str]:
    """One line per JSON-schema violation: the config file, the dotted key and what is wrong.
    ``command_line``: the values given with ``--config`` (a violation there names it instead)."""
    import jsonschema

    schema = load_config_file(schema_path)
    validator = jsonschema.validators.validator_for(schema)(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        key = ".".join(str(p) for p in err.path) or "(top level)"
        hint = ""
        if err.validator == "type" and "string" in str(err.validator_value):
            if isinstance(err.instance, bool | int | float):
                kind = "boolean" if isinstance(err.instance, bool) else "number"
                hint = (
                    f" (YAML read the value as a {kind}: unquoted 012 is the octal number 10, "
                    "1.0 a number, true/false booleans; put it in quotes)"
                )
        elif err.validator == "type" and (yaml11 := _yaml11_hint(err.instance)):
            hint = f" ({yaml11})"
        if err.validator in ("oneOf", "anyOf") and err.context:
            # which forms the key takes, not only that the value fits none of them
            hint = f" ({_forms(err)})"
            if yaml11 := _yaml11_hint(err.instance):
                hint += f" ({yaml11})"
            elif isinstance(err.instance, str) and NUMBER_TEXT.fullmatch(err.instance.strip()):
                hint += f" (a number in quotes is text: write {err.instance.strip()} unquoted)"
        if err.instance is None and err.validator in ("type", "oneOf", "anyOf"):
            # `analysis:` with nothing after it (its settings commented out) is null, not {}
            hint += (
                " (YAML reads a key with nothing after it as null: give it a value, or remove "
                "the key where it has a default)"
            )
        where = source
        unexpected = _unexpected_keys(err)
        given = _node_at(command_line or {}, list(err.path))
        if unexpected and isinstance(given, Mapping) and set(unexpected) <= set(given):
            # an unknown key --config gave (the file's own keys were merged around it)
            where = "--config"
            homes = sorted({h for k in unexpected for h in _schema_homes(schema, k)})
            at = [f"this name is a key at {', '.join(homes)}"] if homes else []
            if not err.path:
                hint = (
                    " (--config names top-level keys: a nested setting goes in a YAML "
                    "file given with --configfile" + "".join(f"; {a}" for a in at) + ")"
                )
            else:
                # a name inside analysis={...}: a typo, or a key of another section (a YAML
                # file would refuse it too), not a nested setting given as a top-level key
                top = [k for k in unexpected if k in schema.get("properties", {})]
                at += [f"{k} is a top-level key: --config {k}=..." for k in top]
                hint = f" ({'; '.join(at)})" if at else ""
        elif command_line and _given_on_command_line(command_line, list(err.path), err.instance):
            where = "--config"
            parsed = (
                _refusals_once_parsed(validator, err)
                if len(err.path) > 1
                and isinstance(err.instance, str)
                and err.validator in ("type", "oneOf", "anyOf")
                else None
            )
            if parsed == []:
                # snakemake's --config reads a mapping's values with YAML's base loader: as text
                hint = (
                    f" (--config gives every value inside {err.path[0]}={{...}} as text: put "
                    "the setting in a YAML file and give it with --configfile)"
                )
            elif parsed:
                # refused as text, and as the number a config file gives: say why it is wrong
                hint = (
                    f" (--config gives every value inside {err.path[0]}={{...}} as text; in a "
                    f"YAML file it would be refused too: {parsed[0]})"
                )
            elif len(err.path) > 1 and (yaml11 := _yaml11_hint(err.instance)):
                # 1.0e-10 on the command line would arrive as text again: the file is the way
                hint = (
                    f" (--config gives every value inside {err.path[0]}={{...}} as text: put "
                    f"the setting in a YAML file and give it with --configfile; there, {yaml11})"
                )
            elif hint.startswith(" (YAML read the value as a"):
                # and a top-level value that looks like a number as that number (007 as 7)
                hint = (
                    " (--config reads a value that looks like a number as that number, quoted "
                    "or not: set it in quotes in a YAML file and give that with --configfile)"
                )
        lines.append(f"Invalid configuration in {where}: key '{key}': {err.message}{hint}")
    return lines


def _refusals_once_parsed(validator: Any, err: Any) -> list[str] | None:
    """What the schema says of a text value that --config gave, had YAML read it as a config
    file does (``5`` as a number, ``True`` as a boolean): [] where it would be valid, so the way
    --config reads values is the reason it is refused; else the messages refusing it (``0``
    where a setting must be above 0: "'0' is not of type 'number'" alone misleads). None
    where YAML reads it as text too (audit: ``layer: last`` was told to move to a YAML file,
    where it is refused as well), or as a number a config file refuses (``010``)."""
    text = err.instance.strip()
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if _OTHER_BASE.fullmatch(text) and (":" in text or parsed != float(text.replace("_", ""))):
        return None  # 010 is 8 in YAML 1.1: a config file refuses it too (_check_number_text)
    if isinstance(parsed, str) or parsed is None:
        return None
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return [f"{parsed} is not a finite number"]  # as check_config refuses it in a file
    return [
        f"{e.message} ({_forms(e)})" if _forms(e) else e.message
        for e in validator.evolve(schema=err.schema).iter_errors(parsed)
    ]


def _forms(err: Any) -> str:
    """The forms a key takes, from a ``oneOf``/``anyOf`` violation ('' for any other): what
    each alternative said of the value, once each."""
    if err.validator not in ("oneOf", "anyOf") or not err.context:
        return ""
    return "; ".join(dict.fromkeys(c.message for c in err.context))


# ----------------------------------------------------------------- the settings a report states
#: The settings the report's captions state (workflow/report/*.rst, read from the config given
#: to ``--report``), and so must be those the results were made with. Each one changes a rule's
#: params, or (the controls' switches) which rules run, so a run with a changed value reruns
#: work and records it (:func:`record_run_settings`).
REPORT_SETTINGS = (
    "analysis.knn_k",
    "analysis.set_size",
    "analysis.n_random",
    "analysis.n_boot",
    "analysis.seed",
    "analysis.drop_fraction",
    "analysis.vision_layer",
    "analysis.metrics",
    "stimuli.drop_duplicates",
    "analysis.drop_control.enabled",
    "analysis.heldout_layer.enabled",
    "analysis.self_selection.enabled",
    "analysis.annotations",
)
#: What an absent optional key means: the one place these defaults are written down (the
#: workflow, the library and the report check all read them through :func:`setting`; the
#: controls' settings classes in xmodal.selection take their switches from here).
DEFAULTS: dict[str, Any] = {
    "analysis.metrics": ["cknna"],
    # None: every numeric manifest column (xmodal.properties.annotations)
    "analysis.annotations": None,
    "stimuli.drop_duplicates": False,
    # docs/method.md, "Controls": the size-matched drop control is cheap and on; the held-out
    # layer choice and the self-selection sets add work to every conditions job and are off
    "analysis.drop_control.enabled": True,
    "analysis.heldout_layer.enabled": False,
    "analysis.self_selection.enabled": False,
}


def setting(config: Mapping[str, Any], dotted: str) -> Any:
    """The value of the dotted config key (``"analysis.metrics"``); an absent (or null) key is
    its default in :data:`DEFAULTS`, None where it has none. A list default comes as a copy."""
    value: Any = config
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        value = DEFAULTS.get(dotted)
        return list(value) if isinstance(value, list) else value
    return value


#: The environment variable through which a run passes the config it scheduled its jobs with
#: to them (:func:`config_json`): a job started as a Snakemake process of its own (a SLURM job)
#: reads the config files again, and so an edit made while it was queued.
RUN_CONFIG_ENV = "XMODAL_RUN_CONFIG"


def config_json(config: Mapping[str, Any]) -> str:
    """The config as compact JSON with sorted keys: what a run passes to its jobs (keys as
    text: YAML may read a key as a number, which the checks then refuse by name)."""

    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(config), sort_keys=True, separators=(",", ":"), default=str)


def changed_settings(before: Any, after: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two configs (parsed :func:`config_json`),
    each as ``key: before -> after`` (``absent`` for a key one of them lacks)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out = []
        for key in sorted(set(before) | set(after), key=str):
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if key not in before or key not in after:
                was = json.dumps(before[key]) if key in before else "absent"
                now = json.dumps(after[key]) if key in after else "absent"
                out.append(f"{dotted}: {was} -> {now}")
            else:
                out += changed_settings(before[key], after[key], dotted)
        return out
    if before == after:
        return []
    return [f"{prefix or '(top level)'}: {json.dumps(before)} -> {json.dumps(after)}"]


def apply_defaults(config: dict) -> None:
    """Write each absent (or null) optional key's default (:data:`DEFAULTS`) into ``config``,
    which the rules and the report's captions read; an absent or null section becomes a
    mapping."""
    for dotted in DEFAULTS:
        value = setting(config, dotted)
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            if not isinstance(node.get(section), dict):
                node[section] = {}
            node = node[section]
        node[key] = value


def report_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`REPORT_SETTINGS` of ``config``, as JSON values: an absent key is its
    default, None where it has none."""
    out = {dotted: setting(config, dotted) for dotted in REPORT_SETTINGS}
    return json.loads(json.dumps(out))


def _read_record(path: Path) -> dict[str, Any] | None:
    """The settings record at ``path``, None when there is none; ValueError when unreadable."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is not a readable settings record ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict):
        raise ValueError(f"{path} is not a settings record (no 'settings' mapping)")
    return record


def record_run_settings(
    path: str | os.PathLike,
    config: Mapping[str, Any],
    whole: bool,
    succeeded: bool,
    touched: bool = False,
    forced: bool = False,
    earlier: bool = False,
) -> None:
    """Record, after a run, the settings its results were made with (``--report`` compares).

    A successful run of the whole workflow records the config's settings. A run of some
    targets only, or a failed one, that changed them leaves results of both settings on disk:
    it records the new ones as ``mixed``, and a report is refused until a whole run succeeds.
    (The workflow counts a run without the ``params`` rerun trigger as one of some targets: a
    changed setting reruns nothing there.) A ``--touch`` run (``touched``) that changed them is
    noted as such: it marked results as made with the new settings without making them, so no
    later run makes them by itself, and only a whole run that forced the analysis (``forced``:
    ``--forceall``, or ``--forcerun`` with its first steps) clears the note.
    An unreadable record counts as one with other settings, and so does a missing one where
    results of an earlier run were on disk (``earlier``: a record deleted, or results made
    before records existed), whose settings nothing then tells.
    """
    from xmodal.io import atomic_path

    now = report_settings(config)
    path = Path(path)
    try:
        old = _read_record(path)
    except ValueError:
        old = {"settings": None}
    was_touched = bool(old and old.get("touched")) and not (whole and succeeded and forced)
    # no record says what settings the results on disk had
    untold = bool(old.get("untold")) if old is not None else earlier
    if whole and succeeded:
        record = {"settings": now, "mixed": was_touched}
        untold = untold and was_touched  # the touch's note, and what it said, stay
    else:
        # a record made before a setting was recorded lacks it: compare the ones it has
        if old is not None and old["settings"] is not None:
            same = all(now.get(k) == v for k, v in old["settings"].items() if k in now)
            # a touch over results of two configs marks the other config's as this one's
            if same and not (touched and old.get("mixed")):
                return
        unknown = old is not None or earlier  # results on disk whose settings may differ
        record = {"settings": now, "mixed": unknown}
        was_touched = was_touched or (touched and unknown)
    if untold:
        record["untold"] = True
    if was_touched:
        record["touched"] = True
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")


def recorded_settings_changes(path: str | os.PathLike, config: Mapping[str, Any]) -> list[str]:
    """The :data:`REPORT_SETTINGS` whose value in the settings record at ``path`` (the last
    runs', :func:`record_run_settings`) differs from ``config``'s, each as ``key = then -> now``
    (one line saying so where the record is ``mixed`` or ``touched``: it vouches for no one
    config); none without a readable record or where it lacks the key."""
    try:
        record = _read_record(Path(path))
    except ValueError:
        return []
    if record is None:
        return []
    if record.get("mixed") or record.get("touched"):  # it cannot vouch for any one config
        return ["the record says they were made with more than one config, or marked by --touch"]
    now, then = report_settings(config), record["settings"]
    return [f"{k} = {json.dumps(then[k])} -> {json.dumps(now[k])}" for k in _changed(then, now)]


def _changed(then: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The :data:`REPORT_SETTINGS` a record holds (``then``) with another value ``now``."""
    return [k for k in REPORT_SETTINGS if k in then and then[k] != now[k]]


def check_report_settings(
    path: str | os.PathLike, config: Mapping[str, Any], first_steps: Sequence[str] = ()
) -> None:
    """Raise :class:`ConfigError` when the report's captions would state settings other than
    those the results were made with (the record :func:`record_run_settings` wrote). Results
    made before such records existed have none, and pass; so do keys a record lacks."""
    path = Path(path)
    way_out = (
        f"run the whole workflow with this config first, with the default rerun triggers (if "
        f"it says 'Nothing to be done', every result is up to date with this config: delete "
        f"{path}), then make the report"
    )
    try:
        record = _read_record(path)
    except ValueError as err:
        raise ConfigError(f"--report: {err}; {way_out}") from None
    if record is None:
        return
    # no record said what settings the results had when a run of some targets (or a touch)
    # ran over them: a record deleted, or results older than records
    untold = (
        f"results whose settings no record told ({path} deleted, or results older than "
        "such records), which may have been made with another config"
    )
    if record.get("touched"):
        what = (
            f"that run's settings, over {untold},"
            if record.get("untold")
            else f"other settings than before ({path})"
        )
        raise ConfigError(
            f"--report: a --touch run marked the results as made with {what} without making "
            f"them, so no run makes them again by itself (it "
            f"says 'Nothing to be done'); make the analysis again with this config, forcing its "
            f"first steps (`snakemake <your options> --forcerun {' '.join(first_steps)}`; the "
            f"extractions are not redone), then make the report"
        )
    if record.get("mixed") and record.get("untold"):
        raise ConfigError(
            f"--report: a run of only some targets, one that failed, or one without the params "
            f"rerun trigger (--rerun-triggers), ran over {untold}; {way_out}"
        )
    if record.get("mixed"):
        raise ConfigError(
            f"--report: a run of only some targets, one that failed, or one without the params "
            f"rerun trigger (--rerun-triggers), changed the settings the report states ({path}), "
            f"so the results on disk were made with two different configs; {way_out}"
        )
    now, then = report_settings(config), record["settings"]
    changed = _changed(then, now)
    if changed:
        shown = ", ".join(f"{k} = {then[k]!r}" for k in changed)
        says = ", ".join(f"{k} = {now[k]!r}" for k in changed)
        raise ConfigError(
            f"--report: the results on disk were made with {shown}, and this config says {says} "
            f"(recorded by the last run in {path}); the report's captions would state this "
            "config's values. Make the report with the config of the run, or run the workflow "
            "with this config first"
        )
