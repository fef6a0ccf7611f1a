"""Language extraction with tiny BLOOM and LLaMA models (CPU, no network)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_extract_vision import _tf32_flags

from xmodal.demo.models import make_hub_cache
from xmodal.extract import (
    ExtractionError,
    NonFiniteFeatureError,
    UnsafeCheckpointError,
    extract_features,
)
from xmodal.extract.language import extract_language_features, load_language_model, mean_pool
from xmodal.features import STIMULI_DIGEST, WEIGHTS_DIGEST, FeatureFile
from xmodal.io import directory_digest
from xmodal.registry import FEATURES_VERSION
from xmodal.stimuli import read_manifest

IDS = [f"stim-{i:02d}" for i in range(12)]


def _alone(model, tokenizer, caption):
    """Reference: one caption, no padding, plain mean of every hidden state."""
    enc = tokenizer(caption, return_tensors="pt")  # token_type_ids too, which BLOOM refuses
    with torch.no_grad():
        hs = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            output_hidden_states=True,
        ).hidden_states
    return np.stack([h[0].float().mean(0).numpy() for h in hs])


@pytest.mark.parametrize("arch, n_layers", [("bloom", 2), ("llama", 3)])
def test_batched_equals_one_at_a_time(arch, n_layers, tiny_lms, captions):
    model, tok, info = load_language_model(str(tiny_lms[arch]))
    assert info["revision"] == "local" and info["source"] == "transformers"
    assert info["n_layers"] == n_layers + 1 and info["dtype"] == "float32" and not model.training
    res = extract_language_features(
        model, tok, captions, stimulus_ids=IDS, batch_size=5, progress=False
    )
    assert res.features.shape == (n_layers + 1, 12, 32) and res.features.dtype == np.float32
    assert res.layer_names == ["embeddings"] + [f"layers.{i}" for i in range(n_layers)]
    assert res.info["pooling"] == "mean" and 0 < res.info["padding_fraction"] < 0.5
    one = extract_language_features(
        model, tok, captions, stimulus_ids=IDS, batch_size=1, progress=False
    )
    assert one.info["padding_fraction"] == 0
    np.testing.assert_allclose(res.features, one.features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res.abs_q95, one.abs_q95, rtol=1e-5, atol=1e-6)
    for j in (0, 3, 4):  # and equal to the model run alone without our machinery
        np.testing.assert_allclose(
            res.features[:, j], _alone(model, tok, captions[j]), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("arch", ["bloom", "llama"])
def test_the_last_layer_is_the_last_block_after_the_final_norm(arch, tiny_lms, captions):
    """As docs/method.md ("Readings of the paper") and contracts.md say: every ``layers.i`` is
    block i's output, except the last, which is the last block's output after the model's
    final norm (BLOOM ``ln_f``, LLaMA ``norm``), as ``output_hidden_states`` returns it. The
    docs called it "the last block" (audit)."""
    model, tok, _ = load_language_model(str(tiny_lms[arch]))
    blocks, norm = (model.h, model.ln_f) if arch == "bloom" else (model.layers, model.norm)
    res = extract_language_features(
        model, tok, captions[:4], stimulus_ids=IDS[:4], batch_size=1, progress=False
    )
    seen: dict[object, list[torch.Tensor]] = {m: [] for m in (*blocks, norm)}

    def keep(module, _args, out):
        seen[module].append((out[0] if isinstance(out, tuple) else out)[0].float().mean(0))

    hooks = [m.register_forward_hook(keep) for m in seen]
    try:
        for c in captions[:4]:
            enc = tok(c, return_tensors="pt")
            with torch.no_grad():
                model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
    pooled = {m: torch.stack(v).numpy() for m, v in seen.items()}
    for i, block in enumerate(blocks[:-1]):  # layers.i: block i's own output
        np.testing.assert_allclose(res.features[i + 1], pooled[block], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.features[-1], pooled[norm], rtol=1e-5, atol=1e-6)
    assert np.abs(res.features[-1] - pooled[blocks[-1]]).max() > 0.1  # not the block's own


@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_repeated_captions_get_exactly_equal_features(batch_size, tiny_lms, captions):
    """A caption repeated among others runs once and its rows are copies, at any batch size.
    Before, each copy ran in its own batch, padded to another width, and the copies differed
    in their last bits (1.8e-7, reviewer), so batch size changed which stimuli were exact
    duplicates (the diagnostics' duplicate groups: 32 against 37 in the demo)."""
    model, tok, _ = load_language_model(str(tiny_lms["llama"]))
    texts = [captions[0], *captions[1:6], captions[0], captions[7], captions[0], captions[9]]
    ids = [f"s{i}" for i in range(len(texts))]
    res = extract_language_features(
        model, tok, texts, stimulus_ids=ids, batch_size=batch_size, progress=False
    )
    for j in (6, 8):
        np.testing.assert_array_equal(res.features[:, j], res.features[:, 0])
        assert res.abs_q95[j] == res.abs_q95[0]
    assert res.info["n_repeated"] == 2 and list(res.n_tokens[[0, 6, 8]]) == [res.n_tokens[0]] * 3
    np.testing.assert_allclose(
        res.features[:, 6], _alone(model, tok, texts[0]), rtol=1e-5, atol=1e-5
    )


def test_mean_pool_ignores_padding_even_if_nonfinite():
    h = torch.randn(2, 4, 3, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    h[0, 2:] = float("nan")
    out = mean_pool(h, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], h[0, :2].float().mean(0))
    torch.testing.assert_close(out[1], h[1].float().mean(0))


def test_mean_pool_of_bfloat16_sums_in_float32():
    """A bfloat16 sum of 300 tokens would keep 8 bits: the mean must be the float32 one."""
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(3, 300, 64, generator=g) + 4).to(torch.bfloat16)
    mask = torch.ones(3, 300, dtype=torch.long)
    mask[1, 200:] = 0
    out = mean_pool(h, mask)
    want = torch.stack([h[0].double().mean(0), h[1, :200].double().mean(0), h[2].double().mean(0)])
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=0)


