"""Language features (transformers): every hidden state, mean-pooled over the caption's real tokens.

Hidden states are those of ``output_hidden_states=True``: the embedding output, then each block's
output (for BLOOM and LLaMA the last one is after the final norm, as the model returns it).
Padding never counts: the mean is over positions with ``attention_mask == 1``, accumulated in
float32. Captions are batched by sorted token length (right padding), so padding is small and
each caption's features equal those of running it alone in float32 (in bfloat16 or float16 the
batch's matrix products round differently, so batch size and composition move features at that
precision's rounding, about 1e-3 relative).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xmodal.extract._common import (
    BatchSizer,
    ExtractionError,
    ExtractionResult,
    FeatureAccumulator,
    SafetensorError,
    check_no_remote_code,
    check_weight_files,
    damaged_weights,
    dtype_name,
    ieee_float32,
    model_config,
    progress_bar,
    resolve_dtype,
    resolve_model_folder,
    rows_by_first,
    spread_copies,
)
from xmodal.logs import preview
from xmodal.registry import TOKENIZER_FILES, download_patterns, hub_repo_of

log = logging.getLogger(__name__)

_HUGE = 1_000_000  # tokenizers report "no limit" as a huge model_max_length

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "TokenizedCaptions",
    "caption_token_limit",
    "context_length",
    "extract_language_features",
    "language_layer_names",
    "load_language_model",
    "mean_pool",
    "tokenize_captions",
]


def _weight_bytes(folder: Path, weights: Sequence[str], target: torch.dtype) -> int:
    """Rough size of the weights once loaded in ``target`` dtype (from file sizes and config dtype)."""
    raw = sum((folder / w).stat().st_size for w in weights if (folder / w).is_file())
    try:
        cfg = json.loads((folder / "config.json").read_text())
        stored = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    except (OSError, ValueError):
        stored = "float32"
    stored_size = 2 if ("16" in stored) else 4
    return int(raw * torch.finfo(target).bits / 8 / stored_size)


#: fraction of the GPUs' free memory the weights may fill (the rest: activations, buffers)
GPU_HOLDS = 0.85


def _choose_device_map(
    device: torch.device,
    folder: Path,
    weights: Sequence[str],
    dtype: torch.dtype,
    model_id: str = "language model",
    size_b: tuple[str, float] | None = None,
) -> str | dict[str, Any] | None:
    """None on CPU; the job's first GPU where the weights fit on it; else ``"auto"`` (sharded by
    accelerate) over every GPU the job sees (docs/cluster.md: a language model that needs more
    than one GPU is spread; a small one was spread over all GPUs a workstation shows, audit).

    Weights that the free memory of the visible GPUs cannot hold are an ExtractionError: with
    ``device_map="auto"`` accelerate would put the rest in host memory and the job would run
    for hours on the CPU, and be retried (docs/cluster.md, "What each job asks for").
    ``size_b``: the model's config key and its ``size_b``, which sized the job; the error names
    it when the weights are over 20% larger than it says."""
    if device.type != "cuda":
        return None
    n_gpu = torch.cuda.device_count()
    first = device.index if device.index is not None else 0
    need = _weight_bytes(folder, weights, dtype)
    if n_gpu <= 1 or need <= GPU_HOLDS * torch.cuda.mem_get_info(first)[0]:
        gpus = [first]
    else:
        gpus = list(range(n_gpu))
    free = sum(torch.cuda.mem_get_info(i)[0] for i in gpus)
    if need > GPU_HOLDS * free:
        key, told = size_b or ("", 0.0)
        planned = told * 1e9 * torch.finfo(dtype).bits / 8  # the weights size_b says
        fix = (
            f"The job was sized from 'models.{key}.size_b: {told}', whose weights take "
            f"~{planned / 2**30:.1f} GiB: set it to the model's billions of parameters"
            if key and need > 1.2 * planned
            else "Set extraction.gpu_mem_gb to the memory of the GPUs the jobs get (it sets how "
            "many each job asks for), or extraction.gpu_model to GPUs that large"
        )
        raise ExtractionError(
            f"{model_id}: its weights need ~{need / 2**30:.1f} GiB of GPU memory "
            f"({dtype_name(dtype)}) but the {len(gpus)} GPU(s) this job sees have "
            f"{free / 2**30:.1f} GiB free; the rest would run on the CPU for hours. {fix}"
        )
    return "auto" if len(gpus) > 1 else {"": first}


def _check_on_gpus(model: torch.nn.Module, model_id: str) -> None:
    """Refuse a sharded model that accelerate placed partly in host memory or on disk."""
    placed = getattr(model, "hf_device_map", None) or {}
    off = sorted(name for name, where in placed.items() if str(where) in ("cpu", "disk"))
    if off:
        raise ExtractionError(
            f"{model_id}: accelerate placed {preview(off)} on the CPU or disk: the GPUs this job "
            "sees cannot hold the model next to its activations, and it would run for hours on the "
            "CPU. Ask for more or larger GPUs (extraction.gpu_mem_gb, extraction.gpu_model)"
        )


def _check_text_model_config(folder: Path, model_id: str) -> None:
    """Refuse, before any weight is loaded, an encoder–decoder model (T5, BART): its decoder
    needs inputs of its own, and the first batch failed deep inside transformers."""
    config = model_config(folder, model_id)
    # transformers writes "vision_config": null for text models whose vision tower is optional
    if isinstance(config, dict) and config.get("vision_config"):
        raise ExtractionError(
            f"{model_id}: a vision-language model (model_type {config.get('model_type')!r}, "
            f"from {folder}); language models here are text models (decoder-only, as BLOOM "
            "and LLaMA, or encoder-only): give a text-only checkpoint"
        )
    if isinstance(config, dict) and config.get("is_encoder_decoder"):
        raise ExtractionError(
            f"{model_id}: an encoder-decoder model (model_type {config.get('model_type')!r}, "
            f"from {folder}); language models here are decoder-only (as BLOOM and LLaMA) or "
            "encoder-only: their hidden states over the caption's tokens are the features"
        )


def load_language_model(
    model_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    max_memory: dict[Any, str | int] | None = None,
    size_b: tuple[str, float] | None = None,
) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Load ``AutoTokenizer`` + ``AutoModel`` (no LM head); returns ``(model, tokenizer, info)``.

    ``model_id`` is a hub repo id (read from the hub cache at ``revision``; downloaded only when
    not cached and not offline) or a local ``save_pretrained`` directory. ``dtype`` None/"auto"
    = bfloat16 on CUDA, float32 on the CPU. On CUDA the model runs on the first GPU where its
    weights fit there, else it is sharded with ``device_map="auto"`` (``max_memory`` per
    device) over the visible GPUs; weights they cannot hold are an error, never offloaded to
    the CPU. A checkpoint lacking weights the model needs is an error. ``trust_remote_code``
    is always False; pickle checkpoints are refused unless ``allow_pickle``. A tokenizer
    without a pad token gets one (eos, unk, bos or token 0; pooling masks padding anyway).
    ``info`` holds the resolved ``revision`` (commit hash or ``"local"``). ``size_b``: the
    config key and ``size_b`` that sized the job, named when the weights do not fit the GPUs
    and are larger than it says.
    """
    from transformers import AutoModel, AutoTokenizer

    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    hub_repo, pinned = hub_repo_of(model_id, "language")
    folder, revision_used = resolve_model_folder(
        model_id,
        hub_repo,
        revision=revision or pinned,
        cache_dir=cache_dir,
        allow_patterns=download_patterns("transformers", allow_pickle),
        what="language model",
    )
    if not (folder / "config.json").is_file():
        raise ExtractionError(
            f"{model_id}: no config.json in {folder}; the model's 'id' in the config must be a "
            "hub repo id or a directory written by save_pretrained"
        )
    _check_text_model_config(folder, model_id)
    remote_code_note = check_no_remote_code(folder, model_id)
    weights = check_weight_files(folder, model_id, allow_pickle=allow_pickle)
    device_map = _choose_device_map(device, folder, weights, torch_dtype, model_id, size_b)

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model, loading = AutoModel.from_pretrained(
            folder,
            trust_remote_code=False,
            use_safetensors=None if allow_pickle else True,
            dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory if device_map == "auto" else None,
            output_loading_info=True,
        )
    # RuntimeError: shapes differ; SafetensorError: a damaged weights file
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        damaged = damaged_weights(err, folder, model_id)
        if damaged is not None:
            raise damaged from err
        names = [p.name for p in folder.iterdir()]
        no_tokenizer = not any(fnmatch(n, p) for n in names for p in TOKENIZER_FILES)
        raise ExtractionError(
            f"{model_id}: could not load tokenizer/model from {folder} ({err})"
            + (
                f"; the folder has no tokenizer file ({' or '.join(TOKENIZER_FILES)})"
                if no_tokenizer
                else ""
            )
        ) from err
    _check_all_weights_loaded(loading, model_id, folder, hidden_state_count(model) - 1)
    try:
        embedding = model.get_input_embeddings()
        found = f"a {type(embedding).__name__}"
    except (NotImplementedError, AttributeError) as err:  # CLIP: "not auto-handled"
        embedding, found = None, f"not found: {err}"
    if not isinstance(embedding, torch.nn.Embedding):
        raise ExtractionError(
            f"{model_id}: {type(model).__name__} (from {folder}) does not read token ids (its "
            f"input embedding is {found}): a language model here must be a text model "
            "(decoder-only, as BLOOM and LLaMA, or encoder-only)"
        )
    if device_map is None:
        model.to(device)
    _check_on_gpus(model, model_id)
    model.eval().requires_grad_(False)

    pad_note = _ensure_pad_token(tokenizer, model_id, embedding.num_embeddings)
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "right"  # as tokenize_captions cuts, recorded below
    info = dict(
        model_id=str(model_id),
        source="transformers",
        revision=revision_used,
        requested_revision=revision,
        weights=weights,
        architecture=type(model).__name__,
        remote_code_note=remote_code_note,
        n_layers=hidden_state_count(model),
        dim=int(model.config.hidden_size),
        device=str(device),
        device_map=device_map if isinstance(device_map, str) else None,
        dtype=dtype_name(torch_dtype),
        tokenizer=dict(
            tokenizer_class=type(tokenizer).__name__,
            pad_token=tokenizer.pad_token,
            pad_token_note=pad_note,
            padding_side="right",
            truncation_side="right",
            add_special_tokens=True,
            max_length=context_length(model, tokenizer),
        ),
    )
    log.info(
        "loaded language model %s (revision %s): %d hidden states, dim %d, %s on %s%s",
        model_id,
        revision_used,
        info["n_layers"],
        info["dim"],
        info["dtype"],
        device,
        " (device_map=auto)" if device_map == "auto" else "",
    )
    return model, tokenizer, info


