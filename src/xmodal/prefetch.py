"""Download stimuli and model weights on the submit host, before any GPU job runs.

Compute nodes of many clusters have no internet. The workflow therefore runs these functions in
local rules (on the login node) and the GPU jobs run with ``HF_HUB_OFFLINE=1`` against the
project-local hub cache that they fill (``hub_cache`` in config.yaml, standard Hugging Face
hub-cache layout, so ``HF_HUB_CACHE=<hub_cache>`` is all a job needs).

- :func:`prefetch_stimuli` writes a stimulus manifest (``stimuli.tsv`` + ``images/``) from a hub
  dataset's parquet files (WIT-1024: ``minhuh/prh`` at revision ``wit_1024``).
- :func:`prefetch_model` downloads a model's configs, tokenizer and ``*.safetensors`` weights
  and returns a record with the resolved commit.

When the hub cannot be reached, files already in the cache are used; if they are not there,
:class:`PrefetchError` says what to download, from where and into which directory. Tokens come
only from the ``HF_TOKEN`` environment variable and are never logged or recorded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from xmodal.io import atomic_path
from xmodal.logs import preview, redact
from xmodal.registry import (
    LIBRARY,
    SAFE_SUFFIXES,
    TOKENIZER_FILES,
    download_patterns,
    hub_repo_of,
    pickle_patterns,
    same_hub_repo,
)
from xmodal.stimuli import (
    MANIFEST_SETTINGS,
    StimulusError,
    decoded_format,
    is_blank,
    is_csv_quoted,
    write_manifest,
    write_manifest_settings,
)

log = logging.getLogger(__name__)

__all__ = [
    "PrefetchError",
    "check_prefetched",
    "downloaded_revision",
    "is_offline",
    "hub_repo_id",
    "model_record_path",
    "prefetch_model",
    "prefetch_stimuli",
    "read_model_record",
]


class PrefetchError(RuntimeError):
    """A download failed; the message says what to fetch, from where, into which directory."""

    #: a hub that did not answer, a rate limit or a time-out pass on retry, and the message
    #: cannot tell them from a missing repository: the profile's retries try again (seconds,
    #: on the submit host), never stopped by xmodal.attempts.fail_attempt (audit)
    repeats_on_retry = False


# ----------------------------------------------------------------------------- helpers
def _token() -> str | bool:
    """The token from ``HF_TOKEN`` only (never a stored login); False = send none."""
    return os.environ.get("HF_TOKEN") or False


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_offline() -> bool:
    """True when the hub must not be contacted: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``
    is set (read now, not at import), or huggingface_hub was imported in offline mode."""
    import huggingface_hub.constants as hc

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hc.HF_HUB_OFFLINE) or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _reason(err: BaseException) -> str:
    """One line about ``err``, with any token redacted."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = redact(text)
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _api() -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint(), token=_token())


def _cache_folder(cache_dir: Path, repo_id: str, repo_type: str) -> Path:
    return cache_dir / f"{repo_type}s--{repo_id.replace('/', '--')}"


def _web_url(repo_id: str, repo_type: str, revision: str) -> str:
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{_endpoint()}/{prefix}{repo_id}/tree/{revision}"


def _unwritable(folders: Iterable[Path]) -> Path | None:
    """The first of ``folders`` (each read as its nearest existing folder, itself or a parent)
    in which this user cannot create files: a cache the lab shares read-only, say."""
    for folder in folders:
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            return folder
    return None


