"""The model registry: one frozen entry per model, built once from the validated config.

Everything the pipeline knows about a model is answered here and nowhere else: where its weights
come from (built for the demo / a local directory / a hub repository at a revision), which files
may be downloaded and loaded, which config fields define its features (the extraction's rerun
trigger), what its extraction job needs on the cluster, and how figures name and order it.
``workflow/rules/common.smk``, the prefetch and extraction steps, the loaders, ``models.tsv`` and
the figures all read it.

Site settings (``extraction:`` in config.yaml) have their one default here, in :data:`SITE_DEFAULTS`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pandas as pd

from xmodal.config import ConfigError
from xmodal.resources import (
    GPU_USABLE_FRACTION,
    extraction_resources,
    gpu_memory_needed_gb,
    gpus_needed,
)

log = logging.getLogger(__name__)

__all__ = [
    "LIBRARY",
    "PICKLE_SUFFIXES",
    "SAFE_SUFFIXES",
    "SITE_DEFAULTS",
    "ModelEntry",
    "Registry",
    "Site",
    "built_model_dir",
    "compute_dtype",
    "download_patterns",
    "hub_repo_of",
    "same_hub_repo",
    "pickle_patterns",
]

#: The library that loads each modality.
LIBRARY = {"vision": "timm", "language": "transformers"}

#: The version of what the extraction code (xmodal.extract, and the image decoding and caption
#: handling it calls) computes, per modality. Raise it by one in the change that alters that
#: modality's features: from version 2 on it enters each such model's :meth:`feature_spec`,
#: the extraction's rerun trigger, so the workflow re-extracts exactly those models once, and
#: the feature files record it (``features_version``). Changes of the analysis code rerun the
#: analysis by themselves (xmodal.analysis_code_digest); the extraction's are left to this,
#: so that an edit that changes no feature costs no GPU hour (docs/cluster.md, "What reruns").
FEATURES_VERSION: Mapping[str, int] = MappingProxyType({"vision": 1, "language": 1})

#: Weight files that are plain tensors (safe to load) and pickle files (loading runs code).
SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".tar")

# What a loader needs from a hub repository besides its weights, and the weight files each library
# loads. timm hub repos (timm/<id>) hold a pretrained config and model.safetensors (or the pickle
# pytorch_model.bin); transformers needs configs, tokenizer files and (sharded) weights.
_SUPPORT = {
    "timm": ("config.json",),
    "transformers": ("*.json", "tokenizer*", "*.model", "*.tiktoken", "vocab*", "merges.txt"),
}
_WEIGHTS = {"timm": ("model.safetensors",), "transformers": ("*.safetensors",)}
#: The files a tokenizer is read from, one of which a transformers repository must hold at its
#: top level (tokenizer_config.json alone only configures one)
TOKENIZER_FILES = ("tokenizer.json", "*.model", "*.tiktoken", "vocab*", "merges.txt")
_PICKLE_WEIGHTS = {"timm": ("pytorch_model.bin",), "transformers": ("*.bin",)}

#: Site settings under ``extraction:`` and their defaults (the only place they are defaulted).
SITE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "dtype": "auto",
        "batch_size": MappingProxyType({"vision": None, "language": None}),
        "num_workers": 4,
        "gpu_mem_gb": 80,
        "gpus_per_node": 8,
        "gpu_model": None,
        "allow_pickle": False,
        "max_tokens": None,
    }
)


def download_patterns(library: str, allow_pickle: bool = False) -> tuple[str, ...]:
    """File patterns to fetch from a model's hub repository (and accept from the cache)."""
    try:
        patterns = _SUPPORT[library] + _WEIGHTS[library]
    except KeyError:
        raise ValueError(
            f"unknown model library {library!r}; expected one of {sorted(_SUPPORT)}"
        ) from None
    return patterns + (_PICKLE_WEIGHTS[library] if allow_pickle else ())


def pickle_patterns(library: str) -> tuple[str, ...]:
    """The pickle weight files a library would load (refused unless ``allow_pickle``)."""
    return _PICKLE_WEIGHTS[library]


