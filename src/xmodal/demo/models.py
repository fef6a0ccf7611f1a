"""Tiny stand-ins for the paper's models, built locally in well under a second.

They use the real architecture classes (timm ``VisionTransformer`` through the real model
names, transformers ``BloomModel`` / ``LlamaModel``) configured very small, and are saved in the
same formats the hubs serve (a timm directory with ``config.json`` + ``model.safetensors``; a
transformers directory from ``save_pretrained``), so they load through the same code paths as the
real models. Built here they are randomly initialised; :mod:`xmodal.demo.train` trains them.
:func:`make_hub_cache` lays a saved model out as a local Hugging Face hub cache entry
(``models--org--name/snapshots/<hash>/``, ``refs/main``) for offline hub-id loading.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from xmodal._compat import ensure_torchvision_importable
from xmodal.demo.stimuli import LABELS

log = logging.getLogger(__name__)

# transformers and timm import torchvision; make that work first (see xmodal._compat)
ensure_torchvision_importable()

# family -> (timm model name with pretrained tag, tiny architecture arguments).
# The names keep each family's quirks: MAE (plain ViT, class token, no pre-norm), DINOv2
# (layer scale, SwiGLU MLP, 14 px patches at a larger input, ImageNet mean/std), CLIP (pre-norm
# before the blocks, OpenAI mean/std, projection head), CLIP fine-tuned (same trunk, class head
# over the demo's scene labels).
VIT_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "mae": (
        "vit_huge_patch14_224.mae",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
    ),
    "dinov2": (
        "vit_giant_patch14_dinov2.lvd142m",
        dict(img_size=56, patch_size=14, embed_dim=48, depth=5, num_heads=2),
    ),
    "clip": (
        "vit_huge_patch14_clip_224.laion2b",
        dict(img_size=32, patch_size=8, embed_dim=40, depth=3, num_heads=2, num_classes=16),
    ),
    "clip_ft": (
        "vit_huge_patch14_clip_224.laion2b_ft_in12k",
        dict(
            img_size=32, patch_size=8, embed_dim=40, depth=3, num_heads=2, num_classes=len(LABELS)
        ),
    ),
}

# pretrained_cfg sizes of the full-size model that a tiny one does not share
_SIZE_KEYS = ("input_size", "test_input_size", "min_input_size", "pool_size")

__all__ = [
    "VIT_FAMILIES",
    "build_tiny_lm",
    "build_tiny_vit",
    "make_hub_cache",
    "save_vit",
    "tiny_lm_config",
    "tiny_vit",
    "train_tokenizer",
    "vit_args",
]


def vit_args(family: str, **overrides: Any) -> dict[str, Any]:
    """The tiny architecture arguments of ``family``, with ``overrides``."""
    if family not in VIT_FAMILIES:
        raise ValueError(f"unknown ViT family {family!r}; choose from {sorted(VIT_FAMILIES)}")
    return {**VIT_FAMILIES[family][1], **overrides}


def tiny_vit(family: str, seed: int, **overrides: Any) -> torch.nn.Module:
    """A tiny randomly initialised timm ViT of ``family`` (see :func:`build_tiny_vit`)."""
    ensure_torchvision_importable()
    import timm

    name, args = VIT_FAMILIES[family][0], vit_args(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **args)
        if family == "dinov2":
            # real DINOv2 layer scales are far from their 1e-5 init; make blocks matter
            for blk in model.blocks:
                for ls in (blk.ls1, blk.ls2):
                    torch.nn.init.uniform_(ls.gamma, 0.05, 0.2)
    log.info("built tiny %s ViT (%s, %s)", family, name, args)
    return model


def save_vit(
    model: torch.nn.Module, out_dir: str | os.PathLike, model_args: dict[str, Any]
) -> Path:
    """Save a timm ViT as a local directory (``config.json`` + ``model.safetensors``).

    ``model_args`` are the architecture arguments it was built with; ``config.json`` records
    them and the model's input size, so that ``timm.create_model("local-dir:...")`` rebuilds this
    architecture, and its eval transform this size, not the full-size defaults of its name
    (timm before 1.0.31 records neither by itself).
    """
    from timm.models._hub import save_for_hf

    # the eval transform reads the input size from pretrained_cfg, which names the full-size
    # model's (timm before 1.0.31 saves it as it is); the caller's model keeps its own
    original = model.pretrained_cfg
    cfg = {k: v for k, v in original.items() if k not in _SIZE_KEYS}
    model.pretrained_cfg = model.default_cfg = {
        **cfg,
        "input_size": (3, *model.patch_embed.img_size),
    }
    out = Path(out_dir)
    try:
        save_for_hf(model, out, model_args=dict(model_args), safe_serialization=True)
    finally:
        model.pretrained_cfg = model.default_cfg = original
    return out


def build_tiny_vit(out_dir: str | os.PathLike, family: str, seed: int, **overrides: Any) -> Path:
    """Build a tiny randomly initialised ViT of ``family`` and save it as a timm local directory.

    ``family`` is one of ``mae``, ``dinov2``, ``clip``, ``clip_ft``; ``overrides`` replace the tiny
    architecture arguments (e.g. ``depth=2``). Returns ``out_dir`` (``config.json`` +
    ``model.safetensors``), loadable with ``load_vision_model(out_dir)``.
    """
    return save_vit(tiny_vit(family, seed, **overrides), out_dir, vit_args(family, **overrides))


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 320,
    *,
    add_bos: bool = True,
    pad_token: str | None = None,
) -> Path:
    """Train a byte-level BPE tokenizer on ``texts``; save it as a transformers fast tokenizer.

    Special tokens ``<unk>``, ``<s>``, ``</s>`` (and ``pad_token`` if given; by default there is
    none, as with LLaMA). With ``add_bos`` every encoding starts with ``<s>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] + ([pad_token] if pad_token else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([str(t) for t in texts], trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token=pad_token,
        model_max_length=1 << 30,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def tiny_lm_config(
    arch: str, tokenizer: Any, hidden_size: int = 32, n_layers: int = 2, max_positions: int = 128
) -> Any:
    """Transformers config of a tiny BLOOM or LLaMA (``arch``) for ``tokenizer``'s vocabulary."""
    from transformers import BloomConfig, LlamaConfig

    n_heads = 2 if hidden_size % 4 else 4
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "bloom":
        return BloomConfig(hidden_size=hidden_size, n_layer=n_layers, n_head=n_heads, **common)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size + 8,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_heads,
            max_position_embeddings=max_positions,
            **common,
        )
    raise ValueError(f"unknown language architecture {arch!r}; choose 'bloom' or 'llama'")


def build_tiny_lm(
    out_dir: str | os.PathLike,
    arch: str,
    tokenizer_dir: str | os.PathLike,
    seed: int,
    hidden_size: int = 32,
    n_layers: int = 2,
    *,
    max_position_embeddings: int = 128,
) -> Path:
    """Build a tiny random BLOOM or LLaMA (``arch``) with ``tokenizer_dir``'s tokenizer.

    Saved with ``save_pretrained`` (safetensors) together with the tokenizer, so ``out_dir``
    loads with ``AutoModel`` / ``AutoTokenizer``. LLaMA's context is ``max_position_embeddings``
    tokens (BLOOM, with ALiBi, has no fixed context). Weights are drawn from N(0, 0.2²), wider
    than transformers' 0.02, which gives less degenerate features without training.
    """
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_lm_config(arch, tok, hidden_size, n_layers, max_position_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim >= 2:
                    p.normal_(0.0, 0.2)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    log.info(
        "built tiny %s (hidden %d, %d layers, vocab %d) in %s",
        arch,
        hidden_size,
        n_layers,
        len(tok),
        out,
    )
    return out


def make_hub_cache(
    model_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    repo_id: str,
    commit: str | None = None,
) -> Path:
    """Lay out ``model_dir``'s files as the hub cache entry of ``repo_id`` (``org/name``).

    Creates ``cache_dir/models--org--name/snapshots/<commit>/`` (copies of the files) and
    ``refs/main`` pointing at it, as ``huggingface_hub`` does, so that hub-id loading works with
    ``HF_HUB_OFFLINE=1``. ``commit`` defaults to a hash of the files. Returns the snapshot folder.
    """
    src = Path(model_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    if commit is None:
        h = hashlib.sha1()
        for p in files:
            h.update(str(p.relative_to(src)).encode())
            h.update(p.read_bytes())
        commit = h.hexdigest()
    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for p in files:
        dest = snap / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, dest)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snap
