"""The HDF5 feature store: round trip, atomic writes, validation errors, abs_q95."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

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
    made_with,
    vision_block_names,
    write_features,
)
from xmodal.io import directory_digest
from xmodal.stimuli import BEFORE

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


@settings(max_examples=150, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 4), st.integers(1, 400)),
        # few distinct values: ties at the order statistics, as in quantised features
        elements=st.sampled_from([0.0, -0.5, 1.0, 2.0, -3.0]) | st.floats(-8, 8, width=32),
    )
)
def test_abs_quantile_rows_are_the_sorted_order_statistics(x):
    """Selection gives exactly the values of sorting each row and interpolating linearly."""
    t = torch.from_numpy(x).abs()
    s = torch.sort(t, dim=1).values
    pos = 0.95 * (t.shape[1] - 1)
    lo = int(np.floor(pos))
    want = torch.lerp(s[:, lo], s[:, min(lo + 1, t.shape[1] - 1)], float(pos - lo))
    assert torch.equal(abs_quantile_rows(torch.from_numpy(x)), want)


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


def test_stimuli_with_all_zero_features_are_named_a_layer_of_zeros_is_left_to_the_analysis(
    tmp_path,
):
    """Rows of zeros among real rows (a failed or padded extraction) moved CKNNA by 0.03 with
    no flag; a whole layer of zeros is refused or skipped by name in the analysis."""
    x, ids, names = _data()
    x[1, [2, 5]] = 0.0
    x[2] = 0.0
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with FeatureFile(path) as ff:
        np.testing.assert_array_equal(ff.finite_layer(0), x[0])
        np.testing.assert_array_equal(ff.finite_layer(2), x[2])
        with pytest.raises(FeatureFileError) as err:
            ff.finite_layer(1)
    msg = str(err.value)
    assert str(path) in msg and "all-zero features in layer 1 ('layers.1')" in msg
    assert "'s2'" in msg and "'s5'" in msg and "'s4'" not in msg


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
    with pytest.raises(
        FeatureFileError,
        match=rf"{path}: 'layer_names' has shape \(2,\), expected \(3,\): one per layer",
    ):
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
    assert str(path) in msg and "layer 1 ('layers.1')" in msg and "['s4'] (1 in all)" in msg
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
    # a model whose config now says language: a changed param, which re-extracts it
    other = write_features(
        tmp_path / "other.h5",
        x,
        ["a", "b", "c"],
        ["l0"],
        {"model_key": "other", "modality": "language", STIMULI_DIGEST: "a" * 64},
    )
    check_against_stamp([other], stamp)
    with pytest.raises(FeatureFileError, match=r"stale\.h5 holds features of other stimuli"):
        check_against_stamp([same, stale], stamp)
    # at the end of a run, against the stamp it started with: a file this run wrote after the
    # manifest was edited mid-run is named as such (the run's tables mix them; audit)
    import time

    started = time.time() - 5
    check_against_stamp([same, old, bare, other], stamp, run_started=started)
    with pytest.raises(FeatureFileError) as err:
        check_against_stamp([same, stale], stamp, run_started=started)
    said = str(err.value)
    assert said.startswith(f"{stale} was extracted from other stimuli than this run started with")
    assert f"digest {'a' * 12}…, where {stamp} says {'b' * 12}…" in said
    assert "changed while the run was going" in said and "Run again" in said
    # one the run did not write (created before it started; touched by --touch) is stale
    with pytest.raises(FeatureFileError, match=r"stale\.h5 holds features of other stimuli"):
        check_against_stamp([stale], stamp, run_started=started + 3600)
    os.utime(stamp)  # a stamp rewritten since: the workflow re-extracts every older file
    os.utime(stale, ns=(0, stamp.stat().st_mtime_ns - 1))
    check_against_stamp([stale], stamp)
    check_against_stamp([stale], tmp_path / "no_stamp.json")
    stamp.write_text("{damaged")
    check_against_stamp([stale], stamp)
    # a stamp carried over from an earlier form keeps that form's digest, which files extracted
    # under it hold (xmodal.stimuli.write_manifest_stamp): accepted, and only that one
    stamp.write_text(json.dumps({"modality": "vision", "sha256": "c" * 64, BEFORE: "a" * 64}))
    for path in (stale, same):
        os.utime(path, ns=(0, stamp.stat().st_mtime_ns + 1))
    check_against_stamp([stale], stamp)
    with pytest.raises(FeatureFileError, match=r"same\.h5 holds features of other stimuli"):
        check_against_stamp([same], stamp)


def test_bytes_damaged_on_disk_are_a_read_error_naming_the_layer(tmp_path):
    """A feature file's data are checksummed (HDF5's Fletcher-32 per chunk): 8 bytes flipped in
    one stimulus's row of a layer were read as features (-58.95 where 0.07 was; the stimulus
    became the most dispersed, exit 0; audit). Now reading that layer is a FeatureFileError
    naming the file and the layer; the other layers still read. abs_q95 and n_tokens too."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 6, 4)).astype(np.float32)
    ids = [f"s{i}" for i in range(6)]
    path = write_features(
        tmp_path / "f.h5", x, ids, ["l0", "l1", "l2"], ATTRS, n_tokens=np.arange(6)
    )

    def flip(dataset: str, chunk: int, at: int) -> None:
        with h5py.File(path, "r") as f:
            d = f[dataset]
            assert d.fletcher32
            offset = d.id.get_chunk_info(chunk).byte_offset
        with open(path, "r+b") as fh:
            fh.seek(offset + at)
            byte = fh.read(1)
            fh.seek(offset + at)
            fh.write(bytes([byte[0] ^ 0xFF]))

    flip("features", 1, 17)  # layer 1, the second row's second value
    with FeatureFile(path) as ff:
        np.testing.assert_array_equal(ff.layer(0), x[0])
        np.testing.assert_array_equal(ff.layer(2), x[2])
        with pytest.raises(FeatureFileError, match=r"f\.h5: cannot read layer 1.*corrupt"):
            ff.layer(1)
    for name in ("abs_q95", "n_tokens"):
        path = write_features(
            tmp_path / "f.h5", x, ids, ["l0", "l1", "l2"], ATTRS, n_tokens=np.arange(6)
        )
        flip(name, 0, 2)
        with FeatureFile(path) as ff, pytest.raises(FeatureFileError, match="corrupt"):
            ff.abs_q95() if name == "abs_q95" else ff.n_tokens()


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