def hub_repo_of(model_id: str, modality: str) -> tuple[str, str | None]:
    """The hub repository of a registry id, and a revision the id pins (``@rev``), if any.

    timm ids with a pretrained tag live under ``timm/<id>`` (``vit_huge_patch14_224.mae`` →
    ``timm/vit_huge_patch14_224.mae``); ``hf-hub:org/name[@rev]`` names a repository directly (as in
    ``timm.create_model``); anything else with a ``/`` is a repository id as it is.
    """
    rid = str(model_id).strip()
    revision = None
    for prefix in ("hf-hub:", "hf_hub:"):
        if rid.startswith(prefix):
            rid = rid[len(prefix) :]
            if "@" in rid:
                rid, revision = rid.split("@", 1)
            break
    if modality == "vision" and "/" not in rid:
        rid = f"timm/{rid}"
    return rid, revision


def same_hub_repo(a: object, b: object, modality: str) -> bool:
    """Whether two registry ids name the same hub repository (and pin the same revision, if
    any): ``vit_huge_patch14_224.mae``, ``timm/vit_huge_patch14_224.mae`` and
    ``hf-hub:timm/vit_huge_patch14_224.mae`` are one model (:func:`hub_repo_of`)."""
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return a == b or hub_repo_of(a, modality) == hub_repo_of(b, modality)


#: Other spellings of the compute dtypes (xmodal.extract: ``fp32`` is float32, ...).
_DTYPE_NAMES = MappingProxyType({"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"})


def compute_dtype(modality: str, dtype: str) -> str:
    """The dtype a model computes in for the ``extraction.dtype`` setting: ``auto`` is float32
    for vision models and ``auto`` (bfloat16 on a GPU, float32 on the CPU) for language models,
    as in the Platonic Representation reference code (docs/cluster.md, "What reruns")."""
    if modality == "vision" and str(dtype).lower() == "auto":
        return "float32"
    return str(dtype)


def built_model_dir(key: str) -> str:
    """The folder the demo's build rule writes model ``key`` into (relative to the workflow)."""
    return f"resources/demo/models/{key}"


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~"))


@dataclass(frozen=True)
class Site:
    """The cluster and extraction settings of config.yaml's ``extraction:`` block, defaults resolved."""

    dtype: str = SITE_DEFAULTS["dtype"]
    batch_size: Mapping[str, int | None] = field(
        default_factory=lambda: dict(SITE_DEFAULTS["batch_size"])
    )
    num_workers: int = SITE_DEFAULTS["num_workers"]
    gpu_mem_gb: float = SITE_DEFAULTS["gpu_mem_gb"]
    gpus_per_node: int = SITE_DEFAULTS["gpus_per_node"]
    gpu_model: str | None = SITE_DEFAULTS["gpu_model"]
    allow_pickle: bool = SITE_DEFAULTS["allow_pickle"]
    max_tokens: int | None = SITE_DEFAULTS["max_tokens"]

    @classmethod
    def from_config(cls, extraction: Mapping[str, Any] | None) -> Site:
        """Site settings from ``config['extraction']`` (missing keys take :data:`SITE_DEFAULTS`)."""
        ext = dict(extraction or {})
        unknown = set(ext) - set(SITE_DEFAULTS)
        if unknown:
            raise ConfigError(f"config key 'extraction': unknown setting(s) {sorted(unknown)}")
        values = {k: ext.get(k, SITE_DEFAULTS[k]) for k in SITE_DEFAULTS}
        values["batch_size"] = MappingProxyType(
            {**SITE_DEFAULTS["batch_size"], **dict(values["batch_size"] or {})}
        )
        return cls(**values)


#: demo build keys that only the other modality's builder reads (xmodal.demo.build)
_BUILD_KEYS_OF_OTHER = {
    "vision": frozenset({"arch", "hidden_size", "n_layers"}),
    "language": frozenset({"family", "embed_dim", "depth", "init"}),
}


