"""Brief training of the demo's tiny models on the world's training scenes.

Each objective mirrors its paper family (docs/method.md, "The embedded demo"):

- ``mae``: masked-patch reconstruction. The encoder sees a random quarter of the patches (and
  the class token); a one-block decoder predicts the pixels of the others (as the transform
  normalises them; MAE's optional per-patch normalisation is off, so that colour and brightness
  stay in the targets). L = mean over hidden patches j of ‖x̂_j − x_j‖² / (p²·3).
- ``dinov2``: self-distillation between two augmented views (a DINO stand-in). The teacher is
  an exponential moving average of the student; its centred, sharpened prototype distribution
  on one view is the target of the student's on the other:
  L = −½ Σ_{a≠b} Σ_k P_t^a(k) log P_s^b(k), P_t = softmax((t − c)/τ_t), P_s = softmax(s/τ_s).
  The teacher is the saved model.
- ``clip``: symmetric InfoNCE between image embeddings (the ViT's projection head) and caption
  embeddings from a tiny text tower (token embeddings, one transformer layer, mean pooling):
  with unit rows I, T and scale s, L = ½[CE(s·ITᵀ, diag) + CE(s·TIᵀ, diag)].
- ``clip_ft``: the trained CLIP image tower, fine-tuned on scene-label classification
  (multi-label: which colour–shape combinations of :data:`xmodal.demo.stimuli.LABELS` the
  scene contains; binary cross-entropy per label).
- language models: next-token prediction on the training captions (cross-entropy of every real
  next token, BOS … EOS).

Images pass through exactly the transform extraction uses (the saved model is loaded with
:func:`xmodal.extract.vision.load_vision_model`); the trained model is saved back in the same
format, so extraction loads it like any other. Everything is seeded: one run of a model on
one thread is a deterministic function of its settings, its seed and the training scenes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xmodal._compat import ensure_torchvision_importable

log = logging.getLogger(__name__)

ensure_torchvision_importable()

__all__ = [
    "TrainSettings",
    "train_language_model",
    "train_vision_model",
]

#: MAE: fraction of patches hidden from the encoder
MASK_RATIO = 0.75
#: DINO: prototypes, student / teacher temperatures, centre and teacher momentum
DINO_PROTOTYPES = 64
DINO_TEMPS = (0.1, 0.04)
DINO_CENTER_MOMENTUM = 0.9
DINO_TEACHER_MOMENTUM = 0.99


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation settings of one model (the ``train`` block of its ``build`` entry)."""

    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    #: number of training scenes used (the first n of the file; None = all)
    n_scenes: int | None = None

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | None, where: str) -> TrainSettings:
        """Settings from a config mapping; unknown keys are an error naming ``where``."""
        spec = dict(spec or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ValueError(
                f"{where}: unknown training setting(s) {unknown}; known: {sorted(known)}"
            )
        return cls(**spec)


# ----------------------------------------------------------------------------- shared loop


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n - batch_size + 1, batch_size):  # drop the ragged last batch
        yield order[start : start + batch_size]


def _optimise(
    params: Sequence[nn.Parameter],
    n: int,
    settings: TrainSettings,
    gen: torch.Generator,
    step: Callable[[torch.Tensor], torch.Tensor],
    after_step: Callable[[int, int], None] | None = None,
    name: str = "model",
) -> list[float]:
    """AdamW with linear warm-up (5% of steps) and cosine decay; returns the mean loss per epoch.

    ``step(indices)`` computes the loss of one batch; ``after_step(step, total)`` runs after
    each update (e.g. a teacher's moving average); ``name`` labels errors and the log.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings.lr,
    )
    per_epoch = n // settings.batch_size
    if per_epoch < 1:
        raise ValueError(
            f"{name}: {n} training scenes are fewer than one batch of {settings.batch_size}; "
            "lower train.batch_size or raise stimuli.train.n"
        )
    total = per_epoch * settings.epochs
    warmup = max(1, total // 20)

    def lr_at(i: int) -> float:
        if i < warmup:
            return settings.lr * (i + 1) / warmup
        return settings.lr * 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))

    losses, i = [], 0
    for epoch in range(settings.epochs):
        t0, running = time.perf_counter(), []
        for idx in _batches(n, settings.batch_size, gen):
            for group in opt.param_groups:
                group["lr"] = lr_at(i)
            loss = step(idx)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{name}: training loss became {loss.item()} at step {i}; "
                    "lower train.lr in its build block"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after_step is not None:
                after_step(i, total)
            running.append(loss.item())
            i += 1
        losses.append(float(np.mean(running)))
        log.info(
            "%s epoch %d/%d: loss %.4f (%.1f s)",
            name,
            epoch + 1,
            settings.epochs,
            losses[-1],
            time.perf_counter() - t0,
        )
    return losses


def _n_scenes(settings: TrainSettings, available: int) -> int:
    """The training scenes used: ``n_scenes`` of the ``available`` ones (all when not set);
    more than there are is an error (before, it trained on fewer and recorded ``n_scenes``)."""
    if settings.n_scenes is None:
        return available
    if settings.n_scenes > available:
        raise ValueError(
            f"build.train.n_scenes is {settings.n_scenes}, and the training scenes file holds "
            f"{available} (stimuli.train.n)"
        )
    return int(settings.n_scenes)


def _write_record(out_dir: Path, record: dict[str, Any]) -> None:
    (out_dir / "training.json").write_text(json.dumps(record, indent=1) + "\n")


# ----------------------------------------------------------------------------- vision


def _image_tensor(images: np.ndarray, transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Every training image through the extraction transform: (n, 3, H, W) float32."""
    from PIL import Image

    return torch.stack([transform(Image.fromarray(im)) for im in images])