#: a checkpoint tensor of block N of a model's layer stack (LLaMA's layers.N, BLOOM's h.N)
_BLOCK_KEY = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def _check_all_weights_loaded(
    loading: Mapping[str, Any], model_id: str, folder: Path, n_blocks: int
) -> None:
    """Refuse a model some of whose weights the checkpoint lacks: transformers initialises them
    at random and only prints a report, so the features would come from random weights. Refuse
    one whose checkpoint has blocks beyond the config's ``n_blocks`` too: the model was built
    short, its last hidden states those of a truncated network, with exit 0.

    Other checkpoint tensors the model does not use (an LM head, old rotary buffers) are fine;
    weights of another shape make transformers raise (ExtractionError "could not load")."""
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise ExtractionError(
            f"{model_id}: the checkpoint in {folder} lacks weights the model needs (missing "
            f"{preview(missing)}); they would be random. Prefetch the model again (an "
            "interrupted download?) or check that its config.json matches its weights"
        )
    extra = sorted(
        k
        for k in loading.get("unexpected_keys") or []
        if (found := _BLOCK_KEY.search(k)) and int(found.group(1)) >= n_blocks
    )
    if extra:
        raise ExtractionError(
            f"{model_id}: the checkpoint in {folder} holds blocks the model built from its "
            f"config.json does not have ({preview(extra)}; the config gives {n_blocks} blocks): "
            "the features would be those of a truncated network. Check that its config.json "
            "matches its weights"
        )