def test_pad_token_fallback_and_truncation(tiny_lms, captions, caplog):
    model, tok, info = load_language_model(str(tiny_lms["llama"]))
    assert tok.pad_token == "</s>" and "eos_token" in info["tokenizer"]["pad_token_note"]
    assert info["tokenizer"]["max_length"] == 48
    long = " ".join(captions)  # far beyond the tiny LLaMA's 48-token context
    with caplog.at_level("WARNING"):
        res = extract_language_features(
            model, tok, [long, "cat", "again " + long], stimulus_ids=["a", "b", "c"], progress=False
        )
    assert res.info["n_truncated"] == 2 and res.info["max_length"] == 48
    assert (
        "2 caption(s) longer than the model's 48-token context were truncated: ['a', 'c']"
        in caplog.text
    )
    assert np.isfinite(res.features).all()


def test_hub_cache_offline(tmp_path, tiny_lms, captions, hf_offline):
    snap = make_hub_cache(tiny_lms["bloom"], tmp_path / "hub", "bigscience/bloom-tiny")
    model, tok, info = load_language_model("bigscience/bloom-tiny", cache_dir=tmp_path / "hub")
    assert info["revision"] == snap.name
    ref, _, _ = load_language_model(str(tiny_lms["bloom"]))
    a = extract_language_features(model, tok, captions[:4], stimulus_ids=IDS[:4], progress=False)
    b = extract_language_features(ref, tok, captions[:4], stimulus_ids=IDS[:4], progress=False)
    np.testing.assert_array_equal(a.features, b.features)
    with pytest.raises(ExtractionError, match="bigscience/bloom-560m.*not in the hub cache"):
        load_language_model("bigscience/bloom-560m", cache_dir=tmp_path / "hub")


def test_pickle_only_checkpoint_refused(tmp_path, tiny_lms):
    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny_lms["llama"], d)
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match=r"pytorch_model.bin.*allow_pickle"):
        load_language_model(str(d))
    model, _, info = load_language_model(str(d), allow_pickle=True)
    assert info["weights"] == ["pytorch_model.bin"]
    key = next(k for k in sd if k.endswith("embed_tokens.weight"))
    torch.testing.assert_close(model.get_input_embeddings().weight, sd[key])


