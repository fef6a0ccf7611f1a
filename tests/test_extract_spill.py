"""Extractions too large for memory: features wait in a scratch file next to the output.

The spill path must give the same feature file as the in-memory path, leave no file behind on
success or failure, and refuse to start when the disk cannot hold it.
"""

from __future__ import annotations

import collections
import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import xmodal.extract._common as common
from xmodal.extract import SPILL_SUFFIX, extract_features
from xmodal.extract._common import FeatureAccumulator, SpilledFeatures
from xmodal.features import FeatureFile
from xmodal.io import DiskFullError


def _fill(acc: FeatureAccumulator, feats: np.ndarray, batches: list[np.ndarray]) -> None:
    for idx in batches:
        acc.add(torch.from_numpy(feats[idx]), idx)  # (B, n_layers, dim) rows of these stimuli


@settings(max_examples=40, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 30), st.integers(1, 6)),
    seed=st.integers(0, 2**32 - 1),
    contiguous=st.booleans(),
)
def test_spilled_equals_in_memory(tmp_path_factory, shape, seed, contiguous):
    """Batches in any order (vision: runs of consecutive stimuli; language: sorted by caption
    length, scattered) give the same array whether kept in memory or in the spill file."""
    n_layers, m, dim = shape
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((m, n_layers, dim)).astype(np.float32)
    order = np.arange(m) if contiguous else rng.permutation(m)
    cuts = np.sort(rng.choice(np.arange(1, m), size=min(m - 1, rng.integers(0, 5)), replace=False))
    batches = np.split(order, cuts)
    ids = [f"s{i}" for i in range(m)]
    names = [f"l{j}" for j in range(n_layers)]
    kw = {"model_name": "m", "layer_names": names, "stimulus_ids": ids}

    plain = FeatureAccumulator(n_layers, m, dim, **kw)
    _fill(plain, feats, batches)
    want = plain.result()

    spill = tmp_path_factory.mktemp("spill") / "f.spill"
    spill.touch()
    old = common.IN_MEMORY_FEATURE_BYTES
    common.IN_MEMORY_FEATURE_BYTES = -1  # every size spills
    try:
        acc = FeatureAccumulator(n_layers, m, dim, spill=spill, **kw)
    finally:
        common.IN_MEMORY_FEATURE_BYTES = old
    _fill(acc, feats, batches)
    got = acc.result()
    assert isinstance(got.features, SpilledFeatures) and got.features.shape == (n_layers, m, dim)
    assert spill.stat().st_size == 4 * n_layers * m * dim
    np.testing.assert_array_equal(np.asarray(got.features), want.features)
    np.testing.assert_array_equal(np.asarray(got.features), feats.transpose(1, 0, 2))
    for j, layer in enumerate(got.features):
        np.testing.assert_array_equal(layer, feats[:, j])
    np.testing.assert_array_equal(got.abs_q95, want.abs_q95)


@settings(max_examples=40, deadline=None)
@given(
    keys=st.lists(st.integers(0, 6), min_size=1, max_size=25),
    seed=st.integers(0, 2**32 - 1),
    spilled=st.booleans(),
)
def test_repeated_inputs_fill_every_row_of_their_group(tmp_path_factory, keys, seed, spilled):
    """Inputs that repeat (a caption's tokens, an image file) run once, at their first row, in
    batches of any order and size: every row gets its first row's features, bit for bit, in
    memory and in the spill file (copies land scattered, unlike the batch's own rows)."""
    from xmodal.extract._common import rows_by_first, spread_copies

    m, n_layers, dim = len(keys), 2, 3
    copies = rows_by_first(keys)
    assert sorted(i for group in copies.values() for i in group) == list(range(m))
    for first, group in copies.items():  # groups are the rows of one key, first row first
        assert group[0] == first and {keys[i] for i in group} == {keys[first]}
        assert first == keys.index(keys[first])
    rng = np.random.default_rng(seed)
    firsts = rng.permutation(np.fromiter(copies, dtype=np.int64))  # e.g. by caption length
    cuts = np.sort(
        rng.choice(np.arange(1, len(firsts)), size=min(len(firsts) - 1, 3), replace=False)
    )
    feats = rng.standard_normal((m, n_layers, dim)).astype(np.float32)  # only firsts' rows used
    kw = {"model_name": "m", "layer_names": ["a", "b"], "stimulus_ids": [f"s{i}" for i in range(m)]}
    spill = None
    if spilled:
        spill = tmp_path_factory.mktemp("spill") / "f.spill"
        spill.touch()
    old = common.IN_MEMORY_FEATURE_BYTES
    common.IN_MEMORY_FEATURE_BYTES = -1 if spilled else old
    try:
        acc = FeatureAccumulator(n_layers, m, dim, spill=spill, **kw)
    finally:
        common.IN_MEMORY_FEATURE_BYTES = old
    for rows in np.split(firsts, cuts):
        acc.add(*spread_copies(torch.from_numpy(feats[rows]), rows, copies))
    got = np.asarray(acc.result().features)
    first_of = {i: first for first, group in copies.items() for i in group}
    np.testing.assert_array_equal(got, feats[[first_of[i] for i in range(m)]].transpose(1, 0, 2))