def _ensure_pad_token(tokenizer: Any, model_id: str, n_embeddings: int) -> str | None:
    """Give the tokenizer a pad token from its own vocabulary when it has none, or when its own
    lies outside the model's ``n_embeddings`` input embeddings (a pad token added to a LLaMA
    tokenizer without resizing the embeddings: the lookup failed inside torch, naming nothing).
    Padding is masked out, so any token inside the table gives the same features."""
    pad_id = tokenizer.pad_token_id
    if tokenizer.pad_token is not None and pad_id is not None and 0 <= pad_id < n_embeddings:
        return None
    why = (
        "no pad token"
        if tokenizer.pad_token is None
        else f"pad token {tokenizer.pad_token!r} has id {pad_id}, outside the model's "
        f"{n_embeddings} input embeddings"
    )
    for name in ("eos_token", "unk_token", "bos_token"):
        tok, tok_id = getattr(tokenizer, name), getattr(tokenizer, f"{name}_id")
        if tok is not None and tok_id is not None and 0 <= tok_id < n_embeddings:
            tokenizer.pad_token = tok
            note = f"{why}; using {name} {tok!r} (padding is masked out of the pooling)"
            break
    else:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
        note = f"{why}; using token id 0 {tokenizer.pad_token!r} (padding is masked out)"
    log.info("%s: %s", model_id, note)
    return note


