"""Feature extraction and feature files: tests that kill mutants the other tests let through.

Each test guards against one plausible bug (named in its docstring) that would change the
numbers written to a feature file, or let a wrong or stale file be read without an error.
"""

from __future__ import annotations

import collections
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import xmodal.extract._common as common
from xmodal.extract import RemoteCodeError, extract_features
from xmodal.extract._common import (
    ExtractionError,
    FeatureAccumulator,
    check_no_remote_code,
    check_weight_files,
    resolve_dtype,
)
from xmodal.extract.language import caption_token_limit, context_length, tokenize_captions
from xmodal.features import FeatureFile
from xmodal.io import DiskFullError
from xmodal.stimuli import read_manifest


@pytest.fixture(scope="module")
def llama_file(tmp_path_factory, tiny_lms, tiny_manifest):
    """One language extraction with a per-modality batch size mapping."""
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "size_b": 0.0}
    out = tmp_path_factory.mktemp("llama") / "llama.h5"
    extract_features(
        "llama",
        cfg,
        tiny_manifest,
        out,
        batch_size={"vision": 2, "language": 5},
        progress=False,
        device="cpu",
    )
    return out


def test_language_extraction_uses_the_language_batch_size(llama_file):
    """Bug: a per-modality batch size mapping read with the wrong modality key (the language
    model ran, and was recorded, with the vision batch size)."""
    with FeatureFile(llama_file) as ff:
        assert ff.attrs["batch_size"] == 5


def test_the_feature_file_holds_each_captions_token_count(llama_file, tiny_lms, tiny_manifest):
    """Bug: the extraction drops ``n_tokens`` when writing the file (the per-caption token
    counts, in manifest order, that the language analyses read)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lms["llama"])
    captions = read_manifest(tiny_manifest)["caption"].tolist()
    want = [len(tok(c)["input_ids"]) for c in captions]
    with FeatureFile(llama_file) as ff:
        got = ff.n_tokens()
    assert got is not None and got.tolist() == want


def test_dtype_names_map_to_their_own_dtype():
    """Bug: an alias mapped to the wrong dtype ("fp16" computing in bfloat16)."""
    cpu = torch.device("cpu")
    assert resolve_dtype("fp16", cpu) is torch.float16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("bf16", cpu) is torch.bfloat16
    assert resolve_dtype("fp32", cpu) is torch.float32
    assert resolve_dtype("auto", cpu) is torch.float32


def test_a_spilling_extraction_needs_room_for_the_spill_and_the_feature_file(tmp_path, monkeypatch):
    """Bug: the free-space check counts only the feature file when features spill to a
    scratch file of the same size (the disk would fill up hours into the extraction)."""
    usage = collections.namedtuple("usage", "total used free")
    nbytes = 4 * 2 * 10 * 8
    monkeypatch.setattr(common, "IN_MEMORY_FEATURE_BYTES", 1)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda _: usage(0, 0, nbytes + 100))
    spill = tmp_path / "x.spill"
    spill.touch()
    kw = dict(model_name="m", layer_names=["a", "b"], stimulus_ids=[str(i) for i in range(10)])
    with pytest.raises(DiskFullError, match="model m: writing its features needs"):
        FeatureAccumulator(2, 10, 8, spill=spill, **kw)
    monkeypatch.setattr(common, "IN_MEMORY_FEATURE_BYTES", 1 << 30)  # in memory: room enough
    FeatureAccumulator(2, 10, 8, spill=spill, **kw).close()


def test_the_room_message_gives_small_amounts_in_mib(tmp_path, monkeypatch):
    """Bug: amounts under a GiB said "0.0 GiB" (needs 0.0 GiB, 0.0 GiB free)."""
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(common.shutil, "disk_usage", lambda _: usage(0, 0, 20 * 2**20))
    with pytest.raises(DiskFullError, match=r"needs 50\.0 MiB .* only 20\.0 MiB are free"):
        common._check_room(tmp_path, 50 * 2**20, "tiny")


def test_training_state_pickles_are_not_weights(tmp_path):
    """Bug: ``training_args.bin`` / ``optimizer.pt`` counted as weight files (loaded, and
    recorded as the model's weights)."""
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert check_weight_files(tmp_path, "m", allow_pickle=True) == ["pytorch_model.bin"]
    (tmp_path / "pytorch_model.bin").unlink()
    with pytest.raises(ExtractionError, match="no weight files"):
        check_weight_files(tmp_path, "m", allow_pickle=True)


def test_custom_code_for_an_unknown_model_type_is_refused(tmp_path):
    """Bug: a config.json auto_map for a model_type transformers does not implement accepted
    (the repository's code would be needed, or another model's class used)."""
    auto = {"AutoModel": "modeling_x.XModel"}
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": auto, "model_type": "xyz-9"}))
    with pytest.raises(RemoteCodeError, match="xyz-9"):
        check_no_remote_code(tmp_path, "org/x")
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": auto, "model_type": "llama"}))
    assert "ignoring it" in check_no_remote_code(tmp_path, "org/x")


def test_a_caption_exactly_at_the_limit_is_not_truncated(tiny_lms, captions):
    """Bug: ``len(tokens) >= limit`` counts captions of exactly the limit as truncated."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lms["llama"])
    lengths = [len(tok(c)["input_ids"]) for c in captions]
    ids = [f"s{i}" for i in range(len(captions))]
    longest = max(lengths)
    res = tokenize_captions(tok, captions, stimulus_ids=ids, max_tokens=longest)
    assert res.truncated == [] and [len(t) for t in res.ids] == lengths
    res = tokenize_captions(tok, captions, stimulus_ids=ids, max_tokens=longest - 1)
    assert res.truncated == [i for i, n in enumerate(lengths) if n == longest]


def test_max_tokens_equal_to_the_context_is_the_users_limit():
    """Bug: ``max_tokens >= context`` reports a limit the user set as the model's context
    (wrong ``max_length_source`` in the file, wrong advice in errors)."""
    assert caption_token_limit(48, 48) == (48, "max_tokens")
    assert caption_token_limit(49, 48) == (48, "model context")


def test_context_length_is_the_smaller_of_model_and_tokenizer_limits():
    """Bug: the larger of the two limits taken (captions longer than the tokenizer's limit, or
    the model's positions, are passed through)."""
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=48))
    assert context_length(model, SimpleNamespace(model_max_length=16)) == 16
    model = SimpleNamespace(config=SimpleNamespace(n_positions=12))
    assert context_length(model, SimpleNamespace(model_max_length=64)) == 12
    assert context_length(model, SimpleNamespace(model_max_length=10**30)) == 12