def _cls_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The pooled, normed pre-logits (the class token for these models) before the head."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


class _MaeDecoder(nn.Module):
    """MAE's lightweight decoder: mask tokens at the hidden positions, one block, pixel head."""

    def __init__(self, dim: int, n_patches: int, patch_pixels: int, dec_dim: int = 32):
        super().__init__()
        from timm.models.vision_transformer import Block

        self.embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dec_dim) * 0.02)
        self.block = Block(dec_dim, num_heads=2, qkv_bias=True)
        self.norm = nn.LayerNorm(dec_dim)
        self.pred = nn.Linear(dec_dim, patch_pixels)

    def forward(self, tokens: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder output (class token + visible patches) → every patch's predicted pixels.

        ``restore[b, j]`` is where patch j sits in the order [visible..., hidden...].
        """
        x = self.embed(tokens)
        b, n_vis, d = x.shape[0], x.shape[1] - 1, x.shape[2]
        n = restore.shape[1]
        patches = torch.cat([x[:, 1:], self.mask_token.expand(b, n - n_vis, d)], dim=1)
        patches = torch.gather(patches, 1, restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos
        return self.pred(self.norm(self.block(x)))[:, 1:]


def _patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _train_mae(model: nn.Module, images: torch.Tensor, s: TrainSettings, gen: torch.Generator):
    p = model.patch_embed.patch_size[0]
    n_patches = model.patch_embed.num_patches
    n_keep = max(1, round(n_patches * (1 - MASK_RATIO)))
    decoder = _MaeDecoder(model.embed_dim, n_patches, p * p * 3)
    target = _patchify(images, p)

    def step(idx: torch.Tensor) -> torch.Tensor:
        x = model._pos_embed(model.patch_embed(images[idx]))  # class token + patches, positions
        b, d = x.shape[0], x.shape[2]
        shuffle = torch.rand(b, n_patches, generator=gen).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        keep = shuffle[:, :n_keep]
        visible = torch.gather(x[:, 1:], 1, keep[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], visible], dim=1)
        x = model.norm(model.blocks(model.norm_pre(x)))
        pred = decoder(x, restore)
        masked = torch.ones(b, n_patches)
        masked[:, :n_keep] = 0
        masked = torch.gather(masked, 1, restore)
        err = ((pred - target[idx]) ** 2).mean(-1)
        return (err * masked).sum() / masked.sum()

    params = [*model.parameters(), *decoder.parameters()]
    return _optimise(params, len(images), s, gen, step, name="MAE")


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random view: shift by up to 1/8 of the side, blur, one erased patch, pixel noise.

    No flips, crops of scale or colour changes: position, size and colour are the content
    that the captions describe.
    """
    b, c, h, w = x.shape
    # shift (border pixels repeat), as one batched resampling
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * 0.25  # in [-1, 1] units: 1/8 side
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # blur with a per-image sigma in [0, 1.5] px: a 5-tap separable Gaussian per image
    sigma = torch.rand(b, generator=gen) * 1.5 + 1e-3
    taps = torch.arange(-2, 3, dtype=x.dtype)
    k1 = torch.exp(-(taps[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = (k1 / k1.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 5)
    flat = v.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), k1[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="replicate"), k1[:, None, :, None], groups=b * c)
    v = flat.reshape(b, c, h, w)
    # one erased rectangle per image (set to the mean colour, 0 after normalisation)
    size = 2 + torch.rand(b, 2, generator=gen) * torch.tensor([h / 3, w / 3])
    corner = torch.rand(b, 2, generator=gen) * (torch.tensor([h, w]) - size)
    ys, xs = torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype)
    inside_y = (ys[None] >= corner[:, :1]) & (ys[None] < corner[:, :1] + size[:, :1])
    inside_x = (xs[None] >= corner[:, 1:]) & (xs[None] < corner[:, 1:] + size[:, 1:])
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    v = v * keep[:, None].to(x.dtype)
    return v + torch.randn(x.shape, generator=gen) * 0.1


class _DinoHead(nn.Module):
    """Projection MLP, l2-normalised bottleneck, weight-normalised prototypes (as DINO)."""

    def __init__(self, dim: int, n_prototypes: int = DINO_PROTOTYPES, bottleneck: int = 32):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, bottleneck))
        self.prototypes = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck, n_prototypes, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=-1))