def _position_offset(model: torch.nn.Module) -> int:
    """Rows of the position table before the first token's: RoBERTa-style encoders (fairseq's
    convention) number positions from ``padding_idx + 1``, so roberta-base's 514 rows hold 512
    tokens; 0 for models whose positions start at row 0."""
    table = getattr(getattr(model, "embeddings", None), "position_embeddings", None)
    pad = getattr(table, "padding_idx", None) if isinstance(table, torch.nn.Embedding) else None
    return pad + 1 if isinstance(pad, int) and pad >= 0 else 0


def context_length(model: torch.nn.Module, tokenizer: Any) -> int | None:
    """The longest input the model takes: min of the config's position limit (less the rows
    a RoBERTa-style model reserves before its first position) and the tokenizer's."""
    limits = []
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(model.config, key, None)
        if isinstance(v, int) and 0 < v < _HUGE:
            # a caption of max_position_embeddings tokens indexed past RoBERTa's table: an
            # IndexError naming no stimulus (audit)
            limits.append(v - _position_offset(model))
            break
    tl = getattr(tokenizer, "model_max_length", None)
    if isinstance(tl, int) and 0 < tl < _HUGE:
        limits.append(tl)
    return min(limits) if limits else None


def hidden_state_count(model: torch.nn.Module) -> int:
    """Hidden states the model returns: the embedding output plus one per block (L + 1)."""
    cfg = model.config
    return int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0)) + 1


