"""The HDF5 feature store: one file per model, layers × stimuli × dims.

Layout (``schema_version`` 1, see docs/contracts.md "Feature file"):

- ``features``: ``(n_layers, m, dim)`` float32 (float16 optional), one layer per chunk;
- ``stimulus_ids``: ``(m,)`` utf-8; ``layer_names``: ``(n_layers,)`` utf-8;
- ``abs_q95``: ``(m,)`` float32, per stimulus the 95th percentile (linear interpolation, as
  ``torch.quantile``) of ``|x|`` over all its layers and dims — the input of the alignment
  preprocessing's clamp threshold;
- ``n_tokens`` (optional, language models): ``(m,)`` int32, the tokens each caption's features are
  the mean over (special tokens included, after truncation); files without it stay valid;
- provenance attributes (model id and key, modality, source, resolved revision, pooling, compute
  dtype, preprocessing, library versions, creation time).

Files are written under a temporary name and renamed into place, so a killed job never leaves a
plausible-looking file. Readers load one layer at a time and check ids, shapes and finiteness.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

if TYPE_CHECKING:
    import torch  # imported where used: reading a feature file needs no torch

from xmodal.io import atomic_path, directory_digest, remove_stale_temporaries
from xmodal.logs import preview, redact

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
Q = 0.95
_MAX_CHUNK_BYTES = 1 << 30  # HDF5 chunks must stay below 4 GiB; keep them at most 1 GiB
_QUANTILE_BLOCK = 1 << 24  # elements per block when computing abs_q95 from a file
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Why a stimulus's row of zeros is refused (xmodal.features.FeatureFile.finite_layer).
_ZERO_ROWS = (
    " (features never written, or a representation in which these stimuli have no features "
    "at all, such as a caption with no known word: the alignment needs a nonzero row for every "
    "stimulus)"
)
#: What to do about a feature file that cannot be used as it is.
REEXTRACT = (
    "delete it and rerun the workflow (Snakemake then re-extracts only this model), or, for a "
    "file you supplied, rewrite it following docs/contracts.md"
)

#: The attribute that records what an extraction read: the ``sha256`` of the manifest stamp
#: of its modality (xmodal.stimuli.manifest_stamp), absent from files written before it.
STIMULI_DIGEST = "stimuli_sha256"
#: The attribute that records the weights a local model's extraction loaded: the digest of its
#: folder's files (xmodal.io.directory_digest), absent for hub models and older files.
WEIGHTS_DIGEST = "weights_sha256"

__all__ = [
    "SCHEMA_VERSION",
    "STIMULI_DIGEST",
    "WEIGHTS_DIGEST",
    "FeatureFile",
    "FeatureFileError",
    "abs_quantile_rows",
    "check_against_stamp",
    "check_against_weights",
    "clamp_threshold",
    "extracted_under",
    "feature_shape",
    "import_features",
    "made_with",
    "vision_block_names",
    "write_features",
]


class FeatureFileError(ValueError):
    """A feature file is missing, malformed, non-finite or does not match the stimuli."""


def feature_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(layers, stimuli, features per stimulus) of a feature file, from its header alone;
    FileNotFoundError when there is none, FeatureFileError naming it when it is unreadable."""
    if not Path(path).is_file():
        raise FileNotFoundError(errno.ENOENT, "no feature file", str(path))
    try:
        with h5py.File(path, "r") as f:
            n_layers, m, dim = (int(n) for n in f["features"].shape)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise FeatureFileError(f"{path}: cannot read its shape ({err})") from err
    return n_layers, m, dim


def made_with(path: str | os.PathLike) -> dict[str, str] | None:
    """How a feature file's model was loaded: its ``model_id``, ``revision`` (the commit the
    weights came from) and ``requested_revision`` ("" for none); None without a readable
    file (the extraction then makes one)."""
    made = extraction_record(path)
    names = ("model_id", "revision", "requested_revision")
    return None if made is None else {k: made[k] for k in names}


def extraction_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """What a feature file records of the settings that defined its features: :func:`made_with`'s
    fields, ``compute_dtype``, ``device``, ``features_version`` (1 where absent) and the
    captions' token limit (``max_length``, None for a vision model, and its
    ``max_length_source``); None without a readable file."""
    names = ("model_id", "revision", "requested_revision", "compute_dtype", "device")
    got = _stored_texts(path, (*names, "features_version", "preprocessing"))
    if got is None:
        return None
    try:
        tokenizer = json.loads(got["preprocessing"] or "{}").get("tokenizer") or {}
        version = int(got["features_version"] or 1)
    except (ValueError, TypeError, AttributeError):
        tokenizer, version = {}, 1
    return {
        **{k: got[k] or "" for k in names},
        "features_version": version,
        "max_length": tokenizer.get("max_length"),
        "max_length_source": tokenizer.get("max_length_source") or "",
    }


def vision_block_names(n_blocks: int) -> list[str]:
    """A ViT's layer names in a feature file: ``blocks.0`` … ``blocks.{n_blocks-1}``."""
    return [f"blocks.{i}" for i in range(n_blocks)]


def _holds_token(text: str) -> bool:
    """True when ``text`` contains a Hugging Face access token (xmodal.logs.redact finds them)."""
    return redact(text) != text