@dataclass(frozen=True)
class ModelEntry:
    """Everything about one model, resolved: identity, source, files, features, resources, display."""

    key: str
    modality: str
    id: str
    revision: str | None
    size_b: float
    label: str
    family: str
    config_order: int
    source: str  # "built" (demo), "local" (a directory), "hub", or "supplied" (a feature file)
    hub_repo: str | None
    build: Mapping[str, Any] | None
    batch_size: int | None
    allow_pickle: bool
    site: Site
    order: int = 0
    #: a feature file the user supplies (source "supplied"): imported, not extracted
    features: str | None = None

    @property
    def library(self) -> str:
        """``timm`` for vision models, ``transformers`` for language models."""
        return LIBRARY[self.modality]

    @property
    def download_patterns(self) -> tuple[str, ...]:
        """Files fetched from the hub repository (and accepted from the cache)."""
        return download_patterns(self.library, self.allow_pickle)

    @property
    def max_tokens(self) -> int | None:
        """Token limit for captions (language models; None = the model's own limit)."""
        return self.site.max_tokens if self.modality == "language" else None

    @property
    def dtype(self) -> str:
        """The compute dtype of this model's extraction (:func:`compute_dtype`)."""
        return compute_dtype(self.modality, self.site.dtype)

    def settled_id(self, made: Mapping[str, Any] | None = None) -> str:
        """The model's ``id`` as the rerun triggers spell it, given how its features on disk
        were made (``made``, as for :meth:`settled_revision`): for a local folder, the
        spelling the file records when it names the same folder (``./models/m``,
        ``models/m/`` or its absolute path; each re-extracted the model, audit), and for a hub
        model when it names the same repository (:func:`same_hub_repo`) and the features came
        from the hub (not from a folder of that name); else the configured id. The extraction
        loads and records that spelling, so this never flips."""
        if made is None or made.get("model_id") in (None, self.id):
            return self.id
        if self.source == "hub":  # timm/… or hf-hub:… spelt otherwise (audit: a re-extraction)
            # only features made from the hub: a folder ./timm/<name> is read as a local model
            # (revision "local"), and the extraction would load it again under that spelling
            spelt = str(made["model_id"])
            from_hub = made.get("revision") != "local" and not Path(spelt).expanduser().exists()
            return spelt if from_hub and self.names_same_repo(spelt) else self.id
        if self.source != "local":
            return self.id
        try:
            same = Path(made["model_id"]).expanduser().resolve() == (
                Path(self.id).expanduser().resolve()
            )
        except (OSError, RuntimeError):
            same = False
        return str(made["model_id"]) if same else self.id

    def names_same_repo(self, model_id: object) -> bool:
        """Whether ``model_id`` names this hub model's repository (:func:`same_hub_repo`)."""
        return self.source == "hub" and same_hub_repo(model_id, self.id, self.modality)

    def settled_revision(self, made: Mapping[str, Any] | None = None) -> str | None:
        """The revision as the rerun triggers spell it, given how this model's features on
        disk were made (``made``: the feature file's ``model_id``, ``revision``, the commit
        the weights came from, and ``requested_revision``, "" for none; None: no file yet).

        The revision asked for then when the configured one names the same weights: the
        commit they came from (pinning a model to it, as config.yaml invites, re-extracted it
        from identical weights: for the paper's 16 models, LLaMA-65B included) or, for
        ``"main"`` and none, the other (the download reads both as ``main``). Otherwise the
        configured revision. A file made again keeps the spelling, so this never flips.
        """
        if made is None or made.get("model_id") != self.settled_id(made):
            return self.revision
        asked = made.get("requested_revision") or None
        pinned = self.revision is not None and self.revision == made.get("revision")
        same_branch = {self.revision, asked} <= {None, "main"}
        return asked if pinned or same_branch else self.revision

    def feature_spec(self, made: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The fields that define this model's features: the extraction's rerun trigger.

        Labels, sizes, batch sizes, workers, GPUs and pickle permission change no feature, so
        editing them re-extracts nothing (docs/cluster.md, "What reruns"); nor does spelling
        the revision as the commit the features came from (``made``: :meth:`settled_revision`),
        or a local folder's path another way (:meth:`settled_id`).
        """
        spec: dict[str, Any] = {
            "modality": self.modality,
            "id": self.settled_id(made),
            "revision": self.settled_revision(made),
            "dtype": self.dtype,
        }
        if self.build is not None:
            spec["build"] = _plain(self.build)
        if self.modality == "language":
            spec["max_tokens"] = self.site.max_tokens
        if FEATURES_VERSION[self.modality] > 1:  # absent at 1: features made before it stand
            spec["features_version"] = FEATURES_VERSION[self.modality]
        return spec

    def differs_from(self, made: Mapping[str, Any]) -> list[str]:
        """Where the extraction a feature file records (``made``:
        :func:`xmodal.features.extraction_record`) differs from this entry's settings that
        define features (:meth:`feature_spec`), each as the config key, its value here and the
        file's; [] when the file is what this config would extract."""
        key = f"models.{self.key}"
        out = []
        if made["model_id"] != self.settled_id(made):
            out.append(f"{key}.id {self.id!r} (the file: {made['model_id']!r})")
        elif self.settled_revision(made) != (made["requested_revision"] or None):
            asked = made["requested_revision"] or None
            out.append(f"{key}.revision {self.revision!r} (the file: {asked!r})")
        want = _DTYPE_NAMES.get(self.dtype.lower(), self.dtype.lower())
        if want == "auto":  # a language model: decided on the device (compute_dtype)
            want = "bfloat16" if made["device"].startswith("cuda") else "float32"
        got = _DTYPE_NAMES.get(made["compute_dtype"].lower(), made["compute_dtype"])
        if got and got != want:  # (a file that records none is not judged)
            out.append(f"extraction.dtype {self.site.dtype!r}: {want} (the file: {got})")
        limit = self.site.max_tokens
        if self.modality == "language":
            length, source = made["max_length"], made["max_length_source"]
            # the limit the file was cut at, as this config would cut it: max_tokens itself, or
            # the model's shorter context (caption_token_limit; the default bound is 512, and
            # a max_tokens of 512 cuts a model without a context there too: review)
            fits = (
                source != "max_tokens"
                if limit is None
                else isinstance(length, int)
                and (length == limit or (source == "model context" and length < limit))
            )
            if not fits:
                out.append(
                    f"extraction.max_tokens {limit!r} (the file: {length!r} tokens, {source})"
                )
        if made["features_version"] < FEATURES_VERSION[self.modality]:
            out.append(
                f"features_version {FEATURES_VERSION[self.modality]} of this pipeline (the "
                f"file: {made['features_version']})"
            )
        return out

    def prefetch_spec(
        self,
        made: Mapping[str, Any] | None = None,
        recorded: Mapping[str, Any] | None = None,
        record: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What the download of this model depends on (repository and revision, as
        :meth:`settled_revision` spells it: a download run again schedules the extraction).

        The download record (``record``: its JSON) is one per model key, shared by every
        dataset of the project. ``recorded`` is the spec the record was last made with
        (Snakemake's record of that job); where this config names the same weights (the
        same repository, however its id is spelt, and the same revision, ``main`` for none,
        or the commit the record resolved to), that spec is kept. Each dataset's own
        spelling, from its feature file, would otherwise differ between two datasets whose
        features were made before and after the revision was pinned, and every switch between
        them downloaded the model again and re-extracted it (audit of two datasets in one
        project: pinned to the same commit).

        Where the record holds other weights than this config names, the spec is the
        configured revision, so that the download runs again: the settled spelling (none,
        for features made from ``main`` before the pin) could equal the record's own, and
        the extraction would load the record's other commit (audit of 2026-12-06: another
        dataset had downloaded ``main`` after it moved).
        """
        spec = {"modality": self.modality, "id": self.id, "revision": self.settled_revision(made)}
        if not recorded or not record or set(recorded) != set(spec):
            return spec
        before, resolved = recorded.get("revision"), record.get("revision")
        same_weights = (
            self.revision == before
            or {self.revision, before} <= {None, "main"}
            or (self.revision is not None and self.revision == resolved)
        )
        # the same repository spelt otherwise (timm/…) by another dataset's config is ours too:
        # else the datasets took turns downloading and re-extracting it (audit of 2026-12-07)
        ours = (
            recorded.get("modality") == self.modality
            and self.names_same_repo(recorded.get("id"))
            and self.names_same_repo(record.get("model_id"))
            and record.get("source") != "local"
        )
        if not ours:
            return spec
        return dict(recorded) if same_weights else {**spec, "revision": self.revision}

    @property
    def bytes_per_param(self) -> int:
        """Bytes per weight in GPU memory: 4 in float32 (vision models, or ``dtype: float32``),
        else 2 (bf16/fp16)."""
        return 4 if self.dtype in ("float32", "fp32") else 2

    def gpus(self) -> int:
        """GPUs of ``site.gpu_mem_gb`` that hold the weights (see :mod:`xmodal.resources`)."""
        return gpus_needed(
            self.size_b, self.site.gpu_mem_gb, self.site.gpus_per_node, self.bytes_per_param
        )

    def resources(self, attempt: int = 1, n_stimuli: int = 0) -> dict[str, Any]:
        """The extraction job's resources over ``n_stimuli`` stimuli: gpu, mem_mb, runtime,
        cpus_per_task (+ gpu_model)."""
        res: dict[str, Any] = extraction_resources(
            self.modality,
            self.size_b,
            attempt,
            gpu_mem_gb=self.site.gpu_mem_gb,
            num_workers=self.site.num_workers,
            max_gpus=self.site.gpus_per_node,
            bytes_per_param=self.bytes_per_param,
            n_stimuli=n_stimuli,
            batch_size=self.batch_size,
        )
        if self.site.gpu_model:
            res["gpu_model"] = str(self.site.gpu_model)
        return res


def _plain(value: Any) -> Any:
    """Mappings (also read-only ones) as plain dicts with sorted keys, recursively: for params
    and JSON (a job's params are recorded as their repr, so the order the config wrote the keys
    in would otherwise rerun the job)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({str(k): _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


class Registry(Mapping[str, ModelEntry]):
    """The models of a config, by key, in config order; built once with :meth:`from_config`."""

    def __init__(self, entries: Mapping[str, ModelEntry]) -> None:
        self._entries = dict(entries)

    def __getitem__(self, key: str) -> ModelEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"model {key!r} is not in the config's 'models'") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def vision(self) -> list[str]:
        """Vision model keys in config order."""
        return [k for k, e in self._entries.items() if e.modality == "vision"]

    @property
    def language(self) -> list[str]:
        """Language model keys in config order."""
        return [k for k, e in self._entries.items() if e.modality == "language"]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], base_dir: str | Path = ".") -> Registry:
        """Resolve every model of a (schema-validated) config.

        ``base_dir`` is where relative local directories are looked up (the working directory of
        the workflow). Raises :class:`ConfigError` naming the key for a model that cannot run: an
        ``hf-hub:…@rev`` id that contradicts its ``revision``, a path-like id that does not exist,
        or a model too large for the site's GPUs.
        """
        site = Site.from_config(config.get("extraction"))
        base = Path(base_dir)
        entries: dict[str, ModelEntry] = {}
        for i, (key, raw) in enumerate((config.get("models") or {}).items()):
            m = dict(raw)
            modality = str(m["modality"])
            model_id = str(m["id"])
            revision = m.get("revision")
            build = m.get("build")
            hub_repo = None
            if m.get("features") is not None:
                source = "supplied"
            elif build is not None:
                source = "built"
                if os.path.normpath(model_id) != built_model_dir(str(key)):
                    # the extraction loads `id`: a copied entry would read the original's weights
                    raise ConfigError(
                        f"config key 'models.{key}.id': a model with 'build' is built into "
                        f"{built_model_dir(str(key))}, so its id must be that folder, not "
                        f"{model_id!r} (its features would be another model's)"
                    )
                # the other modality's keys would be ignored: a vision model with arch: bloom
                # became a default MAE ViT
                wrong = sorted(set(build) & _BUILD_KEYS_OF_OTHER[modality])
                if wrong:
                    raise ConfigError(
                        f"config key 'models.{key}.build': {', '.join(wrong)} describe a "
                        f"{'language' if modality == 'vision' else 'vision'} model, and this one "
                        f"is a {modality} model (modality: {modality}); remove them or fix the "
                        "modality"
                    )
            elif (base / model_id).expanduser().is_dir():
                source = "local"
            elif _looks_like_path(model_id):
                raise ConfigError(
                    f"config key 'models.{key}.id': {model_id!r} looks like a local directory but "
                    f"does not exist (relative to {base.resolve()}); fix the path, or give a hub id"
                )
            else:
                source = "hub"
                hub_repo, pinned = hub_repo_of(model_id, modality)
                if pinned is not None:
                    if revision not in (None, pinned):
                        raise ConfigError(
                            f"config key 'models.{key}.revision': {revision!r} contradicts the "
                            f"revision {pinned!r} pinned in its id {model_id!r}; keep one"
                        )
                    revision = pinned
            if source != "hub" and revision is not None:
                # nothing reads it (the extraction only logged that it ignored it), and as a
                # feature-defining field a change re-extracted the model for nothing
                what = {"supplied": "a supplied feature file (features)", "built": "built by "
                        "the demo (build)", "local": f"a local folder ({model_id})"}[source]  # fmt: skip
                raise ConfigError(
                    f"config key 'models.{key}.revision': {revision!r} pins a hub commit, and "
                    f"this model is {what}: nothing would read it; remove it"
                )
            batch_size = m.get("batch_size", site.batch_size.get(modality))
            entries[key] = ModelEntry(
                key=str(key),
                modality=modality,
                id=model_id,
                revision=revision,
                size_b=float(m["size_b"]),
                label=str(m.get("label") or key),
                family=str(m.get("family") or ""),
                config_order=i,
                source=source,
                hub_repo=hub_repo,
                build=_freeze(build) if build is not None else None,
                batch_size=int(batch_size) if batch_size is not None else None,
                allow_pickle=bool(m.get("allow_pickle", site.allow_pickle)),
                site=site,
                features=str(m["features"]) if m.get("features") is not None else None,
            )
        _check_labels(entries)
        registry = cls(_with_plot_order(entries))
        registry.check_fits()
        return registry

    def check_fits(self) -> None:
        """Raise :class:`ConfigError` for a model that no node's GPUs can hold, or a vision
        model that one GPU cannot hold (vision extraction uses one GPU); models whose features
        are supplied are not extracted, and not checked."""
        for e in self.values():
            if e.source == "supplied":  # imported, never extracted: no GPU to fit on
                continue
            need = gpu_memory_needed_gb(e.size_b, e.bytes_per_param)
            if e.modality == "vision" and need > GPU_USABLE_FRACTION * e.site.gpu_mem_gb:
                raise ConfigError(
                    f"config key 'models.{e.key}': a vision model runs on one GPU (timm models "
                    f"are not spread over several), but it needs about {need:.1f} GB of GPU "
                    f"memory (dtype {e.dtype}, size_b {e.size_b}, with activations), more than "
                    f"the {GPU_USABLE_FRACTION:.0%} of 'extraction.gpu_mem_gb: "
                    f"{e.site.gpu_mem_gb}' one GPU offers. "
                    "Check the model's size_b, set extraction.gpu_mem_gb to your GPUs' memory, "
                    "set extraction.dtype: bfloat16 (half the memory; it changes every model's "
                    "features), or remove the model"
                )
            try:
                e.gpus()
            except ValueError as err:
                site = e.site
                offered = GPU_USABLE_FRACTION * site.gpu_mem_gb * site.gpus_per_node
                raise ConfigError(
                    f"config key 'models.{e.key}': {err}. The model needs about {need:.1f} GB of "
                    f"GPU memory (dtype {e.dtype}, size_b {e.size_b}, with activations), more "
                    f"than the {offered:.1f} GB that 'extraction.gpus_per_node: "
                    f"{site.gpus_per_node}' GPUs of 'extraction.gpu_mem_gb: {site.gpu_mem_gb}' "
                    f"offer ({GPU_USABLE_FRACTION:.0%} of each). Check the model's size_b, set "
                    "extraction.gpu_mem_gb to your GPUs' memory and extraction.gpus_per_node to "
                    "the GPUs of your largest node, or remove the model"
                ) from None

    def duplicate_ids(
        self, resolved: Mapping[str, str | None] | None = None
    ) -> list[tuple[str, str, str]]:
        """Pairs of keys that name the same weights (same hub repository and revision, or the
        same local directory): ``(first key, second key, what they share)``. ``resolved``: the
        commit each hub model's download resolved its revision to, where known (its prefetch
        record), so that a revision left as main and the commit main resolved to are one."""
        seen: dict[tuple, tuple[str, str]] = {}
        out = []
        for e in self.values():
            # what names the weights: a hub model by the revision as written and, once
            # downloaded, by the commit it resolved to (a key copied before its download)
            if e.source == "hub":
                revs = [e.revision or "main", (resolved or {}).get(e.key)]
                idents = {
                    ("hub", e.hub_repo, r): f"hub repository {e.hub_repo} at revision {r}"
                    for r in dict.fromkeys(revs)
                    if r
                }
            elif e.source == "local":
                idents = {
                    ("local", str(Path(e.id).expanduser().resolve())): f"local directory {e.id}"
                }
            elif e.source == "supplied":
                idents = {
                    ("supplied", str(Path(str(e.features)).expanduser().resolve())): (
                        f"supplied feature file {e.features}"
                    )
                }
            else:
                idents = {
                    ("built", repr(_plain(e.build)), e.modality): "the same demo build settings"
                }
            shared = next((seen[i] for i in idents if i in seen), None)
            if shared:
                out.append((shared[0], e.key, shared[1]))
            for ident, what in idents.items():
                seen.setdefault(ident, (e.key, what))
        return out

    def table(self) -> pd.DataFrame:
        """``models.tsv``: model, modality, label, family, size_b, order (figures read it)."""
        rows = [
            {
                "model": e.key,
                "modality": e.modality,
                "label": e.label,
                "family": e.family,
                "size_b": e.size_b,
                "order": e.order,
            }
            for e in sorted(self.values(), key=lambda e: e.order)
        ]
        return pd.DataFrame(
            rows, columns=["model", "modality", "label", "family", "size_b", "order"]
        )