def _download_help(
    what: str,
    repo_id: str,
    repo_type: str,
    revision: str,
    cache_dir: Path,
    patterns: Iterable[str],
    reason: str,
) -> str:
    include = " ".join(f"'{p}'" for p in patterns)
    type_arg = " --repo-type dataset" if repo_type == "dataset" else ""
    folder = _cache_folder(cache_dir, repo_id, repo_type)
    # the hub client writes .locks/ in the cache and blobs/, snapshots/ in the repo's folder
    shut = _unwritable([cache_dir, folder / "blobs", folder / "snapshots"])
    if shut is not None:
        # copying there fails as the download did: say so instead of advising it
        return (
            f"Cannot download {what} ({reason}).\n"
            f"  what : {repo_id} at revision {revision}, files matching {include}\n"
            f"  into : {cache_dir} (Hugging Face hub-cache layout: {folder.name}/)\n"
            f"but this user cannot write in {shut} (a cache shared read-only?). Fix: ask whoever "
            f"keeps that cache to download these files there (hf download {repo_id}{type_arg} "
            f"--revision {revision} --include {include} --cache-dir {cache_dir}), or set the "
            f"config key 'hub_cache' to a folder you can write."
        )
    return (
        f"Cannot download {what} ({reason}).\n"
        f"Compute nodes run offline, so these files must be on disk first.\n"
        f"  what : {repo_id} at revision {revision}, files matching {include}\n"
        f"  from : {_web_url(repo_id, repo_type, revision)}\n"
        f"  into : {cache_dir} (Hugging Face hub-cache layout: {folder.name}/)\n"
        f"Fix: run this workflow's prefetch rules on a machine with internet access (the login "
        f"node), or there run\n"
        f"  hf download {repo_id}{type_arg} --revision {revision} --include {include} "
        f"--cache-dir <dir>\n"
        f"and copy <dir>/{folder.name} to {folder}. Behind a mirror or proxy set HF_ENDPOINT; "
        f"for gated or private repos set HF_TOKEN."
    )


def _snapshot(
    repo_id: str,
    repo_type: str,
    revision: str,
    cache_dir: Path,
    select: Any,
    what: str,
    help_patterns: Iterable[str],
) -> tuple[Path, list[str], bool]:
    """Download the files ``select(all_files)`` picks; fall back to the cache when offline.

    Returns (snapshot folder, selected relative paths, used_cache_only).
    """
    from huggingface_hub import snapshot_download

    reason = "HF_HUB_OFFLINE=1 is set"
    if not is_offline():
        try:
            # repo_info: one request, no retry loop (list_repo_files retries for ~25 s)
            info = _api().repo_info(repo_id, repo_type=repo_type, revision=revision)
            files = [s.rfilename for s in (info.siblings or [])]
        except Exception as err:  # network, auth, missing repo: all end in the same advice
            reason = _reason(err)
        else:
            wanted = select(files)
            try:
                path = snapshot_download(
                    repo_id,
                    repo_type=repo_type,
                    revision=revision,
                    cache_dir=cache_dir,
                    allow_patterns=wanted,
                    token=_token(),
                    endpoint=_endpoint(),
                )
            except Exception as err:
                raise PrefetchError(
                    _download_help(
                        what, repo_id, repo_type, revision, cache_dir, help_patterns, _reason(err)
                    )
                ) from None
            return Path(path), sorted(wanted), False
    # offline or the hub is unreachable: what is in the cache already?
    try:
        path = Path(
            snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
            )
        )
    except Exception:
        raise PrefetchError(
            _download_help(what, repo_id, repo_type, revision, cache_dir, help_patterns, reason)
        ) from None
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    log.warning("hub not reachable (%s); using cached snapshot %s", reason, path)
    return path, select(files), True


#: ``<stem>-NNNNN-of-MMMMM[-<tag>]<ext>``: datasets' push_to_hub adds a fingerprint tag
_SHARD = re.compile(r"^(?P<stem>.*)-(?P<i>\d+)-of-(?P<n>\d+)(?P<tag>-[^/.]+)?(?P<ext>\.[^/]*)$")


