"""Vision features (timm): the CLS token of every transformer block's output.

"Block output" is after the block's second residual add and before the model's final norm,
captured with forward hooks on ``model.blocks[i]``. Images go through timm's own eval transform
for the model (``resolve_data_config`` + ``create_transform``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal._compat import ensure_torchvision_importable
from xmodal.extract._common import (
    BatchSizer,
    ExtractionError,
    ExtractionResult,
    FeatureAccumulator,
    SafetensorError,
    UnsafeCheckpointError,
    check_weight_files,
    damaged_weights,
    dtype_name,
    ieee_float32,
    model_config,
    progress_bar,
    resolve_model_folder,
    spread_copies,
)
from xmodal.features import vision_block_names
from xmodal.registry import PICKLE_SUFFIXES, SAFE_SUFFIXES, download_patterns, hub_repo_of

log = logging.getLogger(__name__)

__all__ = [
    "extract_vision_features",
    "load_vision_model",
    "vision_layer_names",
]


def _timm_checkpoint(folder: Path, model_id: str, allow_pickle: bool) -> list[str] | None:
    """The one checkpoint file timm's local-dir loader reads from ``folder``, by timm's own
    order of preference (``timm.models._hub``; None where this timm has no such order): it
    prefers a ``pytorch_model.bin`` to an ``open_clip_model.safetensors`` beside it, so a pickle
    is refused here unless ``allow_pickle``, and the feature file names the file read."""
    try:
        from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
    except ImportError:
        return None
    chosen = next((n for n in _PREFERRED_FILES if (folder / n).exists()), None)
    if chosen is None:  # then the first by name of the first suffix that any file has
        found = (sorted(p.name for p in folder.glob(f"*{ext}")) for ext in _EXT_PRIORITY)
        chosen = next((names[0] for names in found if names), None)
    if chosen is None:
        return None
    if chosen.endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{model_id}: timm loads the pickle checkpoint {chosen} from {folder} (it prefers it "
            "to the safetensors file(s) there); loading a pickle can run arbitrary code. Leave "
            "only the safetensors weights in the folder (named model.safetensors), or opt in "
            "with allow_pickle=True (in the config file: extraction.allow_pickle: true)."
        )
    return [chosen]


def load_vision_model(
    model_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights_file: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load a timm ViT in eval mode with its eval transform; returns ``(model, transform, info)``.

    ``model_id`` is a timm id with pretrained tag (``vit_huge_patch14_224.mae``; weights from the
    hub cache repo ``timm/<id>`` at ``revision``, downloaded only when not cached and not
    offline) or a local directory with a timm ``config.json`` + ``model.safetensors``. With
    ``weights_file``, the architecture comes from the timm id and the weights from that file.
    Pickle checkpoints are refused unless ``allow_pickle``. ``info`` holds ``revision`` (the hub
    commit hash, or ``"local"``), ``preprocessing`` (timm data config), ``n_layers``, ``dim``.
    """
    ensure_torchvision_importable()
    import timm
    from timm.data import create_transform, resolve_data_config

    device = torch.device(device)
    weights: list[str]
    if weights_file is not None:
        wf = Path(weights_file)
        if not wf.is_file():
            raise ExtractionError(f"{model_id}: weights file {wf} not found")
        if not wf.name.endswith(SAFE_SUFFIXES):
            if not wf.name.endswith(PICKLE_SUFFIXES) or not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{model_id}: weights file {wf} is not safetensors; loading a pickle can run "
                    "arbitrary code. Convert it, or opt in with allow_pickle=True."
                )
            log.warning("%s: loading pickle weights %s (allow_pickle=True)", model_id, wf)
        name, revision_used, weights = model_id, "local", [wf.name]
        where = wf.parent
        create = dict(
            model_name=model_id,
            pretrained=True,
            # custom_load: the name's own checkpoint may be a JAX .npz, which this file is not
            pretrained_cfg_overlay=dict(file=str(wf), custom_load=False),
        )
    else:
        hub_repo, pinned = hub_repo_of(model_id, "vision")
        folder, revision_used = resolve_model_folder(
            model_id,
            hub_repo,
            revision=revision or pinned,
            cache_dir=cache_dir,
            allow_patterns=download_patterns("timm", allow_pickle),
            what="vision model",
        )
        if not (folder / "config.json").is_file():
            raise ExtractionError(f"{model_id}: no timm config.json in {folder}")
        _check_timm_config(folder, model_id)
        weights = check_weight_files(folder, model_id, allow_pickle=allow_pickle)
        weights = _timm_checkpoint(folder, model_id, allow_pickle) or weights
        name, where = model_id, folder
        create = dict(model_name=f"local-dir:{folder}", pretrained=True)

    try:
        model = timm.create_model(**create)
    except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as err:
        damaged = damaged_weights(err, where, model_id)  # safetensors' error: its own message
        if damaged is not None:
            raise damaged from err
        msg = str(err) if len(str(err)) < 600 else str(err)[:600] + " ..."
        raise ExtractionError(f"{model_id}: timm could not build/load the model ({msg})") from err
    model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    _check_vit(model, model_id)

    data_cfg = resolve_data_config({}, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    info = dict(
        model_id=str(name),
        source="timm",
        revision=revision_used,
        requested_revision=revision,
        weights=weights,
        architecture=type(model).__name__,
        pretrained_tag=model.pretrained_cfg.get("tag"),
        preprocessing={k: (list(v) if isinstance(v, tuple) else v) for k, v in data_cfg.items()},
        n_layers=len(model.blocks),
        dim=int(model.embed_dim if hasattr(model, "embed_dim") else model.num_features),
        device=str(device),
        dtype=dtype_name(dtype),
    )
    log.info(
        "loaded vision model %s (revision %s): %d blocks, dim %d, input %s, %s on %s",
        model_id,
        revision_used,
        info["n_layers"],
        info["dim"],
        data_cfg.get("input_size"),
        info["dtype"],
        device,
    )
    return model, transform, info


def _check_timm_config(folder: Path, model_id: str) -> None:
    """A transformers checkpoint given as a vision model failed as "timm could not build/load
    the model ('architecture')": its config.json names ``model_type``, timm's ``architecture``."""
    config = model_config(folder, model_id)
    if isinstance(config, dict) and "architecture" not in config and "model_type" in config:
        raise ExtractionError(
            f"{model_id}: {folder} holds a transformers model (model_type "
            f"{config['model_type']!r}), not a timm one; vision models here are timm ViTs "
            "(a hub id such as vit_huge_patch14_224.mae or timm/…, or a folder timm's "
            "save_for_hf wrote)"
        )


def _check_vit(model: torch.nn.Module, model_id: str) -> None:
    if not hasattr(model, "blocks") or len(model.blocks) == 0:
        raise ExtractionError(
            f"{model_id}: model has no transformer 'blocks' to read features from"
        )
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 1) < 1:
        raise ExtractionError(f"{model_id}: model has no class token (CLS) to extract")


