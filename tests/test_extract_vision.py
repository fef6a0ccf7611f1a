"""Vision extraction with tiny timm ViTs of the paper's four families (CPU, no network)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from xmodal._compat import ensure_torchvision_importable
from xmodal.demo.models import VIT_FAMILIES, make_hub_cache
from xmodal.extract import (
    ExtractionError,
    NonFiniteFeatureError,
    UnsafeCheckpointError,
    extract_features,
)
from xmodal.extract.vision import extract_vision_features, load_vision_model
from xmodal.features import STIMULI_DIGEST, FeatureFile
from xmodal.registry import FEATURES_VERSION
from xmodal.stimuli import ImageDataset, manifest_stamp, read_manifest

ensure_torchvision_importable()
import timm  # noqa: E402


def _batches(ds, bs):
    items = [ds[i] for i in range(len(ds))]
    for s in range(0, len(items), bs):
        chunk = items[s : s + bs]
        yield torch.stack([x for x, _ in chunk]), [i for _, i in chunk]


def _images(tiny_manifest, transform):
    df = read_manifest(tiny_manifest)
    return df, ImageDataset(df, tiny_manifest.parent, transform)


@pytest.mark.parametrize("family", list(VIT_FAMILIES))
def test_cls_of_every_block(family, tiny_vits, tiny_manifest):
    model, transform, info = load_vision_model(str(tiny_vits[family]))
    depth = VIT_FAMILIES[family][1]["depth"]
    assert info["revision"] == "local" and info["source"] == "timm" and info["n_layers"] == depth
    assert not model.training
    # timm's own eval transform for the model
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert info["preprocessing"]["input_size"] == list(data_cfg["input_size"])
    df, ds = _images(tiny_manifest, transform)
    res = extract_vision_features(
        model, _batches(ds, 5), stimulus_ids=df["stimulus_id"].tolist(), progress=False
    )
    dim = info["dim"]
    assert res.features.shape == (depth, 12, dim) and res.features.dtype == np.float32
    assert res.layer_names == [f"blocks.{i}" for i in range(depth)]
    # independent reference: forward_intermediates without the final norm, token 0
    x = torch.stack([ds[i][0] for i in range(12)])
    with torch.no_grad():
        inter = model.forward_intermediates(
            x, norm=False, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        final = model.forward_features(x)[:, 0]  # after the final norm
    assert len(inter) == depth
    for i, (_, prefix) in enumerate(inter):
        np.testing.assert_allclose(res.features[i], prefix[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    if not isinstance(model.norm, torch.nn.Identity):
        assert not np.allclose(res.features[-1], final.numpy(), atol=1e-3)
    # and equal to the output of blocks[i] captured by a hook
    seen = []
    h = model.blocks[1].register_forward_hook(lambda m, a, o: seen.append(o[:, 0].clone()))
    with torch.no_grad():
        model.forward_features(x)
    h.remove()
    np.testing.assert_allclose(res.features[1], seen[0].numpy(), rtol=1e-5, atol=1e-5)
    assert not model.blocks[0]._forward_hooks  # extraction removed its hooks


def test_family_quirks(tiny_vits):
    dino, _, _ = load_vision_model(str(tiny_vits["dinov2"]))
    clip, _, clip_info = load_vision_model(str(tiny_vits["clip"]))
    assert not isinstance(dino.blocks[0].ls1, torch.nn.Identity)  # layer scale
    assert isinstance(clip.norm_pre, torch.nn.LayerNorm)  # CLIP pre-norm
    assert clip_info["preprocessing"]["mean"][0] == pytest.approx(0.48145466)


def test_hub_cache_offline_matches_local_dir(tmp_path, tiny_vits, hf_offline):
    snap = make_hub_cache(tiny_vits["mae"], tmp_path / "hub", "timm/vit_huge_patch14_224.mae")
    model, _, info = load_vision_model("vit_huge_patch14_224.mae", cache_dir=tmp_path / "hub")
    assert info["revision"] == snap.name and len(snap.name) == 40
    ref, _, _ = load_vision_model(str(tiny_vits["mae"]))
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # pinned revision = the commit hash; an unknown model is an error naming the cache
    load_vision_model("vit_huge_patch14_224.mae", cache_dir=tmp_path / "hub", revision=snap.name)
    with pytest.raises(ExtractionError, match="not in the hub cache .*HF_HUB_OFFLINE"):
        load_vision_model("vit_huge_patch14_clip_224.laion2b", cache_dir=tmp_path / "hub")


def test_pickle_only_checkpoint_refused(tmp_path, tiny_vits):
    """Also beside a safetensors file that timm's local-dir loader ranks below the pickle
    (open_clip_model.safetensors): the pickle loaded with allow_pickle false, and the feature
    file named the safetensors file (model audit)."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_vits["clip"] / "config.json").read_text())
    sd = load_file(tiny_vits["clip"] / "model.safetensors")
    torch.save(sd, d / "pytorch_model.bin")
    other = {k: v + 1.0 for k, v in sd.items()}
    for beside in (None, "open_clip_model.safetensors"):
        if beside:
            save_file(other, d / beside)
        with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin.*allow_pickle"):
            load_vision_model(str(d))
        model, _, info = load_vision_model(str(d), allow_pickle=True)
        assert info["weights"] == ["pytorch_model.bin"]
        torch.testing.assert_close(
            model.state_dict()["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc1.weight"]
        )
    (d / "pytorch_model.bin").unlink()  # then the safetensors file is read, and named
    model, _, info = load_vision_model(str(d))
    assert info["weights"] == ["open_clip_model.safetensors"]
    torch.testing.assert_close(
        model.state_dict()["blocks.0.mlp.fc1.weight"], other["blocks.0.mlp.fc1.weight"]
    )


