"""Prefetch of stimuli and weights (xmodal.prefetch), against local fakes only, never the network.

A "fake hub" here is a directory in the Hugging Face hub-cache layout
(``<type>s--org--name/refs/<rev>`` + ``snapshots/<sha>/...``); "no network" is HF_ENDPOINT
pointing at a closed local port.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmodal.prefetch import (
    PrefetchError,
    check_prefetched,
    hub_repo_id,
    prefetch_model,
    prefetch_stimuli,
)

SECRET = "hf_notARealTokenButSecret123"


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the hub at a closed local port; drop any offline flag; set a token to check leaks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub reads the flag once, at import (an earlier test may have set it)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return endpoint


def fake_repo(cache: Path, repo_type: str, repo_id: str, ref: str, files: dict[str, bytes]) -> str:
    """Write a hub-cache snapshot of ``files`` at ``ref``; return its (fake) commit hash."""
    sha = hashlib.sha1(repr(sorted(files)).encode() + ref.encode()).hexdigest()
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    for name, data in files.items():
        path = root / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sha


def image_bytes(fmt: str, color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, format=fmt)
    return buf.getvalue()


def parquet_bytes(rows: list[tuple[bytes, list[str]]]) -> bytes:
    """A parquet file as `datasets` writes it: image = struct<bytes, path>, text = list<string>."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "image": pa.array([{"bytes": b, "path": None} for b, _ in rows], type=image_type),
            "text": pa.array([t for _, t in rows], type=pa.list_(pa.string())),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


LM_FILES = {
    "config.json": b"{}",
    "generation_config.json": b"{}",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "tokenizer.model": b"sp",
    "special_tokens_map.json": b"{}",
    "model-00001-of-00002.safetensors": b"w1",
    "model-00002-of-00002.safetensors": b"w2",
    "model.safetensors.index.json": b"{}",
    "pytorch_model.bin": b"pickle",
    "pytorch_model.bin.index.json": b"{}",
    "README.md": b"# card",
    "flax_model.msgpack": b"flax",
}


# ----------------------------------------------------------------------------- models
def test_timm_ids_live_under_timm() -> None:
    assert hub_repo_id("vit_huge_patch14_224.mae", "vision") == "timm/vit_huge_patch14_224.mae"
    assert hub_repo_id("org/vit", "vision") == "org/vit"
    assert hub_repo_id("huggyllama/llama-7b", "language") == "huggyllama/llama-7b"