def test_a_vit_with_register_tokens_but_no_class_token_is_refused():
    """Bug: only ``num_prefix_tokens`` checked: a ViT with register tokens and no class token
    passes, and token 0 of each block (a register token) is written as its CLS features."""
    import timm

    from xmodal.extract.vision import _check_vit

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        depth=1,
        embed_dim=16,
        num_heads=2,
        class_token=False,
        reg_tokens=2,
        global_pool="avg",
    )
    assert model.num_prefix_tokens == 2 and model.cls_token is None
    with pytest.raises(ExtractionError, match="no class token"):
        _check_vit(model, "vit-reg")


def test_vision_features_follow_the_batch_indices_in_any_order():
    """Bug: a batch's rows assigned to its indices in sorted order (right only for batches
    whose indices ascend): stimuli would swap features."""
    import timm

    from xmodal.extract.vision import extract_vision_features

    with torch.random.fork_rng():  # the global generator is left as it was
        torch.manual_seed(0)
        model = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            depth=2,
            embed_dim=16,
            num_heads=2,
        ).eval()
        x = torch.randn(4, 3, 32, 32)
    ids = ["a", "b", "c", "d"]
    kw = dict(stimulus_ids=ids, progress=False)
    ref = extract_vision_features(model, [(x, [0, 1, 2, 3])], **kw).features
    perm = [2, 0, 3, 1]
    got = extract_vision_features(model, [(x[perm], perm)], batch_size=3, **kw).features
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref[:, 0], ref[:, 2])  # distinct stimuli, so a swap shows


def _file(tmp_path, m=5, n_tokens=None, name="f.h5"):
    from xmodal.features import write_features

    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, m, 3)).astype(np.float32)
    ids = [f"s{i}" for i in range(m)]
    attrs = {"model_key": "k", "modality": "language"}
    path = write_features(tmp_path / name, x, ids, ["l0", "l1"], attrs, n_tokens=n_tokens)
    return path, x, ids


