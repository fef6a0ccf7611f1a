"""Pieces shared by the vision and language extractors: devices, dtypes, hub cache, safety checks,
the per-batch feature accumulator and out-of-memory back-off."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError

from xmodal._compat import ensure_torchvision_importable
from xmodal.config import PREFETCH_RECORDS
from xmodal.features import abs_quantile_rows
from xmodal.io import DiskFullError
from xmodal.logs import preview
from xmodal.prefetch import is_offline
from xmodal.registry import PICKLE_SUFFIXES, SAFE_SUFFIXES
from xmodal.resources import slurm_gpus

# transformers and timm import torchvision; make that work first (see xmodal._compat)
ensure_torchvision_importable()

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("xmodal.extract")


class ExtractionError(RuntimeError):
    """Feature extraction failed for a model (bad model, bad input, non-finite output)."""


class DeviceError(ExtractionError):
    """The node has no usable device for the job; a retry, maybe on another node, may not."""

    repeats_on_retry = False


class NonFiniteFeatureError(ExtractionError):
    """A model produced NaN or Inf features; names the model, layers and stimuli."""


class UnsafeCheckpointError(ExtractionError):
    """Only pickle checkpoints (which run code when loaded) are available and pickle is not allowed."""


class RemoteCodeError(ExtractionError):
    """A model needs custom Python code from its repository (``trust_remote_code``); never run."""


#: Environment variable naming the extraction device where the caller says ``"auto"``: ``cpu``
#: runs on the CPU in a job SLURM gave GPUs (a test cluster whose GPUs are fake).
DEVICE_ENV = "XMODAL_DEVICE"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` (or :data:`DEVICE_ENV` when set) = the first CUDA device if one is visible,
    else the CPU; but in a job SLURM gave GPUs, no visible CUDA device is an error: the job
    would hold them idle for hours and extract in float32 where the others use bfloat16."""
    if str(device) == "auto":
        device = os.environ.get(DEVICE_ENV) or "auto"
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpus = slurm_gpus()
        if gpus:
            build = (
                "a CPU-only build"
                if torch.version.cuda is None
                else f"built for CUDA {torch.version.cuda}: check the driver and CUDA_VISIBLE_DEVICES"
            )
            raise DeviceError(
                f"this job was given GPUs by SLURM ({', '.join(f'{k}={v}' for k, v in gpus.items())})"
                f", but torch {torch.__version__} ({build}) sees no CUDA device. Install a CUDA "
                f"build of torch in the job's environment (docs/cluster.md), or set "
                f"{DEVICE_ENV}=cpu to extract on the CPU anyway"
            )
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but no CUDA device is visible")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/None = bfloat16 on CUDA, float32 on the CPU; names like ``"bfloat16"`` accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ExtractionError(
            f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}"
        ) from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@contextlib.contextmanager
def ieee_float32(dtype: torch.dtype) -> Iterator[None]:
    """While features are computed in ``dtype`` float32, compute in IEEE float32: no TF32 in
    cuDNN convolutions or CUDA matrix products (docs/method.md, "Compute precision").

    torch's defaults run cuDNN convolutions (a ViT's patch embedding) in TF32, a 10-bit
    mantissa, on Ampere and later GPUs, so features recorded as float32 were not; a process
    that called ``torch.set_float32_matmul_precision("high")`` does the same to every matrix
    product. Other dtypes are left as they are; the flags are restored afterwards.
    """
    if dtype != torch.float32:
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9; mixing it with the old flags raises
        flags = [(conv, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision")]
        off: object = "ieee"
    else:
        flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
        off = False
    saved = [(owner, name, getattr(owner, name)) for owner, name in flags]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, off)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def resolve_model_folder(
    model_id: str,
    hub_repo: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    allow_patterns: Sequence[str],
    what: str,
) -> tuple[Path, str]:
    """The folder to load a model from, and its revision: a local directory as it is
    (``"local"``), else the hub-cache snapshot of ``hub_repo`` (its commit hash)."""
    local = Path(model_id).expanduser()  # as the registry reads a local model's id
    if local.is_dir():
        if revision:
            log.warning("%s is a local directory; ignoring revision %r", model_id, revision)
        return local, "local"
    folder = resolve_hub_snapshot(
        hub_repo, revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns, what=what
    )
    return folder, folder.name


def resolve_hub_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    allow_patterns: Sequence[str] | None = None,
    what: str = "model",
) -> Path:
    """The local snapshot folder of ``repo_id`` at ``revision`` (None = main) in the hub cache.

    Uses the cache only when it holds the revision; otherwise downloads (``allow_patterns``),
    unless offline, which is an error telling the user to prefetch. The folder's name is the
    resolved commit hash.
    """
    from huggingface_hub import snapshot_download

    kwargs = dict(revision=revision, cache_dir=str(cache_dir) if cache_dir is not None else None)
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception as err:  # LocalEntryNotFoundError and friends
        if is_offline():
            where = cache_dir if cache_dir is not None else "the default Hugging Face cache"
            raise ExtractionError(
                f"{what} {repo_id!r} (revision {revision or 'main'}) is not in the hub cache "
                f"{where} and HF_HUB_OFFLINE is set; prefetch it first ({err})"
            ) from err
    log.info("downloading %s %r (revision %s)", what, repo_id, revision or "main")
    return Path(
        snapshot_download(repo_id, allow_patterns=list(allow_patterns or []) or None, **kwargs)
    )