def test_cached_model_offline_records_resolved_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = fake_repo(tmp_path, "model", "org/tiny-lm", "main", LM_FILES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = prefetch_model("org/tiny-lm", "language", None, tmp_path)
    assert rec["revision"] == sha and rec["revision_requested"] is None
    assert rec["source"] == "transformers" and rec["repo_id"] == "org/tiny-lm"
    assert rec["from_cache_only"] is True
    assert rec["files"] == sorted(
        [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "special_tokens_map.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
        ]
    )
    assert SECRET not in json.dumps(rec)


def test_cached_model_is_used_when_hub_unreachable(tmp_path: Path) -> None:
    """No HF_HUB_OFFLINE, but the endpoint refuses connections: the cache still serves."""
    sha = fake_repo(tmp_path, "model", "org/tiny-lm", "v1.0", LM_FILES)
    rec = prefetch_model("org/tiny-lm", "language", "v1.0", tmp_path)
    assert rec["revision"] == sha and rec["revision_requested"] == "v1.0"
    assert rec["from_cache_only"] is True


def test_check_prefetched_follows_the_cache_it_is_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record keeps the cache it was downloaded into; a moved copy of that cache passes,
    a cache without the snapshot or with a file missing fails naming both caches."""
    import shutil

    fake_repo(tmp_path / "old", "model", "org/tiny-lm", "main", LM_FILES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    record = tmp_path / "mae.json"
    record.write_text(json.dumps(prefetch_model("org/tiny-lm", "language", None, tmp_path / "old")))
    check_prefetched(record, tmp_path / "old")
    shutil.copytree(tmp_path / "old", tmp_path / "moved")  # the user moved the cache
    check_prefetched(record, tmp_path / "moved")
    with pytest.raises(PrefetchError) as err:
        check_prefetched(record, tmp_path / "empty")
    msg = str(err.value)
    assert f"downloaded into {tmp_path / 'old'}" in msg and f"now {tmp_path / 'empty'}" in msg
    assert "'hub_cache'" in msg and str(record) in msg
    snapshot = next((tmp_path / "moved").glob("models--org--tiny-lm/snapshots/*"))
    (snapshot / "config.json").unlink()
    with pytest.raises(PrefetchError, match=r"lacks config\.json"):
        check_prefetched(record, tmp_path / "moved")
    # a file purged from the cache it was downloaded into: no move to speak of (audit)
    snapshot = next((tmp_path / "old").glob("models--org--tiny-lm/snapshots/*"))
    (snapshot / "config.json").unlink()
    with pytest.raises(PrefetchError) as err:
        check_prefetched(record, tmp_path / "old")
    msg = str(err.value)
    assert f"files its prefetch downloaded are gone from the hub cache {tmp_path / 'old'}" in msg
    assert msg.endswith(f"config.json; delete {record} so that the next run downloads them again")
    assert "'hub_cache'" not in msg and "move" not in msg
    record.write_text(json.dumps(prefetch_model(str(tmp_path / "old"), "language", None, "x")))
    check_prefetched(record, tmp_path / "empty")  # a local directory is used where it is


def test_timm_model_gets_config_and_safetensors_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {
        "config.json": b"{}",
        "model.safetensors": b"w",
        "pytorch_model.bin": b"p",
        "open_clip_model.safetensors": b"big",
    }
    fake_repo(tmp_path, "model", "timm/vit_tiny.fake", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = prefetch_model("vit_tiny.fake", "vision", None, tmp_path)
    assert rec["source"] == "timm" and rec["repo_id"] == "timm/vit_tiny.fake"
    assert rec["files"] == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    ("modality", "repo", "files", "lacks"),
    [
        ("language", "org/no-tok", {"config.json": b"{}", "tokenizer_config.json": b"{}",
                                    "model.safetensors": b"w"}, "tokenizer file"),
        ("language", "org/no-cfg", {"tokenizer.json": b"{}", "model.safetensors": b"w"},
         "config.json"),
        ("vision", "timm/vit_x.fake", {"model.safetensors": b"w"}, "config.json"),
    ],
)  # fmt: skip
def test_a_repo_without_what_the_loader_reads_besides_weights_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modality, repo, files, lacks
) -> None:
    """A snapshot without a tokenizer file passed the prefetch; the model's GPU job then failed
    with 'You need to have sentencepiece or tiktoken installed' (installed), naming no file
    (model audit). Refused at the prefetch, on the login node, naming what is missing."""
    fake_repo(tmp_path, "model", repo, "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_id = repo.removeprefix("timm/")
    with pytest.raises(PrefetchError, match=rf"{repo} at revision main has no {lacks}"):
        prefetch_model(model_id, modality, None, tmp_path)


def test_pickle_only_repo_is_refused_unless_opted_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "pytorch_model.bin": b"p"}
    fake_repo(tmp_path, "model", "org/old-lm", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrefetchError, match="allow_pickle: true") as err:
        prefetch_model("org/old-lm", "language", None, tmp_path)
    assert "pytorch_model.bin" in str(err.value)
    rec = prefetch_model("org/old-lm", "language", None, tmp_path, allow_pickle=True)
    assert "pytorch_model.bin" in rec["files"]


def test_local_directory_is_used_as_is(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    rec = prefetch_model(str(tmp_path / "m"), "language", None, tmp_path / "hub")
    assert rec["source"] == "local" and rec["revision"] == "local"
    assert rec["files"] == ["config.json"]


def test_no_network_no_cache_says_what_where_and_into(tmp_path: Path, no_network: str) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(PrefetchError) as err:
        prefetch_model("huggyllama/llama-65b", "language", None, cache)
    msg = str(err.value)
    assert "huggyllama/llama-65b" in msg and "*.safetensors" in msg  # what
    assert f"{no_network}/huggyllama/llama-65b/tree/main" in msg  # from where
    assert str(cache.resolve()) in msg and "models--huggyllama--llama-65b" in msg  # into
    assert "hf download huggyllama/llama-65b --revision main" in msg
    # the reason (the hub client may remember an unreachable endpoint and say "offline")
    assert any(k in msg for k in ("Connection refused", "ConnectError", "OfflineModeIsEnabled"))
    assert SECRET not in msg


def test_a_cache_this_user_cannot_write_is_named_instead_of_advising_a_copy_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lab's shared hub cache, read-only to the user (config key ``hub_cache``), lacking a
    model: the message advised copying the files into that cache, which fails as the download
    did. It names the folder the user cannot write and the two ways out (audit of 2026-12-07,
    as a user other than the cache's owner; here ``os.access`` stands in, since root may write
    anywhere). A cache the user can write keeps the copy advice."""
    shared = tmp_path / "shared" / "hub"
    partial = {k: v for k, v in LM_FILES.items() if k != "model-00002-of-00002.safetensors"}
    fake_repo(shared, "model", "bigscience/bloomz-560m", "main", partial)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if Path(path).is_relative_to(tmp_path / "shared"):
            return not mode & os.W_OK
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    for model in ("huggyllama/llama-65b", "bigscience/bloomz-560m"):  # absent; a shard short
        with pytest.raises(PrefetchError) as err:
            prefetch_model(model, "language", None, shared)
        msg = str(err.value)
        assert f"this user cannot write in {shared}" in msg, msg
        assert "config key 'hub_cache'" in msg and f"--cache-dir {shared}" in msg, msg
        assert "and copy" not in msg, msg
    with pytest.raises(PrefetchError) as err:
        prefetch_model("huggyllama/llama-65b", "language", None, tmp_path / "own" / "hub")
    assert "and copy <dir>/models--huggyllama--llama-65b" in str(err.value)
    assert "cannot write" not in str(err.value)


def test_cli_prints_the_message_without_a_traceback(tmp_path: Path) -> None:
    env = os.environ.copy()
    cmd = [sys.executable, "-m", "xmodal.prefetch", "model", "--id", "vit_huge_patch14_224.mae"]
    cmd += ["--modality", "vision", "--cache-dir", str(tmp_path / "hub")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "ERROR: Cannot download the weights of model 'vit_huge_patch14_224.mae'" in proc.stderr
    assert "timm/vit_huge_patch14_224.mae" in proc.stderr
    assert SECRET not in proc.stderr + proc.stdout


def test_cli_writes_the_record(tmp_path: Path) -> None:
    sha = fake_repo(tmp_path / "hub", "model", "org/tiny-lm", "main", LM_FILES)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "xmodal.prefetch", "model", "--id", "org/tiny-lm"]
    cmd += ["--modality", "language", "--cache-dir", str(tmp_path / "hub")]
    cmd += ["--record", str(tmp_path / "rec.json")]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    assert json.loads((tmp_path / "rec.json").read_text())["revision"] == sha


# ----------------------------------------------------------------------------- stimuli
def stimuli_repo(cache: Path) -> tuple[str, list[tuple[bytes, list[str]]]]:
    train = [
        (image_bytes("JPEG", (255, 0, 0)), ["a red square", "another caption"]),
        (image_bytes("PNG", (0, 255, 0)), ["a green square, with\ta tab"]),
        (image_bytes("JPEG", (0, 0, 255)), ["a blue square"]),
    ]
    other = [(image_bytes("JPEG", (9, 9, 9)), ["not in train"])]
    sha = fake_repo(
        cache,
        "dataset",
        "fake/prh",
        "wit_1024",
        {
            "data/train-00000-of-00002.parquet": parquet_bytes(train[:2]),
            "data/train-00001-of-00002.parquet": parquet_bytes(train[2:]),
            "data/validation-00000-of-00001.parquet": parquet_bytes(other),
            "README.md": b"# dataset card",
        },
    )
    return sha, train


def test_stimuli_manifest_from_cached_dataset(tmp_path: Path) -> None:
    sha, train = stimuli_repo(tmp_path / "hub")
    out = tmp_path / "resources" / "stimuli" / "wit1024"
    manifest = prefetch_stimuli("fake/prh", "wit_1024", "train", out, cache_dir=tmp_path / "hub")
    assert manifest == out / "stimuli.tsv"
    df = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    assert list(df.columns) == ["stimulus_id", "image", "caption"]
    assert list(df.stimulus_id) == ["s0000", "s0001", "s0002"]
    # text[0], in dataset order; a tab or line break becomes a space (one stimulus per line)
    assert list(df.caption) == [re.sub(r"[\t\n]+", " ", text[0]) for _, text in train]
    assert list(df.image) == ["images/s0000.jpg", "images/s0001.png", "images/s0002.jpg"]
    for rel, (data, _) in zip(df.image, train, strict=True):
        assert (out / rel).read_bytes() == data  # written unchanged, no re-encoding
    src = json.loads((out / "source.json").read_text())
    assert src["revision"] == sha and src["revision_requested"] == "wit_1024"
    assert src["n_stimuli"] == 3 and all("train-" in f for f in src["files"])
    assert src["captions_with_tabs_or_line_breaks"] == [
        sid for sid, (_, text) in zip(df.stimulus_id, train, strict=True) if "\t" in text[0]
    ]


def test_stimuli_split_missing_names_the_files(tmp_path: Path) -> None:
    stimuli_repo(tmp_path / "hub")
    with pytest.raises(PrefetchError, match="split 'test'") as err:
        prefetch_stimuli("fake/prh", "wit_1024", "test", tmp_path / "out", tmp_path / "hub")
    assert "data/train-00000-of-00002.parquet" in str(err.value)


def test_stimuli_without_network_say_what_to_download(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    with pytest.raises(PrefetchError) as err:
        prefetch_stimuli("minhuh/prh", "wit_1024", "train", tmp_path / "out", cache)
    msg = str(err.value)
    assert "/datasets/minhuh/prh/tree/wit_1024" in msg
    assert "--repo-type dataset --revision wit_1024" in msg
    assert str(cache.resolve()) in msg and "datasets--minhuh--prh" in msg
    assert not (tmp_path / "out" / "stimuli.tsv").exists()


def test_stimuli_rows_without_a_caption_or_embedded_image_are_named(tmp_path: Path) -> None:
    """An empty `text` list became the caption "[]" (str of the list), embedded as text by
    every language model; a row whose image is only a path was "a row" without its number."""
    good = (image_bytes("PNG", (1, 2, 3)), ["a caption"])
    sha = fake_repo(
        tmp_path / "hub", "dataset", "fake/empty", "main",
        {"data/train-0.parquet": parquet_bytes([good, (image_bytes("PNG", (0, 0, 0)), [])])},
    )  # fmt: skip
    assert sha
    with pytest.raises(
        PrefetchError, match=r"train-0\.parquet row 1 \(stimulus s0001\) has an empty caption"
    ):
        prefetch_stimuli("fake/empty", None, "train", tmp_path / "out", tmp_path / "hub")
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    texts = pa.array([["a"], ["b"]], type=pa.list_(pa.string()))
    paths_only = pa.array(
        [{"bytes": good[0], "path": None}, {"bytes": None, "path": "img/1.jpg"}], type=image_type
    )
    # an image column of plain paths (text) crashed with a TypeError (review)
    for name, image in (("paths", paths_only), ("text", pa.array(["img/0.jpg", "img/1.jpg"]))):
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": image, "text": texts}), buf)
        hub = tmp_path / f"hub-{name}"
        fake_repo(hub, "dataset", f"fake/{name}", "main", {"data/train-0.parquet": buf.getvalue()})
        row = 1 if name == "paths" else 0
        with pytest.raises(
            PrefetchError,
            match=rf"row {row} \(stimulus s000{row}\) has no embedded image bytes \(only a path, "
            rf"'img/{row}\.jpg'",
        ):
            prefetch_stimuli(f"fake/{name}", None, "train", tmp_path / f"out-{name}", hub)


# ----------------------------------------------------------------------------- incomplete caches
def test_missing_shards_of_datasets_and_weights() -> None:
    from xmodal.prefetch import missing_shards

    assert (
        missing_shards(["d/train-00000-of-00002.parquet", "d/train-00001-of-00002.parquet"]) == []
    )
    assert missing_shards(["d/train-00001-of-00003.parquet"]) == [
        "d/train-00000-of-00003.parquet", "d/train-00002-of-00003.parquet"
    ]  # fmt: skip
    assert missing_shards(["model-00002-of-00002.safetensors"]) == [
        "model-00001-of-00002.safetensors"
    ]
    assert missing_shards(["README.md", "model.safetensors"]) == []
    # datasets' push_to_hub names shards with a fingerprint: one of two was taken for a whole
    # dataset offline (audit); the missing one is named with the others' fingerprint
    assert missing_shards(["data/train-00000-of-00002-5f2c1d9a0b3e4f67.parquet"]) == [
        "data/train-00001-of-00002-5f2c1d9a0b3e4f67.parquet"
    ]
    assert missing_shards(["t-00000-of-00003-aa.parquet", "t-00001-of-00003-bb.parquet"]) == [
        "t-00002-of-00003-*.parquet"
    ]
    tagged = [f"data/train-0000{i}-of-00002-{i}f.parquet" for i in range(2)]
    assert missing_shards(tagged) == []


def test_the_prefetch_decodes_images_by_the_extraction_rules(tmp_path: Path) -> None:
    """Its own check (Image.open and load) refused a 13500-pixel-wide JPEG the extraction
    reduces and uses, and passed a TIFF with an Orientation tag that the stimuli check then
    refused, advising a download that gives the same bytes (audit). Both now as load_rgb,
    the refusal naming the file's row and the stimulus."""
    wide = io.BytesIO()
    Image.new("RGB", (13500, 40), (9, 8, 7)).save(wide, format="JPEG")
    Image.MAX_IMAGE_PIXELS, limit = 200_000, Image.MAX_IMAGE_PIXELS  # a bomb to plain Image.open
    try:
        rotated = io.BytesIO()
        Image.new("RGB", (8, 6), (1, 2, 3)).save(rotated, format="TIFF", exif={0x0112: 6})
        ok = [(image_bytes("PNG", (1, 2, 3)), ["fine"]), (wide.getvalue(), ["wide"])]
        fake_repo(tmp_path / "hub", "dataset", "fake/wide", "main",
                  {"data/train-0.parquet": parquet_bytes(ok)})  # fmt: skip
        prefetch_stimuli("fake/wide", None, "train", tmp_path / "out", tmp_path / "hub")
        assert (tmp_path / "out" / "images" / "s0001.jpg").read_bytes() == wide.getvalue()
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    bad = [(image_bytes("PNG", (1, 2, 3)), ["fine"]), (rotated.getvalue(), ["rotated"])]
    fake_repo(tmp_path / "hub2", "dataset", "fake/rot", "main",
              {"data/train-0.parquet": parquet_bytes(bad)})  # fmt: skip
    with pytest.raises(PrefetchError, match=r"stimulus 's0001'.*train-0\.parquet row 1.*Orient"):
        prefetch_stimuli("fake/rot", None, "train", tmp_path / "out2", tmp_path / "hub2")


def test_an_incomplete_cached_dataset_is_refused_offline(tmp_path: Path, monkeypatch) -> None:
    """Offline, the files of a split were what the cache held: one shard of two gave a
    manifest of half the dataset, with exit 0."""
    train = [(image_bytes("PNG", (i, 0, 0)), [f"caption {i}"]) for i in range(4)]
    fake_repo(
        tmp_path / "hub", "dataset", "fake/half", "main",
        {"data/train-00000-of-00002.parquet": parquet_bytes(train[:2])},
    )  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        PrefetchError, match=r"lacks the shard\(s\) \['data/train-00001-of-00002\.parquet'\]"
    ):
        prefetch_stimuli("fake/half", None, "train", tmp_path / "out", tmp_path / "hub")
    assert not (tmp_path / "out" / "stimuli.tsv").exists()


def test_a_cached_model_missing_a_shard_its_index_names_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    """A model whose cache lacks a weight shard passed prefetch (the check compared the cache
    with itself) and failed in its GPU job."""
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    files = {k: v for k, v in LM_FILES.items() if k != "model-00002-of-00002.safetensors"}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    fake_repo(tmp_path, "model", "org/half-lm", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrefetchError, match=r"lacks the weight shard\(s\) \['model-00002-of-00002"):
        prefetch_model("org/half-lm", "language", None, tmp_path)


def test_a_truncated_image_is_refused_at_prefetch_not_in_the_gpu_jobs(tmp_path: Path) -> None:
    """A JPEG cut in half opens and verifies; it failed only when each vision model's job
    decoded it."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="JPEG", quality=95)
    cut = buf.getvalue()[: len(buf.getvalue()) // 2]
    rows = [(image_bytes("PNG", (1, 2, 3)), ["fine"]), (cut, ["cut in half"])]
    fake_repo(tmp_path / "hub", "dataset", "fake/cut", "main",
              {"data/train-0.parquet": parquet_bytes(rows)})  # fmt: skip
    with pytest.raises(
        PrefetchError, match=r"stimulus 's0001': cannot decode image train-0\.parquet row 1 "
    ):
        prefetch_stimuli("fake/cut", None, "train", tmp_path / "out", tmp_path / "hub")


def test_a_failed_rerun_leaves_no_manifest_next_to_new_images(tmp_path: Path) -> None:
    """Re-running prefetch into the same folder wrote new images one by one, then failed on a
    later row: the old manifest and settings stayed, pairing old captions with new images."""
    hub, out = tmp_path / "hub", tmp_path / "out"
    red = [
        (image_bytes("PNG", (255, 0, 0)), ["a red square"]),
        (image_bytes("PNG", (0, 0, 0)), ["b"]),
    ]
    fake_repo(hub, "dataset", "fake/two", "main", {"data/train-0.parquet": parquet_bytes(red)})
    prefetch_stimuli("fake/two", "main", "train", out, hub)
    assert (out / "stimuli.tsv").exists() and (out / "settings.json").exists()
    blue = [
        (image_bytes("PNG", (0, 0, 255)), ["a blue square"]),
        (image_bytes("PNG", (0, 0, 0)), []),
    ]
    fake_repo(hub, "dataset", "fake/two", "v2", {"data/train-0.parquet": parquet_bytes(blue)})
    with pytest.raises(PrefetchError, match=r"row 1 \(stimulus s0001\) has an empty caption"):
        prefetch_stimuli("fake/two", "v2", "train", out, hub)
    assert not (out / "stimuli.tsv").exists() and not (out / "settings.json").exists()


def test_a_hub_caption_in_csv_quoted_form_is_refused_before_any_image(tmp_path: Path) -> None:
    """It stopped at write_manifest with advice for a hand-written file (rewrite it with
    write_manifest), after every image was written; a caption of zero-width characters too."""
    for caption, match in (('"Nighthawks ""by"" ""Hopper"""', "as a CSV writer quotes"),
                           ("\u200b\u200b", r"row 1 \(stimulus s0001\) has an empty caption")):  # fmt: skip
        hub, out = tmp_path / caption.encode().hex()[:8], tmp_path / "out"
        rows = [
            (image_bytes("PNG", (1, 1, 1)), ["fine"]),
            (image_bytes("PNG", (2, 2, 2)), [caption]),
        ]
        fake_repo(hub, "dataset", "fake/q", "main", {"data/train-0.parquet": parquet_bytes(rows)})
        with pytest.raises(PrefetchError, match=match):
            prefetch_stimuli("fake/q", None, "train", out, hub)
        assert not (out / "images").exists()


