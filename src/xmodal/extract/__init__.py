"""Feature extraction: vision (timm) and language (transformers) models to HDF5 feature files.

:func:`extract_features` is the one call the workflow makes: it reads the stimulus manifest,
loads one model from its config.yaml registry entry, extracts every layer's features and writes
the feature file atomically with its provenance. Loaders (``vision.load_vision_model``,
``language.load_language_model``) are separate from the extractors, which take a model and
batches and know nothing about hubs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal.extract._common import (
    ExtractionError,
    ExtractionResult,
    NonFiniteFeatureError,
    RemoteCodeError,
    UnsafeCheckpointError,
    resolve_device,
    resolve_dtype,
    rows_by_first,
)
from xmodal.registry import FEATURES_VERSION
from xmodal.resources import DEFAULT_BATCH, LOADER_PREFETCH

log = logging.getLogger(__name__)

#: suffix of the scratch file that holds features too large for memory until they are written
SPILL_SUFFIX = ".spill"


__all__ = [
    "ExtractionError",
    "ExtractionResult",
    "NonFiniteFeatureError",
    "SPILL_SUFFIX",
    "RemoteCodeError",
    "UnsafeCheckpointError",
    "extract_features",
]


def _batch_size(batch_size: Any, modality: str, device: torch.device) -> int:
    if isinstance(batch_size, Mapping):
        batch_size = batch_size.get(modality)
    if batch_size is None:
        return DEFAULT_BATCH[(modality, "cuda" if device.type == "cuda" else "cpu")]
    return int(batch_size)


def _image_keys(images: Sequence[str], root: Path, digests: Sequence[str | None]) -> list[Hashable]:
    """What makes two stimuli's images one model input: the file's SHA-256 where it is known
    (the duplicate scan of ``stimuli.drop_duplicates`` read every file: a byte-identical copy
    is the same input), else the file itself (its device and inode: a path written another
    way, ``a/../a/x.png``, a symbolic or a hard link), else the path as written (a file that
    cannot be read, which the loader then names)."""
    keys: list[Hashable] = []
    for image, digest in zip(images, digests, strict=True):
        if digest is not None:
            keys.append(("sha256", digest))
            continue
        try:
            st = os.stat(root / image)
        except (OSError, ValueError):
            keys.append(("path", Path(image)))
        else:
            keys.append(("file", st.st_dev, st.st_ino))
    return keys


def extract_features(
    model_key: str,
    model_cfg: Mapping[str, Any],
    manifest_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    batch_size: int | Mapping[str, int] | None = None,
    num_workers: int | None = None,
    allow_pickle: bool = False,
    max_tokens: int | None = None,
    drop_duplicates: bool = False,
    progress: bool = True,
    vision_layer: int | None = None,
) -> Path:
    """Extract every layer's features of one model for every stimulus; write ``out_path``.

    ``model_cfg`` is the model's config.yaml entry (``modality``, ``id``, ``revision``, and
    optionally ``label``, ``family``, ``size_b``). ``device="auto"`` = CUDA when visible, else
    CPU; ``dtype="auto"`` = float32 for vision models, and for language models bfloat16 on CUDA
    and float32 on CPU (xmodal.registry.compute_dtype). Vision images are decoded by
    ``num_workers`` DataLoader workers (None: the site default, xmodal.registry.SITE_DEFAULTS).
    Captions are cut to ``max_tokens`` tokens (None: the model's context, or
    ``language.DEFAULT_MAX_TOKENS`` when it declares none); the limit and the number of truncated
    captions go into the ``preprocessing`` attribute. With ``vision_layer`` (config key
    ``analysis.vision_layer``), a vision model whose blocks do not include that layer fails right
    after loading, before any image is processed. With ``drop_duplicates``, stimuli with the same
    decoded image and the same caption as an earlier one are left out
    (xmodal.stimuli.drop_duplicates). Returns the path of the written feature file.
    """
    from torch.utils.data import DataLoader

    from xmodal.attempts import begin_attempt, end_attempt
    from xmodal.features import STIMULI_DIGEST, WEIGHTS_DIGEST, write_features
    from xmodal.io import remove_stale_temporaries, scratch_path
    from xmodal.stimuli import ImageDataset, manifest_stamp, read_manifest

    # until the file is made: a failed or killed extraction leaves the mark, and the next run
    # makes the file again (xmodal.attempts.begin_attempt: Snakemake records a failed job as done)
    begin_attempt(out_path)
    t0 = time.perf_counter()
    modality = model_cfg.get("modality")
    if modality not in ("vision", "language"):
        raise ExtractionError(
            f"model {model_key}: modality must be 'vision' or 'language', got {modality!r}"
        )
    if not model_cfg.get("id"):
        raise ExtractionError(f"model {model_key}: registry entry has no 'id'")
    model_id = str(model_cfg["id"])
    revision = model_cfg.get("revision")
    dev = resolve_device(device)
    if isinstance(dtype, str):
        from xmodal.registry import compute_dtype

        dtype = compute_dtype(modality, dtype)
    dt = resolve_dtype(dtype, dev)
    bs = _batch_size(batch_size, modality, dev)
    manifest_path = Path(manifest_path)
    df = manifest = read_manifest(manifest_path)
    # what this extraction reads, as its manifest stamp digests it: the workflow refuses the file
    # later if it is stale yet newer than the stamp (xmodal.features.check_against_stamp). A
    # vision extraction digests the image bytes it decodes (each file read once, in the loader's
    # workers, not in a serial pass before the first batch); the duplicate scan's digests cover
    # every file when it runs, and files with no digest yet are read for the stamp.
    image_digests: list[str | None] = [None] * len(manifest)
    if drop_duplicates:  # the same rule in every model's job: every file gets the same stimuli
        from xmodal.stimuli import analysed_stimuli

        df, scan = analysed_stimuli(df, manifest_path.parent)  # reads every image once
        image_digests = scan["bytes_sha256"].tolist()
    ids = df["stimulus_id"].tolist()
    log.info(
        "extracting %s (%s, %s) for %d stimuli of %s on %s, %s, batch %d",
        model_key, modality, model_id, len(ids), manifest_path, dev, dt, bs,
    )  # fmt: skip

    # features too large for memory wait in a scratch file next to the output (one a killed
    # job left is removed first)
    remove_stale_temporaries(out_path, SPILL_SUFFIX)
    remove_stale_temporaries(out_path)  # a killed write's: before the free-space check counts it
    # the snapshot the download record names, not whatever the cache's refs/main says now
    from xmodal.prefetch import downloaded_revision

    snapshot = downloaded_revision(model_key, model_id, revision)
    if snapshot != revision:
        log.info("%s: loading revision %s, as its download record names", model_key, snapshot)
    load = dict(
        revision=snapshot, cache_dir=cache_dir, device=dev, dtype=dt, allow_pickle=allow_pickle
    )
    with scratch_path(out_path, SPILL_SUFFIX) as spill:
        if modality == "vision":
            from xmodal.extract.vision import extract_vision_features, load_vision_model

            model, transform, info = load_vision_model(model_id, **load)
            if vision_layer is not None:  # fail before hours of extraction, naming the key
                from xmodal.config import resolve_layer

                resolve_layer(
                    vision_layer, int(info["n_layers"]), f"model {model_key} ({model_id})"
                )
            if num_workers is None:
                from xmodal.registry import SITE_DEFAULTS

                num_workers = int(SITE_DEFAULTS["num_workers"])
            # rows of df are rows of the manifest (duplicates dropped): their manifest positions
            rows = (
                np.flatnonzero(manifest["stimulus_id"].isin(ids).to_numpy())
                if drop_duplicates
                else np.arange(len(df))
            )
            # an image file that several stimuli show (one image, several captions, as in COCO)
            # is decoded and run once and fills their rows with one copy of its features, so
            # they tie exactly, as repeated captions do (docs/method.md, "Ties")
            copies = rows_by_first(
                _image_keys(
                    df["image"].astype(str).tolist(),
                    manifest_path.parent,
                    [image_digests[int(r)] for r in rows],
                )
            )
            first = np.fromiter(copies, dtype=np.int64, count=len(copies))
            dataset = ImageDataset(
                df.iloc[first], manifest_path.parent, transform, with_digests=True
            )
            loader = DataLoader(
                dataset,
                batch_size=bs,
                shuffle=False,
                num_workers=num_workers,
                pin_memory=dev.type == "cuda",
                prefetch_factor=LOADER_PREFETCH if num_workers > 0 else None,
                persistent_workers=False,
            )

            def batches() -> Iterator[tuple[torch.Tensor, np.ndarray]]:
                for images, idx, digests in loader:
                    at = first[idx.numpy()]  # the first rows of df naming these files
                    for i, digest in zip(at.tolist(), digests, strict=True):
                        for r in copies[i]:
                            image_digests[int(rows[r])] = digest
                    yield images, at

            res = extract_vision_features(
                model,
                batches(),
                stimulus_ids=ids,
                batch_size=bs,
                model_name=model_key,
                progress=progress,
                spill=spill,
                copies=copies,
            )
            n_repeated = len(df) - len(first)
            if n_repeated:
                log.info(
                    "%s: %d images run for %d stimuli (%d show an earlier stimulus's image "
                    "file: the same file, or a byte-identical copy)",
                    model_key, len(first), len(df), n_repeated,
                )  # fmt: skip
            preprocessing = {
                "image": info["preprocessing"],
                "num_workers": num_workers,
                "n_repeated": n_repeated,  # rows copied from an earlier stimulus's image file
            }
        else:
            from xmodal.extract.language import extract_language_features, load_language_model

            model, tokenizer, info = load_language_model(
                model_id, **load, size_b=(model_key, float(model_cfg.get("size_b") or 0.0))
            )
            res = extract_language_features(
                model,
                tokenizer,
                df["caption"].tolist(),
                stimulus_ids=ids,
                batch_size=bs,
                max_tokens=max_tokens,
                model_name=model_key,
                progress=progress,
                spill=spill,
            )
            preprocessing = {
                "tokenizer": {
                    **info["tokenizer"],
                    "max_length": res.info["max_length"],
                    "max_length_source": res.info["max_length_source"],
                    "n_truncated": res.info["n_truncated"],
                    "truncated_ids": res.info["truncated_ids"],
                    # captions run once per distinct token sequence (docs/method.md)
                    "n_repeated": res.info["n_repeated"],
                }
            }

        attrs = {
            "model_id": model_id,
            "model_key": model_key,
            "modality": modality,
            "source": info["source"],
            "revision": info["revision"],
            "requested_revision": revision or "",
            "pooling": res.info["pooling"],
            "compute_dtype": info["dtype"],
            "preprocessing": preprocessing,
            "architecture": info["architecture"],
            "weights": info["weights"],
            "device": str(dev),
            "batch_size": int(res.info["batch_size"]),
            "label": model_cfg.get("label") or "",
            "family": model_cfg.get("family") or "",
            "size_b": float(model_cfg.get("size_b") or 0.0),
            "features_version": FEATURES_VERSION[modality],
            STIMULI_DIGEST: manifest_stamp(
                manifest,
                modality,
                drop_duplicates,
                manifest_path.parent,
                image_digests=image_digests,
            )["sha256"],
        }
        folder = Path(model_id).expanduser()
        # a local or built model: the weights its folder held (the workflow checks)
        if folder.is_dir():
            from xmodal.io import directory_digest

            log.info("%s: digest of the weights in %s", model_key, folder)
            attrs[WEIGHTS_DIGEST] = directory_digest(folder)
        # the extractor checked finiteness batch by batch on the device (no float16 cast here)
        out = write_features(
            out_path,
            res.features,
            ids,
            res.layer_names,
            attrs,
            abs_q95=res.abs_q95,
            n_tokens=res.n_tokens,
            check_finite=False,
        )
        shape = res.features.shape
        del res  # a spilled result reads its file; the file goes when the block ends
    dt_s = time.perf_counter() - t0
    log.info(
        "%s: %d layers x %d stimuli x %d dims in %.1f s (%.1f stimuli/s) -> %s",
        model_key, shape[0], len(ids), shape[2], dt_s, len(ids) / dt_s, out,
    )  # fmt: skip
    end_attempt(out_path)
    return out