def abs_quantile_rows(x: torch.Tensor | np.ndarray, q: float = Q) -> torch.Tensor:
    """Per row of ``x`` (rows = stimuli), the ``q``-quantile of ``|x|`` over everything else.

    Linear interpolation between order statistics, exactly as ``torch.quantile`` (default
    ``interpolation='linear'``), computed in float32 by selecting the two order statistics, so it
    has no input-size limit.
    Returns a float32 tensor of shape ``(rows,)`` on ``x``'s device.
    """
    import torch

    t = torch.as_tensor(x)
    t = t.reshape(t.shape[0], -1).abs().float()
    n = t.shape[1]
    if n == 0:
        raise ValueError("abs_quantile_rows: rows have no elements")
    pos = q * (n - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, n - 1)
    # the two order statistics by selection, not a full sort: the same values; sorting every
    # batch's rows cost BLOOM-7b1's extraction a fifth of its rate on an H200 (docs/cluster.md)
    s_lo = torch.kthvalue(t, lo + 1, dim=1).values
    s_hi = s_lo if hi == lo else torch.kthvalue(t, hi + 1, dim=1).values
    # a Python weight: a tensor made on a GPU from a host number would wait for the GPU's queue
    return torch.lerp(s_lo, s_hi, float(pos - lo))


def library_version(name: str) -> str:
    """The installed version of library ``name`` ("" if it is not installed). torch's is its
    build's, as the module says (``2.14.1+cu130``: PyPI's CUDA wheels leave the ``+cu130`` out
    of the package's version, ``2.14.1``, so that it did not say which build made a file),
    read from ``torch/version.py`` where torch is not loaded (loading it takes seconds)."""
    import importlib.metadata as md
    import importlib.util

    if name == "torch":
        if (module := sys.modules.get("torch")) is not None:  # None: its import is blocked
            return str(module.__version__)
        with contextlib.suppress(AttributeError, ImportError, ValueError, OSError, TypeError):
            origin = importlib.util.find_spec("torch").origin  # finds, does not import it
            text = (Path(origin).parent / "version.py").read_text(encoding="utf-8")
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, flags=re.M)
            if found:
                return found[1]
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return ""


def _library_versions() -> dict[str, str]:
    versions = {
        name: library_version(name)
        for name in ("xmodal", "torch", "timm", "transformers", "h5py", "numpy")
    }
    return {name: version for name, version in versions.items() if version}


def _attr_value(value: Any) -> Any:
    """HDF5 attributes take scalars and strings; dicts/lists go in as JSON strings."""
    if value is None:
        return ""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, Path):
        return str(value)
    return value


def _check_stored(
    path: str | os.PathLike,
    given: np.ndarray,
    stored: np.ndarray,
    layer: int,
    name: str,
    ids: Sequence[str],
    check_finite: bool,
) -> None:
    """FeatureFileError naming the layer and stimuli when ``stored`` (``given`` cast to the
    file's dtype) holds non-finite values (``check_finite``): NaN or Inf given, or finite
    values too large for the dtype; or a row of ``given`` that the cast turned to zeros (too
    small for it). Both were written as "non-finite features" or without a word, and read back
    as all-zero features "never written" (audit)."""
    where = f"{path}: layer {layer} ({name!r})"
    rows = np.flatnonzero(~np.isfinite(stored).all(axis=1)) if check_finite else []
    if len(rows):
        too_large = rows[np.isfinite(given[rows]).all(axis=1)]
        if too_large.size:
            raise FeatureFileError(
                f"{where}: features too large for {stored.dtype} storage (at most "
                f"{np.finfo(stored.dtype).max:g} in magnitude) for stimuli "
                f"{preview([ids[j] for j in too_large])}; write them as float32"
            )
        raise FeatureFileError(
            f"{where}: non-finite features for stimuli {preview([ids[j] for j in rows])}"
        )
    if stored.dtype != given.dtype:
        gone = np.flatnonzero(~stored.any(axis=1) & given.any(axis=1))
        if gone.size:
            raise FeatureFileError(
                f"{where}: features too small for {stored.dtype} storage turned to zeros (its "
                f"smallest magnitude is {np.finfo(stored.dtype).smallest_subnormal:g}) for "
                f"stimuli {preview([ids[j] for j in gone])}; write them as float32"
            )