def _check_label_math(key: str, label: str) -> None:
    """Raise :class:`ConfigError` when ``label`` has math that the figures cannot typeset.

    matplotlib typesets the text between two unescaped ``$`` as mathtext (an even number of
    them, ``matplotlib.cbook.is_math_text``): ``$\\alpha$-CLIP`` draws an α, and mathtext it
    cannot parse (``$\\frac{$``) stopped every figure job naming the label, after every
    extraction. Parsed here, at start-up, only for labels that have such ``$``."""
    dollars = label.count("$") - label.count("\\$")
    if dollars == 0 or dollars % 2:
        return
    from matplotlib.mathtext import MathTextParser

    fonts = logging.getLogger("matplotlib.font_manager")  # findfont falls back, noisily
    level = fonts.level
    fonts.setLevel(logging.ERROR)
    try:
        MathTextParser("path").parse(label)
    except ValueError as err:
        why = str(err).strip().splitlines()[-1]
        raise ConfigError(
            f"config key 'models.{key}.label': {label!r} has text between two $ signs, which "
            f"figures typeset as math, and it is not math they can typeset "
            f"({why[:160]}{' …' if len(why) > 160 else ''}); fix it, or write \\$ for a "
            "dollar sign"
        ) from None
    finally:
        fonts.setLevel(level)