def test_weights_file(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    model, _, info = load_vision_model(
        "vit_tiny_patch16_224", weights_file=tmp_path / "w.safetensors"
    )
    assert info["revision"] == "local" and info["n_layers"] == 12  # architecture from the timm id
    torch.save(src.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UnsafeCheckpointError, match="not safetensors"):
        load_vision_model("vit_tiny_patch16_224", weights_file=tmp_path / "w.pth")


def test_bfloat16_and_oom_halving(tiny_vits, tiny_manifest, caplog, monkeypatch):
    model, transform, _ = load_vision_model(str(tiny_vits["dinov2"]))
    df, ds = _images(tiny_manifest, transform)
    ids = df["stimulus_id"].tolist()
    ref = extract_vision_features(model, _batches(ds, 12), stimulus_ids=ids, progress=False)

    forward = model.forward_features

    def flaky(x):
        if len(x) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    monkeypatch.setattr(model, "forward_features", flaky)
    with caplog.at_level("WARNING"):
        res = extract_vision_features(
            model,
            _batches(ds, 12),
            stimulus_ids=ids,
            batch_size=8,
            model_name="dino",
            progress=False,
        )
    np.testing.assert_allclose(res.features, ref.features, rtol=1e-5, atol=1e-5)
    assert res.info["batch_size"] == 2 and res.info["oom_halvings"] == 2
    assert "out of memory on a batch of 8; continuing with batch size 4" in caplog.text
    monkeypatch.undo()

    bf, _, info = load_vision_model(str(tiny_vits["dinov2"]), dtype=torch.bfloat16)
    assert info["dtype"] == "bfloat16" and next(bf.parameters()).dtype == torch.bfloat16
    res16 = extract_vision_features(bf, _batches(ds, 6), stimulus_ids=ids, progress=False)
    assert res16.features.dtype == np.float32
    np.testing.assert_allclose(res16.features, ref.features, rtol=0.1, atol=0.1)


def test_nan_is_an_error_naming_model_layer_stimuli(
    tmp_path, tiny_vits, tiny_manifest, monkeypatch
):
    model, transform, _ = load_vision_model(str(tiny_vits["mae"]))
    df, ds = _images(tiny_manifest, transform)

    def poison(module, args, out):
        out = out.clone()
        out[1, 0, 0] = float("nan")
        return out

    model.blocks[2].register_forward_hook(poison)
    with pytest.raises(NonFiniteFeatureError) as err:
        extract_vision_features(
            model,
            _batches(ds, 4),
            stimulus_ids=df["stimulus_id"].tolist(),
            model_name="mae-h",
            progress=False,
        )
    msg = str(err.value)
    assert "mae-h" in msg and "'blocks.2'" in msg and "'blocks.3'" in msg and "'stim-01'" in msg
    # through the workflow entry point: the error propagates and no file is written
    monkeypatch.setattr(
        "xmodal.extract.vision.load_vision_model", lambda *a, **k: (model, transform, {})
    )
    out = tmp_path / "mae-h.h5"
    with pytest.raises(NonFiniteFeatureError):
        extract_features(
            "mae-h", {"modality": "vision", "id": "x"}, tiny_manifest, out, progress=False
        )
    # no file; only the mark of the failed attempt (xmodal.attempts.begin_attempt)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".mae-h.h5.attempt"]


def test_extract_features_end_to_end(tmp_path, tiny_vits, tiny_manifest, hf_offline):
    make_hub_cache(
        tiny_vits["clip_ft"], tmp_path / "hub", "timm/vit_huge_patch14_clip_224.laion2b_ft_in12k"
    )
    cfg = {
        "modality": "vision",
        "id": "vit_huge_patch14_clip_224.laion2b_ft_in12k",
        "revision": None,
        "size_b": 0.63,
        "label": "CLIP+FT",
        "family": "ViT",
    }
    out = extract_features(
        "clip-h-ft", cfg, tiny_manifest, tmp_path / "f" / "clip-h-ft.h5",
        cache_dir=tmp_path / "hub", batch_size=5, num_workers=1, progress=False,
    )  # fmt: skip
    ids = read_manifest(tiny_manifest)["stimulus_id"].tolist()
    with FeatureFile(out) as ff:
        ff.validate(ids)
        a = ff.attrs
        assert (ff.n_layers, ff.m, ff.dim) == (3, 12, 40)
        assert a["model_key"] == "clip-h-ft" and a["pooling"] == "cls" and a["source"] == "timm"
        assert (
            len(a["revision"]) == 40
            and a["compute_dtype"] == "float32"
            and a["modality"] == "vision"
        )
        assert '"input_size": [3, 32, 32]' in a["preprocessing"]
        assert a["features_version"] == FEATURES_VERSION["vision"]
        assert np.all(ff.abs_q95() > 0)
    # what it read: the digest of the vision stamp (ids and image contents), from the bytes
    rows = [[i, hashlib.sha256((tiny_manifest.parent / img).read_bytes()).hexdigest()]
            for i, img in read_manifest(tiny_manifest)[["stimulus_id", "image"]].to_numpy()]  # fmt: skip
    want = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    assert a[STIMULI_DIGEST] == want


#: paths of the files opened while a test lists them (None: not listening); an audit hook sees
#: every open, by Python code or C (Pillow, hashlib's callers), and cannot be removed
_OPENED: list[str] | None = None


def _on_audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED is not None and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_on_audit)