def test_a_checkpoint_missing_weights_is_refused(tmp_path, tiny_lms):
    """transformers fills weights a checkpoint lacks with random values and only prints a
    report; the features would then come from a partly random model."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith("layers.1.")}
    assert 0 < len(kept) < len(weights)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExtractionError, match=r"lacks weights .*missing \['layers\.1\."):
        load_language_model(str(folder))
    load_language_model(str(tiny_lms["llama"]))  # its LM head is unused, not missing
    # weights of another shape than config.json says: transformers raises, named as a load error
    shutil.copy(tiny_lms["llama"] / "model.safetensors", folder / "model.safetensors")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExtractionError, match="could not load tokenizer/model"):
        load_language_model(str(folder))


def test_a_truncated_weights_file_is_named_with_the_model_and_folder(tmp_path, tiny_lms, tiny_vits):
    """An interrupted copy of a model folder left a truncated model.safetensors: the job died
    with safetensors' bare "SafetensorError: ... incomplete metadata", naming neither the model
    nor the folder, and was retried (audit). Likewise a vision model's."""
    from xmodal.extract.vision import load_vision_model

    folder = tmp_path / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExtractionError) as err:
        load_language_model(str(folder))
    said = str(err.value)
    assert said.startswith(f"{folder}: a weights file in {folder} is incomplete or damaged")
    assert "copy the model's folder again" in said and ".prefetched/<model key>.json" in said
    vit = tmp_path / "mae"
    shutil.copytree(tiny_vits["mae"], vit)
    (weights,) = vit.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExtractionError, match=rf"a weights file in {vit} is incomplete or damaged"):
        load_vision_model(str(vit))


def test_a_checkpoint_with_blocks_beyond_its_config_is_refused(tmp_path, tiny_lms):
    """config.json giving 2 layers over a 3-layer checkpoint built a model 2 blocks deep, exit 0:
    its last hidden states those of a truncated network (the extra blocks only 'UNEXPECTED' in
    transformers' printed report; model audit)."""
    folder = tmp_path / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ExtractionError, match=r"holds blocks .*\['layers\.2\..*gives 2 blocks"):
        load_language_model(str(folder))


def test_a_folder_without_a_tokenizer_file_is_named(tmp_path, tiny_lms):
    """transformers said 'You need to have sentencepiece or tiktoken installed' (both were)."""
    folder = tmp_path / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExtractionError, match=r"the folder has no tokenizer file \(tokenizer"):
        load_language_model(str(folder))