def check_weight_files(directory: Path, model_id: str, *, allow_pickle: bool) -> list[str]:
    """Weight files in ``directory``; refuse pickle-only checkpoints unless ``allow_pickle``.

    Returns the names of the files that will be loaded (safetensors when present).
    """
    files = [p for p in directory.iterdir() if p.is_file()]
    safe = sorted(p.name for p in files if p.name.endswith(SAFE_SUFFIXES))
    pickles = sorted(p.name for p in files if p.name.endswith(PICKLE_SUFFIXES))
    pickles = [n for n in pickles if "training_args" not in n and "optimizer" not in n]
    if safe:
        return safe
    if pickles:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{model_id}: only pickle checkpoint(s) {pickles} in {directory}; loading a pickle "
                "can run arbitrary code. Convert the weights to safetensors, or opt in with "
                "allow_pickle=True (in the config file: extraction.allow_pickle: true)."
            )
        log.warning("%s: loading pickle checkpoint(s) %s (allow_pickle=True)", model_id, pickles)
        return pickles
    raise ExtractionError(
        f"{model_id}: no weight files (*.safetensors"
        f"{', pickle files' if allow_pickle else ''}) in {directory}"
        + ("" if allow_pickle else "; if the model ships only pickle files, set allow_pickle")
    )


def damaged_weights(err: BaseException, folder: Path, model_id: str) -> ExtractionError | None:
    """The model's own error for a weights file safetensors cannot read (truncated by an
    interrupted copy or download, or damaged), which was a bare ``SafetensorError`` naming
    neither the model nor the folder, and was retried (audit); None for other errors."""
    if not isinstance(err, SafetensorError):
        return None
    return ExtractionError(
        f"{model_id}: a weights file in {folder} is incomplete or damaged (safetensors: {err}), "
        "as an interrupted copy or download leaves it: copy the model's folder again; for a "
        "hub model, delete its whole folder in the hub cache (models--<org>--<name>, whose "
        "blobs/ holds the damaged file: a snapshot deleted alone is linked to it again) and "
        f"its download record ({PREFETCH_RECORDS}/<model key>.json), so that the next run "
        "downloads it again"
    )


def model_config(folder: Path, model_id: str) -> Any:
    """A model folder's ``config.json``, parsed; an :class:`ExtractionError` naming the model
    and the folder when it cannot be read."""
    import json

    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExtractionError(f"{model_id}: unreadable config.json in {folder} ({err})") from err