def write_features(
    path: str | os.PathLike,
    features: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
    stimulus_ids: Sequence[str],
    layer_names: Sequence[str],
    attrs: Mapping[str, Any],
    *,
    abs_q95: np.ndarray | torch.Tensor | None = None,
    n_tokens: np.ndarray | Sequence[int] | None = None,
    dtype: str | np.dtype = "float32",
    check_finite: bool = True,
) -> Path:
    """Write one model's features to ``path`` atomically (temporary name, then rename).

    ``features`` is an ``(n_layers, m, dim)`` array or an iterable of per-layer ``(m, dim)``
    arrays (so a caller never needs all layers at once). ``abs_q95`` is computed here when not
    given (from the array, or block-wise from the written file). ``n_tokens`` (language models:
    tokens per caption) is stored as the optional dataset ``n_tokens`` when given. Non-finite
    values, duplicate ids or inconsistent shapes raise :class:`FeatureFileError` and leave no
    file at ``path``.
    ``schema_version``, ``created`` and ``library_versions`` are filled in unless given.
    ``check_finite=False`` skips the finiteness scan (for callers that already checked).
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float16):
        raise FeatureFileError(f"{path}: features dtype must be float32 or float16, not {dtype}")
    ids = [str(s) for s in stimulus_ids]
    names = [str(s) for s in layer_names]
    m, n_layers = len(ids), len(names)
    if len(set(ids)) != m:
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise FeatureFileError(f"{path}: duplicate stimulus ids {preview(dup)}")
    if n_layers == 0 or m == 0:
        raise FeatureFileError(f"{path}: need at least one layer and one stimulus")
    tokens = None if n_tokens is None else _token_counts(path, n_tokens, m)

    if isinstance(features, np.ndarray) or _is_tensor(features):
        if tuple(features.shape[:2]) != (n_layers, m) or features.ndim != 3:
            raise FeatureFileError(
                f"{path}: features have shape {tuple(features.shape)}, expected "
                f"({n_layers}, {m}, dim) for {n_layers} layer names and {m} stimulus ids"
            )
        if abs_q95 is None:
            import torch

            t = torch.as_tensor(features)
            abs_q95 = torch.cat(
                [
                    abs_quantile_rows(t[:, i : i + 256].to(torch.float32).transpose(0, 1))
                    for i in range(0, m, 256)
                ]
            )
        layer_iter: Iterable = (features[i] for i in range(n_layers))
    else:
        layer_iter = features

    full_attrs = {
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "library_versions": _library_versions(),
        **dict(attrs),
    }
    for key, value in full_attrs.items():
        if _holds_token(f"{key} {_attr_value(value)}"):
            raise FeatureFileError(
                f"{path}: attribute {key!r} looks like it holds an access token; tokens are "
                "read from the environment (HF_TOKEN) and never written to feature files"
            )

    remove_stale_temporaries(path)  # left by a killed earlier write of this file
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            dset = None
            count = 0
            for i, layer in enumerate(layer_iter):
                arr = _as_numpy(layer)
                if i >= n_layers:
                    raise FeatureFileError(f"{path}: more layers than the {n_layers} layer names")
                if arr.ndim != 2 or arr.shape[0] != m:
                    raise FeatureFileError(
                        f"{path}: layer {i} ({names[i]!r}) has shape {arr.shape}, expected ({m}, dim)"
                    )
                if dset is None:
                    dim = arr.shape[1]
                    rows = max(1, min(m, _MAX_CHUNK_BYTES // max(1, dim * dtype.itemsize)))
                    # checksummed chunks: bytes damaged on disk are a read error naming the
                    # layer, not features analysed as they are (8 flipped bytes made one
                    # stimulus the most dispersed, exit 0; audit)
                    dset = f.create_dataset(
                        "features",
                        shape=(n_layers, m, dim),
                        dtype=dtype,
                        chunks=(1, rows, dim),
                        fletcher32=True,
                    )
                elif arr.shape[1] != dset.shape[2]:
                    raise FeatureFileError(
                        f"{path}: layer {i} ({names[i]!r}) has dim {arr.shape[1]}, "
                        f"layer 0 has {dset.shape[2]}"
                    )
                stored = arr.astype(dtype, copy=False)
                _check_stored(path, arr, stored, i, names[i], ids, check_finite)
                dset[i] = stored
                dim = dset.shape[2]
                count += 1
            if count != n_layers:
                raise FeatureFileError(f"{path}: got {count} layers for {n_layers} layer names")
            str_dt = h5py.string_dtype("utf-8")
            f.create_dataset("stimulus_ids", data=np.array(ids, dtype=object), dtype=str_dt)
            f.create_dataset("layer_names", data=np.array(names, dtype=object), dtype=str_dt)
            if abs_q95 is None:
                abs_q95 = _abs_q95_from_dataset(dset)
            q = _as_numpy(abs_q95).astype(np.float32).reshape(-1)
            if q.shape != (m,) or not np.isfinite(q).all():
                raise FeatureFileError(f"{path}: abs_q95 must be {m} finite values")
            f.create_dataset("abs_q95", data=q, chunks=True, fletcher32=True)
            if tokens is not None:
                f.create_dataset("n_tokens", data=tokens, chunks=True, fletcher32=True)
            for key, value in full_attrs.items():
                f.attrs[key] = _attr_value(value)
    log.info("wrote %s: %d layers x %d stimuli x %d dims", path, n_layers, m, dim)
    return path


def _stored_texts(path: str | os.PathLike, names: Iterable[str]) -> dict[str, str | None] | None:
    """A feature file's text attributes ``names`` (None where absent); None if the file is
    missing or unreadable (the steps that read it name it)."""
    try:
        with h5py.File(path, "r") as f:
            values = {name: f.attrs.get(name) for name in names}
    except (OSError, ValueError):
        return None
    return {
        name: None if v is None else v.decode() if isinstance(v, bytes) else str(v)
        for name, v in values.items()
    }


def _stored_text(path: str | os.PathLike, name: str) -> str | None:
    """A feature file's text attribute ``name``; None if absent, or if the file is missing or
    unreadable."""
    return (_stored_texts(path, (name,)) or {}).get(name)


def extracted_under(paths: Iterable[str | os.PathLike], digests: Iterable[str]) -> list[Path]:
    """The feature files of ``paths`` extracted from the stimuli of one of the manifest stamp
    digests ``digests`` (their :data:`STIMULI_DIGEST`); missing or unreadable files are not."""
    want = set(digests)
    return [Path(p) for p in paths if _stored_text(p, STIMULI_DIGEST) in want]


#: How to replace a stale feature file. Deleted alone it is not made again: Snakemake does not
#: rebuild an intermediate file while what was made from it is up to date.
REMAKE = (
    "delete it and make it again by naming it: `snakemake <your options> -- {path}`, then run as "
    "before (what was made from it reruns)"
)


def check_against_stamp(
    paths: Iterable[str | os.PathLike],
    stamp: str | os.PathLike,
    *,
    run_started: float | None = None,
) -> None:
    """Refuse a feature file extracted from other stimuli than ``stamp`` (a manifest stamp,
    docs/contracts.md) describes now, when the file is not older than the stamp.

    The workflow re-extracts a model when its stamp is newer than its feature file; a stale file
    that is newer (touched with ``snakemake --touch``, or copied in) would be analysed as it is.
    ``run_started`` (a time, seconds since the epoch): the check at the end of a run, against
    the stamp the run started with. A file that differs and that this run wrote (its
    ``created`` time not before the run's start, less a minute for a compute node's clock)
    was extracted after the manifest (or an image) was edited during the run, and the run's
    tables mix the stimuli before and after the edit (audit); one the run did not write (it
    was touched, by ``--touch``) is named as stale.
    Missing files, a missing stamp, files of the other modality (the config changed the model's
    modality, a changed param) and files without :data:`STIMULI_DIGEST` (written before it
    existed) are not checked.
    """
    from xmodal.stimuli import BEFORE

    stamp = Path(stamp)
    try:
        record = json.loads(stamp.read_text(encoding="utf-8"))
        want, since = record["sha256"], stamp.stat().st_mtime_ns
        # a stamp carried over from an earlier form keeps that form's digest (same stimuli)
        accepted = {want, record.get(BEFORE, want)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return
    for path in map(Path, paths):
        try:
            if path.stat().st_mtime_ns < since:
                continue  # the workflow re-extracts it
        except OSError:
            continue  # missing: the workflow extracts it
        # the attributes read in one open of the file
        stored = _stored_texts(path, ("modality", STIMULI_DIGEST, "created")) or {}
        if stored.get("modality") not in (None, record.get("modality")):
            # the config changed the model's modality: that is a changed param, and the workflow
            # re-extracts it (its readers refuse a file of the other modality)
            continue
        got = stored.get(STIMULI_DIGEST)
        if got is None or got in accepted:
            continue
        if _written_since(stored, run_started):
            raise FeatureFileError(
                f"{path} was extracted from other stimuli than this run started with (digest "
                f"{got[:12]}…, where {stamp} says {want[:12]}…): the manifest or an image "
                "changed while the run was going, and the tables it made may mix the stimuli "
                "before and after the edit. Run again: Snakemake re-extracts the models the "
                "edit concerns and makes the tables again. Edit the stimuli only between runs "
                "(docs/cluster.md)"
            )
        raise FeatureFileError(
            f"{path} holds features of other stimuli than the manifest now lists: it was "
            f"extracted from stimuli with digest {got[:12]}…, and {stamp} says "
            f"{want[:12]}…. The file is not older than that stamp, so Snakemake would "
            f"not re-extract it (was it touched with `snakemake --touch`, or copied in?); "
            f"{REMAKE.format(path=path)}"
        )


def _written_since(stored: Mapping[str, str | None], started: float | None) -> bool:
    """Whether a feature file's ``created`` time is not before ``started`` (less a minute for a
    compute node's clock); False without a time or an unreadable ``created``."""
    if started is None or not stored.get("created"):
        return False
    try:
        created = _dt.datetime.fromisoformat(str(stored["created"])).timestamp()
    except ValueError:
        return False
    return created >= started - 60