@pytest.mark.parametrize("drop_duplicates", [False, True])
def test_each_image_file_is_read_once_and_digested_as_decoded(
    tmp_path, tiny_vits, tiny_manifest, drop_duplicates
):
    """The stimuli digest comes from the bytes the loader decoded: no serial pass over every
    image before the first batch, and no second read. With duplicates dropped, their files
    (which the duplicate scan reads anyway) are digested too, in manifest order."""
    global _OPENED
    root = tmp_path / "m"
    shutil.copytree(tiny_manifest.parent, root)
    manifest = root / "stimuli.tsv"
    lines = manifest.read_text().splitlines()
    # stim-05's image under another caption (COCO-style): kept, its file read once all the same
    lines.append("coco-05\t" + lines[6].split("\t")[1] + "\ta taxi in the rain")
    if drop_duplicates:  # stim-03 again under another id, in the middle: dropped by the scan
        lines.insert(5, "again-03\t" + lines[4].split("\t", 1)[1])
    manifest.write_text("\n".join(lines) + "\n")
    cfg = {"modality": "vision", "id": str(tiny_vits["mae"]), "size_b": 0.1}
    named = [str(root / p) for p in read_manifest(manifest)["image"]]
    images = set(named)
    _OPENED = []
    try:
        out = extract_features(
            "mae", cfg, manifest, tmp_path / "mae.h5", batch_size=5, num_workers=0,
            drop_duplicates=drop_duplicates, progress=False,
        )  # fmt: skip
        opened = [p for p in _OPENED if p in images]
    finally:
        _OPENED = None
    reads = Counter(opened)
    assert set(reads) == images
    # once each, stim-05's too (two stimuli name it; before, once for each); with
    # drop_duplicates the scan reads each row's file once more (its digests serve the stamp)
    want = Counter(images) + (Counter(named) if drop_duplicates else Counter())
    assert reads == want
    ref = manifest_stamp(read_manifest(manifest), "vision", drop_duplicates, root)  # from files
    with FeatureFile(out) as ff:
        assert ff.attrs[STIMULI_DIGEST] == ref["sha256"]
        assert ff.m == 13 and json.loads(ff.attrs["preprocessing"])["n_repeated"] == 1
        features = ff.layer(0)
    np.testing.assert_array_equal(features[12], features[5])


