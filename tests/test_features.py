"""The HDF5 feature store: round trip, atomic writes, validation errors, abs_q95."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

from xmodal.features import (
    SCHEMA_VERSION,
    STIMULI_DIGEST,
    WEIGHTS_DIGEST,
    FeatureFile,
    FeatureFileError,
    abs_quantile_rows,
    check_against_stamp,
    check_against_weights,
    import_features,
    write_features,
)
from xmodal.io import directory_digest

ATTRS = {"model_id": "org/tiny", "model_key": "tiny", "modality": "language", "source": "test"}


def _data(n_layers: int = 3, m: int = 7, dim: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_layers, m, dim)).astype(np.float32)
    ids = [f"s{i}" for i in range(m)]
    names = [f"layers.{i}" for i in range(n_layers)]
    return x, ids, names


def _ref_q95(x: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(x).abs().transpose(0, 1).reshape(x.shape[1], -1)
    return torch.quantile(t, 0.95, dim=1).numpy()


def test_round_trip_array(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, {**ATTRS, "preprocessing": {"a": 1}})
    with FeatureFile(path) as ff:
        assert (ff.n_layers, ff.m, ff.dim) == x.shape
        assert ff.stimulus_ids == ids and ff.layer_names == names
        for i, layer in enumerate(ff.layers()):
            np.testing.assert_array_equal(layer, x[i])
            assert layer.dtype == np.float32
        np.testing.assert_array_equal(ff.layer(-1), x[-1])
        np.testing.assert_allclose(ff.abs_q95(), _ref_q95(x), rtol=1e-6)
        a = ff.attrs
        assert a["schema_version"] == SCHEMA_VERSION and a["model_key"] == "tiny"
        assert a["preprocessing"] == '{"a": 1}' and "torch" in a["library_versions"]
        assert a["created"].endswith("+00:00")
        ff.validate(ids)
    with h5py.File(path) as f:
        assert f["features"].chunks == (1, 7, 5)


def test_round_trip_layer_iterable_float16(tmp_path):
    x, ids, names = _data(4, 9, 3)
    path = write_features(
        tmp_path / "f.h5", (layer for layer in x), ids, names, ATTRS, dtype="float16"
    )
    with FeatureFile(path) as ff:
        np.testing.assert_allclose(ff.layer(2), x[2], rtol=1e-3, atol=1e-3)
        assert ff.layer(2).dtype == np.float32
        # computed from the stored (float16) values, block-wise from the file
        np.testing.assert_allclose(
            ff.abs_q95(), _ref_q95(x.astype(np.float16).astype(np.float32)), rtol=1e-6
        )


def test_abs_quantile_rows_matches_torch_quantile():
    rng = np.random.default_rng(1)
    for shape in [(3, 1), (4, 2), (5, 7, 3), (2, 101)]:
        x = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
        ref = torch.quantile(x.abs().reshape(shape[0], -1), 0.95, dim=1)
        torch.testing.assert_close(abs_quantile_rows(x), ref)


def test_failure_mid_write_leaves_no_file(tmp_path):
    x, ids, names = _data()

    def layers():
        yield x[0]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_features(tmp_path / "f.h5", layers(), ids, names, ATTRS)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_old_file(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    bad = x.copy()
    bad[1, 3, 0] = np.nan
    with pytest.raises(FeatureFileError, match=r"layer 1 \('layers.1'\).*'s3'"):
        write_features(path, bad, ids, names, ATTRS)
    with FeatureFile(path) as ff:
        np.testing.assert_array_equal(ff.layer(1), x[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stimulus_ids": ["a", "a", "b", "c", "d", "e", "f"]}, "duplicate stimulus ids.*'a'"),
        ({"layer_names": ["x", "y"]}, "expected \\(2, 7, dim\\)"),
        ({"attrs": {**ATTRS, "note": "hf_" + "a" * 34}}, "token"),
    ],
)
def test_write_rejects_bad_input(tmp_path, kwargs, match):
    x, ids, names = _data()
    args = dict(features=x, stimulus_ids=ids, layer_names=names, attrs=ATTRS) | kwargs
    with pytest.raises(FeatureFileError, match=match):
        write_features(tmp_path / "f.h5", **args)
    assert not (tmp_path / "f.h5").exists()


def test_validate_names_file_layer_and_stimuli(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f["features"][2, 4, 1] = np.inf
    with FeatureFile(path) as ff, pytest.raises(FeatureFileError) as err:
        ff.validate()
    msg = str(err.value)
    assert str(path) in msg and "'layers.2'" in msg and "'s4'" in msg


def test_finite_layer_checks_only_the_layer_read(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f["features"][2, 4, 1] = np.nan
    with FeatureFile(path) as ff:
        ff.validate(layers=False)  # ids and abs_q95 only: layer 2 is not scanned
        np.testing.assert_array_equal(ff.finite_layer(0), x[0])
        with pytest.raises(FeatureFileError) as err:
            ff.finite_layer(-1)  # negative index: named as layer 2
    msg = str(err.value)
    assert str(path) in msg and "'layers.2'" in msg and "'s4'" in msg


def test_schema_version_mismatch_asks_to_reextract(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 0
    with pytest.raises(FeatureFileError, match="re-extract"):
        FeatureFile(path)


def test_shape_mismatch_detected(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        del f["layer_names"]
        f.create_dataset(
            "layer_names", data=np.array(["a", "b"], dtype=object), dtype=h5py.string_dtype()
        )
    with pytest.raises(FeatureFileError, match=f"{path}.*2 layer names for 3 layers"):
        FeatureFile(path)


def test_reorders_to_expected_ids(tmp_path, caplog):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    perm = [3, 0, 6, 1, 5, 2, 4]
    want = [ids[i] for i in perm]
    with (
        caplog.at_level("INFO", logger="xmodal.features"),
        FeatureFile(path, expected_ids=want) as ff,
    ):
        assert ff.stimulus_ids == want
        np.testing.assert_array_equal(ff.layer(0), x[0][perm])
        np.testing.assert_allclose(ff.abs_q95(), _ref_q95(x)[perm], rtol=1e-6)
    assert "re-ordered" in caplog.text
    with FeatureFile(path) as ff:  # validate() adopts the order too
        ff.validate(want)
        np.testing.assert_array_equal(ff.layer(1), x[1][perm])


def test_different_id_set_names_missing_and_extra(tmp_path):
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    want = ids[:5] + ["new1", "new2"]
    with FeatureFile(path) as ff, pytest.raises(FeatureFileError) as err:
        ff.validate(want)
    msg = str(err.value)
    assert "missing ['new1', 'new2'" in msg and "extra ['s5', 's6'" in msg and str(path) in msg


def test_abs_q95_computed_when_missing(tmp_path):
    x, ids, names = _data(3, 11, 4)
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        del f["abs_q95"]
    with FeatureFile(path) as ff:
        np.testing.assert_allclose(ff.abs_q95(), _ref_q95(x), rtol=1e-6)
        ff.validate()


def test_not_a_feature_file(tmp_path):
    (tmp_path / "x.h5").write_text("not hdf5")
    with pytest.raises(FeatureFileError, match="not a readable HDF5"):
        FeatureFile(tmp_path / "x.h5")
    with pytest.raises(FeatureFileError, match="not found"):
        FeatureFile(tmp_path / "missing.h5")


def test_abs_q95_of_non_finite_features_names_layer_and_stimuli(tmp_path):
    """A file without abs_q95 (user-written) and a NaN in a layer that is not analysed: once a
    bare "abs_q95 must be a finite non-empty 1-D array" from the layer search, naming nothing."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        del f["abs_q95"]
        f["features"][1, 4, 1] = np.nan
    with FeatureFile(path) as ff, pytest.raises(FeatureFileError) as err:
        ff.abs_q95()
    msg = str(err.value)
    assert str(path) in msg and "layer 1 ('layers.1')" in msg and "['s4' (1)]" in msg
    # a stored abs_q95 that is not finite, over finite features
    path = write_features(tmp_path / "g.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f["abs_q95"][0] = np.inf
    with (
        FeatureFile(path) as ff,
        pytest.raises(FeatureFileError, match=r"non-finite abs_q95 for stimuli \['s0'"),
    ):
        ff.abs_q95()


def test_a_stale_feature_file_newer_than_its_stamp_is_refused(tmp_path):
    """A feature file records the stamp digest of what it was extracted from; one that differs
    from the stamp's and is not older than the stamp (touched, copied in) is refused naming
    the file; older (the workflow re-extracts it), matching, or without the record: accepted."""
    stamp = tmp_path / "extract_vision.json"
    stamp.write_text(json.dumps({"modality": "vision", "sha256": "b" * 64}))
    x = np.ones((1, 3, 2), np.float32)

    def feature(name, digest):
        attrs = {"model_key": name, "modality": "vision"}
        if digest is not None:
            attrs[STIMULI_DIGEST] = digest
        return write_features(tmp_path / f"{name}.h5", x, ["a", "b", "c"], ["l0"], attrs)

    same, old, bare = feature("same", "b" * 64), feature("old", "a" * 64), feature("bare", None)
    stale = feature("stale", "a" * 64)
    os.utime(old, (1, 1))  # older than the stamp: Snakemake re-extracts it
    check_against_stamp([same, old, bare, tmp_path / "missing.h5"], stamp)
    with pytest.raises(FeatureFileError, match=r"stale\.h5 holds features of other stimuli"):
        check_against_stamp([same, stale], stamp)
    os.utime(stamp)  # a stamp rewritten since: the workflow re-extracts every older file
    os.utime(stale, ns=(0, stamp.stat().st_mtime_ns - 1))
    check_against_stamp([stale], stamp)
    check_against_stamp([stale], tmp_path / "no_stamp.json")
    stamp.write_text("{damaged")
    check_against_stamp([stale], stamp)


def test_a_folder_digest_follows_its_files_names_and_contents(tmp_path):
    """Equal for a copy of the folder; changed by a file rewritten (same size), renamed, added
    or removed; subfolders (other checkpoints) do not enter it."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    (folder / "checkpoint-1").mkdir()
    first = directory_digest(folder)
    shutil.copytree(folder, tmp_path / "copy")
    assert directory_digest(tmp_path / "copy") == first
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"other")
    assert directory_digest(folder) == first
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)
    second = directory_digest(folder)
    assert second != first
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    assert directory_digest(folder) not in (first, second)
    (folder / "weights.safetensors").unlink()
    assert directory_digest(folder) not in (first, second)


def test_features_of_a_local_model_whose_weights_changed_are_refused(tmp_path):
    """A feature file records the digest of its local model's folder; once the folder's files
    change (trained again in place), the file is refused, naming it and the folder."""
    folder = tmp_path / "my-vit"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"epoch 1")
    x = np.ones((1, 2, 2), np.float32)
    attrs = {"model_key": "my-vit", "modality": "vision", WEIGHTS_DIGEST: directory_digest(folder)}
    path = write_features(tmp_path / "my-vit.h5", x, ["a", "b"], ["l0"], attrs)
    bare = write_features(tmp_path / "bare.h5", x, ["a", "b"], ["l0"], {"modality": "vision"})
    cache = tmp_path / "digests.json"
    check_against_weights(path, folder, cache)
    (folder / "model.safetensors").write_bytes(b"epoch 2")
    with pytest.raises(FeatureFileError, match=r"my-vit\.h5 was extracted from other weights"):
        check_against_weights(path, folder, cache)
    check_against_weights(bare, folder, cache)  # no record: not checked
    check_against_weights(tmp_path / "missing.h5", folder, cache)
    (folder / "model.safetensors").write_bytes(b"epoch 1")  # put back
    check_against_weights(path, folder, cache)


def test_a_supplied_feature_file_is_checked_then_copied_as_it_is(tmp_path):
    """import_features copies the file byte for byte after checking it; a wrong modality, other
    stimuli or a non-finite value is refused naming the config key, and nothing is written."""
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    attrs = {"model_key": "mine", "modality": "vision"}
    src = write_features(tmp_path / "mine.h5", x, ["c", "a", "b"], ["l0"], attrs)
    dst = tmp_path / "results" / "mine.h5"
    import_features(src, dst, "mine", "vision", ["a", "b", "c"])
    assert dst.read_bytes() == src.read_bytes()
    out = tmp_path / "refused.h5"
    with pytest.raises(FeatureFileError, match=r"models\.mine\.features'.*'vision' features"):
        import_features(src, out, "mine", "language")
    with pytest.raises(FeatureFileError, match=r"models\.mine\.features'.*\bd\b"):
        import_features(src, out, "mine", "vision", ["a", "b", "d"])
    bad = tmp_path / "bad.h5"
    shutil.copyfile(src, bad)
    with h5py.File(bad, "a") as f:
        f["features"][0, 1, 2] = np.nan
    with pytest.raises(FeatureFileError, match=r"models\.mine\.features'"):
        import_features(bad, out, "mine", "vision")
    assert not out.exists()