def check_against_weights(
    path: str | os.PathLike, folder: str | os.PathLike, cache: str | os.PathLike | None = None
) -> None:
    """Refuse a feature file extracted from other weights than the local model ``folder`` holds
    now (its files rewritten in place, as by a later training run): the workflow does not track
    a local model's files, so it would analyse the file as it is. A missing feature file, or one
    without :data:`WEIGHTS_DIGEST`, is not checked; ``cache`` as in xmodal.io.file_digests."""
    got = _stored_text(path, WEIGHTS_DIGEST)
    folder = Path(folder).expanduser()
    if got is None or not folder.is_dir():
        return
    now = directory_digest(folder, cache)
    if got != now:
        raise FeatureFileError(
            f"{path} was extracted from other weights than {folder} holds now (digest "
            f"{got[:12]}…, now {now[:12]}…): its files changed since (trained again, or replaced "
            f"in place?), which Snakemake does not track; {REMAKE.format(path=path)}"
        )


#: Attributes of a feature file that are one line of text (the provenance table copies them
#: into its cells, which hold no tab or line break).
ONE_LINE_ATTRS = ("model_id", "model_key", "modality", "source", "revision",
                  "requested_revision", "compute_dtype", "device", "pooling", "created", "label",
                  "family", "weights_sha256", "stimuli_sha256")  # fmt: skip


def _check_text_attrs(path: Path, attrs: Mapping[str, Any]) -> None:
    """Refuse a supplied file's text attribute that its copy or the provenance table cannot
    hold: a NUL in any (HDF5 text cannot), a tab or line break in :data:`ONE_LINE_ATTRS` (a
    trailing newline from a text file passed the import, and the provenance job failed after
    the whole analysis naming neither file nor attribute)."""
    for name, value in attrs.items():
        if not isinstance(value, str):
            continue
        if "\x00" in value:
            what = "a NUL character"
        elif name in ONE_LINE_ATTRS and any(c in value for c in "\t\r\n"):
            what = "a tab or line break"
        else:
            continue
        raise FeatureFileError(
            f"{path}: attribute {name!r} ({value[:60]!r}) holds {what}; write it as one line "
            "of text (a value read from a text file keeps its final line break)"
        )