def test_a_supplied_feature_file_is_checked_then_copied_in_manifest_order(tmp_path):
    """import_features writes the file's rows in the order of the manifest's ids (positions,
    random sets and tie order follow the manifest, docs/contracts.md), with its attributes; a
    wrong modality, other stimuli or a non-finite value is refused naming the config key, and
    nothing is written."""
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    attrs = {"model_key": "mine", "modality": "vision", "source": "my lab"}
    src = write_features(tmp_path / "mine.h5", x, ["c", "a", "b"], ["l0"], attrs)
    dst = tmp_path / "results" / "mine.h5"
    import_features(src, dst, "mine", "vision", ["a", "b", "c"])
    with FeatureFile(dst) as out, h5py.File(dst, "r") as raw:
        assert out.stimulus_ids == ["a", "b", "c"] and out._order is None
        np.testing.assert_array_equal(out.layer(0), x[0][[1, 2, 0]])
        assert out.attrs["source"] == "my lab" and out.attrs["model_key"] == "mine"
        assert out.attrs["imported_from"] == str(src.resolve())
        assert raw["features"].dtype == np.float32
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


def test_an_imported_file_holds_its_own_data_and_a_recomputed_abs_q95(tmp_path, caplog):
    """A supplied abs_q95 is never trusted (features rescaled with the old value kept gave
    another CKNNA), and a `features` dataset that is an external link is copied as data: the
    copy does not change when the linked file does."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 20, 8)).astype(np.float32)
    attrs = {"model_key": "mine", "modality": "language"}
    ids = [f"s{i}" for i in range(20)]
    good = write_features(tmp_path / "good.h5", x, ids, ["l0", "l1"], attrs)
    stale = tmp_path / "stale.h5"
    shutil.copyfile(good, stale)
    with h5py.File(stale, "a") as f:
        f["features"][...] = 30 * x  # the user rescaled the features, kept abs_q95
    dst = tmp_path / "results" / "stale.h5"
    with caplog.at_level(logging.WARNING, logger="xmodal.features"):
        import_features(stale, dst, "mine", "language", ids)
    assert "differs from the features' for 20 of 20 stimuli (by a factor up to 30" in caplog.text
    with FeatureFile(dst) as out, FeatureFile(good) as ref:
        np.testing.assert_allclose(out.abs_q95(), 30 * ref.abs_q95(), rtol=1e-6)

    target = tmp_path / "big.h5"
    shutil.copyfile(good, target)
    linked = tmp_path / "linked.h5"
    with h5py.File(linked, "w") as f, h5py.File(good, "r") as g:
        for name in ("stimulus_ids", "layer_names", "abs_q95"):
            g.copy(name, f)
        for key, value in g.attrs.items():
            f.attrs[key] = value
        f["features"] = h5py.ExternalLink(str(target), "features")
    dst = tmp_path / "results" / "linked.h5"
    import_features(linked, dst, "mine", "language", ids)
    with h5py.File(target, "a") as f:
        f["features"][...] = 50.0
    with h5py.File(dst, "r") as f:
        assert isinstance(f.get("features", getlink=True), h5py.HardLink)
    with FeatureFile(dst) as out:
        np.testing.assert_array_equal(out.layer(1), x[1])


def test_import_leaves_out_the_duplicates_drop_duplicates_drops(tmp_path):
    """With stimuli.drop_duplicates a supplied file may hold the dropped stimuli (it then loses
    them) or not; any other difference is refused, naming the ids."""
    x = np.arange(24, dtype=np.float32).reshape(1, 4, 6)
    attrs = {"model_key": "mine", "modality": "vision"}
    full = write_features(tmp_path / "full.h5", x, ["a", "b", "a2", "c"], ["l0"], attrs)
    kept = write_features(tmp_path / "kept.h5", x[:, [0, 1, 3]], ["a", "b", "c"], ["l0"], attrs)
    for src in (full, kept):
        dst = tmp_path / "results" / src.name
        import_features(src, dst, "mine", "vision", ["a", "b", "c"], dropped={"a2"})
        with FeatureFile(dst) as out:
            assert out.stimulus_ids == ["a", "b", "c"]
            np.testing.assert_array_equal(out.layer(0), x[0][[0, 1, 3]])
    with pytest.raises(FeatureFileError, match=r"extra \['a2'"):
        import_features(full, tmp_path / "no.h5", "mine", "vision", ["a", "b", "c"])
    with pytest.raises(FeatureFileError, match=r"missing \['d'"):
        import_features(kept, tmp_path / "no.h5", "mine", "vision", ["a", "b", "c", "d"], {"a2"})
    assert not (tmp_path / "no.h5").exists()


@pytest.mark.parametrize("shape", [(0, 3, 4), (1, 0, 4), (1, 3, 0)])
def test_a_file_without_features_is_refused_when_opened(tmp_path, shape):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["modality"] = "vision"
        f.create_dataset("features", shape=shape, dtype=np.float32)
        f.create_dataset(
            "stimulus_ids",
            data=np.array(["a", "b", "c"][: shape[1]], dtype=object),
            dtype=h5py.string_dtype(),
        )
        f.create_dataset(
            "layer_names",
            data=np.array(["l0"][: shape[0]], dtype=object),
            dtype=h5py.string_dtype(),
        )
    with pytest.raises(FeatureFileError, match="no layers, stimuli or dims"):
        FeatureFile(path)
    with pytest.raises(FeatureFileError, match=r"models\.mine\.features'.*no layers"):
        import_features(path, tmp_path / "out.h5", "mine", "vision")


@pytest.mark.skipif(
    os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() in ("FALSE", "0"),
    reason="HDF5 file locking is turned off in this environment",
)
def test_a_locked_file_is_named_as_locked_not_corrupt(tmp_path):
    """Another process holding the file open for writing is a lock, not corruption (the old
    message told the user to delete a good file)."""
    path = write_features(tmp_path / "f.h5", np.ones((1, 2, 2), np.float32), ["a", "b"], ["l0"], {})
    code = (
        "import h5py, sys, time; f = h5py.File(sys.argv[1], 'a'); print('open', flush=True); "
        "time.sleep(60)"
    )
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(
            FeatureFileError, match="locked by another process.*HDF5_USE_FILE_LOCKING"
        ):
            FeatureFile(path)
    finally:
        holder.kill()
        holder.wait()


def test_run_import_features_keeps_the_stimuli_every_extraction_keeps(tmp_path, tiny_manifest):
    """stimuli.drop_duplicates with a supplied file: before, a file without the dropped
    duplicate was refused at import and a file with it was refused later by GPA."""
    from xmodal.pipeline import run_import_features
    from xmodal.stimuli import read_manifest

    root = tmp_path / "m"
    shutil.copytree(tiny_manifest.parent, root)
    manifest = root / "stimuli.tsv"
    lines = manifest.read_text().splitlines()
    lines.insert(5, "again-03\t" + lines[4].split("\t", 1)[1])  # stim-03 listed twice
    manifest.write_text("\n".join(lines) + "\n")
    every = read_manifest(manifest)["stimulus_id"].tolist()
    kept = [s for s in every if s != "again-03"]
    rng = np.random.default_rng(1)
    attrs = {"model_key": "mine", "modality": "language"}
    for name, ids in (("all", every), ("kept", kept)):
        src = write_features(
            tmp_path / f"{name}.h5", rng.normal(size=(1, len(ids), 4)), ids[::-1], ["l0"], attrs
        )
        dst = tmp_path / "results" / f"{name}.h5"
        run_import_features(manifest, src, dst, "mine", "language", drop_duplicates=True)
        order = kept + ["again-03"] if name == "all" else kept
        with FeatureFile(dst) as out, FeatureFile(src, order) as ref:
            assert out.stimulus_ids == kept
            np.testing.assert_array_equal(out.layer(0), ref.layer(0)[: len(kept)])
    with pytest.raises(FeatureFileError, match=r"models\.mine\.features'.*missing \['again-03'"):
        run_import_features(manifest, tmp_path / "kept.h5", tmp_path / "no.h5", "mine", "language")


def _rewrite(path, name, data) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        f.create_dataset(name, data=data)


@pytest.mark.parametrize(
    "dtype", ["int16", "uint16", "int32", "int64", "bool", "complex64", "S8", "V2"]
)
def test_features_that_are_not_floats_are_refused(tmp_path, dtype):
    """bfloat16 saved as its bit pattern (``tensor.view(torch.int16)``), or any other integer,
    boolean, complex or text array, was cast to float32 and analysed as features with exit 0:
    GPA's dispersion on such a file differed from the float one's in every stimulus."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    bits = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy()
    data = np.zeros(x.shape, dtype) if dtype != "int16" else bits
    _rewrite(path, "features", data)
    with pytest.raises(FeatureFileError, match=rf"{path}: 'features' are stored as .*bfloat16"):
        FeatureFile(path)
    with pytest.raises(FeatureFileError, match=r"config key 'models.tiny.features'.*stored as"):
        import_features(path, tmp_path / "copy.h5", "tiny", "language", ids)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("stimulus_ids", [["s0"]] * 7, r"'stimulus_ids' has shape \(7, 1\), expected \(7,\)"),
        ("stimulus_ids", "s0", r"'stimulus_ids' has shape \(\), expected \(7,\)"),
        ("layer_names", [["a"]] * 3, r"'layer_names' has shape \(3, 1\), expected \(3,\)"),
        ("stimulus_ids", [b"caf\xe9"] + [b"s%d" % i for i in range(1, 7)],
         r"'stimulus_ids' entry 0 \(b'caf\\xe9'\) is not UTF-8 text"),
        ("n_tokens", [b"3"] * 7, r"'n_tokens' are stored as \S+, expected whole numbers"),
    ],
)  # fmt: skip
def test_names_and_counts_of_the_wrong_shape_or_type_are_named(tmp_path, name, data, message):
    """Ids or layer names as a column (MATLAB, pandas) or a scalar, ids in Latin-1 and token
    counts as text were "N stimulus ids for N feature rows", an IndexError, or "the file is
    corrupt or truncated": each now names the dataset and what it must be."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    if name == "n_tokens":
        with h5py.File(path, "r+") as f:
            f.create_dataset(name, data=data)
    else:
        _rewrite(path, name, data)
    with pytest.raises(FeatureFileError, match=rf"{path}: {message}"):
        FeatureFile(path)


@pytest.mark.parametrize("version", ["v1", 1.7, True, [1, 1], 2, np.float64(2.0)])
def test_a_schema_version_that_is_not_the_integer_is_refused(tmp_path, version):
    """``int()`` read 1.7 as 1 and True as 1; "v1" gave "corrupt or truncated"."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(FeatureFileError, match=r"schema_version is .*reads the integer 1"):
        FeatureFile(path)