def missing_shards(files: Iterable[str], path: Path | None = None) -> list[str]:
    """Shards of a sharded file set that ``files`` lacks: every ``<stem>-NNNNN-of-MMMMM<ext>``
    (also with a ``-<tag>`` before ``<ext>``, as datasets' fingerprints) needs all M numbers,
    and every shard a weights index (``*.index.json`` in ``path``) names."""
    files = set(files)
    groups: dict[tuple[str, str, str], set[int]] = {}
    tags: dict[tuple[str, str, str], set[str]] = {}
    for f in files:
        m = _SHARD.match(f)
        if m:
            groups.setdefault((m["stem"], m["n"], m["ext"]), set()).add(int(m["i"]))
            tags.setdefault((m["stem"], m["n"], m["ext"]), set()).add(m["tag"] or "")
    missing = []
    for (stem, n, ext), have in sorted(groups.items()):
        width = len(n)
        # a missing shard's tag is not known: the others' where they share one
        (tag,) = tags[stem, n, ext] if len(tags[stem, n, ext]) == 1 else {"-*"}
        # datasets' parquet shards count from 0, weights' from 1
        first = 0 if 0 in have or ext == ".parquet" else 1
        for i in range(first, int(n) + first):
            if i not in have:
                missing.append(f"{stem}-{i:0{width}d}-of-{n}{tag}{ext}")
    for index in sorted(f for f in files if f.endswith(".index.json")):
        try:
            weight_map = json.loads((path / index).read_text())["weight_map"] if path else {}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable index: the loader reports it
        folder = Path(index).parent.as_posix()
        for shard in sorted(set(weight_map.values())):
            name = shard if folder == "." else f"{folder}/{shard}"
            if name not in files:
                missing.append(name)
    return sorted(set(missing))