def import_features(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    model_key: str,
    modality: str,
    stimulus_ids: Sequence[str] | None = None,
    dropped: Collection[str] = (),
) -> Path:
    """Check a feature file the user supplies (config key ``models.<key>.features``) and write a
    self-contained copy to ``dst`` atomically (docs/contracts.md, "Feature file").

    Checked: its structure, its ids (equal to ``stimulus_ids`` up to order, when given; ids in
    ``dropped``, the duplicates ``stimuli.drop_duplicates`` leaves out, may be there too and are
    left out of the copy), every layer finite, and its ``modality`` attribute against the
    config, and its ``model_key`` against the config key (absent: set to it in the copy). The
    copy holds the rows in the order of ``stimulus_ids``, its own data (not HDF5
    links to other files, which could change unseen), ``abs_q95`` recomputed from the features
    (a supplied value is never trusted: it sets the alignment's clamp threshold) and the file's
    attributes. Raises :class:`FeatureFileError` naming the config key and the file.
    """
    src = Path(src)
    where = f"config key 'models.{model_key}.features'"
    try:
        with FeatureFile(src) as ff:
            attrs = ff.attrs
            got = attrs.get("modality")
            if not isinstance(got, str) or got != modality:
                holds = "has no 'modality' attribute" if got is None else (
                    f"holds {got!r} features (its 'modality' attribute)"
                )  # fmt: skip
                raise FeatureFileError(
                    f"{src} {holds}, but the config says 'models.{model_key}.modality: {modality}'"
                )
            _check_text_attrs(src, attrs)
            made_for = attrs.setdefault("model_key", model_key)  # absent: the config's key
            if not isinstance(made_for, str) or made_for != model_key:  # refused later else
                raise FeatureFileError(
                    f"{src} says it holds the features of model_key={made_for!r} (its "
                    f"'model_key' attribute), not of {model_key!r}: another model's file? Point "
                    "the config key at this model's file, or set the attribute to the key"
                )
            keep = None if stimulus_ids is None else [str(s) for s in stimulus_ids]
            if keep is not None:
                drop = set(map(str, dropped)) - set(keep)
                ff._match_ids(keep + [s for s in ff.stimulus_ids if s in drop])
            n = ff.m if keep is None else len(keep)
            names, tokens = ff.layer_names, ff.n_tokens()
            stored = ff._f["features"].dtype
            with ff._reading("'abs_q95'"):
                supplied_q = (
                    np.asarray(ff._f["abs_q95"][()], np.float32) if "abs_q95" in ff._f else None
                )
            if supplied_q is not None and ff._order is not None:
                supplied_q = supplied_q[ff._order]
            # what the file itself records, or nothing: the provenance table must not show the
            # importer's time and libraries as the extraction's
            told = {k: attrs.get(k, "") for k in ("created", "library_versions")}
            write_features(
                dst,
                (_written_layer(ff, i)[:n] for i in range(ff.n_layers)),
                keep if keep is not None else ff.stimulus_ids,
                names,
                {**attrs, **told, "imported_from": str(src.resolve())},
                n_tokens=None if tokens is None else tokens[:n],
                # any byte order: np.dtype(">f2") == np.float16 is False
                dtype="float16" if stored.kind == "f" and stored.itemsize == 2 else "float32",
                check_finite=False,  # finite_layer checked each layer, naming the stimuli
            )
    except FeatureFileError as err:
        raise FeatureFileError(f"{where}: {err}") from None
    with FeatureFile(dst) as out:
        q = out.abs_q95()
    try:
        clamp_threshold(src, q)
    except FeatureFileError as err:
        Path(dst).unlink()
        raise FeatureFileError(f"{where}: {err}") from None
    if supplied_q is not None:
        a = supplied_q[:n].astype(np.float64)
        off = ~np.isclose(a, q, rtol=1e-3, atol=0.0)  # a NaN or inf value differs too
        if off.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.maximum(a[off] / q[off], q[off] / a[off])
            finite = ratio[np.isfinite(ratio)]
            how = [f"by a factor up to {finite.max():.3g}"] if finite.size else []
            if finite.size < ratio.size:
                how.append(f"{ratio.size - finite.size} not finite or 0")
            log.warning(
                "%s: its abs_q95 differs from the features' for %d of %d stimuli (%s); the copy "
                "holds the values recomputed from the features, which set the alignment's clamp "
                "threshold (docs/method.md, 'Alignment')",
                src,
                int(off.sum()),
                n,
                ", ".join(how),
            )
    blocks = vision_block_names(len(names))
    if modality == "vision" and names != blocks:  # analysis.vision_layer counts from the end
        log.warning(
            "%s: its layers are named %s, not %s as extraction names a ViT's blocks; "
            "analysis.vision_layer counts from the end of the file's layers, so check that they "
            "are the model's blocks in order, with no embeddings or head after the last block",
            src,
            preview(names),
            preview(blocks),
        )
    log.info("imported %s as %s (model %s, %d stimuli)", src, dst, model_key, n)
    return Path(dst)


def _written_layer(ff: FeatureFile, i: int) -> np.ndarray:
    """Layer ``i`` of a supplied file, checked as :meth:`FeatureFile.finite_layer`, and refused
    when it is zero for every stimulus: no extraction gives such a layer, while a writer killed
    before it, or a virtual dataset whose source file is missing, leaves one that reads as
    zeros; its zeros would also lower the clamp threshold of every other layer (docs/method.md,
    "Alignment")."""
    x = ff.finite_layer(i)
    if not x.any():
        raise FeatureFileError(
            f"{ff.path}: layer {i} ({ff.layer_names[i]!r}) is 0 for every stimulus: never "
            "written (the program writing the file stopped before it?), or read through a "
            "virtual dataset whose source file is missing. Write the file again; a layer that "
            "truly is zero has nothing to align, so leave it out of the file"
        )
    return x


def clamp_threshold(path: str | os.PathLike, abs_q95: np.ndarray) -> float:
    """The alignment's outlier clamp threshold t of the features at ``path``, from their
    ``abs_q95`` (docs/method.md, "Alignment"); a :class:`FeatureFileError` naming ``path`` when
    t is 0, which would clamp every value to 0."""
    from xmodal.metrics import threshold_from_quantiles

    t = threshold_from_quantiles(abs_q95)
    if not t > 0:
        raise FeatureFileError(
            f"{path}: for every stimulus at least 95% of the feature values are 0 (sparse "
            "features, or values below float32's range, in which the features are read), so "
            "the outlier clamp's threshold (the mean over stimuli of each stimulus's 95th "
            "percentile of |x|, docs/method.md, 'Alignment') is 0 and would set every value to 0"
        )
    return t