def language_layer_names(n_hidden_states: int) -> list[str]:
    """``embeddings``, ``layers.0`` … ``layers.{L-1}`` for L+1 hidden states."""
    return ["embeddings"] + [f"layers.{i}" for i in range(n_hidden_states - 1)]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU through pinned memory without waiting: a copy from ordinary
    host memory first waits for everything queued on the GPU, which leaves it idle between
    batches."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over positions where ``mask`` is 1, in float32: ``(B, T, D), (B, T) -> (B, D)``.

    Padding positions are zeroed (not multiplied), so even non-finite values there never leak in.
    """
    return _masked_mean(hidden, *_padding(mask, hidden.device))


def _padding(mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """From a ``(B, T)`` 0/1 mask: where the padding is, ``(B, T, 1)`` bool, and the number of
    real tokens per row, ``(B, 1)`` float32 (at least 1), on ``device``."""
    keep = mask.to(device=device, dtype=torch.bool)
    return ~keep[..., None], keep.sum(dim=1, keepdim=True).clamp_min(1).float()


def _masked_mean(hidden: torch.Tensor, pad: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over the positions that ``pad`` does not mark, summed in float32
    (without a float32 copy of ``hidden``): three kernels a layer, once ``_padding`` is made."""
    return hidden.masked_fill(pad, 0.0).sum(dim=1, dtype=torch.float32) / count


#: Caption token limit for a model that declares no context length (BLOOM's ALiBi has no
#: position limit). Captions are image descriptions, typically tens of tokens; 512 leaves room
#: for paragraph-long ones while bounding the memory of one batch: eager attention holds
#: batch x heads x T^2 scores per layer (32 x 16 x 512^2 x 4 bytes = 0.5 GiB at T = 512, but
#: about 30 GiB at the ~4,000 tokens of a 20,000-character caption).
DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class TokenizedCaptions:
    """Token ids per caption (special tokens included) and how they were truncated."""

    ids: list[list[int]]
    truncated: list[int]  # rows whose caption was cut to max_tokens
    max_tokens: int
    limit_source: str  # "model context", "max_tokens" or "default bound"


def caption_token_limit(max_tokens: int | None, context: int | None) -> tuple[int, str]:
    """The token limit for captions and where it comes from.

    ``max_tokens`` None: the model's ``context`` (from :func:`context_length`), else
    :data:`DEFAULT_MAX_TOKENS`. A ``max_tokens`` above the model's context is lowered to it
    (positions beyond the context have no trained embedding).
    """
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise ExtractionError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if max_tokens is None:
        if context is None:
            return DEFAULT_MAX_TOKENS, "default bound"
        return context, "model context"
    if context is not None and max_tokens > context:
        log.warning(
            "max_tokens=%d is more than the model's %d-token context; using %d",
            max_tokens,
            context,
            context,
        )
        return context, "model context"
    return max_tokens, "max_tokens"


def _check_truncation_keeps_captions_apart(
    ids: Sequence[Sequence[int]],
    whole: Mapping[int, tuple[int, ...]],
    stimulus_ids: Sequence[str],
    limit: int,
    source: str,
) -> None:
    """ExtractionError if the token limit made captions with different tokens identical.

    ``ids`` are the captions' tokens after truncation, ``whole`` the untruncated tokens of the
    truncated ones. Two such stimuli would get the same features although their captions differ:
    the analysis would see a planted duplicate (docs/contracts.md, "Captions: token limit").
    """
    if not whole:  # nothing was cut
        return
    groups: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    members: dict[tuple[int, ...], list[str]] = {}
    for i, t in enumerate(ids):
        key = tuple(t)
        groups.setdefault(key, set()).add(whole.get(i, key))
        members.setdefault(key, []).append(str(stimulus_ids[i]))
    merged = [members[k] for k, full in groups.items() if len(full) > 1]
    if not merged:
        return
    n = sum(len(g) for g in merged)
    first = merged[0]
    fix = (
        "raise max_tokens (config key extraction.max_tokens)"
        if source != "model context"
        else "the model reads no more tokens; shorten the captions' shared beginning"
    )
    raise ExtractionError(
        f"the {limit}-token caption limit ({source}) makes captions with different text "
        f"identical: {len(merged)} group(s) of {n} stimuli in all, e.g. {preview(first)}: they "
        f"would get the same features; {fix}"
    )