def test_a_non_finite_abs_q95_given_to_the_writer_is_refused(tmp_path):
    """Bug: the writer stores a supplied ``abs_q95`` without checking it is finite (it sets the
    alignment's clamp threshold)."""
    from xmodal.features import FeatureFileError, write_features

    x = np.ones((1, 3, 2), np.float32)
    q = np.array([1.0, np.nan, 1.0], np.float32)
    with pytest.raises(FeatureFileError, match="abs_q95 must be 3 finite values"):
        write_features(tmp_path / "f.h5", x, ["a", "b", "c"], ["l0"], {}, abs_q95=q)
    assert not (tmp_path / "f.h5").exists()


def test_fractional_token_counts_are_refused(tmp_path):
    """Bug: ``n_tokens`` of 2.5 silently cut to 2 when stored as integers."""
    from xmodal.features import FeatureFileError

    with pytest.raises(FeatureFileError, match="whole numbers"):
        _file(tmp_path, m=3, n_tokens=[3.0, 2.5, 4.0])
    path, _, _ = _file(tmp_path, m=3, n_tokens=[3.0, 2.0, 4.0])
    with FeatureFile(path) as ff:
        assert ff.n_tokens().tolist() == [3, 2, 4]


def test_a_token_count_dataset_of_the_wrong_length_is_refused_when_opened(tmp_path):
    """Bug: the reader checks the shape of ``abs_q95`` but not of ``n_tokens`` (counts of
    another manifest would be matched to these stimuli)."""
    import h5py

    from xmodal.features import FeatureFileError

    path, _, _ = _file(tmp_path, m=4, n_tokens=[1, 2, 3, 4])
    with h5py.File(path, "r+") as f:
        del f["n_tokens"]
        f["n_tokens"] = np.array([1, 2, 3], np.int32)
    with pytest.raises(FeatureFileError, match=r"'n_tokens' has shape \(3,\), expected \(4,\)"):
        FeatureFile(path)


def test_expected_ids_with_a_duplicate_are_refused(tmp_path):
    """Bug: expected ids listing a stimulus twice accepted because the id *sets* agree; the
    re-ordered rows would then repeat that stimulus."""
    from xmodal.features import FeatureFileError

    path, _, ids = _file(tmp_path)
    with pytest.raises(FeatureFileError, match="expected ids contain duplicates"):
        FeatureFile(path, expected_ids=[*ids, ids[0]])


def test_token_counts_follow_the_expected_order(tmp_path):
    """Bug: ``n_tokens`` returned in file order while the rows are re-ordered to the expected
    ids (each caption's token count attached to another stimulus)."""
    path, x, ids = _file(tmp_path, n_tokens=[10, 11, 12, 13, 14])
    perm = [3, 0, 4, 1, 2]
    with FeatureFile(path, expected_ids=[ids[i] for i in perm]) as ff:
        assert ff.n_tokens().tolist() == [10 + i for i in perm]
        np.testing.assert_array_equal(ff.layer(1), x[1][perm])


def test_a_stale_file_as_new_as_its_stamp_is_refused(tmp_path):
    """Bug: ``mtime <= stamp`` treated as older. Snakemake re-runs a job only when an input is
    newer than its output, so a stale file with the stamp's very mtime is not re-extracted and
    must be refused."""
    from xmodal.features import STIMULI_DIGEST, FeatureFileError, check_against_stamp

    stamp = tmp_path / "extract_language.json"
    stamp.write_text(json.dumps({"modality": "language", "sha256": "b" * 64}))
    path, _, _ = _file(tmp_path)
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs[STIMULI_DIGEST] = "a" * 64
    t = stamp.stat().st_mtime_ns
    os.utime(path, ns=(t, t))
    with pytest.raises(FeatureFileError, match="holds features of other stimuli"):
        check_against_stamp([path], stamp)
    os.utime(path, ns=(t - 1, t - 1))  # older: the workflow re-extracts it
    check_against_stamp([path], stamp)


def test_an_imported_float16_file_stays_float16(tmp_path):
    """Bug: an imported copy always written in float32 (a float16 file doubles in size, and the
    copy no longer says what precision the supplied features had)."""
    import h5py

    from xmodal.features import import_features, write_features

    x = np.linspace(-2, 2, 18, dtype=np.float32).reshape(2, 3, 3)
    attrs = {"model_key": "mine", "modality": "vision"}
    src = write_features(tmp_path / "h.h5", x, ["a", "b", "c"], ["l0", "l1"], attrs, dtype="f2")
    dst = import_features(src, tmp_path / "out" / "h.h5", "mine", "vision", ["c", "a", "b"])
    with h5py.File(dst, "r") as f:
        assert f["features"].dtype == np.float16
    with FeatureFile(dst) as ff:
        np.testing.assert_array_equal(ff.layer(1), x[1].astype(np.float16)[[2, 0, 1]])