def _train_dino(model: nn.Module, images: torch.Tensor, s: TrainSettings, gen: torch.Generator):
    """Returns (losses, teacher)."""
    head = _DinoHead(model.embed_dim)
    teacher, teacher_head = copy.deepcopy(model), copy.deepcopy(head)
    for p in [*teacher.parameters(), *teacher_head.parameters()]:
        p.requires_grad_(False)
    center = torch.zeros(DINO_PROTOTYPES)
    t_student, t_teacher = DINO_TEMPS

    def step(idx: torch.Tensor) -> torch.Tensor:
        nonlocal center
        views = [_augment(images[idx], gen) for _ in range(2)]
        with torch.no_grad():
            t_out = [teacher_head(_cls_features(teacher, v)) for v in views]
            targets = [F.softmax((t - center) / t_teacher, dim=-1) for t in t_out]
            center = DINO_CENTER_MOMENTUM * center + (1 - DINO_CENTER_MOMENTUM) * torch.cat(
                t_out
            ).mean(0)
        s_out = [F.log_softmax(head(_cls_features(model, v)) / t_student, dim=-1) for v in views]
        loss = -(targets[0] * s_out[1]).sum(-1).mean() - (targets[1] * s_out[0]).sum(-1).mean()
        return loss / 2

    def ema(i: int, total: int) -> None:
        # momentum rises from DINO_TEACHER_MOMENTUM to 1 on a cosine schedule, as in DINO
        mom = 1 - (1 - DINO_TEACHER_MOMENTUM) * (math.cos(math.pi * i / total) + 1) / 2
        with torch.no_grad():
            for src, dst in ((model, teacher), (head, teacher_head)):
                for ps, pt in zip(src.parameters(), dst.parameters(), strict=True):
                    pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)

    params = [*model.parameters(), *head.parameters()]
    losses = _optimise(params, len(images), s, gen, step, ema, name="DINO")
    return losses, teacher