@pytest.mark.parametrize("drop_duplicates", [False, True])
def test_an_image_several_stimuli_name_runs_once_and_their_rows_are_copies(
    tmp_path, tiny_vits, tiny_manifest, monkeypatch, drop_duplicates
):
    """One image under several captions (COCO-style) runs once and fills their rows with one
    copy of its features, however its path is spelled, and through a symbolic or a hard link.
    Before, each row ran in its own batch position, which on a GPU may round differently, so
    the copies were near-equal and rounding chose which entered a kNN set; here a hook makes
    every batch position round differently. A byte-identical copy of the file is one input
    where the duplicate scan (``drop_duplicates``) read its digest, and runs on its own where
    nothing read it."""
    root = tmp_path / "m"
    shutil.copytree(tiny_manifest.parent, root)
    manifest = root / "stimuli.tsv"
    lines = manifest.read_text().splitlines()
    image = {i: lines[i + 1].split("\t")[1] for i in (0, 5)}
    (root / "img" / "link").symlink_to(root / image[0])
    os.link(root / image[5], root / "img" / "hard")
    shutil.copyfile(root / image[0], root / "img" / "copy")
    lines += [
        f"coco-a\t./{image[5]}\ta taxi in the rain",
        f"coco-b\t{image[0]}\tanother red cube",
        f"coco-c\t{image[5].replace('/', '//')}\ta cab",
        f"coco-d\timg/../{image[0]}\ta cube once more",
        "coco-e\timg/link\ta linked cube",
        "coco-f\timg/hard\ta hard-linked taxi",
        "coco-g\timg/copy\ta copied cube",
    ]
    manifest.write_text("\n".join(lines) + "\n")
    model, transform, info = load_vision_model(str(tiny_vits["dinov2"]))
    seen = []

    def by_position(module, args):  # row j of a batch moved by 1e-4 j: a GPU's rounding by position
        seen.append(len(args[0]))
        x = args[0]
        return (x + 1e-4 * torch.arange(len(x), dtype=x.dtype)[:, None, None],)

    model.blocks[0].register_forward_pre_hook(by_position)
    monkeypatch.setattr(
        "xmodal.extract.vision.load_vision_model", lambda *a, **k: (model, transform, info)
    )

    def extract(path, name):
        out = extract_features(
            "dino", {"modality": "vision", "id": "x"}, path, tmp_path / name,
            batch_size=4, num_workers=0, progress=False, drop_duplicates=drop_duplicates,
        )  # fmt: skip
        with FeatureFile(out) as ff:
            ff.validate(read_manifest(path)["stimulus_id"].tolist())
            features = np.stack(list(ff.layers()))
            return features, ff.abs_q95(), json.loads(ff.attrs["preprocessing"])

    ref, ref_q95, _ = extract(tiny_manifest, "plain.h5")  # the 12 images, in the same batches
    seen.clear()
    features, q95, preprocessing = extract(manifest, "coco.h5")
    # 19 stimuli: 12 image files, 6 rows that name one of them, and a copy of one
    run = 12 if drop_duplicates else 13
    assert sum(seen) == run and preprocessing["n_repeated"] == 19 - run
    rows = [*range(12), 5, 0, 5, 0, 0, 5, 0]
    if drop_duplicates:
        np.testing.assert_array_equal(features, ref[:, rows])
        np.testing.assert_array_equal(q95, ref_q95[rows])
    else:  # the copy ran alone, at batch position 0 (no shift): equal on the CPU, not by copying
        np.testing.assert_array_equal(features[:, :18], ref[:, rows[:18]])
        np.testing.assert_array_equal(q95[:18], ref_q95[rows[:18]])