def test_only_vision_ids_without_an_owner_live_under_timm():
    """Bug: a bare language id (``gpt2``) also prefixed with ``timm/`` (the hub repository
    looked up, prefetched and recorded would be another one)."""
    from xmodal.registry import hub_repo_of

    assert hub_repo_of("gpt2", "language") == ("gpt2", None)
    assert hub_repo_of("vit_base_patch16_224.mae", "vision") == (
        "timm/vit_base_patch16_224.mae",
        None,
    )
    assert hub_repo_of("hf-hub:org/m@abc", "language") == ("org/m", "abc")


def _registry(models, **extraction):
    from xmodal.registry import Registry

    return Registry.from_config({"models": models, "extraction": extraction})


def _lm(size_b, **kw):
    return {"modality": "language", "id": "org/lm", "size_b": size_b, **kw}


def test_a_models_own_batch_size_and_pickle_permission_override_the_site():
    """Bug: the per-model ``batch_size`` / ``allow_pickle`` of a registry entry ignored in
    favour of the site settings (``extraction:``)."""
    reg = _registry(
        {
            "a": _lm(1.0, id="org/a", batch_size=3, allow_pickle=True),
            "b": _lm(1.0, id="org/b"),
        },
        batch_size={"language": 8},
    )
    assert reg["a"].batch_size == 3 and reg["b"].batch_size == 8
    assert reg["a"].allow_pickle and not reg["b"].allow_pickle
    assert "*.bin" in reg["a"].download_patterns and "*.bin" not in reg["b"].download_patterns


def test_fp32_is_four_bytes_per_weight():
    """Bug: only the spelling ``float32`` counted as 4 bytes per weight; ``fp32`` asked for half
    the GPU memory the weights need."""
    reg = _registry({"a": _lm(7.0)}, dtype="fp32")
    assert reg["a"].dtype == "fp32" and reg["a"].bytes_per_param == 4
    assert _registry({"a": _lm(7.0)}, dtype="bf16")["a"].bytes_per_param == 2


def test_language_models_of_a_family_are_ordered_by_size():
    """Bug: language models of one family ordered by config position instead of size (figures
    and tables list them in the wrong order)."""
    models = {
        "big": _lm(7.0, id="org/big", family="f"),
        "other": _lm(1.0, id="org/o", family="g"),
        "small": _lm(0.5, id="org/small", family="f"),
    }
    reg = _registry(models)
    assert reg.table()["model"].tolist() == ["small", "big", "other"]


def test_validating_against_the_files_own_order_drops_an_earlier_reordering(tmp_path):
    """Bug: matching the file's own order returns early but keeps the permutation of an
    earlier match, so rows come back permuted under the ids of the file order."""
    path, x, ids = _file(tmp_path)
    perm = [4, 2, 0, 1, 3]
    with FeatureFile(path, expected_ids=[ids[i] for i in perm]) as ff:
        ff.validate(ids)
        assert ff.stimulus_ids == ids
        np.testing.assert_array_equal(ff.layer(0), x[0])


def test_a_stale_file_without_a_modality_attribute_is_still_checked(tmp_path):
    """Bug: a file with no ``modality`` attribute skipped as if it were of the other modality
    (a stale file written without it would be analysed as it is)."""
    import h5py

    from xmodal.features import STIMULI_DIGEST, FeatureFileError, check_against_stamp

    stamp = tmp_path / "extract_language.json"
    stamp.write_text(json.dumps({"modality": "language", "sha256": "b" * 64}))
    os.utime(stamp, ns=(1, 1))
    path, _, _ = _file(tmp_path)
    with h5py.File(path, "r+") as f:
        del f.attrs["modality"]
        f.attrs[STIMULI_DIGEST] = "a" * 64
    with pytest.raises(FeatureFileError, match="holds features of other stimuli"):
        check_against_stamp([path], stamp)


def test_fewer_stimulus_ids_than_feature_rows_are_refused_when_opened(tmp_path):
    """Bug: the reader does not compare the number of stimulus ids with the feature rows (rows
    and ids would be paired wrongly, or rows left without an id)."""
    import h5py

    from xmodal.features import FeatureFileError

    path, _, ids = _file(tmp_path)
    with h5py.File(path, "r+") as f:
        del f["stimulus_ids"]
        f.create_dataset("stimulus_ids", data=ids[:4], dtype=h5py.string_dtype("utf-8"))
    with pytest.raises(
        FeatureFileError,
        match=r"'stimulus_ids' has shape \(4,\), expected \(5,\): one per stimulus",
    ):
        FeatureFile(path, expected_ids=ids[:4])