def test_a_pad_token_outside_the_embeddings_is_replaced(tmp_path, tiny_lms, captions):
    """A pad token added to the tokenizer without resizing the model's embeddings (common in
    LLaMA fine-tunes): the lookup failed inside torch with 'index out of range', naming nothing
    (extraction audit). Padding is masked out, so an in-table token pads with the same
    features; a caption token beyond the table (a tokenizer of another model) is refused."""
    from transformers import AutoTokenizer

    folder = tmp_path / "llama"
    shutil.copytree(tiny_lms["llama"], folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(folder)
    model, tok, info = load_language_model(str(folder))
    n = model.get_input_embeddings().num_embeddings
    assert tok.pad_token == "</s>" and tok.pad_token_id < n
    assert (
        f"pad token '<pad>' has id {n}, outside the model's {n}"
        in (info["tokenizer"]["pad_token_note"])
    )
    ref_model, ref_tok, _ = load_language_model(str(tiny_lms["llama"]))
    got = extract_language_features(model, tok, captions[:5], stimulus_ids=IDS[:5], progress=False)
    want = extract_language_features(
        ref_model, ref_tok, captions[:5], stimulus_ids=IDS[:5], progress=False
    )
    np.testing.assert_array_equal(got.features, want.features)
    tok.add_tokens(["zebra-striped"])  # a caption token the model has no embedding for
    with pytest.raises(
        ExtractionError,
        match=rf"token id {n + 1}, beyond the model's {n} .*\['stim-01'\] \(1 in all\)",
    ):
        extract_language_features(
            model, tok, [captions[0], "a zebra-striped cube", captions[0]],
            stimulus_ids=IDS[:3], progress=False,
        )  # fmt: skip


def test_oom_halving_and_nan(tiny_lms, captions, monkeypatch, caplog):
    model, tok, _ = load_language_model(str(tiny_lms["bloom"]))
    ref = extract_language_features(
        model, tok, captions, stimulus_ids=IDS, batch_size=12, progress=False
    )
    forward = model.forward

    def flaky(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    with caplog.at_level("WARNING"):
        res = extract_language_features(
            model, tok, captions, stimulus_ids=IDS, batch_size=12, progress=False
        )
    np.testing.assert_allclose(res.features, ref.features, rtol=1e-5, atol=1e-5)
    assert res.info["batch_size"] == 3 and "continuing with batch size 6" in caplog.text

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.hidden_states[-1][0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(model, "forward", poisoned)
    with pytest.raises(NonFiniteFeatureError, match=r"bloom-7b1.*'layers.1'.*'stim-04'"):
        # longest caption first: stim-04 is in the first batch, row 0
        extract_language_features(
            model,
            tok,
            captions,
            stimulus_ids=IDS,
            batch_size=12,
            model_name="bloom-7b1",
            progress=False,
        )


def test_extract_features_end_to_end(tmp_path, tiny_lms, tiny_manifest):
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "revision": None, "size_b": 0.0}
    out = extract_features(
        "llama-tiny", cfg, tiny_manifest, tmp_path / "llama-tiny.h5", progress=False
    )
    ids = read_manifest(tiny_manifest)["stimulus_id"].tolist()
    with FeatureFile(out) as ff:
        ff.validate(ids)
        a = ff.attrs
        assert (ff.n_layers, ff.m, ff.dim) == (4, 12, 32) and ff.layer_names[0] == "embeddings"
        assert a["pooling"] == "mean" and a["source"] == "transformers" and a["revision"] == "local"
        assert a["compute_dtype"] == "float32" and a["model_key"] == "llama-tiny"
        assert a["features_version"] == FEATURES_VERSION["language"]
        assert (
            '"padding_side": "right"' in a["preprocessing"]
            and '"max_length": 48' in a["preprocessing"]
        )
    rows = read_manifest(tiny_manifest)[["stimulus_id", "caption"]].to_numpy().tolist()
    want = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    assert a[STIMULI_DIGEST] == want  # what it read: ids and captions, as the language stamp
    assert a[WEIGHTS_DIGEST] == directory_digest(tiny_lms["llama"])  # a local model's folder
    with pytest.raises(ExtractionError, match="modality"):
        extract_features("x", {"modality": "audio", "id": "x"}, tiny_manifest, tmp_path / "x.h5")


def test_drop_duplicates_digests_the_images_it_scanned(tmp_path, tiny_lms, tiny_manifest):
    """With drop_duplicates the language stamp holds every image's digest too (which stimuli are
    dropped depends on them): the duplicate scan's digests, not a second read of each file."""
    root = tmp_path / "m"
    shutil.copytree(tiny_manifest.parent, root)
    manifest = root / "stimuli.tsv"
    lines = manifest.read_text().splitlines()
    lines.insert(5, "again-03\t" + lines[4].split("\t", 1)[1])  # stim-03 again: dropped
    manifest.write_text("\n".join(lines) + "\n")
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "size_b": 0.0}
    out = extract_features(
        "llama", cfg, manifest, tmp_path / "llama.h5", drop_duplicates=True, progress=False
    )
    full = read_manifest(manifest)
    # ids and captions, and each image file's digest in place of its path
    rows = [[str(sid), str(cap), hashlib.sha256((root / img).read_bytes()).hexdigest()]
            for sid, img, cap in full[["stimulus_id", "image", "caption"]].to_numpy()]  # fmt: skip
    want = hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()
    with FeatureFile(out) as ff:
        assert ff.m == 12 and ff.attrs[STIMULI_DIGEST] == want


def test_gpus_too_small_for_the_weights_fail_instead_of_offloading(tmp_path, tiny_lms, monkeypatch):
    """Several GPUs smaller than the job was sized for: device_map="auto" would put the rest of
    the model in host memory and run for hours; the job fails at once, naming the settings."""
    from xmodal.extract import language

    weights = ["model.safetensors"]
    need = language._weight_bytes(tiny_lms["llama"], weights, torch.float32)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    free = {"each": need // 2}  # two GPUs hold 100% of the weights, not 85%
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (free["each"], 10 * need))
    cuda = torch.device("cuda", 0)
    with pytest.raises(ExtractionError, match=r"llama: its weights need .*extraction\.gpu_mem_gb"):
        language._choose_device_map(cuda, tiny_lms["llama"], weights, torch.float32, "llama")
    # the job sized from the config's size_b: the right one names the GPU settings, one 10x
    # too small (6.52 for 65.2) names itself, not the GPU settings that are right
    told = need / 4 / 1e9  # float32: 4 bytes per parameter
    for size_b, names in ((told, "extraction.gpu_mem_gb"), (told / 10, "models.tiny.size_b")):
        with pytest.raises(ExtractionError) as err:
            language._choose_device_map(
                cuda, tiny_lms["llama"], weights, torch.float32, "llama", ("tiny", size_b)
            )
        assert names in str(err.value) and str(err.value).count("size_b") == (
            names != "extraction.gpu_mem_gb"
        ), str(err.value)
    free["each"] = need  # 50% of two GPUs: sharded
    assert language._choose_device_map(cuda, tiny_lms["llama"], weights, torch.float32) == "auto"
    free["each"] = 2 * need  # fits on the first: not spread over both (docs/cluster.md; audit)
    assert language._choose_device_map(cuda, tiny_lms["llama"], weights, torch.float32) == {"": 0}
    cuda1 = torch.device("cuda", 1)
    assert language._choose_device_map(cuda1, tiny_lms["llama"], weights, torch.float32) == {"": 1}
    free["each"] = need
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ExtractionError, match="the 1 GPU"):  # one GPU with the same memory
        language._choose_device_map(cuda, tiny_lms["llama"], weights, torch.float32)
    free["each"] = 2 * need
    assert language._choose_device_map(cuda, tiny_lms["llama"], weights, torch.float32) == {"": 0}

    class Sharded(torch.nn.Module):
        hf_device_map = {"embed_tokens": 0, "layers.0": 1, "layers.1": "cpu", "norm": "disk"}

    with pytest.raises(
        ExtractionError, match=r"placed \['layers\.1', 'norm'\] .* on the CPU or disk"
    ):
        language._check_on_gpus(Sharded(), "llama")
    language._check_on_gpus(torch.nn.Linear(1, 1), "llama")  # one device: no map