def test_hub_captions_stored_as_bytes_are_decoded_and_other_types_refused(tmp_path: Path) -> None:
    """A `text` column of binary values gave the captions "b'a dog on a sofa'" (str of bytes),
    which every language model then embedded, with exit 0."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": image_bytes("PNG", (i, i, i)), "path": None} for i in range(2)]

    def hub(name: str, text: pa.Array) -> Path:
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": pa.array(images, type=image_type), "text": text}), buf)
        root = tmp_path / f"hub-{name}"
        fake_repo(root, "dataset", f"fake/{name}", "main", {"data/train-0.parquet": buf.getvalue()})
        return root

    texts = [[b"a dog on a sofa"], ["café au lait".encode()]]
    root = hub("bytes", pa.array(texts, type=pa.list_(pa.binary())))
    manifest = prefetch_stimuli("fake/bytes", None, "train", tmp_path / "out", root)
    got = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    assert got.caption.tolist() == ["a dog on a sofa", "café au lait"]
    bad = (
        ("latin1", pa.array([b"ok", "caf\xe9".encode("latin-1")]), r"row 1 \(stimulus s0001\): the "
         r"caption is stored as bytes that are not UTF-8"),
        ("number", pa.array([1.5, 2.5]), r"row 0 \(stimulus s0000\): the caption is a float"),
    )  # fmt: skip
    for name, text, match in bad:
        with pytest.raises(PrefetchError, match=match):
            prefetch_stimuli(f"fake/{name}", None, "train", tmp_path / name, hub(name, text))


def test_split_files_take_one_configuration_and_no_other_split() -> None:
    """Any folder named after the split, or a name starting with it and '_', was taken: two
    configurations of a dataset, train_extra and train/validation files went into one
    manifest."""
    from xmodal.prefetch import _split_files

    flat = ["data/train-00000-of-00001.parquet", "data/train_extra-00000.parquet",
            "data/validation-00000-of-00001.parquet", "README.md"]  # fmt: skip
    assert _split_files(flat, "train") == ["data/train-00000-of-00001.parquet"]
    nested = ["train/part-0.parquet", "train/validation-0.parquet", "test/part-0.parquet"]
    assert _split_files(nested, "train") == ["train/part-0.parquet"]
    configs = ["coco/train-0.parquet", "wit_1024/train-0.parquet", "wit_1024/train-1.parquet"]
    with pytest.raises(PrefetchError, match=r"2 folders \(coco, wit_1024\).*e\.g\. 'coco/train'"):
        _split_files(configs, "train")
    assert _split_files(configs, "wit_1024/train") == configs[1:]
    folders = ["coco/train/a.parquet", "wit/train/b.parquet"]
    with pytest.raises(PrefetchError, match=r"e\.g\. 'coco/train'"):
        _split_files(folders, "train")
    assert _split_files(folders, "wit/train") == ["wit/train/b.parquet"]


def test_an_extraction_loads_the_snapshot_its_download_record_names(tmp_path):
    """The params spell a pinned revision as the features on disk asked for it (none, where
    the config pins the commit they came from): loaded as none, the extraction followed the
    cache's refs/main, which a later download into a shared cache can move to other weights.
    It loads the record's commit; a call outside the workflow asking for another revision,
    another model's record, a local folder or no record leave the revision as asked."""
    from xmodal.prefetch import downloaded_revision

    sha, other = "a" * 40, "b" * 40
    records = tmp_path / "records"
    records.mkdir()

    def record(**fields):
        base = {"model_id": "org/m", "source": "transformers", "revision_requested": None,
                "revision": sha}  # fmt: skip
        (records / "m.json").write_text(json.dumps({**base, **fields}))

    record()
    for asked in (None, "main", sha):
        assert downloaded_revision("m", "org/m", asked, records) == sha, asked
    assert downloaded_revision("m", "org/m", other, records) == other  # asked for other weights
    assert downloaded_revision("m", "org/other", None, records) is None  # not this model's
    assert downloaded_revision("x", "org/m", None, records) is None  # no record
    record(revision_requested=sha)  # downloaded again under the pin; params still say none
    assert downloaded_revision("m", "org/m", None, records) == sha
    record(revision_requested="v1.0")
    assert downloaded_revision("m", "org/m", "v1.0", records) == sha
    record(source="local", revision="local")
    assert downloaded_revision("m", "org/m", None, records) is None
    (records / "m.json").write_text("{broken")
    assert downloaded_revision("m", "org/m", "main", records) == "main"
    # the repository spelt otherwise by another dataset's config (timm/… for a timm id,
    # hf-hub:…): the record is this model's (before: ignored, and main followed refs/main)
    record(model_id="timm/vit_x.mae", modality="vision")
    for spelling in ("vit_x.mae", "hf-hub:timm/vit_x.mae", " timm/vit_x.mae"):
        assert downloaded_revision("m", spelling, None, records) == sha, spelling
    assert downloaded_revision("m", "vit_y.mae", None, records) is None
    assert downloaded_revision("m", "hf-hub:timm/vit_x.mae@v2", None, records) is None
    record(model_id="vit_x.mae")  # a record without its modality: the spelling must match
    assert downloaded_revision("m", "timm/vit_x.mae", None, records) is None