def test_weight_memory_scales_from_the_stored_dtype(tmp_path):
    """Bug: weight files assumed to hold float32 (4 bytes) whatever ``torch_dtype`` says: a
    bfloat16 checkpoint loaded in float32 would be estimated at half its GPU memory."""
    from xmodal.extract.language import _weight_bytes

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert _weight_bytes(tmp_path, ["model.safetensors"], torch.float32) == 2000
    assert _weight_bytes(tmp_path, ["model.safetensors"], torch.bfloat16) == 1000
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert _weight_bytes(tmp_path, ["model.safetensors"], torch.bfloat16) == 500


def test_revision_main_and_no_revision_are_the_same_weights():
    """Bug: a hub model pinned to ``main`` and the same model without a revision not reported
    as the same weights (two keys, one model)."""
    reg = _registry({"a": _lm(1.0, revision="main"), "b": _lm(1.0, label="B")})
    assert [(a, b) for a, b, _ in reg.duplicate_ids()] == [("a", "b")]


def test_an_unknown_extraction_setting_is_refused():
    """Bug: a misspelt ``extraction:`` key (``max_token``) silently ignored, so the default
    applies instead of the value the user set."""
    from xmodal.config import ConfigError
    from xmodal.registry import Site

    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['max_token'\]"):
        Site.from_config({"max_token": 64})
    assert Site.from_config({"max_tokens": 64}).max_tokens == 64


def test_stimuli_no_batch_covered_are_an_error_not_uninitialised_rows():
    """Bug: the accumulator's result skips its completeness check: stimuli that no batch held
    would get the uninitialised memory of ``np.empty`` as features."""
    acc = FeatureAccumulator(
        2, 4, 3, model_name="m", layer_names=["a", "b"], stimulus_ids=list("wxyz")
    )
    acc.add(torch.ones(2, 2, 3), np.array([0, 2]))
    with pytest.raises(ExtractionError, match=r"model m: no features for stimuli \['x', 'z'\]"):
        acc.result()


def test_a_layer_iterable_shorter_than_the_layer_names_is_refused(tmp_path):
    """Bug: the writer does not count the layers an iterable gave: missing layers would be
    stored as zeros (the dataset's fill value) under their names."""
    from xmodal.features import FeatureFileError, write_features

    x = np.ones((3, 4, 2), np.float32)
    with pytest.raises(FeatureFileError, match="got 2 layers for 3 layer names"):
        write_features(tmp_path / "f.h5", iter(x[:2]), list("abcd"), ["l0", "l1", "l2"], {})
    assert not (tmp_path / "f.h5").exists()


# ------------------------------------------------------------ session 39's changes (mutation audit)


def test_the_job_gpu_is_the_one_whose_memory_decides(tiny_lms, monkeypatch):
    """The weights fit on the job's GPU (cuda:1), not on GPU 0: that GPU alone, by its own
    free memory."""
    from xmodal.extract import language

    weights = ["model.safetensors"]
    need = language._weight_bytes(tiny_lms["llama"], weights, torch.float32)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    free = {0: 0, 1: 2 * need}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (free[i], 10 * need))
    cuda1 = torch.device("cuda", 1)
    assert language._choose_device_map(cuda1, tiny_lms["llama"], weights, torch.float32) == {"": 1}


def test_a_roberta_with_padding_idx_0_has_one_position_less(tiny_tokenizer):
    """Positions numbered from padding_idx + 1 = 1: 41 usable rows of a table of 42."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    cfg = RobertaConfig(vocab_size=len(tok), max_position_embeddings=42, intermediate_size=40,
                        pad_token_id=0, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2)  # fmt: skip
    model = RobertaModel(cfg)
    assert model.embeddings.position_embeddings.padding_idx == 0
    assert context_length(model, tok) == 41


def test_a_truncated_weights_file_names_its_folder(tmp_path):
    import timm
    from safetensors.torch import save_file

    from xmodal.extract.vision import load_vision_model

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "w.safetensors"
    save_file(src.state_dict(), weights)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ExtractionError) as err:
        load_vision_model("vit_tiny_patch16_224", weights_file=weights)
    assert f"a weights file in {tmp_path} is incomplete or damaged" in str(err.value)