def _match(files: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The repository's top-level files that match a pattern: timm and transformers load a
    snapshot's top level only, so ``sub/model.safetensors`` is not the model's weights."""
    pats = tuple(patterns)
    return sorted(f for f in files if "/" not in f and any(fnmatch(f, p) for p in pats))


# ----------------------------------------------------------------------------- models
def hub_repo_id(model_id: str, modality: str) -> str:
    """The hub repository of a registry id (xmodal.registry.hub_repo_of, without the revision)."""
    return hub_repo_of(model_id, modality)[0]


def _select_weights(
    files: list[str], repo_id: str, revision: str, modality: str, allow_pickle: bool
) -> list[str]:
    library = LIBRARY[modality]
    # what the loader needs besides weights, refused here (the login node) rather than in the
    # model's GPU job, where a missing tokenizer read as "sentencepiece is not installed"
    needs = [(("config.json",), "config.json")]
    if library == "transformers":
        needs.append((TOKENIZER_FILES, f"tokenizer file ({' or '.join(TOKENIZER_FILES)})"))
    for patterns, what in needs:
        if not _match(files, patterns):
            raise PrefetchError(
                f"{repo_id} at revision {revision} has no {what} at its top level, where "
                f"{library} reads it; files: {', '.join(files[:20]) or 'none'}"
            )
    wanted = _match(files, download_patterns(library, allow_pickle=False))
    weights = [f for f in wanted if f.endswith(SAFE_SUFFIXES)]
    pickles = _match(files, pickle_patterns(library))
    # the index of pickle shards is useless without them: kept only where the pickles are the
    # weights taken (allow_pickle, no safetensors); beside safetensors its shards, not taken,
    # read as missing and the prefetch refused the model (audit of 2026-12-06)
    if not allow_pickle or weights:
        wanted = [f for f in wanted if not f.endswith(".bin.index.json")]
    if weights:
        return wanted
    if not pickles:
        safe = " or ".join(p for p in download_patterns(library) if p.endswith(SAFE_SUFFIXES))
        raise PrefetchError(
            f"{repo_id} at revision {revision} has no weights that xmodal can load: no {safe} "
            f"and no pickle checkpoint at its top level, where {library} reads them; files: "
            f"{', '.join(files[:20]) or 'none'}"
        )
    if not allow_pickle:
        raise PrefetchError(
            f"{repo_id} at revision {revision} has only pickle checkpoints "
            f"{preview(pickles)}; loading a pickle runs code from the file, so xmodal "
            "refuses it by default. Either pin the model's `revision` in the config file to a "
            "commit that has *.safetensors (the hub's safetensors-conversion pull request, e.g. "
            "refs/pr/N), or opt in with `allow_pickle: true` on the model (or under "
            "`extraction:`) in the config file."
        )
    log.warning("%s: no safetensors, downloading pickle checkpoints (allow_pickle)", repo_id)
    return sorted(set(wanted) | set(pickles))


def model_record_path(model_key: str, records: str | os.PathLike | None = None) -> str:
    """Where the download record of model ``model_key`` lives: one per model key, for every
    dataset of the project, in ``records`` (default the workflow's folder, relative to the
    working directory, which stays there wherever ``hub_cache`` points: docs/cluster.md)."""
    from xmodal.config import PREFETCH_RECORDS

    return f"{records if records is not None else PREFETCH_RECORDS}/{model_key}.json"


def read_model_record(
    model_key: str, records: str | os.PathLike | None = None
) -> dict[str, Any] | None:
    """The download record of model ``model_key`` (:func:`prefetch_model`'s JSON, at
    :func:`model_record_path`); None without a readable one."""
    path = Path(model_record_path(model_key, records))
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def downloaded_revision(
    model_key: str,
    model_id: str,
    revision: str | None,
    records: str | os.PathLike | None = None,
) -> str | None:
    """The revision an extraction loads: the commit the model's download record names (the
    snapshot :func:`check_prefetched` checked), else ``revision``.

    The workflow's params spell a revision as the features on disk asked for it
    (:meth:`xmodal.registry.ModelEntry.settled_revision`: none, where the config now pins the
    commit they came from); loaded as ``main`` it would follow the cache's ``refs/main``,
    which a later download into a shared cache can move. The record is used when it is this
    model's (from the hub, its repository however the id spells it:
    :func:`xmodal.registry.same_hub_repo`) and ``revision`` is none, ``main``, or what it asked
    for or resolved to; another ``revision`` (a call outside the workflow) is loaded as given.
    ``records``: the folder of records (default: the workflow's, relative to the working
    directory).
    """
    record = read_model_record(model_key, records)
    # the repository spelt otherwise (timm/…) by another dataset's config is this model
    if record is None or not same_hub_repo(
        record.get("model_id"), model_id, str(record.get("modality"))
    ):
        return revision
    resolved = record.get("revision")
    if record.get("source") == "local" or not isinstance(resolved, str):
        return revision
    if revision in (None, "main", record.get("revision_requested"), resolved):
        return resolved
    return revision


def check_prefetched(record_path: str | os.PathLike, cache_dir: str | os.PathLike) -> None:
    """Check that the files a prefetch record lists are in the hub cache ``cache_dir``.

    The record keeps the cache it was downloaded into; ``hub_cache`` may have moved since
    (which reruns nothing, docs/cluster.md). When the snapshot is not in ``cache_dir`` either,
    a :class:`PrefetchError` names the model, both caches and the three ways out.
    """
    record_path = Path(record_path).resolve()
    record = json.loads(record_path.read_text())
    if record.get("cache_dir") is None:  # a local directory, used where it is
        return
    cache, old = Path(cache_dir).resolve(), Path(record["cache_dir"])
    snapshot = cache / Path(record["snapshot"]).relative_to(old)
    missing = [f for f in record.get("files", []) if not (snapshot / f).is_file()]
    if snapshot.is_dir() and not missing:
        return
    if cache == old.resolve():  # not moved: files deleted from it (a purge, delete-cache; audit)
        raise PrefetchError(
            f"model {record['model_id']!r}: files its prefetch downloaded are gone from the hub "
            f"cache {cache} (purged?): "
            f"{snapshot if not snapshot.is_dir() else ', '.join(missing[:3])}; delete "
            f"{record_path} so that the next run downloads them again"
        )
    raise PrefetchError(
        f"model {record['model_id']!r}: its weights were downloaded into {old} (record "
        f"{record_path}), but the hub cache is now {cache} (config key 'hub_cache'), which lacks "
        f"{snapshot if not snapshot.is_dir() else ', '.join(missing[:3])}; move the cache's "
        f"contents to {cache}, set 'hub_cache' back to {old}, or delete {record_path} so that "
        f"the next run downloads the weights into {cache}"
    )


def prefetch_model(
    model_id: str,
    modality: str,
    revision: str | None,
    cache_dir: str | os.PathLike,
    allow_pickle: bool = False,
) -> dict[str, Any]:
    """Download one model's configs, tokenizer and weights into the hub cache ``cache_dir``.

    ``model_id`` is the registry id (a timm id, a hub repo id, or a local directory, which is
    used as is). Returns a JSON-ready record: ``model_id``, ``repo_id``, ``modality``,
    ``source`` (timm / transformers / local), ``revision_requested``, ``revision`` (the resolved
    commit), ``files``, ``cache_dir``, ``snapshot``, ``from_cache_only``, ``created``.
    Raises :class:`PrefetchError` (with what/where/into) when the files cannot be obtained.
    """
    if modality not in ("vision", "language"):
        raise ValueError(f"modality must be 'vision' or 'language', got {modality!r}")
    source = "timm" if modality == "vision" else "transformers"
    record: dict[str, Any] = {
        "model_id": model_id,
        "modality": modality,
        "source": source,
        "revision_requested": revision,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if Path(model_id).expanduser().is_dir():  # as the registry reads a local model's id
        local = Path(model_id).expanduser().resolve()
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        return record | {
            "repo_id": None,
            "source": "local",
            "revision": "local",
            "files": files,
            "cache_dir": None,
            "snapshot": str(local),
            "from_cache_only": False,
        }
    repo_id, pinned = hub_repo_of(model_id, modality)
    rev = revision or pinned or "main"
    cache = Path(cache_dir).resolve()
    patterns = download_patterns(LIBRARY[modality], allow_pickle)
    path, files, cached = _snapshot(
        repo_id,
        "model",
        rev,
        cache,
        lambda fs: _select_weights(list(fs), repo_id, rev, modality, allow_pickle),
        f"the weights of model {model_id!r}",
        patterns,
    )
    missing = [f for f in files if not (path / f).is_file()]
    gaps = missing_shards(files, path)  # a cache an interrupted download filled, read offline
    if missing or gaps:
        lacks = (
            preview(missing)
            if missing
            else f"the weight shard(s) {preview(gaps)} that its other files name"
        )
        raise PrefetchError(
            f"the cached snapshot {path} of {repo_id} lacks {lacks}; "
            + _download_help(
                f"the weights of model {model_id!r}",
                repo_id,
                "model",
                rev,
                cache,
                patterns,
                "incomplete cache",
            )
        )
    return record | {
        "repo_id": repo_id,
        "revision": path.name,  # snapshot folders are named by commit hash
        "files": files,
        "cache_dir": str(cache),
        "snapshot": str(path),
        "from_cache_only": cached,
    }


# ----------------------------------------------------------------------------- stimuli
_LINE_BREAKS = re.compile(r"[\t\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")


#: split names that a file name inside a split's folder may start with (other splits)
_SPLIT_WORDS = ("train", "validation", "valid", "val", "test", "dev")


def _split_files(files: Iterable[str], split: str) -> list[str]:
    """Parquet files of ``split``: files named ``<split>.parquet`` or ``<split>-*.parquet``, or
    in a folder named after it (but not named after another split). ``split`` may name a folder
    too (``<folder>/<split>``: only files under it). Files of the split in several folders
    (several configurations of one dataset) are refused, naming the folders."""
    folder, _, name = split.rpartition("/")
    own = re.compile(rf"^{re.escape(name)}(-[^/]*)?\.parquet$")
    other = re.compile(rf"^({'|'.join(w for w in _SPLIT_WORDS if w != name)})[-_.]")
    chosen = []
    for f in files:
        path = PurePosixPath(f)
        if path.suffix != ".parquet" or (folder and not f.startswith(folder + "/")):
            continue
        if own.match(path.name) or (name in path.parent.parts and not other.match(path.name)):
            chosen.append(f)
    folders = sorted({PurePosixPath(f).parent.as_posix() for f in chosen})
    if len(folders) > 1:
        first = folders[0].removesuffix(f"/{name}").removesuffix(name).rstrip("/")
        raise PrefetchError(
            f"split {split!r} has parquet files in {len(folders)} folders ({', '.join(folders)}): "
            "several configurations of the dataset, which would be mixed into one manifest. "
            f"Name the one to use in stimuli.split as '<folder>/{name}', e.g. "
            f"'{first + '/' if first else ''}{name}'"
        )
    return sorted(chosen)


#: file suffix of each image format Pillow names (MPO: a camera JPEG with a second image)
_SUFFIX = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
           "BMP": ".bmp", "TIFF": ".tif"}  # fmt: skip


#: what to do about a row whose image the extraction would refuse
_FIX_ROW = (
    "this dataset's row cannot be used as it is: use the dataset through a local manifest "
    "(stimuli.source: local), without the row or with its image saved again"
)


def _image_suffix(data: bytes, stimulus_id: str, label: str) -> str:
    """File suffix of encoded image bytes, after decoding them by the rules the vision
    extraction decodes by (xmodal.stimuli.load_rgb: a truncated JPEG opens and verifies, and
    would fail only in each vision model's GPU job; a huge image is accepted as there)."""
    return _SUFFIX.get(decoded_format(data, stimulus_id, label, _FIX_ROW).upper(), ".img")


def _rows(paths: list[Path]) -> Iterator[tuple[bytes | None, str | None, object, str]]:
    """(image bytes, stored path, caption, where: '<file> row <n>') for every row of the parquet
    files, in order. A row that embeds no image bytes has None and, where it has one, the path
    it names instead; the caption is the stored value (:func:`_caption_text` makes it text).
    The caller refuses a row once its stimulus id is known."""
    import pyarrow.parquet as pq

    for path in paths:
        pf = pq.ParquetFile(path)
        missing = {"image", "text"} - set(pf.schema_arrow.names)
        if missing:
            raise PrefetchError(
                f"{path.name} has no column(s) {sorted(missing)} (columns: {pf.schema_arrow.names}); "
                "expected a dataset with `image` and `text` columns"
            )
        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=["image", "text"]):
            for image, text in zip(
                batch.column("image").to_pylist(), batch.column("text").to_pylist(), strict=True
            ):
                data = image.get("bytes") if isinstance(image, dict) else image
                stored = image.get("path") if isinstance(image, dict) else None
                if isinstance(data, str):  # a column of paths holds text
                    data, stored = None, data
                if isinstance(text, list | tuple):  # text[0] is the caption; [] has none
                    text = text[0] if text else None
                yield data or None, stored, text, f"{path.name} row {row}"
                row += 1