def _check_labels(entries: Mapping[str, ModelEntry]) -> None:
    """Raise :class:`ConfigError` when two models of one modality share a label (``label``, or
    the key where none is given): figures name models by label, so one would stand for both;
    when a label or family holds a tab or line break, or ``</`` or ``<!--``; or when a label's
    math cannot be typeset (:func:`_check_label_math`)."""
    seen: dict[tuple[str, str], str] = {}
    for e in entries.values():
        for name, text in (("label", e.label), ("family", e.family)):
            if any(c in text for c in "\t\r\n"):  # the models table's cells hold one line
                raise ConfigError(
                    f"config key 'models.{e.key}.{name}': {text!r} holds a tab or line break, "
                    "which a table cell cannot hold (YAML's '>' and '|' styles end the text "
                    "with a line break: write '>-', or the text on the key's line)"
                )
            if "</" in text or "<!--" in text:
                # the report (snakemake --report) embeds the jobs' params, labels among them, in
                # a <script> block without escaping: "</script>" there ends it and breaks the
                # whole report, with exit 0 (audit)
                raise ConfigError(
                    f"config key 'models.{e.key}.{name}': {text!r} holds '</' or '<!--', which "
                    "would end the data the HTML report embeds in a script and break the whole "
                    "report; write it without them"
                )
        _check_label_math(e.key, e.label)
        other = seen.setdefault((e.modality, e.label), e.key)
        if other != e.key:
            raise ConfigError(
                f"config key 'models.{e.key}.label': {e.label!r} is also the label of {e.modality} "
                f"model {other!r}; figures and tables name models by label, so give each its own"
            )


def _with_plot_order(entries: Mapping[str, ModelEntry]) -> dict[str, ModelEntry]:
    """Plotting order: vision models in config order, then language models grouped by family
    (families in order of first appearance) and by size within a family."""
    family_rank: dict[str, int] = {}
    for e in entries.values():
        family_rank.setdefault(e.family, len(family_rank))

    def sort_key(e: ModelEntry) -> tuple:
        if e.modality == "vision":
            return (0, 0, 0.0, e.config_order)
        size = e.size_b if math.isfinite(e.size_b) else math.inf
        return (1, family_rank[e.family], size, e.config_order)

    ranked = sorted(entries.values(), key=sort_key)
    order = {e.key: i for i, e in enumerate(ranked)}
    return {k: replace(e, order=order[k]) for k, e in entries.items()}