@pytest.mark.parametrize(
    "model_id",
    [
        "vit_huge_patch14_224.mae",
        "hf-hub:timm/vit_huge_patch14_224.mae",
        "hf_hub:timm/vit_huge_patch14_224.mae",
    ],
)
def test_hub_id_forms_resolve_to_the_same_repo_and_files_in_prefetch_and_extraction(
    tmp_path, tiny_vits, hf_offline, model_id
):
    from xmodal.prefetch import prefetch_model

    snap = make_hub_cache(tiny_vits["mae"], tmp_path / "hub", "timm/vit_huge_patch14_224.mae")
    record = prefetch_model(model_id, "vision", None, tmp_path / "hub")
    assert record["repo_id"] == "timm/vit_huge_patch14_224.mae"
    assert record["snapshot"] == str(snap.resolve()) and record["revision"] == snap.name
    assert record["files"] == ["config.json", "model.safetensors"]
    _, _, info = load_vision_model(model_id, cache_dir=tmp_path / "hub")
    assert info["revision"] == snap.name and info["weights"] == ["model.safetensors"]


def test_local_directory_id_is_the_same_in_prefetch_and_extraction(tiny_vits, tmp_path):
    from xmodal.prefetch import prefetch_model

    record = prefetch_model(str(tiny_vits["mae"]), "vision", None, tmp_path / "hub")
    _, _, info = load_vision_model(str(tiny_vits["mae"]))
    assert record["source"] == "local" and record["snapshot"] == str(tiny_vits["mae"].resolve())
    assert info["revision"] == "local" and set(info["weights"]) <= set(record["files"])


def test_vision_layer_the_model_lacks_fails_before_extraction(tmp_path, tiny_vits, tiny_manifest):
    from xmodal.config import ConfigError

    entry = {"modality": "vision", "id": str(tiny_vits["mae"])}
    with pytest.raises(ConfigError, match=r"'analysis.vision_layer': layer -9 does not exist"):
        extract_features(
            "tiny-mae", entry, tiny_manifest, tmp_path / "f.h5", vision_layer=-9, progress=False
        )
    assert not (tmp_path / "f.h5").exists()


def test_a_gpu_job_without_cuda_fails_instead_of_running_on_the_cpu(monkeypatch):
    """A SLURM job given GPUs whose torch sees none (a CPU-only build in the job's environment)
    used to extract on the CPU for hours, in float32, with exit 0; XMODAL_DEVICE=cpu opts in."""
    from xmodal.extract import ExtractionError
    from xmodal.extract._common import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for key in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "XMODAL_DEVICE"):
        monkeypatch.delenv(key, raising=False)
    assert resolve_device("auto").type == "cpu"  # a laptop: the CPU
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "0")
    assert resolve_device("auto").type == "cpu"  # a CPU job on a GPU cluster
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    with pytest.raises(ExtractionError, match=r"given GPUs by SLURM \(SLURM_JOB_GPUS=0\).*XMODAL"):
        resolve_device("auto")
    monkeypatch.setenv("XMODAL_DEVICE", "cpu")
    assert resolve_device("auto").type == "cpu"
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [  # the class token joins after the blocks (CaiT, XCiT) or midway (ConViT)
        ("cait_xxs24_224", dict(depth=2, depth_token_only=1, embed_dim=48, num_heads=2)),
        ("xcit_nano_12_p16_224", dict(depth=2, embed_dim=48, num_heads=2)),
        ("convit_tiny", dict(depth=3, local_up_to_layer=2, embed_dim=48, num_heads=2)),
    ],
)
def test_models_whose_blocks_lack_the_class_token_are_refused(arch, kwargs):
    model = timm.create_model(arch, pretrained=False, img_size=64, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ExtractionError, match=f"^{arch}: .* not the CLS token"):
        extract_vision_features(
            model, [(x, [0, 1])], stimulus_ids=["a", "b"], model_name=arch, progress=False
        )