def test_stimuli_from_a_hub_dataset_are_streamed_not_held_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prefetch held every row's image bytes in memory until all were checked: gigabytes
    on a login node for a dataset of 100,000 stimuli (audit). Rows are now checked, then read
    again to be written: the traced peak stays well below the dataset's size, and the files
    are the dataset's bytes. The peak is traced in a process of its own: traced in the test
    session, it took allocations of other threads and reached the dataset's size in about one
    session in five (mutation audit)."""
    import subprocess
    import sys

    import xmodal

    rng = np.random.default_rng(0)
    rows = []
    for i in range(240):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
        rows.append((buf.getvalue(), [f"caption {i}"]))
    total = sum(len(b) for b, _ in rows)
    shards = {f"data/train-{k}.parquet": parquet_bytes(rows[k::2]) for k in range(2)}
    hub = tmp_path / "hub"
    fake_repo(hub, "dataset", "fake/big", "main", shards)
    code = (
        "import sys, tracemalloc\n"
        "from xmodal.prefetch import prefetch_stimuli\n"
        "hub, warm, out = sys.argv[1:]\n"
        "prefetch_stimuli('fake/big', None, 'train', warm, hub)  # imports, caches\n"
        "tracemalloc.start()\n"
        "prefetch_stimuli('fake/big', None, 'train', out, hub)\n"
        "print('peak', tracemalloc.get_traced_memory()[1])\n"
    )
    src = str(Path(xmodal.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src, "HF_HUB_OFFLINE": "1"}
    args = [str(hub), str(tmp_path / "warm"), str(tmp_path / "out")]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True
    )
    peak = int(proc.stdout.split()[-1])
    manifest = tmp_path / "out" / "stimuli.tsv"
    assert peak < total / 2, (peak, total)  # 3.4 MB of 11.8 MB; 12.2 MB before
    got = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    order = rows[0::2] + rows[1::2]  # shard by shard, in each its order
    assert got.caption.tolist() == [t[0] for _, t in order]
    for image, (data, _) in zip(got.image, order, strict=True):
        assert (tmp_path / "out" / image).read_bytes() == data
    # a file changed between the check and the write is refused, naming the stimulus
    import xmodal.prefetch as prefetch

    real, calls = prefetch._rows, []

    def changing(paths):
        calls.append(1)
        for data, *rest in real(paths):
            yield (data + b"x" if len(calls) == 2 else data), *rest

    monkeypatch.setattr(prefetch, "_rows", changing)
    with pytest.raises(
        PrefetchError, match=r"changed while the stimuli were written \(stimulus s0000\)"
    ):
        prefetch_stimuli("fake/big", None, "train", tmp_path / "out2", hub)
    # a row fewer, or more, on the second read (a bare ValueError of zip at first, review)
    for cut, where in ((-1, r"stimulus s0239"), (1, r"rows after stimulus s0239")):
        calls.clear()

        def resized(paths, cut=cut):
            calls.append(1)
            got = list(real(paths))
            if len(calls) == 2:
                got = got[:cut] if cut < 0 else got + got[:cut]
            yield from got

        monkeypatch.setattr(prefetch, "_rows", resized)
        with pytest.raises(PrefetchError, match=rf"while the stimuli were written \({where}\)"):
            prefetch_stimuli("fake/big", None, "train", tmp_path / f"out{cut}", hub)


@pytest.mark.parametrize("gone", ["config.json", "tokenizer_config.json", "tokenizer.model"])
def test_check_prefetched_refuses_a_cache_missing_any_one_recorded_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gone: str
) -> None:
    """Every file the record lists is checked, not only the first (mutation audit of the
    guards: a cache missing the record's last file passed, and the offline GPU job failed)."""
    fake_repo(tmp_path / "hub", "model", "org/tiny-lm", "main", LM_FILES)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = prefetch_model("org/tiny-lm", "language", None, tmp_path / "hub")
    assert gone in rec["files"]
    record = tmp_path / "tiny.json"
    record.write_text(json.dumps(rec))
    check_prefetched(record, tmp_path / "hub")
    (Path(rec["snapshot"]) / gone).unlink()
    with pytest.raises(PrefetchError, match=rf"gone from the hub cache .*{re.escape(gone)}"):
        check_prefetched(record, tmp_path / "hub")


def test_weights_in_a_subfolder_are_not_the_models_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers loads a snapshot's top level only: a repository whose only safetensors
    are in a subfolder is refused at the prefetch (login node), and subfolder files are never
    selected (troubleshooting.md; mutation audit of the guards)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "sub/model.safetensors": b"w"}
    fake_repo(tmp_path, "model", "org/sub-lm", "main", files)
    with pytest.raises(PrefetchError, match=r"org/sub-lm at revision main has no weights"):
        prefetch_model("org/sub-lm", "language", None, tmp_path)
    files = {**files, "model.safetensors": b"w", "sub/config.json": b"{}"}
    fake_repo(tmp_path / "b", "model", "org/sub-lm", "main", files)
    rec = prefetch_model("org/sub-lm", "language", None, tmp_path / "b")
    assert rec["files"] == ["config.json", "model.safetensors", "tokenizer.json"]


def test_allow_pickle_on_a_repo_with_both_sharded_formats_takes_the_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository with sharded safetensors and sharded pickles and both indexes: with
    allow_pickle (per model or under extraction:) the prefetch takes the safetensors, as
    without it. It kept the pickle index, whose shards it did not take, and refused, saying
    the snapshot lacked the .bin shards the cache held (mutation audit of the guards)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    pickles = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    files = {"config.json": b"{}", "tokenizer.json": b"{}"}
    files |= {name: b"w" for name in [*shards.values(), *pickles.values()]}
    files["model.safetensors.index.json"] = json.dumps({"weight_map": shards}).encode()
    files["pytorch_model.bin.index.json"] = json.dumps({"weight_map": pickles}).encode()
    fake_repo(tmp_path, "model", "org/both", "main", files)
    without = prefetch_model("org/both", "language", None, tmp_path, allow_pickle=False)
    with_pickle = prefetch_model("org/both", "language", None, tmp_path, allow_pickle=True)
    assert with_pickle["files"] == without["files"]
    assert without["files"] == sorted(["config.json", "tokenizer.json", *shards.values(),
                                       "model.safetensors.index.json"])  # fmt: skip