def _datasets(path):
    with FeatureFile(path) as ff:
        return np.stack([ff.layer(i) for i in range(ff.n_layers)]), ff.attrs


@pytest.mark.parametrize("modality", ["language", "vision"])
def test_extract_features_through_the_spill_file(
    tmp_path, monkeypatch, caplog, tiny_lms, tiny_vits, tiny_manifest, modality
):
    """Same feature file through the spill file as in memory, for scattered batches (language,
    longest caption first) and in-order batches (vision); no scratch file is left, and one a
    killed job left is removed."""
    model = str(tiny_lms["llama"] if modality == "language" else tiny_vits["dinov2"])
    cfg = {"modality": modality, "id": model, "revision": None, "size_b": 0.0}
    kw = {"batch_size": 5, "num_workers": 0, "progress": False, "device": "cpu"}
    plain = extract_features("m", cfg, tiny_manifest, tmp_path / "plain" / "m.h5", **kw)

    out = tmp_path / "spilled" / "m.h5"
    out.parent.mkdir()
    stale = out.parent / f".{out.name}.killed.tmp{SPILL_SUFFIX}"
    stale.write_bytes(b"left by a killed job")
    monkeypatch.setattr(common, "IN_MEMORY_FEATURE_BYTES", -1)
    with caplog.at_level("INFO"):
        spilled = extract_features("m", cfg, tiny_manifest, out, **kw)
    assert "kept in" in caplog.text and SPILL_SUFFIX in caplog.text
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.h5"]  # stale and own scratch gone
    a, attrs_a = _datasets(plain)
    b, attrs_b = _datasets(spilled)
    np.testing.assert_array_equal(a, b)
    with FeatureFile(plain) as fa, FeatureFile(spilled) as fb:
        np.testing.assert_array_equal(fa.abs_q95(), fb.abs_q95())
        assert fa.stimulus_ids == fb.stimulus_ids and fa.layer_names == fb.layer_names
    assert {k: v for k, v in attrs_a.items() if k != "created"} == {
        k: v for k, v in attrs_b.items() if k != "created"
    }


def test_a_full_disk_fails_before_the_first_batch(tmp_path, monkeypatch, tiny_lms, tiny_manifest):
    """Too little free space for the feature file (and its spill file) fails at once, naming the
    model, the folder and the sizes; no batch runs and nothing is left behind."""
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "size_b": 0.0}
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(common.shutil, "disk_usage", lambda _: usage(10, 10, 100))
    added = []
    monkeypatch.setattr(FeatureAccumulator, "add", lambda self, *a: added.append(1))
    out = tmp_path / "f" / "llama.h5"
    with pytest.raises(DiskFullError, match=r"model llama: writing its features needs") as err:
        extract_features("llama", cfg, tiny_manifest, out, progress=False, device="cpu")
    # a small file in units that tell the two amounts apart ("needs 0.0 GiB … only 0.0 GiB")
    assert re.search(r"needs \d+\.\d [KM]iB in .* but only 0\.1 KiB are free", str(err.value))
    # only the mark of the failed attempt, which makes the workflow extract it again
    assert not added and [p.name for p in out.parent.iterdir()] == [".llama.h5.attempt"]


def test_a_write_error_in_the_spill_file_names_the_output(
    tmp_path, monkeypatch, tiny_lms, tiny_manifest
):
    """The disk filling up while features are spilled is reported as a full disk naming the
    output; neither the scratch file nor a feature file is left."""
    cfg = {"modality": "language", "id": str(tiny_lms["llama"]), "size_b": 0.0}
    monkeypatch.setattr(common, "IN_MEMORY_FEATURE_BYTES", -1)

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common.os, "pwrite", full)
    out = tmp_path / "f" / "llama.h5"
    match = r"disk full while writing scratch file .*llama\.h5"
    with pytest.raises(DiskFullError, match=match) as failure:
        extract_features("llama", cfg, tiny_manifest, out, progress=False, device="cpu")
    assert [p.name for p in out.parent.iterdir()] == [".llama.h5.attempt"]  # the mark alone
    assert failure.tb is not None  # the traceback (and its frames) still alive here:
    # no open descriptor keeps the unlinked file's space
    held = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.islink(f"/proc/self/fd/{fd}")]  # fmt: skip
    assert not [h for h in held if SPILL_SUFFIX in h], held


@pytest.mark.parametrize(("rule", "marked"), [("extract", True), ("import_features", True),
                                              ("gpa", False)])  # fmt: skip
def test_an_extraction_job_is_marked_from_its_first_line(tmp_path, rule, marked):
    """A job that fails before extract_features (its weights not in the hub cache, a bad
    config) or is killed early left no mark, and the next run said "Nothing to be done" (review).
    The scripts' _bootstrap, their first import, marks an extraction's or import's output."""
    import subprocess
    import sys

    from xmodal.attempts import attempt_marker

    out = tmp_path / "f" / "m.h5"
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    job = (
        f"types.SimpleNamespace(rule={rule!r}, threads=1, resources=types.SimpleNamespace(gpu=0),"
        f" output=types.SimpleNamespace(features={str(out)!r}))"
    )
    code = (
        f"import sys, types, __main__; sys.path.insert(0, {str(scripts)!r}); "
        f"__main__.snakemake = {job}; import _bootstrap"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert attempt_marker(out).is_file() is marked