class _TextTower(nn.Module):
    """CLIP's text encoder, tiny: token + position embeddings, transformer layers, mean pool."""

    def __init__(self, vocab: int, dim: int, out_dim: int, max_len: int, n_layers: int = 1):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, nhead=2, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.proj = nn.Linear(dim, out_dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.pos[:, : ids.shape[1]]
        x = self.encoder(x, src_key_padding_mask=~mask)
        w = mask[..., None].float()
        return self.proj((x * w).sum(1) / w.sum(1))


def _tokenize(tokenizer_dir: str | os.PathLike, captions: Sequence[str], eos: bool):
    """Padded token ids and the real-token mask of ``captions`` (BOS as the tokenizer adds it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok(list(captions), add_special_tokens=True)["input_ids"]
    if eos:
        ids = [seq + [tok.eos_token_id] for seq in ids]
    width = max(len(seq) for seq in ids)
    out = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, seq in enumerate(ids):
        out[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = True
    return tok, out, mask


def _train_clip(
    model: nn.Module,
    images: torch.Tensor,
    captions: Sequence[str],
    tokenizer_dir: str | os.PathLike,
    s: TrainSettings,
    gen: torch.Generator,
):
    tok, ids, mask = _tokenize(tokenizer_dir, captions, eos=False)
    text = _TextTower(len(tok), 48, model.num_classes, ids.shape[1])
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def step(idx: torch.Tensor) -> torch.Tensor:
        width = int(mask[idx].sum(1).max())
        img = F.normalize(model(images[idx]), dim=-1)
        txt = F.normalize(text(ids[idx, :width], mask[idx, :width]), dim=-1)
        logits = logit_scale.clamp(max=math.log(100)).exp() * img @ txt.T
        labels = torch.arange(len(idx))
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    params = [*model.parameters(), *text.parameters(), logit_scale]
    return _optimise(params, len(images), s, gen, step, name="CLIP")


def _train_classifier(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, s: TrainSettings, gen
) -> list[float]:
    """Multi-label scene classification: binary cross-entropy per label."""

    def step(idx: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(images[idx]), labels[idx])

    return _optimise(list(model.parameters()), len(images), s, gen, step, name="CLIP+FT")


def _load_trunk(model: nn.Module, init_dir: str | os.PathLike) -> None:
    """Copy every weight but the classifier head from the model saved at ``init_dir``."""
    from xmodal.extract.vision import load_vision_model

    source, _, _ = load_vision_model(str(init_dir))
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("head.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("head.")] + list(unexpected)
    if bad:
        raise ValueError(
            f"{init_dir}: its weights do not fit this model's trunk (mismatched keys {bad[:5]}); "
            "the init model must be the same ViT with another head"
        )


def train_vision_model(
    model_dir: str | os.PathLike,
    family: str,
    scenes: Mapping[str, np.ndarray],
    settings: TrainSettings,
    seed: int,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    init_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train the ViT saved at ``model_dir`` with its family's objective; save it there again.

    ``scenes`` holds the arrays of :func:`xmodal.demo.stimuli.load_training_scenes`. ``clip``
    needs ``tokenizer_dir`` (its text tower's tokens); ``clip_ft`` starts from the trunk of the
    trained CLIP at ``init_dir`` (from scratch without it). Returns the training record (also
    written to ``model_dir/training.json``): family, settings, seed, scenes, loss per epoch,
    seconds.
    """
    from xmodal.demo.models import save_vit
    from xmodal.extract.vision import load_vision_model

    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    n = _n_scenes(settings, len(scenes["images"]))
    model, transform, _ = load_vision_model(str(model_dir))
    model.requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        images = _image_tensor(scenes["images"][:n], transform)
        model.train()
        if family == "mae":
            losses = _train_mae(model, images, settings, gen)
        elif family == "dinov2":
            losses, model = _train_dino(model, images, settings, gen)
        elif family == "clip":
            if tokenizer_dir is None:
                raise ValueError("training a CLIP model needs the tokenizer of its text tower")
            captions = [str(c) for c in scenes["captions"][:n]]
            losses = _train_clip(model, images, captions, tokenizer_dir, settings, gen)
        elif family == "clip_ft":
            if init_dir is not None:
                _load_trunk(model, init_dir)
            labels = torch.as_tensor(scenes["labels"][:n], dtype=torch.float32)
            losses = _train_classifier(model, images, labels, settings, gen)
        else:
            raise ValueError(f"no training objective for ViT family {family!r}")
    model.eval().requires_grad_(False)
    built = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    save_vit(model, model_dir, built.get("model_args", {}))
    record = dict(
        family=family,
        settings=asdict(settings),
        seed=seed,
        n_scenes=n,
        loss_per_epoch=losses,
        seconds=round(time.perf_counter() - t0, 2),
        threads=torch.get_num_threads(),
    )
    _write_record(model_dir, record)
    return record


# ----------------------------------------------------------------------------- language


def train_language_model(
    out_dir: str | os.PathLike,
    arch: str,
    tokenizer_dir: str | os.PathLike,
    captions: Sequence[str],
    settings: TrainSettings,
    seed: int,
    *,
    hidden_size: int = 32,
    n_layers: int = 2,
    max_positions: int = 128,
) -> dict[str, Any]:
    """Train a tiny BLOOM / LLaMA by next-token prediction on ``captions``; save it to ``out_dir``.

    Loss: mean cross-entropy of each real next token (BOS … EOS; padding never counts). Saved
    is the base model (``save_pretrained``, no LM head) with the tokenizer, as the extraction
    loads it (``AutoModel``). Returns the training record (also ``out_dir/training.json``).
    """
    from transformers import AutoModelForCausalLM

    from xmodal.demo.models import tiny_lm_config

    t0 = time.perf_counter()
    captions = list(captions[: _n_scenes(settings, len(captions))])
    tok, ids, mask = _tokenize(tokenizer_dir, captions, eos=True)
    cfg = tiny_lm_config(arch, tok, hidden_size, n_layers, max_positions)
    if arch == "llama" and ids.shape[1] > max_positions:
        raise ValueError(f"captions of {ids.shape[1]} tokens exceed the context {max_positions}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        model.train()

        def step(idx: torch.Tensor) -> torch.Tensor:
            width = int(mask[idx].sum(1).max())
            x, m = ids[idx, :width], mask[idx, :width]
            labels = x.masked_fill(~m, -100)
            return model(input_ids=x, attention_mask=m.long(), labels=labels).loss

        losses = _optimise(list(model.parameters()), len(captions), settings, gen, step, name=arch)
    model.eval()
    out = Path(out_dir)
    model.base_model.save_pretrained(out)
    tok.save_pretrained(out)
    record = dict(
        arch=arch,
        hidden_size=hidden_size,
        n_layers=n_layers,
        settings=asdict(settings),
        seed=seed,
        n_scenes=len(captions),
        loss_per_epoch=losses,
        seconds=round(time.perf_counter() - t0, 2),
        threads=torch.get_num_threads(),
    )
    _write_record(out, record)
    return record