def _texts(path: Path, name: str, values: np.ndarray) -> list[str]:
    """A dataset of names (``stimulus_ids``, ``layer_names``) as text; bytes must be UTF-8."""
    out = []
    for v in values:
        try:
            out.append(v.decode() if isinstance(v, bytes) else str(v))
        except UnicodeDecodeError as err:
            raise FeatureFileError(
                f"{path}: {name!r} entry {len(out)} ({v!r}) is not UTF-8 text ({err}); write "
                "the names as UTF-8 strings (h5py.string_dtype())"
            ) from None
    return out


def _whole_number(value: Any) -> int | None:
    """An attribute as a whole number: an integer, a float with no fraction (MATLAB and R
    write doubles), either as a one-element array, or decimal digits; None otherwise."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        return None
    return int(value) if float(value).is_integer() else None


def _nfc(ids: Sequence[str]) -> set[str]:
    return {unicodedata.normalize("NFC", s) for s in ids}


def _twin(id_: str, others: Sequence[str], key: Callable[[str], Any]) -> str:
    """The first of ``others`` that ``key`` maps where it maps ``id_`` (the id as the other
    side writes it, for an example in a message)."""
    return next((s for s in others if key(s) == key(id_)), others[0])


def _as_numbers(ids: Sequence[str]) -> list[float] | None:
    """The ids as numbers, sorted; None when one of them is not written as a number."""
    from xmodal.config import NUMBER_TEXT

    if not all(NUMBER_TEXT.fullmatch(s) for s in ids):
        return None
    return sorted(float(s) for s in ids)


def _token_counts(path: Path, n_tokens: np.ndarray | Sequence[int], m: int) -> np.ndarray:
    """``n_tokens`` as ``(m,)`` int32, checked: whole numbers ≥ 0."""
    t = np.asarray(n_tokens.cpu() if _is_tensor(n_tokens) else n_tokens)
    if t.shape != (m,) or not np.issubdtype(t.dtype, np.number):
        raise FeatureFileError(f"{path}: n_tokens must be {m} counts, got shape {t.shape}")
    if not (np.isfinite(t).all() and (t >= 0).all() and (t == np.round(t)).all()):
        raise FeatureFileError(f"{path}: n_tokens must be whole numbers ≥ 0")
    return t.astype(np.int32)


def _is_tensor(x: Any) -> bool:
    """True for a torch tensor; without importing torch (a tensor implies torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if _is_tensor(x):
        x = x.detach().cpu()
        # numpy has no bfloat16: float32, as .to('cpu', torch.float32); float64 kept, so that
        # values beyond float32 are named as such when written (review)
        return (x if str(x.dtype) == "torch.float64" else x.float()).numpy()
    return np.asarray(x)


def _abs_q95_from_dataset(dset: h5py.Dataset) -> np.ndarray:
    """abs_q95 from an on-disk ``(n_layers, m, dim)`` dataset, a block of stimuli at a time."""
    import torch

    n_layers, m, dim = dset.shape
    block = max(1, _QUANTILE_BLOCK // max(1, n_layers * dim))
    out = np.empty(m, dtype=np.float32)
    for start in range(0, m, block):
        stop = min(m, start + block)
        x = torch.from_numpy(np.asarray(dset[:, start:stop, :], dtype=np.float32))
        out[start:stop] = abs_quantile_rows(x.transpose(0, 1)).numpy()
    return out


class FeatureFile:
    """Read access to one feature file without loading it: ``with FeatureFile(p) as ff: ff.layer(-2)``.

    With ``expected_ids`` (or after ``validate(expected_ids)``), a file holding the same stimuli
    in another order returns rows re-ordered to ``expected_ids``; a different set of stimuli is
    an error naming the missing and extra ids.
    """

    def __init__(self, path: str | os.PathLike, expected_ids: Sequence[str] | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureFileError(f"{self.path}: feature file not found")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as err:
            if "unable to lock file" in str(err):
                raise FeatureFileError(
                    f"{self.path}: locked by another process that has it open for writing (an "
                    f"h5py session in mode 'a' or 'r+', HDFView?); close it there and rerun. On a "
                    f"file system without working locks set HDF5_USE_FILE_LOCKING=FALSE ({err})"
                ) from err
            raise FeatureFileError(
                f"{self.path}: not a readable HDF5 file, truncated or corrupt ({err}); {REEXTRACT}"
            ) from err
        try:
            with self._reading("its structure"):
                self._check_structure()
                self._ids = _texts(self.path, "stimulus_ids", self._f["stimulus_ids"][()])
        except BaseException:
            self._f.close()
            raise
        self._order: np.ndarray | None = None
        try:
            self._check_unique_ids()
            if expected_ids is not None:
                self._match_ids(expected_ids)
        except BaseException:
            self._f.close()
            raise

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn low-level HDF5 read errors (a corrupt or truncated file) into FeatureFileError."""
        try:
            yield
        except FeatureFileError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as err:
            raise FeatureFileError(
                f"{self.path}: cannot read {what}: the file is corrupt or truncated "
                f"({type(err).__name__}: {err}); {REEXTRACT}"
            ) from err

    # -- structure -------------------------------------------------------------------------
    def _check_structure(self) -> None:
        f, p = self._f, self.path
        version = f.attrs.get("schema_version")
        if _whole_number(version) != SCHEMA_VERSION:
            raise FeatureFileError(
                f"{p}: feature file schema_version is {version!r}, this version of xmodal reads "
                f"the integer {SCHEMA_VERSION}. A file written by another version of xmodal: "
                "re-extract the features (delete the file and rerun extraction); a file you "
                "wrote: follow docs/contracts.md, 'Feature file'"
            )
        for name in ("features", "stimulus_ids", "layer_names", "abs_q95", "n_tokens"):
            link = f.get(name, getlink=True)
            if isinstance(link, h5py.ExternalLink):
                try:
                    f[name]
                except (KeyError, OSError):
                    raise FeatureFileError(
                        f"{p}: {name!r} is a link to {link.path!r} in {link.filename}, which "
                        "cannot be opened (moved or deleted?)"
                    ) from None
            if name in ("features", "stimulus_ids", "layer_names") and name not in f:
                raise FeatureFileError(f"{p}: dataset {name!r} is missing")
            if name in f and not isinstance(f[name], h5py.Dataset):
                raise FeatureFileError(
                    f"{p}: {name!r} is a {type(f[name]).__name__.lower()}, not a dataset "
                    "(docs/contracts.md, 'Feature file': 'features' is one (layers, stimuli, "
                    "dims) dataset)"
                )
        feats = f["features"]
        if feats.ndim != 3:
            raise FeatureFileError(f"{p}: 'features' has shape {feats.shape}, expected 3-D")
        if feats.dtype.kind != "f":  # cast to float, integers would pass as features
            raise FeatureFileError(
                f"{p}: 'features' are stored as {feats.dtype}, not as floating-point numbers "
                "(float32, float16 or float64). bfloat16 values saved as their 16-bit pattern "
                "(tensor.view(torch.int16)) read as integers: write them as float32 "
                "(tensor.float().numpy())"
            )
        n_layers, m, dim = feats.shape
        if not (n_layers and m and dim):
            raise FeatureFileError(
                f"{p}: 'features' has shape {feats.shape}: no layers, stimuli or dims to analyse"
            )
        row, layer = (m, "stimulus"), (n_layers, "layer")
        lengths = {"stimulus_ids": row, "layer_names": layer, "abs_q95": row, "n_tokens": row}
        for name, (n, each) in lengths.items():
            if name in f and f[name].shape != (n,):  # one value each, as a 1-D dataset
                raise FeatureFileError(
                    f"{p}: {name!r} has shape {f[name].shape}, expected ({n},): one per {each} "
                    f"of 'features' {feats.shape}"
                )
        if "n_tokens" in f and f["n_tokens"].dtype.kind not in "iuf":
            raise FeatureFileError(
                f"{p}: 'n_tokens' are stored as {f['n_tokens'].dtype}, expected whole numbers"
            )

    def _match_ids(self, expected_ids: Sequence[str]) -> None:
        expected = [str(s) for s in expected_ids]
        if expected == self._ids:
            self._order = None
            return
        have, want = set(self._ids), set(expected)
        if have != want or len(expected) != len(want):
            missing = [s for s in expected if s not in have]
            extra = [s for s in self._ids if s not in want]
            parts = []
            if missing:
                parts.append(f"missing {preview(missing)}")
            if extra:
                parts.append(f"extra {preview(extra)}")
            if len(expected) != len(want):
                parts.append("expected ids contain duplicates")
            hinted = True
            if missing and _nfc(missing) == _nfc(extra):  # 'café' typed, 'café' from a Mac
                parts.append(
                    "the missing and extra ids differ only in Unicode form (NFC against NFD: "
                    f"they print alike), e.g. {ascii(missing[0])} and "
                    f"{ascii(_twin(missing[0], extra, lambda s: unicodedata.normalize('NFC', s)))}"
                )
            elif missing and sorted(s.strip() for s in missing) == sorted(
                s.strip() for s in extra
            ):  # a fixed-width string column ('S8') pads ids with spaces
                parts.append(
                    "the missing and extra ids differ only in spaces before or after them, "
                    f"e.g. {missing[0]!r} and {_twin(missing[0], extra, str.strip)!r} (a "
                    "fixed-width string column pads "
                    "them): write the ids as variable-length strings, exactly as the manifest's"
                )
            elif (nums := _as_numbers(missing)) and nums == _as_numbers(extra):
                parts.append(
                    "the missing and extra ids are the same numbers written otherwise, e.g. "
                    f"{missing[0]!r} and {_twin(missing[0], extra, float)!r} (ids stored as "
                    "numbers lose leading "
                    "zeros and gain '.0'): write the ids as strings, exactly as the manifest's"
                )
            else:
                hinted = False
            cause = (
                "The file's ids are written otherwise than the manifest's"
                if hinted
                else "The file was extracted for another stimulus manifest"
            )
            raise FeatureFileError(
                f"{self.path}: stimulus ids do not match the expected stimuli: "
                + "; ".join(parts)
                + f". {cause}: "
                + REEXTRACT
            )
        pos = {s: i for i, s in enumerate(self._ids)}
        self._order = np.array([pos[s] for s in expected], dtype=np.int64)
        log.info(
            "%s: same stimuli in another order; rows are re-ordered to the expected ids", self.path
        )

    # -- metadata --------------------------------------------------------------------------
    @property
    def stimulus_ids(self) -> list[str]:
        """Stimulus ids, in the order rows are returned."""
        if self._order is None:
            return list(self._ids)
        return [self._ids[i] for i in self._order]

    @property
    def layer_names(self) -> list[str]:
        with self._reading("'layer_names'"):
            names = self._f["layer_names"][()]
        return _texts(self.path, "layer_names", names)

    @property
    def n_layers(self) -> int:
        return int(self._f["features"].shape[0])

    @property
    def m(self) -> int:
        return int(self._f["features"].shape[1])

    @property
    def dim(self) -> int:
        return int(self._f["features"].shape[2])

    @property
    def attrs(self) -> dict[str, Any]:
        """Provenance attributes as stored (``preprocessing`` and ``library_versions`` are JSON strings)."""
        out = {}
        with self._reading("its attributes"):
            items = list(self._f.attrs.items())
        for k, v in items:
            if isinstance(v, bytes):
                try:
                    v = v.decode()
                except UnicodeDecodeError as err:
                    raise FeatureFileError(
                        f"{self.path}: attribute {k!r} is not UTF-8 text ({err.reason} at byte "
                        f"{err.start} of {v[:40]!r}); write it as UTF-8"
                    ) from None
            elif isinstance(v, np.generic):
                v = v.item()
            out[k] = v
        return out

    # -- data ------------------------------------------------------------------------------
    def layer(self, i: int) -> np.ndarray:
        """Features of layer ``i`` (negative counts from the end) as ``(m, dim)`` float32."""
        n = self.n_layers
        if not -n <= i < n:
            raise IndexError(f"{self.path}: layer {i} out of range for {n} layers")
        with self._reading(f"layer {i}"):
            x = self._f["features"][i % n]
        x = x if self._order is None else x[self._order]
        if x.dtype.itemsize > 4:  # float64: float32 would turn values beyond its range into inf
            big = np.isfinite(x) & (np.abs(x) > _FLOAT32_MAX)
            if big.any():
                raise FeatureFileError(
                    f"{self.path}: layer {i % n} ({self.layer_names[i]!r}) holds values beyond "
                    f"float32's range (±{_FLOAT32_MAX:.3g}), up to {np.abs(x[big]).max():.3g}, "
                    f"for stimuli {preview(self._ids_of(big.any(axis=1)))}; the analysis "
                    "computes in float32: rescale the features"
                )
        return x.astype(np.float32, copy=False)

    def _ids_of(self, rows: np.ndarray) -> list[str]:
        """The ids of the rows flagged in ``rows`` (a boolean mask in the returned order)."""
        ids = self.stimulus_ids
        return [ids[j] for j in np.flatnonzero(rows)]

    def finite_layer(self, i: int) -> np.ndarray:
        """:meth:`layer`, checked: non-finite values, or all-zero rows in a layer whose other
        rows are not zero (stimuli without features), raise an error naming layer and stimuli.
        A layer of zeros only is left to the analysis, which refuses or skips it by name."""
        x = self.layer(i)
        bad = ~np.isfinite(x).all(axis=1)
        what, why = "non-finite features", ""
        if not bad.any():
            bad = ~x.any(axis=1)
            if bad.all():  # a layer of zeros only: refused or skipped by the analysis
                return x
            what, why = "all-zero features", _ZERO_ROWS
        if bad.any():
            raise FeatureFileError(
                f"{self.path}: {what} in layer {i % self.n_layers} "
                f"({self.layer_names[i]!r}) for stimuli "
                f"{preview(self._ids_of(bad))}{why}; {REEXTRACT}"
            )
        return x

    def layers(self) -> Iterator[np.ndarray]:
        """Every layer in order, one at a time."""
        for i in range(self.n_layers):
            yield self.layer(i)

    def abs_q95(self) -> np.ndarray:
        """Per stimulus 95th percentile of |x| over all layers and dims, ``(m,)`` float32.

        Non-finite values raise an error naming the stimuli, and the first layer with
        non-finite features when there is one (:meth:`finite_layer`).
        """
        with self._reading("'abs_q95'"):
            if "abs_q95" in self._f:
                q = np.asarray(self._f["abs_q95"][()], dtype=np.float32)
            else:
                log.info("%s has no abs_q95; computing it from the features", self.path)
                q = _abs_q95_from_dataset(self._f["features"])
        q = q if self._order is None else q[self._order]
        bad = ~np.isfinite(q)
        if bad.any():
            for i in range(self.n_layers):
                self.finite_layer(i)  # names the layer and stimuli of non-finite features
            ids = self.stimulus_ids
            raise FeatureFileError(
                f"{self.path}: non-finite abs_q95 for stimuli "
                f"{preview([ids[j] for j in np.flatnonzero(bad)])}; {REEXTRACT}"
            )
        return q

    def n_tokens(self) -> np.ndarray | None:
        """Tokens per caption (language models), ``(m,)`` int64; None when the file has no
        ``n_tokens`` dataset (vision models, files written before it existed, user files)."""
        with self._reading("'n_tokens'"):
            if "n_tokens" not in self._f:
                return None
            raw = np.asarray(self._f["n_tokens"][()])
        # checked before the cast: 2.9 tokens (a user's file) were read as 2
        t = _token_counts(self.path, raw, raw.size).astype(np.int64)
        return t if self._order is None else t[self._order]

    def validate(
        self, expected_ids: Sequence[str] | None = None, layers: bool = True
    ) -> FeatureFile:
        """Check ids (unique; equal to ``expected_ids`` up to order), shapes and finiteness.

        Reads one layer at a time; ``layers=False`` skips that scan, for callers that read only
        some layers and check them with :meth:`finite_layer`. Raises :class:`FeatureFileError`
        naming the file and the offending stimulus ids / layers. Returns ``self``.
        """
        if expected_ids is not None:
            self._match_ids(expected_ids)
        for i in range(self.n_layers if layers else 0):
            self.finite_layer(i)
        self.check_abs_q95()
        return self

    def _check_unique_ids(self) -> None:
        """A stimulus id stored twice is an error naming it (before any matching by id)."""
        counts = Counter(self._ids)
        dup = sorted(s for s, n in counts.items() if n > 1)
        if dup:
            raise FeatureFileError(
                f"{self.path}: stimulus ids stored more than once: {preview(dup)}; each row "
                f"must be one stimulus. {REEXTRACT}"
            )

    def check_abs_q95(self) -> None:
        """A stored ``abs_q95`` must be finite (it sets the alignment's clamp threshold);
        :meth:`abs_q95` raises otherwise."""
        if "abs_q95" in self._f:
            self.abs_q95()

    # -- context manager -------------------------------------------------------------------
    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FeatureFile({str(self.path)!r}, n_layers={self.n_layers}, m={self.m}, dim={self.dim})"
        )