def check_no_remote_code(directory: Path, model_id: str) -> str | None:
    """Refuse a transformers model whose config needs code from its repository.

    ``trust_remote_code`` is never enabled: a repository's ``*.py`` files would run with the
    job's permissions. A config with an ``auto_map`` whose ``model_type`` transformers
    implements itself is loaded with that built-in class (the repository's code is ignored, as
    the returned note, logged, says); one whose ``model_type`` is unknown is a
    :class:`RemoteCodeError`.
    """
    import json

    auto_maps = {}
    for name in ("config.json", "tokenizer_config.json"):
        try:
            cfg = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(cfg, dict) and cfg.get("auto_map"):
            auto_maps[name] = cfg["auto_map"]
            if name == "config.json":
                model_type = cfg.get("model_type")
    if not auto_maps:
        return None
    if "config.json" not in auto_maps:
        note = f"{model_id}: ignoring the custom tokenizer code in tokenizer_config.json auto_map"
        log.warning("%s", note)
        return note
    from transformers import CONFIG_MAPPING

    code = sorted({str(v) for m in auto_maps.values() for v in dict(m).values()})
    if model_type in CONFIG_MAPPING:
        note = (
            f"{model_id}: config.json asks for custom code {code}; ignoring it and using "
            f"transformers' own implementation of model_type {model_type!r}"
        )
        log.warning("%s", note)
        return note
    raise RemoteCodeError(
        f"{model_id}: the model needs custom code from its repository ({code}, model_type "
        f"{model_type!r} is not built into transformers); xmodal never runs repository code "
        "(trust_remote_code is always off). Use a model that transformers supports natively, "
        "or a newer transformers that implements this architecture."
    )


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> tqdm:
    """A tqdm bar; updates often on a terminal, every 30 s in a log file."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        mininterval=0.5 if tty else 30.0,
        dynamic_ncols=tty,
    )


#: An extraction's features beyond this many bytes go to a spill file next to the output instead
#: of host memory, so that a job's memory does not grow with the number of stimuli (the 8 GB base
#: of xmodal.resources.extraction_resources covers this much).
IN_MEMORY_FEATURE_BYTES = 2 << 30


class SpilledFeatures:
    """``(n_layers, m, dim)`` float32 features held in a file (layer-major, C order), read one
    layer at a time: iterating yields each layer's ``(m, dim)`` array; ``np.asarray`` reads all."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int]):
        self.path = Path(path)
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, layer: int) -> np.ndarray:
        n_layers, m, dim = self.shape
        if not 0 <= layer < n_layers:
            raise IndexError(f"layer {layer} of {n_layers}")
        count = m * dim
        arr = np.fromfile(self.path, self.dtype, count=count, offset=layer * count * 4)
        if arr.size != count:
            raise ExtractionError(f"{self.path}: spill file ends inside layer {layer}")
        return arr.reshape(m, dim)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(self.shape[0]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.stack(list(self))
        return out if dtype is None else out.astype(dtype)


@dataclass
class ExtractionResult:
    """Features of one model for every stimulus: ``features`` ``(n_layers, m, dim)`` float32, in
    memory or (large extractions) in a spill file."""

    features: np.ndarray | SpilledFeatures
    abs_q95: np.ndarray
    layer_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    #: language models: tokens each caption was pooled over (special tokens included, after
    #: truncation), ``(m,)`` int; None for vision models
    n_tokens: np.ndarray | None = None


def rows_by_first(keys: Iterable[Hashable]) -> dict[int, list[int]]:
    """Rows with equal keys, by their first row: ``{first: [first, copy, ...]}`` for every
    distinct key, in order of first rows. Repeated inputs (captions with the same tokens, one
    image file under several stimuli) run once and fill every row of their group."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return {group[0]: group for group in groups.values()}


def spread_copies(
    feats: torch.Tensor, rows: Sequence[int], copies: dict[int, list[int]]
) -> tuple[torch.Tensor, np.ndarray]:
    """``(B, ...)`` features of the first rows ``rows`` and the rows they fill: each row of
    ``copies`` (:func:`rows_by_first`) fills its whole group with bit-identical values, so
    repeated stimuli tie exactly (docs/method.md, "Ties"), whatever rounding their batches had."""
    rows = [int(r) for r in rows]
    same = [j for j, r in enumerate(rows) for _ in copies.get(r, (r,))]
    targets = np.array([i for r in rows for i in copies.get(r, (r,))], dtype=np.int64)
    if len(same) > len(rows):
        index = torch.as_tensor(same)
        if feats.is_cuda:  # through pinned memory, so the copy does not wait for the GPU
            index = index.pin_memory().to(feats.device, non_blocking=True)
        feats = feats[index]
    return feats, targets


def _contiguous_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` positions in sorted ``rows`` where the values run up by one."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    edges = [0, *breaks.tolist(), len(rows)]
    return list(zip(edges[:-1], edges[1:], strict=True))


class FeatureAccumulator:
    """Collects ``(B, n_layers, dim)`` batches into an ``(n_layers, m, dim)`` float32 array.

    Per batch, on the compute device: finiteness flags and ``abs_q95`` (all layers of the batch
    are in memory). The device-to-host copy of batch k happens when batch k+1 has been queued
    (``add`` then ``flush`` lag by one), so the GPU is not idle while the host copies.

    With ``spill`` (a scratch file, xmodal.io.scratch_path) and more than
    :data:`IN_MEMORY_FEATURE_BYTES` of features, batches are written into that file instead of
    memory; the result is then :class:`SpilledFeatures`. Fails before the first batch when the
    file system lacks room for the spill file and the feature file.
    """

    def __init__(
        self,
        n_layers: int,
        m: int,
        dim: int,
        *,
        model_name: str,
        layer_names: Sequence[str],
        stimulus_ids: Sequence[str],
        spill: str | os.PathLike | None = None,
    ):
        self.shape = (int(n_layers), int(m), int(dim))
        nbytes = 4 * n_layers * m * dim
        self.spill = Path(spill) if spill is not None and nbytes > IN_MEMORY_FEATURE_BYTES else None
        if spill is not None:
            _check_room(Path(spill).parent, nbytes * (2 if self.spill else 1), model_name)
        if self.spill is None:
            self.features = np.empty(self.shape, dtype=np.float32)
            self._fh = None
        else:
            log.info(
                "model %s: %.1f GiB of features, kept in %s until written",
                model_name, nbytes / 2**30, self.spill,
            )  # fmt: skip
            self._fh = open(self.spill, "r+b")  # noqa: SIM115 (closed by close())
            self._fh.truncate(nbytes)
        self.abs_q95 = np.full(m, np.nan, dtype=np.float32)
        self.filled = np.zeros(m, dtype=bool)
        self.model_name = model_name
        self.layer_names = list(layer_names)
        self.stimulus_ids = list(stimulus_ids)
        self._pending: tuple | None = None

    def add(self, feats: torch.Tensor, idx: np.ndarray) -> None:
        """Queue one batch of features (rows = stimuli ``idx``); stores the previous batch."""
        feats = feats.detach().float()
        finite = torch.isfinite(feats).all(dim=-1)  # (B, n_layers)
        q = abs_quantile_rows(feats)
        if feats.is_cuda:
            # asynchronous copies into pinned memory; the event marks when they are done, so
            # waiting for this batch never waits for the forward pass queued after it
            host = [
                torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (feats, finite, q)
            ]
            for h, t in zip(host, (feats, finite, q), strict=True):
                h.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(feats.device))  # the copies' device, not cuda:0
            pending = (*host, np.asarray(idx), done)
        else:
            pending = (feats, finite, q, np.asarray(idx), None)
        prev, self._pending = self._pending, pending
        if prev is not None:
            self._store(*prev)

    def flush(self) -> None:
        """Store the queued batch."""
        if self._pending is not None:
            prev, self._pending = self._pending, None
            self._store(*prev)

    def _store(
        self,
        feats: torch.Tensor,
        finite: torch.Tensor,
        q: torch.Tensor,
        idx: np.ndarray,
        done: torch.cuda.Event | None,
    ) -> None:
        if done is not None:
            done.synchronize()
        finite_np = finite.numpy()
        if not finite_np.all():
            bad_rows, bad_layers = np.nonzero(~finite_np)
            layers = sorted({self.layer_names[j] for j in bad_layers})
            stimuli = sorted({self.stimulus_ids[idx[i]] for i in bad_rows})
            raise NonFiniteFeatureError(
                f"model {self.model_name}: NaN/Inf features in layer(s) {preview(layers)} for "
                f"stimuli {preview(stimuli)}; no feature file was written"
            )
        if self._fh is None:
            self.features[:, idx, :] = feats.numpy().transpose(1, 0, 2)
        else:
            self._write_rows(feats.numpy(), idx)
        self.abs_q95[idx] = q.numpy()
        self.filled[idx] = True

    def result(self, info: dict[str, Any] | None = None) -> ExtractionResult:
        self.flush()
        if not self.filled.all():
            missing = [self.stimulus_ids[i] for i in np.flatnonzero(~self.filled)]
            raise ExtractionError(
                f"model {self.model_name}: no features for stimuli {preview(missing)}"
            )
        features: np.ndarray | SpilledFeatures
        if self._fh is None:
            features = self.features
        else:
            self.close()
            features = SpilledFeatures(self.spill, self.shape)
        return ExtractionResult(features, self.abs_q95, self.layer_names, dict(info or {}))

    def close(self) -> None:
        """Close the spill file (the extractors call it on every exit, so that a failed
        extraction does not keep an unlinked file's space while its traceback lives)."""
        if self._fh is not None and not self._fh.closed:
            self._fh.close()

    def _write_rows(self, batch: np.ndarray, idx: np.ndarray) -> None:
        """Write a ``(B, n_layers, dim)`` batch for stimuli ``idx`` into the spill file, one
        write per layer and run of consecutive stimuli."""
        n_layers, m, dim = self.shape
        order = np.argsort(idx, kind="stable")
        rows, batch = idx[order], batch[order]
        fd = self._fh.fileno()
        for a, b in _contiguous_runs(rows):
            for layer in range(n_layers):
                buf = memoryview(np.ascontiguousarray(batch[a:b, layer])).cast("B")
                offset = 4 * dim * (layer * m + int(rows[a]))
                while buf:  # a write may be short; os.pwrite says how much it wrote
                    n = os.pwrite(fd, buf, offset)
                    buf, offset = buf[n:], offset + n


def _check_room(directory: Path, needed: int, model_name: str) -> None:
    """Fail before extraction when ``directory`` has fewer than ``needed`` bytes free."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return  # cannot tell; a full disk is still reported when a write fails
    if free < needed:
        raise DiskFullError(
            errno.ENOSPC,
            f"model {model_name}: writing its features needs {_amount(needed)} in "
            f"{directory} (the feature file, and a spill file of the same size above "
            f"{IN_MEMORY_FEATURE_BYTES / 2**30:.0f} GiB of features), but only "
            f"{_amount(free)} are free; free space there or move results/ to a bigger disk",
        )


def _amount(n_bytes: int) -> str:
    """Bytes in GiB, or MiB or KiB where GiB would round to 0.0 (a message said "needs 0.0 GiB
    … but only 0.0 GiB are free" for a small model, audit)."""
    for unit, power in (("GiB", 30), ("MiB", 20)):
        if n_bytes >= 2**power / 10:
            return f"{n_bytes / 2**power:.1f} {unit}"
    return f"{n_bytes / 2**10:.1f} KiB"


def is_oom(err: BaseException) -> bool:
    """True for a CUDA (or other accelerator) out-of-memory error."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


class BatchSizer:
    """Runs work in chunks of the current batch size; on out-of-memory halves it and retries.

    The reduced size is kept for the rest of the run (a smaller batch that fits once will fit again).
    """

    def __init__(self, batch_size: int, model_name: str):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.model_name = model_name
        self.n_halvings = 0

    def run(self, n: int, fn: Callable[[int, int], None]) -> None:
        """Call ``fn(start, stop)`` over ``range(n)`` in chunks, halving the chunk on OOM."""
        start = 0
        while start < n:
            stop = min(n, start + self.batch_size)
            try:
                fn(start, stop)
            except Exception as err:
                if not is_oom(err) or self.batch_size == 1:
                    raise
                oom = True
            else:
                oom = False
            if not oom:
                start = stop
                continue
            # outside the except block, so the traceback's references to tensors are gone
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.batch_size = max(1, self.batch_size // 2)
            self.n_halvings += 1
            log.warning(
                "model %s: out of memory on a batch of %d; continuing with batch size %d",
                self.model_name,
                stop - start,
                self.batch_size,
            )