def vision_layer_names(model: torch.nn.Module) -> list[str]:
    """``blocks.0`` … ``blocks.{L-1}``."""
    return vision_block_names(len(model.blocks))


class _ClsHooks:
    """Forward hooks that keep token 0 of every block's output during one forward pass."""

    def __init__(self, model: torch.nn.Module, model_name: str = "vision model"):
        self.model = model
        self.model_name = model_name
        self.tokens: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.handles = [blk.register_forward_hook(self._hook) for blk in model.blocks]

    def _hook(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        # a copy: a view of token 0 would keep the whole (B, tokens, dim) output alive
        self.tokens.append(output[:, 0].clone())
        self.lengths.append(int(output.shape[1]))

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n_layers, dim)`` CLS tokens for a batch of preprocessed images."""
        self.tokens, self.lengths = [], []
        try:
            out = self.model.forward_features(x)
            if len(self.tokens) != len(self.model.blocks):
                raise ExtractionError(
                    f"captured {len(self.tokens)} block outputs for {len(self.model.blocks)} blocks"
                )
            # token 0 of a block is the CLS token only when the block sees the model's whole
            # sequence; CaiT and XCiT add the class token after their blocks, ConViT midway
            if any(n != out.shape[1] for n in self.lengths):
                raise ExtractionError(
                    f"{self.model_name}: its blocks see {sorted(set(self.lengths))} tokens but the "
                    f"model outputs {out.shape[1]}: the class token joins after (some of) the "
                    "blocks (CaiT, XCiT, ConViT), so token 0 of a block is a patch, not the CLS "
                    "token; use a ViT whose blocks carry the class token (ViT, DeiT, EVA, BEiT)"
                )
            return torch.stack(self.tokens, dim=1)
        finally:
            self.tokens, self.lengths = [], []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def extract_vision_features(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | np.ndarray | Sequence[int]]],
    *,
    stimulus_ids: Sequence[str],
    batch_size: int | None = None,
    model_name: str = "vision model",
    progress: bool = True,
    spill: str | os.PathLike | None = None,
    copies: dict[int, list[int]] | None = None,
) -> ExtractionResult:
    """CLS token of every block for every stimulus, from ``(images, indices)`` batches.

    ``batches`` (e.g. a DataLoader over :class:`xmodal.stimuli.ImageDataset`) yields preprocessed
    images and their row indices into ``stimulus_ids``. Each batch runs in chunks of at most
    ``batch_size`` (default: the batch as given); a chunk that runs out of memory is halved.
    ``copies`` (:func:`~xmodal.extract._common.rows_by_first`): an image that several stimuli
    name runs once, at its first row, and its features fill every row of its group.
    Returns float32 features ``(n_layers, m, dim)`` and per-stimulus ``abs_q95``; ``spill``: a
    scratch file for features too large for memory (:class:`FeatureAccumulator`).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    names = vision_layer_names(model)
    dim = int(getattr(model, "embed_dim", 0) or model.num_features)
    m = len(stimulus_ids)
    acc = FeatureAccumulator(
        len(names),
        m,
        dim,
        model_name=model_name,
        layer_names=names,
        stimulus_ids=stimulus_ids,
        spill=spill,
    )
    hooks = _ClsHooks(model, model_name)
    sizer: BatchSizer | None = BatchSizer(batch_size, model_name) if batch_size else None
    nonblocking = device.type == "cuda"
    copies = copies or {}
    try:
        with ieee_float32(dtype), progress_bar(m, model_name, "img", progress) as bar:
            for images, idx in batches:
                idx = np.asarray(idx, dtype=np.int64)
                if sizer is None:
                    sizer = BatchSizer(len(idx), model_name)
                x_all = images.to(device=device, dtype=dtype, non_blocking=nonblocking)

                def run(start: int, stop: int, x_all=x_all, idx=idx) -> None:
                    feats, targets = spread_copies(
                        hooks(x_all[start:stop]), idx[start:stop], copies
                    )
                    acc.add(feats, targets)
                    bar.update(len(targets))

                sizer.run(len(idx), run)
        res = acc.result()
    finally:
        hooks.remove()
        acc.close()
    res.info.update(
        pooling="cls",
        batch_size=sizer.batch_size if sizer else batch_size,
        oom_halvings=sizer.n_halvings if sizer else 0,
    )
    return res