@pytest.fixture(scope="module")
def sentencepiece_llama(tmp_path_factory) -> Path:
    """A LLaMA tokenizer shipped as tokenizer.model alone (as OpenLLaMA's): SentencePiece BPE
    with a dummy prefix and spaces kept, as LLaMA's."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("sp")
    text = root / "captions.txt"
    text.write_text("\n".join(["a red cube on a blue floor", "two green spheres"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(root / "sp"), vocab_size=300, model_type="bpe",
        add_dummy_prefix=True, remove_extra_whitespaces=False, byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    folder = root / "llama"
    folder.mkdir()
    shutil.copy(root / "sp.model", folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": True,
                    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )  # fmt: skip
    return folder


def test_a_caption_starting_with_a_space_gets_the_models_own_tokens(sentencepiece_llama, tiny_lms):
    """transformers 5 rebuilds a LLaMA tokenizer that drops a caption's leading space, which
    SentencePiece keeps: such a caption is refused naming it, where it is tokenized otherwise
    than by the model's own tokenizer file; other captions get SentencePiece's tokens."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from xmodal.extract.language import tokenize_captions

    tok = AutoTokenizer.from_pretrained(sentencepiece_llama)  # tokenizer.model alone loads
    sp = spm.SentencePieceProcessor(model_file=str(sentencepiece_llama / "tokenizer.model"))
    plain = tokenize_captions(tok, ["a red cube", "two green spheres"], stimulus_ids=["a", "b"])
    assert plain.ids == [[1, *sp.encode("a red cube")], [1, *sp.encode("two green spheres")]]
    caps, ids = ["a red cube", " a red cube"], ["plain", "lead"]
    differs = tok(caps[1], add_special_tokens=False)["input_ids"] != sp.encode(caps[1])
    if differs:  # transformers 5
        with pytest.raises(ExtractionError, match=r"stimuli \['lead'\] .* start with a space"):
            tokenize_captions(tok, caps, stimulus_ids=ids)
    else:
        assert tokenize_captions(tok, caps, stimulus_ids=ids).ids[1] == [1, *sp.encode(caps[1])]
    # a caption with a special token's spelling was not checked, and then (audit) one with
    # only spaces before the spelling, nor one starting with SentencePiece's word mark: each
    # got the features of the caption without its space or mark, with exit 0. SentencePiece
    # reads the spelling as characters, as the extraction does
    for marked in (" a </s>", " <s> two green spheres", " </s> a red cube", "\u2581a red cube"):
        own = [1, *sp.encode(marked)]
        if tok(marked, add_special_tokens=False, split_special_tokens=True)["input_ids"] != own[1:]:
            with pytest.raises(ExtractionError, match=r"stimuli \['mark'\] .* start with a space"):
                tokenize_captions(tok, [marked], stimulus_ids=["mark"])
        else:
            assert tokenize_captions(tok, [marked], stimulus_ids=["mark"]).ids[0] == own
    # other leading whitespace (a no-break space, a tab, a line break) is checked alike: each
    # is refused where the loaded tokenizer reads it otherwise than SentencePiece (mutation)
    for lead in ("\u00a0a red cube", "\ta red cube", "\na red cube"):
        own = [1, *sp.encode(lead)]
        if tok(lead, add_special_tokens=False)["input_ids"] != own[1:]:
            with pytest.raises(ExtractionError, match=r"stimuli \['ws'\] .* start with a space"):
                tokenize_captions(tok, [lead], stimulus_ids=["ws"])
        else:
            assert tokenize_captions(tok, [lead], stimulus_ids=["ws"]).ids[0] == own
    # the same captions without the space or mark are accepted, with SentencePiece's tokens
    bare = ["<s> two green spheres", "</s> a red cube", "a red cube"]
    got = tokenize_captions(tok, bare, stimulus_ids=["x", "y", "z"]).ids
    assert got == [[1, *sp.encode(c)] for c in bare]
    # a byte-level BPE tokenizer keeps the space as its file does: nothing to refuse
    bpe = AutoTokenizer.from_pretrained(tiny_lms["bloom"])
    got = tokenize_captions(bpe, caps, stimulus_ids=ids).ids
    assert got[0] != got[1]
    # ... also before a special token's spelling, which the tokenizer.json comparison reads as
    # characters, as the extraction does (read as the token, every such caption was refused)
    from tokenizers import Tokenizer

    llama = AutoTokenizer.from_pretrained(tiny_lms["llama"])
    own = Tokenizer.from_file(str(tiny_lms["llama"] / "tokenizer.json"))
    own.encode_special_tokens = True
    marked = [" </s> a red cube", " <s> two green spheres"]
    got = tokenize_captions(llama, marked, stimulus_ids=["m1", "m2"]).ids
    assert got == [[1, *own.encode(c, add_special_tokens=False).ids] for c in marked]