def _count_rows(paths: list[Path]) -> int:
    """The rows of the parquet files, from their footers (no data read)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def _caption_text(text: object, at: str) -> str:
    """A row's caption as text: a string as stored, bytes decoded as UTF-8 (a binary column);
    anything else refused, naming the row (``str()`` of bytes gave the caption "b'a dog'")."""
    if text is None:
        return ""
    if isinstance(text, str):
        return text
    if isinstance(text, bytes | bytearray):
        try:
            return bytes(text).decode("utf-8")
        except UnicodeDecodeError as err:
            raise PrefetchError(
                f"{at}: the caption is stored as bytes that are not UTF-8 ({err.reason} at byte "
                f"{err.start} of {bytes(text)[:60]!r}); expected a dataset whose `text` column "
                "holds text"
            ) from None
    raise PrefetchError(
        f"{at}: the caption is a {type(text).__name__} ({str(text)[:60]!r}), not text; expected "
        "a dataset whose `text` column holds strings or lists of strings"
    )


def prefetch_stimuli(
    repo: str,
    revision: str | None,
    split: str,
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the stimulus manifest ``out_dir/stimuli.tsv`` and ``out_dir/images/`` from a hub dataset.

    The dataset's parquet files for ``split`` at ``revision`` are downloaded into the hub cache
    ``cache_dir`` (default: the Hugging Face default cache); columns ``image`` (embedded bytes)
    and ``text`` (``text[0]`` is the caption). Images are written unchanged (no re-encoding),
    named ``<stimulus_id>.<format>``; ids are ``s0000``, ``s0001``, ... in dataset order. A
    caption's tabs and line breaks (which a one-line-per-stimulus manifest cannot hold) are
    replaced by a space per run, and those stimuli listed in ``source.json``.
    ``out_dir/source.json`` records the repo, requested and resolved revision and files.
    Returns the manifest path (written last, atomically).
    """
    from huggingface_hub import constants

    out = Path(out_dir)
    cache = Path(cache_dir).resolve() if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    rev = revision or "main"
    split_pattern = [f"*{split}*.parquet"]

    def select(files: Iterable[str]) -> list[str]:
        chosen = _split_files(files, split)
        if not chosen:
            raise PrefetchError(
                f"dataset {repo} at revision {rev} has no parquet files for split {split!r} "
                f"(files: {', '.join(sorted(files)[:20]) or 'none'})"
            )
        return chosen

    path, files, cached = _snapshot(
        repo, "dataset", rev, cache, select, f"the stimuli {repo!r} (split {split})", split_pattern
    )
    gaps = missing_shards(files)
    if gaps:  # e.g. offline, with a cache that an interrupted download filled
        raise PrefetchError(
            f"dataset {repo} split {split!r} at revision {rev}: the snapshot {path} lacks "
            f"the shard(s) {preview(gaps)} that its other files name (it holds "
            f"{preview(files, 3)}): the manifest would hold "
            "part of the dataset. Download it again where the hub is reachable"
        )
    # nothing of an earlier manifest may stay next to new images if this run fails half-way
    for stale in (out / "stimuli.tsv", out / MANIFEST_SETTINGS):
        stale.unlink(missing_ok=True)
    parquet = [path / f for f in files]
    n_rows = _count_rows(parquet)
    if not n_rows:
        raise PrefetchError(f"dataset {repo} split {split!r} at revision {rev} has no rows")
    width = max(4, len(str(n_rows - 1)))
    # every row checked and decoded before any file is written; a row's bytes are kept only
    # while it is checked and read again to be written, so that memory does not grow with the
    # dataset (it held every image at once: gigabytes on a login node for 100,000 stimuli)
    checked = []
    flattened = []
    for i, (data, stored, text, where) in enumerate(_rows(parquet)):
        sid = f"s{i:0{width}d}"
        at = f"dataset {repo}: {where} (stimulus {sid})"
        raw_caption = _caption_text(text, at)
        if data is None:
            only = f" (only a path, {stored!r}, which this dataset does not ship)" if stored else ""
            raise PrefetchError(
                f"{at} has no embedded image bytes{only}; expected a dataset whose `image` "
                "column embeds the images"
            )
        # a manifest line holds one stimulus: tabs and line breaks inside a caption become one
        # space each run (counted, logged and recorded in source.json)
        caption = _LINE_BREAKS.sub(" ", raw_caption)
        if caption != raw_caption:
            flattened.append(sid)
        if is_blank(caption):
            raise PrefetchError(f"{at} has an empty caption")
        if is_csv_quoted(caption):
            raise PrefetchError(
                f"{at}: the caption ({caption[:60]!r}) is written as a CSV "
                "writer quotes a field (wrapped in quotes, each inner quote doubled); a manifest "
                "reader cannot tell it from a quoting mistake. Use the dataset through a local "
                "manifest (stimuli.source: local) with that caption written as meant"
            )
        try:
            suffix = _image_suffix(data, sid, where)
        except StimulusError as err:  # names the stimulus and the row
            raise PrefetchError(f"dataset {repo}: {err}") from None
        checked.append((sid, suffix, caption, hashlib.sha256(data).digest()))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []

    def changed(where: str) -> PrefetchError:
        return PrefetchError(
            f"dataset {repo}: the parquet files of {path} changed while the stimuli were "
            f"written ({where}); run the prefetch again"
        )

    again = _rows(parquet)
    for sid, suffix, caption, digest in checked:
        data = next(again, (None,))[0]
        if data is None or hashlib.sha256(data).digest() != digest:
            raise changed(f"stimulus {sid}")
        target = images / f"{sid}{suffix}"
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        records.append(
            {"stimulus_id": sid, "image": target.relative_to(out).as_posix(), "caption": caption}
        )
    if next(again, None) is not None:
        raise changed(f"rows after stimulus {checked[-1][0]}")
    provenance = {
        "repo": repo,
        "repo_type": "dataset",
        "split": split,
        "revision_requested": revision,
        "revision": path.name,
        "files": files,
        "n_stimuli": len(records),
        "captions_with_tabs_or_line_breaks": flattened,
        "from_cache_only": cached,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with atomic_path(out / "source.json") as tmp:
        tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    if flattened:
        log.warning(
            "%d caption(s) held tabs or line breaks, each run replaced by one space so that the "
            "manifest keeps one stimulus per line: %s (listed in %s)",
            len(flattened),
            preview(flattened),
            out / "source.json",
        )
    manifest = out / "stimuli.tsv"
    write_manifest(pd.DataFrame.from_records(records), manifest)
    # after it: the settings it was made from (the workflow compares them with the config's)
    write_manifest_settings(manifest, {"repo": repo, "revision": revision, "split": split})
    log.info("wrote %d stimuli to %s (revision %s)", len(records), manifest, path.name)
    return manifest


# ----------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """``python -m xmodal.prefetch {stimuli,model} ...``: errors as one message, no traceback."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m xmodal.prefetch", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("stimuli", help="write a stimulus manifest from a hub dataset")
    s.add_argument("--repo", required=True)
    s.add_argument("--revision", default=None)
    s.add_argument(
        "--split",
        default="train",
        help="the split (<split>.parquet, <split>-*.parquet or a folder named after it); "
        "'<folder>/<split>' picks one configuration of a dataset that has several",
    )
    s.add_argument("--out-dir", required=True)
    s.add_argument("--cache-dir", default=None)
    m = sub.add_parser("model", help="download a model into the hub cache; write its record")
    m.add_argument("--id", required=True)
    m.add_argument("--modality", required=True, choices=["vision", "language"])
    m.add_argument("--revision", default=None)
    m.add_argument("--cache-dir", required=True)
    m.add_argument("--allow-pickle", action="store_true")
    m.add_argument("--record", default=None, help="JSON file for the record (default: stdout)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.what == "stimuli":
            print(
                prefetch_stimuli(args.repo, args.revision, args.split, args.out_dir, args.cache_dir)
            )
        else:
            rec = prefetch_model(
                args.id, args.modality, args.revision, args.cache_dir, args.allow_pickle
            )
            text = json.dumps(rec, indent=2) + "\n"
            if args.record:
                with atomic_path(args.record) as tmp:
                    tmp.write_text(text)
            else:
                print(text, end="")
    except PrefetchError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