def test_block_outputs_are_not_kept_alive_by_their_cls_tokens(tiny_vits):
    from xmodal.extract.vision import _ClsHooks

    model, _, info = load_vision_model(str(tiny_vits["dinov2"]))
    size = info["preprocessing"]["input_size"]
    hooks = _ClsHooks(model)
    hooks.model.forward_features(torch.randn(3, *size))
    token = hooks.tokens[0]  # a copy of token 0, not a view of the (3, tokens, dim) output
    assert token.untyped_storage().nbytes() == token.numel() * token.element_size()
    hooks.remove()


def test_auto_dtype_is_float32_for_vision_and_decided_on_the_device_for_language(
    monkeypatch, tmp_path
):
    import xmodal.extract as extract

    seen = {}

    def stop(dtype, device):
        seen["dtype"] = dtype
        raise RuntimeError("stop")

    monkeypatch.setattr(extract, "resolve_dtype", stop)
    for modality, want in (("vision", "float32"), ("language", "auto")):
        with pytest.raises(RuntimeError, match="stop"):
            extract_features(
                "m", {"modality": modality, "id": "x"}, "m.tsv", tmp_path / "o.h5", device="cpu"
            )
        assert seen["dtype"] == want


def test_save_vit_records_the_tiny_size_and_leaves_the_model_as_it_was(tmp_path):
    """timm before 1.0.31 saved the full-size model's input size (224 px for a 32 px model);
    save_vit writes the model's own, and the caller's model keeps its pretrained_cfg."""
    from xmodal.demo.models import save_vit, tiny_vit, vit_args

    model = tiny_vit("mae", 0)
    before = dict(model.pretrained_cfg)
    save_vit(model, tmp_path / "v", vit_args("mae"))
    assert model.pretrained_cfg == before and model.default_cfg is model.pretrained_cfg
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    assert cfg["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert cfg["model_args"]["depth"] == vit_args("mae")["depth"]


def test_a_transformers_model_given_as_a_vision_model_is_named_as_such(tiny_hf_vit):
    """A transformers checkpoint in a vision model's place failed as "timm could not build/load
    the model ('architecture')", which named the model but not the cause."""
    with pytest.raises(ExtractionError, match=r"holds a transformers model \(model_type 'vit'\)"):
        load_vision_model(str(tiny_hf_vit))


def _tf32_flags() -> tuple[object, object]:
    """What cuDNN convolutions and CUDA matrix products compute float32 in, right now."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(conv, "fp32_precision"):
        return conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_float32_features_are_computed_without_tf32(tiny_vits, tiny_manifest):
    """torch runs cuDNN convolutions (the patch embedding) in TF32 by default on Ampere and
    later GPUs: features recorded as float32 were computed with a 10-bit mantissa there. While
    a float32 model runs, TF32 is off; the flags are restored after, and a bfloat16 model runs
    under the flags as they were (docs/method.md, "Compute precision")."""
    before = _tf32_flags()
    ieee = ("ieee", "ieee") if isinstance(before[0], str) else (False, False)
    for dtype, expected in ((torch.float32, ieee), (torch.bfloat16, before)):
        model, transform, _ = load_vision_model(str(tiny_vits["mae"]), dtype=dtype)
        seen = []
        model.patch_embed.register_forward_pre_hook(
            lambda *_, seen=seen: seen.append(_tf32_flags())
        )
        df, ds = _images(tiny_manifest, transform)
        extract_vision_features(
            model, _batches(ds, 6), stimulus_ids=df["stimulus_id"].tolist(), progress=False
        )
        assert seen == [expected, expected], dtype
        assert _tf32_flags() == before