def test_truncation_keeps_a_captions_beginning_whatever_the_tokenizer_config_says(tiny_lms):
    """A tokenizer_config.json with ``truncation_side: left`` made the cut keep a long
    caption's end (BOS plus its last tokens), with no word but the usual truncation warning;
    the reference keeps the beginning. The loaded tokenizer records the side."""
    from transformers import AutoTokenizer

    from xmodal.extract.language import load_language_model, tokenize_captions

    caption = "a red cube on a wooden table next to two green spheres"
    tok = AutoTokenizer.from_pretrained(tiny_lms["llama"])
    whole = tok(caption)["input_ids"]
    assert len(whole) > 6
    tok.truncation_side = "left"
    got = tokenize_captions(tok, [caption], stimulus_ids=["s"], max_tokens=6).ids
    assert got == [whole[:6]] and tok.truncation_side == "left"  # the caller's setting kept
    _, loaded, info = load_language_model(str(tiny_lms["llama"]))
    assert loaded.truncation_side == "right" and info["tokenizer"]["truncation_side"] == "right"


def test_models_that_do_not_read_token_ids_alone_are_refused_at_load(
    tmp_path, tiny_lms, tiny_hf_vit
):
    """An encoder-decoder model (T5) loaded, then its first batch failed inside transformers
    ("You must specify exactly one of input_ids or inputs_embeds"), naming neither the model nor
    the cause, once per retry of the GPU job; a vision transformer given as a language model
    failed the same way. Both are refused when loaded, naming the model."""
    from transformers import T5Config, T5Model

    t5 = tmp_path / "t5"
    T5Model(
        T5Config(vocab_size=300, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    ).save_pretrained(t5)
    vit = shutil.copytree(tiny_hf_vit, tmp_path / "vit")
    for folder in (t5, vit):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (tiny_lms["llama"] / name).is_file():
                shutil.copy(tiny_lms["llama"] / name, folder / name)
    with pytest.raises(ExtractionError, match=r"t5: an encoder-decoder model \(model_type 't5'"):
        load_language_model(str(t5))
    with pytest.raises(ExtractionError, match=r"vit: ViTModel .*does not read token ids"):
        load_language_model(str(vit))


def test_vision_language_models_given_as_language_models_are_refused(
    tmp_path, tiny_lms, monkeypatch
):
    """CLIP failed inside the token-id check with transformers' NotImplementedError
    ("get_input_embeddings not auto-handled"), and SigLIP, whose text tower passes it, on a
    missing hidden_size (review): both are refused before loading, naming the model; a model
    whose input embedding cannot be found is refused too."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    text = dict(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2)  # fmt: skip
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=8)  # fmt: skip
    for name, config, model in (
        ("clip", CLIPConfig, CLIPModel),
        ("siglip", SiglipConfig, SiglipModel),
    ):
        folder = tmp_path / name
        model(config(text_config=text, vision_config=vision)).save_pretrained(folder)
        pattern = rf"{name}: a vision-language model \(model_type '{name}'"
        with pytest.raises(ExtractionError, match=pattern):
            load_language_model(str(folder))

    # a text model whose vision tower is optional has "vision_config": null (transformers 5)
    text_only = shutil.copytree(tiny_lms["llama"], tmp_path / "text-only")
    config = json.loads((text_only / "config.json").read_text())
    (text_only / "config.json").write_text(json.dumps({**config, "vision_config": None}))
    assert load_language_model(str(text_only))[2]["architecture"] == "LlamaModel"

    def not_handled(self):
        raise NotImplementedError("get_input_embeddings not auto-handled")

    model = load_language_model(str(tiny_lms["llama"]))[0]
    monkeypatch.setattr(type(model), "get_input_embeddings", not_handled)
    with pytest.raises(ExtractionError, match=r"input embedding is not found: get_input_emb"):
        load_language_model(str(tiny_lms["llama"]))


def test_a_local_model_id_under_the_home_folder_is_loaded_from_there(
    tmp_path, tiny_lms, monkeypatch
):
    """The registry reads ``~/folder`` as a local folder (no prefetch); the loaders and the
    prefetch record tested ``Path('~/folder').is_dir()``, false, and then asked the hub cache
    for a repo named '~/folder' and said to prefetch it."""
    from xmodal.prefetch import prefetch_model

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_lms["bloom"], tmp_path / "mylm")
    _, _, info = load_language_model("~/mylm")
    assert info["revision"] == "local"
    record = prefetch_model("~/mylm", "language", None, tmp_path / "hub")
    assert record["source"] == "local" and record["snapshot"] == str(tmp_path / "mylm")


def test_an_extraction_marks_its_file_until_made(tmp_path, tiny_lms, tiny_manifest, monkeypatch):
    """A failed extraction leaves the mark that the workflow reads (xmodal.attempts.
    unfinished_outputs: Snakemake records a failed job's output as made); a finished one
    removes it."""
    from xmodal.attempts import attempt_marker, unfinished_outputs

    out = tmp_path / "llama.h5"
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "size_b": 0.0}
    with pytest.raises(ExtractionError, match="max_tokens"):
        extract_features("llama", cfg, tiny_manifest, out, max_tokens=0, progress=False)
    assert attempt_marker(out).is_file() and unfinished_outputs([out]) == [out]
    extract_features("llama", cfg, tiny_manifest, out, progress=False)
    assert out.is_file() and not attempt_marker(out).exists() and unfinished_outputs([out]) == []


def test_float32_features_are_computed_without_tf32(tiny_lms, captions):
    """As for vision models (test_extract_vision): TF32 is off for the matrix products of a
    float32 language model while it runs, and the flags are restored after."""
    before = _tf32_flags()
    ieee = ("ieee", "ieee") if isinstance(before[0], str) else (False, False)
    model, tok, _ = load_language_model(str(tiny_lms["llama"]))
    seen = []
    model.get_input_embeddings().register_forward_pre_hook(lambda *_: seen.append(_tf32_flags()))
    extract_language_features(model, tok, captions, stimulus_ids=IDS, progress=False)
    assert seen and set(seen) == {ieee}
    assert _tf32_flags() == before