def tokenize_captions(
    tokenizer: Any,
    captions: Sequence[str],
    *,
    stimulus_ids: Sequence[str],
    max_tokens: int | None = None,
    context: int | None = None,
) -> TokenizedCaptions:
    """Token ids per caption (special tokens included), each cut to the caption token limit.

    The limit is :func:`caption_token_limit` of ``max_tokens`` and the model's ``context``.
    Truncation is the tokenizer's own (``truncation=True``: special tokens are kept), at the
    end (``truncation_side`` right, whatever the tokenizer's config says). Truncated
    captions are logged as a warning: their count, the limit and the first stimulus ids.

    Captions are text: a special token's spelling in a caption (``</s>``, ``<s>``, ``<unk>``,
    ``<pad>``, as in HTML-like markup) is tokenized as the characters it is made of, never as
    the control token (``split_special_tokens``). A caption left longer than the limit, or with
    no token but special ones (a limit that keeps only BOS), is an ExtractionError naming it,
    and so are captions with different tokens that the limit makes identical.
    """
    limit, source = caption_token_limit(max_tokens, context)
    # the tokenizer's own BOS / EOS are added; the caption's text never becomes one of them
    kw = {"add_special_tokens": True, "split_special_tokens": True}
    ids = tokenizer(list(captions), truncation=False, **kw)["input_ids"]
    truncated = [i for i, t in enumerate(ids) if len(t) > limit]
    whole: dict[int, tuple[int, ...]] = {}  # the truncated captions' tokens before the cut
    if truncated:
        # the beginning is kept, whatever the tokenizer's config says (truncation_side "left"
        # kept the end, unnoticed); the reference extraction cuts no caption (docs/method.md,
        # "Readings of the paper")
        side = getattr(tokenizer, "truncation_side", "right")
        tokenizer.truncation_side = "right"
        try:
            redo = tokenizer(
                [captions[i] for i in truncated], truncation=True, max_length=limit, **kw
            )["input_ids"]
        finally:
            tokenizer.truncation_side = side
        longest = max(len(ids[i]) for i in truncated)
        whole.update((i, tuple(ids[i])) for i in truncated)
        for i, t in zip(truncated, redo, strict=True):
            ids[i] = t
        why = {
            "model context": f"longer than the model's {limit}-token context",
            "max_tokens": f"longer than max_tokens={limit}",
            "default bound": (
                f"longer than {limit} tokens (the model declares no context length; "
                f"{limit} is the default bound; set max_tokens, config key extraction.max_tokens, "
                "to change it)"
            ),
        }[source]
        log.warning(
            "%d caption(s) %s were truncated: %s (the longest had %d tokens)",
            len(truncated),
            why,
            preview(stimulus_ids[i] for i in truncated),
            longest,
        )
    empty = [stimulus_ids[i] for i, t in enumerate(ids) if len(t) == 0]
    if empty:
        raise ExtractionError(f"captions of stimuli {preview(empty)} tokenize to zero tokens")
    long = [stimulus_ids[i] for i, t in enumerate(ids) if len(t) > limit]
    if long:  # a tokenizer that keeps its special tokens beyond max_length
        raise ExtractionError(
            f"captions of stimuli {preview(long)} still have more than {limit} tokens after "
            f"truncation (the tokenizer's special tokens do not fit); raise max_tokens "
            "(config key extraction.max_tokens)"
        )
    _check_leading_spaces(tokenizer, captions, stimulus_ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    bare = [stimulus_ids[i] for i, t in enumerate(ids) if all(x in special for x in t)]
    if bare:  # every such caption gets the features of its special tokens alone
        raise ExtractionError(
            f"captions of stimuli {preview(bare)} tokenize to special tokens only (BOS, EOS, "
            f"unknown): the model cannot tell them apart. If the {limit}-token limit cut their "
            "text, raise max_tokens (config key extraction.max_tokens); otherwise this "
            "tokenizer cannot read their characters"
        )
    _check_truncation_keeps_captions_apart(ids, whole, stimulus_ids, limit, source)
    return TokenizedCaptions(ids, truncated, limit, source)


def _own_tokens(tokenizer: Any, texts: Sequence[str]) -> list[list[int]] | None:
    """Token ids (no special tokens added) that the model's own tokenizer file gives ``texts``:
    its ``tokenizer.json`` (tokenizers) or ``tokenizer.model`` (SentencePiece); None without
    one. A special token's spelling in a text is read as its characters, as the extraction
    reads it (SentencePiece never matches its control tokens in text)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        own = Tokenizer.from_file(str(folder / "tokenizer.json"))
        own.encode_special_tokens = True
        return [own.encode(t, add_special_tokens=False).ids for t in texts]
    if (folder / "tokenizer.model").is_file():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        return [list(sp.encode(t)) for t in texts]
    return None


def _check_leading_spaces(
    tokenizer: Any, captions: Sequence[str], stimulus_ids: Sequence[str]
) -> None:
    """Refuse captions that start with a space (any whitespace, or SentencePiece's word mark
    ``▁``) when the loaded tokenizer gives them other tokens than the model's own tokenizer
    file does.

    transformers 5 rebuilds LLaMA tokenizers with a pre-tokenizer that drops a caption's
    leading space (and adds no word mark before a leading ``▁``), which SentencePiece and the
    tokenizer.json of the model keep: such captions would get other features than the
    reference extraction (docs/contracts.md, "Captions: token limit"). Whole captions are
    compared, a special token's spelling in them read as characters on both sides (the text
    before such a spelling was compared, and a caption with only spaces before it was not:
    ``' </s> a cube'`` got the features of ``'</s> a cube'``, audit)."""
    lead = [i for i, c in enumerate(captions) if c[:1].isspace() or c[:1] == "\u2581"]
    if not lead:
        return
    texts = [captions[i] for i in lead]
    own = _own_tokens(tokenizer, texts)
    if own is None:
        return
    kw = {"add_special_tokens": False, "split_special_tokens": True}
    got = tokenizer(texts, **kw)["input_ids"]
    differ = [stimulus_ids[i] for i, a, b in zip(lead, got, own, strict=True) if list(a) != b]
    if differ:
        import transformers

        raise ExtractionError(
            f"captions of stimuli {preview(differ)} start with a space (or SentencePiece's "
            "word mark '\u2581'), and the loaded tokenizer "
            f"({type(tokenizer).__name__}, transformers {transformers.__version__}) tokenizes them "
            f"otherwise than the model's own tokenizer file in {tokenizer.name_or_path}: their "
            "features would not be the model's. Remove the leading spaces from those captions in "
            "the manifest, or extract with transformers < 5"
        )


def extract_language_features(
    model: torch.nn.Module,
    tokenizer: Any,
    captions: Sequence[str],
    *,
    stimulus_ids: Sequence[str],
    batch_size: int = 32,
    max_tokens: int | None = None,
    model_name: str = "language model",
    progress: bool = True,
    spill: str | os.PathLike | None = None,
) -> ExtractionResult:
    """Mean-pooled hidden states of every layer for every caption: ``(L+1, m, dim)`` float32.

    Captions run longest first (out-of-memory shows up at once, and halves the batch) in
    batches of similar length, right-padded; captions with the same tokens run once and share
    their features exactly. Each caption is first cut to ``max_tokens`` tokens (None: the
    model's context, or :data:`DEFAULT_MAX_TOKENS` when it declares none), before any batch is
    built; ``info`` records the limit (``max_length``), its source, and the number and
    first ids of truncated captions. ``n_tokens`` holds, per caption, the number of tokens its
    features are the mean over (special tokens included, after truncation). ``spill``: a scratch
    file for features too large for memory (:class:`FeatureAccumulator`).
    """
    if len(captions) != len(stimulus_ids):
        raise ExtractionError(f"{len(captions)} captions for {len(stimulus_ids)} stimulus ids")
    tok = tokenize_captions(
        tokenizer,
        captions,
        stimulus_ids=stimulus_ids,
        max_tokens=max_tokens,
        context=context_length(model, tokenizer),
    )
    token_ids, truncated = tok.ids, tok.truncated
    lengths = np.array([len(t) for t in token_ids])
    # captions with the same tokens run once and their rows are copies: features of one
    # caption run in batches padded to different widths differ in their last bits, so repeated
    # captions would stop being exact duplicates (their neighbours then decided by rounding)
    rows_of = rows_by_first(tuple(t) for t in token_ids)
    first = np.array(sorted(rows_of), dtype=np.int64)
    order = first[np.argsort(-lengths[first], kind="stable")]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n_embeddings = model.get_input_embeddings().num_embeddings
    beyond = [i for i in first if max(token_ids[i], default=0) >= n_embeddings]
    if beyond:
        largest = max(max(token_ids[i]) for i in beyond)
        raise ExtractionError(
            f"{model_name}: its tokenizer gives token id {largest}, beyond the model's "
            f"{n_embeddings} input embeddings, to the caption(s) of "
            f"{preview([stimulus_ids[r] for i in beyond for r in rows_of[i]])}: a tokenizer that "
            "does not match the model's weights (tokens added without resizing the embeddings?)"
        )
    input_device = model.get_input_embeddings().weight.device
    n_hidden = hidden_state_count(model)
    names = language_layer_names(n_hidden)
    m = len(captions)
    acc = FeatureAccumulator(
        n_hidden,
        m,
        int(model.config.hidden_size),
        model_name=model_name,
        layer_names=names,
        stimulus_ids=stimulus_ids,
        spill=spill,
    )
    sizer = BatchSizer(batch_size, model_name)
    n_tokens = int(lengths.sum())
    n_padded = 0

    with (
        ieee_float32(model.get_input_embeddings().weight.dtype),
        progress_bar(m, model_name, "caption", progress) as bar,
        contextlib.closing(acc),
    ):

        @torch.inference_mode()
        def run(start: int, stop: int) -> None:
            nonlocal n_padded
            rows = order[start:stop]
            width = int(lengths[rows].max())
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, : lengths[r]] = torch.as_tensor(token_ids[r])
                mask[j, : lengths[r]] = 1
            mask_in = _to_device(mask, input_device)
            out = model(
                input_ids=_to_device(ids, input_device),
                attention_mask=mask_in,
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
            )
            hidden = out.hidden_states
            if len(hidden) != n_hidden:
                raise ExtractionError(
                    f"model {model_name}: {len(hidden)} hidden states, expected {n_hidden}"
                )
            pads = {input_device: _padding(mask_in, input_device)}
            for h in hidden:  # a sharded model's layers live on several GPUs
                if h.device not in pads:
                    pads[h.device] = _padding(_to_device(mask, h.device), h.device)
            pooled = torch.stack(
                [_masked_mean(h, *pads[h.device]).to(input_device) for h in hidden], dim=1
            )
            pooled, targets = spread_copies(pooled, rows, rows_of)  # repeated captions
            acc.add(pooled, targets)
            n_padded += len(rows) * width
            bar.update(len(targets))

        sizer.run(len(order), run)
        res = acc.result()
    res.n_tokens = lengths.astype(np.int64)
    res.info.update(
        pooling="mean",
        batch_size=sizer.batch_size,
        oom_halvings=sizer.n_halvings,
        max_length=tok.max_tokens,
        max_length_source=tok.limit_source,
        n_truncated=len(truncated),
        truncated_ids=[str(stimulus_ids[i]) for i in truncated[:20]],
        padding_fraction=round(1 - int(lengths[order].sum()) / max(n_padded, 1), 4),
    )
    res.info["n_repeated"] = m - len(order)
    log.info(
        "%s: %d captions (%d repeat an earlier one's tokens), %d tokens, %.1f%% padding, "
        "%d truncated",
        model_name,
        m,
        m - len(order),
        n_tokens,
        100 * res.info["padding_fraction"],
        len(truncated),
    )
    return res