@pytest.mark.parametrize("version", [1, np.int32(1), 1.0, np.array([1.0]), "1", np.uint8(1)])
def test_a_schema_version_written_as_a_double_or_array_is_read(tmp_path, version):
    """MATLAB's h5writeatt and R's rhdf5 write numbers as doubles, often as one-element
    arrays: 1.0 and [1.0] are the version 1."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = version
    with FeatureFile(path) as ff:
        np.testing.assert_array_equal(ff.layer(0), x[0])


def test_ids_that_differ_only_in_unicode_form_are_named_so(tmp_path):
    """'café' typed (NFC) against 'café' from a Mac file name (NFD): the lists of missing and
    extra ids printed alike; the message now says why they differ."""
    import unicodedata

    x, _, names = _data()
    ids = [f"café{i}" for i in range(7)]
    nfd = [unicodedata.normalize("NFD", s) for s in ids]
    path = write_features(tmp_path / "f.h5", x, nfd, names, ATTRS)
    with pytest.raises(FeatureFileError, match=r"differ only in Unicode form.*'caf\\xe90'"):
        FeatureFile(path, expected_ids=ids)


def test_import_checks_the_model_key_the_analysis_checks(tmp_path):
    """A supplied file made for another model passed the import and failed only at the
    analysis, after every extraction, with advice (delete the copy) that re-imported it.
    It is refused at import, naming the config key; an absent model_key is set to the key."""
    x, ids, names = _data()
    other = write_features(tmp_path / "other.h5", x, ids, names, {**ATTRS, "model_key": "b"})
    with pytest.raises(FeatureFileError, match=r"'models.tiny.features'.*model_key='b'"):
        import_features(other, tmp_path / "c1.h5", "tiny", "language", ids)
    plain = {k: v for k, v in ATTRS.items() if k != "model_key"}
    bare = write_features(tmp_path / "bare.h5", x, ids, names, plain)
    copy = import_features(bare, tmp_path / "c2.h5", "tiny", "language", ids)
    from xmodal.pipeline import open_features

    with open_features(copy, ids, model="tiny", modality="language") as f:
        np.testing.assert_array_equal(f.layer(0), x[0])
    for attr, value in (("model_key", ["tiny", "b"]), ("modality", ["language", "x"])):
        odd = write_features(tmp_path / f"{attr}.h5", x, ids, names, ATTRS)
        with h5py.File(odd, "r+") as f:
            f.attrs[attr] = value
        with pytest.raises(FeatureFileError, match=rf"'{attr}' attribute"):
            import_features(odd, tmp_path / f"c-{attr}.h5", "tiny", "language", ids)


def test_float64_values_beyond_float32_are_named_not_called_non_finite(tmp_path):
    """A float64 file holding 1e39 was refused as "non-finite features" (the cast to float32
    made them inf), although every value in the file is finite; in float64 range they pass."""
    x, ids, names = _data()
    path = write_features(tmp_path / "f.h5", x, ids, names, ATTRS)
    big = x.astype(np.float64)
    big[1, 2, 0] = -1e39
    _rewrite(path, "features", big)
    with pytest.raises(FeatureFileError, match=r"layer 1 \('layers.1'\) holds values beyond "
                       r"float32's range .* up to 1e\+39, for stimuli \['s2'\]"):  # fmt: skip
        FeatureFile(path).layer(1)
    with FeatureFile(path, expected_ids=ids[::-1]) as f:  # named in the order it returns rows
        with pytest.raises(FeatureFileError, match=r"for stimuli \['s2'\]"):
            f.finite_layer(-2)
        np.testing.assert_array_equal(f.layer(0), x[0][::-1])


def test_import_names_a_missing_modality_and_a_non_finite_supplied_abs_q95(tmp_path, caplog):
    x, ids, names = _data()
    plain = {k: v for k, v in ATTRS.items() if k != "modality"}
    bare = write_features(tmp_path / "bare.h5", x, ids, names, plain)
    with pytest.raises(FeatureFileError, match=r"bare.h5 has no 'modality' attribute, but the"):
        import_features(bare, tmp_path / "c.h5", "tiny", "language", ids)
    path = write_features(tmp_path / "nan.h5", x, ids, names, ATTRS)
    with h5py.File(path, "r") as f:
        q = f["abs_q95"][()]
    q[0], q[1] = np.nan, 2 * q[1]
    _rewrite(path, "abs_q95", q)
    with caplog.at_level(logging.WARNING, logger="xmodal.features"):
        import_features(path, tmp_path / "c2.h5", "tiny", "language", ids)
    assert "differs from the features' for 2 of 7 stimuli (by a factor up to 2, 1 not finite" in (
        caplog.text
    )


def test_a_supplied_vision_file_with_other_layers_than_blocks_is_warned_about(tmp_path, caplog):
    """analysis.vision_layer counts from the end of a file's layers: a supplied ViT file with
    an embeddings layer first is fine, one with a head or pooled layer last would be analysed
    one block off the extracted models, with no message. Its layer names are said."""
    x, ids, _ = _data()
    attrs = {**ATTRS, "modality": "vision"}
    for names, warned in ((vision_block_names(3), False), (["blocks.0", "blocks.1", "head"], True)):
        src = write_features(tmp_path / f"{names[-1]}.h5", x, ids, names, attrs)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="xmodal.features"):
            import_features(src, tmp_path / f"c-{names[-1]}.h5", "tiny", "vision", ids)
        assert ("its layers are named ['blocks.0', 'blocks.1', 'head']" in caplog.text) is warned


def test_made_with_reads_how_the_model_was_loaded(tmp_path):
    """The rerun trigger's view of a feature file (xmodal.registry.ModelEntry.settled_revision):
    the id, the commit and the revision asked for; none for a missing or unreadable file."""
    x, ids, names = _data()
    attrs = {**ATTRS, "revision": "abc123", "requested_revision": ""}
    path = write_features(tmp_path / "f.h5", x, ids, names, attrs)
    assert made_with(path) == {"model_id": "org/tiny", "revision": "abc123",
                               "requested_revision": ""}  # fmt: skip
    assert made_with(write_features(tmp_path / "g.h5", x, ids, names, ATTRS))["revision"] == ""
    assert made_with(tmp_path / "missing.h5") is None
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert made_with(tmp_path / "junk.h5") is None


def test_extraction_record_reads_the_settings_that_made_the_features(tmp_path):
    """What the check of feature files without Snakemake records compares with the config
    (xmodal.registry.ModelEntry.differs_from): the token limit from the preprocessing record,
    the dtype and device, the feature version (1 where a file records none)."""
    from xmodal.features import extraction_record

    x, ids, names = _data()
    tokenizer = {"max_length": 64, "max_length_source": "max_tokens"}
    attrs = {**ATTRS, "revision": "abc123", "compute_dtype": "bfloat16", "device": "cuda:0",
             "features_version": 2, "preprocessing": {"tokenizer": tokenizer}}  # fmt: skip
    path = write_features(tmp_path / "f.h5", x, ids, names, attrs)
    assert extraction_record(path) == {
        "model_id": "org/tiny", "revision": "abc123", "requested_revision": "",
        "compute_dtype": "bfloat16", "device": "cuda:0", "features_version": 2,
        "max_length": 64, "max_length_source": "max_tokens",
    }  # fmt: skip
    bare = extraction_record(write_features(tmp_path / "g.h5", x, ids, names, ATTRS))
    assert bare is not None and bare["features_version"] == 1
    assert (bare["max_length"], bare["max_length_source"], bare["compute_dtype"]) == (None, "", "")
    assert extraction_record(tmp_path / "missing.h5") is None


def _supplied(tmp_path, x, ids, name="user.h5", n_tokens=None):
    """A user's feature file (a language model's) as h5py writes it, not write_features."""
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        f["features"] = x
        f["stimulus_ids"] = np.array(ids, dtype=object if isinstance(ids[0], str) else None)
        f["layer_names"] = np.array([f"l{i}" for i in range(x.shape[0])], dtype=object)
        if n_tokens is not None:
            f["n_tokens"] = n_tokens
        f.attrs.update({"model_key": "mine", "modality": "language", "schema_version": 1})
    return path


def test_a_supplied_file_of_the_wrong_form_is_named_not_a_python_error(tmp_path):
    """A group of per-layer datasets for 'features' (AttributeError), a Latin-1 or NUL-holding
    attribute (UnicodeDecodeError, ValueError) named neither file nor fault; an external link
    to a moved file was "corrupt or truncated"; a model_id with its text file's final line
    break passed the import and failed the provenance job after the whole analysis (audit)."""
    x, ids = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2), ["a", "b", "c"]
    grouped = _supplied(tmp_path, x, ids, "grouped.h5")
    with h5py.File(grouped, "r+") as f:
        del f["features"]
        for i in range(2):
            f[f"features/layer{i}"] = x[i]
    with pytest.raises(FeatureFileError, match=rf"{grouped}: 'features' is a group, not a dataset"):
        FeatureFile(grouped)
    linked = _supplied(tmp_path, x, ids, "linked.h5")
    with h5py.File(linked, "r+") as f:
        del f["features"]
        f["features"] = h5py.ExternalLink(str(tmp_path / "moved.h5"), "/features")
    with pytest.raises(FeatureFileError, match=r"'features' is a link to '/features' in .*moved"):
        FeatureFile(linked)
    bad = (("model_id", np.bytes_("café".encode("latin-1")), r"'model_id' is not UTF-8 text"),
           ("model_id", np.bytes_(b"org\x00model"), r"'model_id' .* holds a NUL character"),
           ("revision", "abc123\n", r"'revision' \('abc123\\n'\) holds a tab or line break"))  # fmt: skip
    for name, value, message in bad:
        path = _supplied(tmp_path, x, ids, "attr.h5")
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
        with pytest.raises(FeatureFileError, match=rf"models\.mine\.features'.*{message}"):
            import_features(path, tmp_path / "copy.h5", "mine", "language", ids)


def test_a_big_endian_float16_file_is_copied_as_float16(tmp_path):
    """contracts.md: float16 kept as float16; a '>f2' file became float32 (np.dtype('>f2') ==
    np.float16 is False), twice the size."""
    x, ids = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2), ["a", "b", "c"]
    path = _supplied(tmp_path, x.astype(">f2"), ids)
    import_features(path, tmp_path / "copy.h5", "mine", "language", ids)
    with h5py.File(tmp_path / "copy.h5") as f:
        assert f["features"].dtype == np.float16
        np.testing.assert_array_equal(f["features"][()], x)


def test_import_refuses_a_layer_never_written(tmp_path):
    """A writer killed after 2 of 3 layers leaves a file that opens, its last layer reading as
    zeros (the dataset's fill value), as does a virtual dataset whose source file is missing.
    Imported, the zeros lowered the clamp threshold of every layer (CKNNA 0.364 where the whole
    file gives 0.417) with exit 0; refused now, naming the key, the file and the layer."""
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(12)]
    x = rng.standard_normal((3, 12, 16)).astype(np.float32)
    src = _supplied(tmp_path, x, ids)
    with h5py.File(src, "a") as f:
        f["features"][2] = 0.0  # the layer the killed writer never reached
    dst = tmp_path / "results" / "mine.h5"
    with pytest.raises(
        FeatureFileError,
        match=r"models\.mine\.features'.*user\.h5: layer 2 \('l2'\) is 0 for every stimulus: "
        r"never written",
    ):
        import_features(src, dst, "mine", "language", ids)
    assert not dst.exists()

    parts = []
    for i in range(3):  # one source file per layer, the last one missing
        part = tmp_path / f"part{i}.h5"
        with h5py.File(part, "w") as f:
            f["x"] = x[i]
        parts.append(part)
    virtual = tmp_path / "virtual.h5"
    layout = h5py.VirtualLayout(shape=x.shape, dtype=np.float32)
    for i, part in enumerate(parts):
        layout[i] = h5py.VirtualSource(str(part), "x", shape=x.shape[1:])
    with h5py.File(virtual, "w") as f:
        f.create_virtual_dataset("features", layout, fillvalue=0.0)
        f["stimulus_ids"] = np.array(ids, dtype=object)
        f["layer_names"] = np.array(["l0", "l1", "l2"], dtype=object)
        f.attrs.update({"model_key": "mine", "modality": "language", "schema_version": 1})
    import_features(virtual, dst, "mine", "language", ids)  # every source there: read through
    with FeatureFile(dst) as out:
        np.testing.assert_array_equal(out.layer(2), x[2])
    dst.unlink()
    parts[1].unlink()
    with pytest.raises(FeatureFileError, match=r"virtual\.h5: layer 1 \('l1'\) is 0 for every"):
        import_features(virtual, dst, "mine", "language", ids)
    assert not dst.exists()


def test_a_supplied_files_provenance_is_its_own(tmp_path, caplog):
    """The provenance table showed the importer's library versions and time as a supplied
    file's (torch, timm, … of the machine that imported it; `created` the import's moment),
    and its `library_versions` in another form than a JSON object crashed the table with a
    JSONDecodeError naming nothing. Now: what the file records, or nothing; `source`
    `supplied`; another form warned about naming the file."""
    from xmodal.pipeline import provenance_table

    rng = np.random.default_rng(1)
    ids = ["a", "b", "c", "d"]
    x = rng.standard_normal((1, 4, 8)).astype(np.float32)
    manifest = tmp_path / "stimuli.tsv"
    manifest.write_text(
        "stimulus_id\timage\tcaption\n" + "".join(f"{s}\t{s}.png\tcap {s}\n" for s in ids)
    )
    bare = _supplied(tmp_path, x, ids)  # schema_version, model_key and modality only
    told = tmp_path / "told.h5"
    shutil.copyfile(bare, told)
    with h5py.File(told, "a") as f:
        f.attrs.update({"created": "2025-01-02T03:04:05+00:00", "source": "hub",
                        "library_versions": json.dumps({"torch": "2.1.0", "numpy": "1.26"})})  # fmt: skip
    odd = tmp_path / "odd.h5"
    shutil.copyfile(bare, odd)
    with h5py.File(odd, "a") as f:
        f.attrs["library_versions"] = "torch 2.1.0, numpy 1.26"
    copies = [import_features(p, tmp_path / "results" / f"{p.stem}.h5", "mine", "language", ids)
              for p in (bare, told, odd)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="xmodal.pipeline"):
        table = provenance_table(manifest, "local", copies).set_index("kind").loc["model"]
    assert list(table["source"]) == ["supplied"] * 3
    assert list(table["created"]) == ["", "2025-01-02T03:04:05+00:00", ""]
    assert list(table["torch"]) == ["", "2.1.0", ""] and list(table["timm"]) == ["", "", ""]
    assert "odd.h5: its 'library_versions' attribute is not a JSON object" in caplog.text
    assert "'torch 2.1.0, numpy 1.26'" in caplog.text
    made = write_features(tmp_path / "made.h5", x, ids, ["l0"], {"modality": "language"})
    row = provenance_table(manifest, "local", [made]).iloc[1]  # an extraction's: filled in
    assert row["created"] and row["torch"] == torch.__version__ and row["source"] == ""


def test_the_torch_version_recorded_is_its_builds(tmp_path, monkeypatch):
    """PyPI's CUDA wheels of torch give the package the version ``2.14.1`` while the module says
    ``2.14.1+cu130``: feature files and the provenance table recorded the first, so they did not
    say which build of torch (CUDA or CPU, which CUDA) made the features (found running the
    suite with Python 3.12 and PyPI's torch). Here the package's version is made to differ.
    Where torch is not loaded, its version is read without loading it (seconds)."""
    import importlib.metadata as md

    from xmodal.features import library_version
    from xmodal.pipeline import provenance_table

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "2.14.1" if name == "torch" else real(name))
    assert md.version("torch") == "2.14.1" != torch.__version__
    assert library_version("torch") == torch.__version__
    assert library_version("numpy") == np.__version__
    assert library_version("no-such-library-xyz") == ""
    ids = ["a", "b", "c"]
    x = np.random.default_rng(0).standard_normal((1, 3, 4)).astype(np.float32)
    made = write_features(tmp_path / "made.h5", x, ids, ["l0"], {"modality": "language"})
    with h5py.File(made) as f:
        assert json.loads(f.attrs["library_versions"])["torch"] == torch.__version__
    manifest = tmp_path / "stimuli.tsv"
    manifest.write_text(
        "stimulus_id\timage\tcaption\n" + "".join(f"{s}\t{s}.png\tc {s}\n" for s in ids)
    )
    table = provenance_table(manifest, "local", [made]).set_index("kind")
    assert table.loc["model", "torch"] == table.loc["analysis", "torch"] == torch.__version__
    # where torch is not loaded (the provenance step), it is read without loading it
    probe = (
        "import importlib.metadata as md, sys\n"
        "real = md.version\n"
        "md.version = lambda name: '2.14.1' if name == 'torch' else real(name)\n"
        "from xmodal.features import library_version\n"
        "print(library_version('torch'), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.split() == [torch.__version__, "False"], out.stderr


def test_ids_stored_as_numbers_are_named_as_such(tmp_path):
    """Manifest ids '001'…'006' stored as the numbers 1…6 (or 1.0…6.0) were blamed on "another
    stimulus manifest", with the advice to re-extract; the message now says that the ids are
    the same numbers written otherwise, and to store them as strings."""
    ids = [f"{i:03d}" for i in range(1, 13)]
    x = np.random.default_rng(2).standard_normal((1, 12, 4)).astype(np.float32)
    for stored in (np.arange(12, 0, -1), np.arange(12, 0, -1, dtype=np.float64)):
        # in another order: the example pairs '001' with its own number, not the first extra
        path = _supplied(tmp_path, x, list(stored))
        with pytest.raises(FeatureFileError) as err:
            import_features(path, tmp_path / "c.h5", "mine", "language", ids)
        text = str(err.value)
        assert re.search(
            r"the same numbers written otherwise, e\.g\. '001' and '1(\.0)?' ", text
        ), text
        assert "write the ids as strings" in text and "another stimulus manifest" not in text
    other = _supplied(tmp_path, x, [f"{i:03d}" for i in range(2, 14)])  # truly other stimuli
    with pytest.raises(FeatureFileError, match="extracted for another stimulus manifest"):
        import_features(other, tmp_path / "c.h5", "mine", "language", ids)


def test_import_refuses_features_that_are_mostly_zero_naming_the_key_and_file(tmp_path):
    """Sparse features (3 of 100 dims nonzero per stimulus) passed import, then every alignment
    job failed with "threshold must be > 0, got 0.0", naming nothing: the clamp threshold, the
    mean of each stimulus's 95th percentile of |x|, is 0. Refused at import, no copy left; a
    file the analysis reads (extracted) is refused naming it, by layer_threshold."""
    from xmodal.pipeline import layer_threshold

    rng = np.random.default_rng(0)
    x = np.zeros((2, 12, 100), np.float32)
    x[:, :, :3] = rng.standard_normal((2, 12, 3))
    ids = [f"s{i}" for i in range(12)]
    src = _supplied(tmp_path, x, ids)
    dst = tmp_path / "results" / "mine.h5"
    with pytest.raises(FeatureFileError, match=r"config key 'models\.mine\.features': .*user\.h5: "
                       r"for every stimulus at least 95% of the feature values are 0"):  # fmt: skip
        import_features(src, dst, "mine", "language", ids)
    assert not dst.exists()
    made = write_features(tmp_path / "made.h5", x, ids, ["l0", "l1"], {"modality": "language"})
    with (
        FeatureFile(made) as f,
        pytest.raises(
            FeatureFileError,
            match=r"made\.h5: for every stimulus at least 95% of the feature values",
        ),
    ):
        layer_threshold(f)
    x[:, :, 3:8] = 1.0  # 8 of 100 nonzero: the 95th percentile of |x| is no longer 0
    with FeatureFile(write_features(tmp_path / "ok.h5", x, ids, ["a", "b"], {})) as f:
        assert layer_threshold(f) > 0


@pytest.mark.parametrize("counts", [[1.7, 2, 3, 4], [1, 2, -1, 4], [1, 2, np.nan, 4]])
def test_token_counts_that_are_not_whole_numbers_are_refused_not_truncated(tmp_path, counts):
    """A supplied file's n_tokens 2.9 was read as 2 (a cast to int before the check), and fed
    the caption_tokens property; now refused at import and when read, naming the file."""
    ids = [f"s{i}" for i in range(4)]
    x = np.random.default_rng(1).standard_normal((1, 4, 6)).astype(np.float32)
    src = _supplied(tmp_path, x, ids, n_tokens=np.array(counts, dtype=np.float64))
    with pytest.raises(FeatureFileError, match=r"user\.h5: n_tokens must be whole numbers ≥ 0"):
        import_features(src, tmp_path / "out.h5", "mine", "language", ids)
    with FeatureFile(src) as f, pytest.raises(FeatureFileError, match="whole numbers"):
        f.n_tokens()
    fine = _supplied(tmp_path, x, ids, "fine.h5", n_tokens=np.array([1.0, 2, 3, 4]))
    with FeatureFile(fine) as f:
        np.testing.assert_array_equal(f.n_tokens(), [1, 2, 3, 4])


def test_ids_padded_with_spaces_are_named_as_such(tmp_path):
    """Ids from a fixed-width string column ('s0   ') did not match, and the message blamed
    another stimulus manifest only; it now says they differ in spaces."""
    ids = [f"s{i}" for i in range(4)]
    x = np.random.default_rng(2).standard_normal((1, 4, 6)).astype(np.float32)
    src = _supplied(tmp_path, x, np.array([s.ljust(5) for s in ids], dtype="S5"))
    with pytest.raises(FeatureFileError, match=r"differ only in spaces before or after them, "
                       r"e\.g\. 's0' and 's0   ' \(a fixed-width string column pads them\)"):  # fmt: skip
        import_features(src, tmp_path / "out.h5", "mine", "language", ids)


def test_values_that_do_not_fit_the_storage_dtype_are_named_when_written(tmp_path):
    """Written with ``dtype``, a finite 70000 (float16) or 1e39 (float64 into float32) was
    refused as "non-finite features", and a row of values near 1e-9 (float16) turned to zeros
    without a word, then read back as all-zero features "never written" (audit). Each is now
    refused when written, saying which and naming the layer and stimulus; NaN and Inf given
    are still "non-finite"."""
    x, ids, names = _data()
    cases = [
        (np.float16, (1, 2), 70000.0, r"too large for float16 storage \(at most 65504"),
        (np.float32, (1, 2), 1e39, r"too large for float32 storage"),
        (np.float16, (1, 2), np.nan, r"non-finite features for stimuli \['s2'\]"),
    ]
    for dtype, (layer, row), value, said in cases:
        y = x.astype(np.float64)
        y[layer, row, 0] = value
        with pytest.raises(FeatureFileError, match=rf"layer 1 \('layers.1'\): .*{said}"):
            write_features(tmp_path / "f.h5", y, ids, names, ATTRS, dtype=dtype)
        assert list(tmp_path.iterdir()) == []
    tiny = x.astype(np.float64)
    tiny[1, 2] = 1e-9 * np.sign(tiny[1, 2] + 0.5)
    with pytest.raises(
        FeatureFileError,
        match=r"layer 1 \('layers.1'\): features too small for float16 storage turned to zeros"
        r" .* for stimuli \['s2'\]",
    ):
        write_features(tmp_path / "f.h5", tiny, ids, names, ATTRS, dtype=np.float16)
    # a row whose nonzero values all underflow, beside exact zeros (mutation)
    tiny[1, 2] = 0.0
    tiny[1, 2, :2] = [1e-9, -2e-9]
    with pytest.raises(FeatureFileError, match=r"too small for float16 storage .*\['s2'\]"):
        write_features(tmp_path / "f.h5", tiny, ids, names, ATTRS, dtype=np.float16)
    # the same from torch tensors in float64 (cast to float32 before the check at first, review)
    import torch

    big = torch.from_numpy(x.astype(np.float64))
    big[1, 2, 0] = 1e39
    with pytest.raises(FeatureFileError, match=r"too large for float32 storage"):
        write_features(tmp_path / "f.h5", big, ids, names, ATTRS)
    with pytest.raises(FeatureFileError, match=r"too small for float32 storage"):
        write_features(tmp_path / "f.h5", torch.full((3, 7, 5), 1e-50, dtype=torch.float64),
                       ids, names, ATTRS)  # fmt: skip
    # values that fit are written as they were
    path = write_features(tmp_path / "ok.h5", x, ids, names, ATTRS, dtype=np.float16)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["features"][()], x.astype(np.float16))


# mutation audit of the guards (2026-12-06): gaps the suite let through
def test_an_import_that_drops_duplicates_keeps_each_kept_stimulus_own_token_count(tmp_path):
    """With stimuli.drop_duplicates the supplied file holds a dropped stimulus (a2): the
    copy's n_tokens are those of a, b, c (1, 2, 4), not shifted by one row (2, 4, 3 under the
    mutant), which the properties table and language dispersion read."""
    x = np.arange(1, 25, dtype=np.float32).reshape(1, 4, 6)
    attrs = {"model_key": "mine", "modality": "language"}
    src = write_features(
        tmp_path / "full.h5", x, ["a", "b", "a2", "c"], ["l0"], attrs, n_tokens=[1, 2, 3, 4]
    )
    dst = tmp_path / "results" / "mine.h5"
    import_features(src, dst, "mine", "language", ["a", "b", "c"], dropped={"a2"})
    with FeatureFile(dst) as out:
        assert out.stimulus_ids == ["a", "b", "c"]
        assert out.n_tokens().tolist() == [1, 2, 4]
        np.testing.assert_array_equal(out.layer(0), x[0][[0, 1, 3]])


def test_a_correct_supplied_abs_q95_in_another_row_order_is_not_warned_about(tmp_path, caplog):
    """A supplied file whose rows are in another order than the manifest, and whose abs_q95
    is right, imports without the 'its abs_q95 differs' warning (the mutant compared the
    file-order values with the manifest-order ones and warned for 2 of 3)."""
    x = np.stack([np.full((3, 4), v, np.float32) for v in (1.0, 2.0, 3.0)], axis=1)  # (3, 3, 4)
    attrs = {"model_key": "mine", "modality": "vision"}
    src = write_features(tmp_path / "mine.h5", x, ["c", "a", "b"], ["b0", "b1", "b2"], attrs)
    with h5py.File(src, "r") as f:
        assert f["abs_q95"][()].tolist() == [1.0, 2.0, 3.0]
    with caplog.at_level(logging.WARNING, logger="xmodal.features"):
        import_features(src, tmp_path / "out.h5", "mine", "vision", ["a", "b", "c"])
    assert "differs from the features'" not in caplog.text
    with FeatureFile(tmp_path / "out.h5") as out:
        assert out.abs_q95().tolist() == [2.0, 3.0, 1.0]


def test_a_stored_abs_q95_of_the_wrong_length_is_refused_when_opened(tmp_path):
    """An abs_q95 with one value too many (8 for 7 stimuli) was read as
    is, and the clamp threshold (its mean) took the extra value in, exit 0."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 5)).astype(np.float32)
    ids = [f"s{i}" for i in range(7)]
    path = write_features(tmp_path / "f.h5", x, ids, ["l0", "l1"], {"modality": "vision"})
    with h5py.File(path, "r+") as f:
        q = f["abs_q95"][()]
        del f["abs_q95"]
        f["abs_q95"] = np.append(q, 100.0).astype(np.float32)
    with pytest.raises(FeatureFileError, match=r"'abs_q95' has shape \(8,\), expected \(7,\)"):
        FeatureFile(path)


def test_validate_refuses_a_stored_abs_q95_that_is_not_finite(tmp_path):
    """Finite features with a NaN in the stored abs_q95 (which sets the
    alignment's clamp threshold) passed validate(), with layers scanned or not."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    ids = [f"s{i}" for i in range(5)]
    path = write_features(tmp_path / "f.h5", x, ids, ["l0", "l1"], {"modality": "vision"})
    with h5py.File(path, "r+") as f:
        f["abs_q95"][3] = np.nan
    for layers in (True, False):
        with (
            FeatureFile(path) as ff,
            pytest.raises(FeatureFileError, match=r"non-finite abs_q95 for stimuli \['s3'\]"),
        ):
            ff.validate(ids, layers=layers)
