"""Duplicate stimuli: planted duplicates are reported with their ids, and dropped only by rule.

Ground truth comes from a brute-force comparison of every pair written here (file bytes, decoded
pixels, captions), against ``find_duplicates``, which hashes.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from xmodal.stimuli import (
    StimulusError,
    drop_duplicates,
    find_duplicates,
    load_rgb,
    read_manifest,
    scan_images,
    write_manifest,
)


def _img(path: Path, seed: int, fmt: str = "PNG", **save: object) -> str:
    rgb = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, fmt, **save)
    return path.name


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """s0's image copied (s1, same bytes), re-encoded losslessly (s2: BMP, same pixels), and
    referenced again (s5: same file, same caption as s0); s3 shares s0's caption only;
    s6/s7 share an image and a caption; s4 and s8 are unique."""
    a = _img(tmp_path / "a.png", 0)
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    Image.open(tmp_path / "a.png").save(tmp_path / "a.bmp")
    rows = [
        ("s0", a, "a red cube"),
        ("s1", "a_copy.png", "another caption"),
        ("s2", "a.bmp", "a third caption"),
        ("s3", _img(tmp_path / "b.png", 1), "a red cube"),
        ("s4", _img(tmp_path / "c.png", 2), "unique"),
        ("s5", a, "a red cube"),
        ("s6", _img(tmp_path / "d.png", 3, compress_level=1), "twin"),
        ("s7", _img(tmp_path / "e.png", 3, compress_level=9), "twin"),
        ("s8", _img(tmp_path / "f.png", 4), "a red cube "),  # a trailing space: not identical
    ]
    df = pd.DataFrame(rows, columns=["stimulus_id", "image", "caption"])
    return write_manifest(df, tmp_path / "stimuli.tsv")


def _as_sets(table: pd.DataFrame, kind: str) -> set[frozenset[str]]:
    sub = table[table["kind"] == kind]
    return {frozenset(g["stimulus_id"]) for _, g in sub.groupby("group")}


def test_planted_duplicates_are_reported_with_their_ids(planted, caplog):
    df = read_manifest(planted)
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        dups = find_duplicates(df, planted.parent)
    assert list(dups.columns) == ["kind", "group", "stimulus_id"]
    assert _as_sets(dups, "image_bytes") == {frozenset({"s0", "s1", "s5"})}
    assert _as_sets(dups, "pixels") == {
        frozenset({"s0", "s1", "s2", "s5"}),
        frozenset({"s6", "s7"}),
    }
    assert _as_sets(dups, "caption") == {frozenset({"s0", "s3", "s5"}), frozenset({"s6", "s7"})}
    # groups numbered by first member, members in manifest order
    pix = dups[dups["kind"] == "pixels"]
    assert pix["group"].tolist() == [0, 0, 0, 0, 1, 1]
    assert pix["stimulus_id"].tolist() == ["s0", "s1", "s2", "s5", "s6", "s7"]
    assert "3 stimuli in 1 group(s) of identical image files: ['s0', 's1', 's5']" in caplog.text
    assert "6 stimuli in 2 group(s) of identical decoded images" in caplog.text
    assert "identical captions: ['s0', 's3', 's5']" in caplog.text


def test_drop_keeps_the_first_of_same_image_and_same_caption(planted, caplog):
    df = read_manifest(planted)
    dups = find_duplicates(df, planted.parent)
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        kept = drop_duplicates(df, dups)
    # s5 = s0 (same image, same caption); s7 = s6. s1, s2 (same image, other caption) and s3
    # (same caption, other image) are kept: different stimuli that happen to share one half
    assert kept["stimulus_id"].tolist() == ["s0", "s1", "s2", "s3", "s4", "s6", "s8"]
    assert "dropped 2 duplicate stimuli" in caplog.text and "'s5' (kept 's0')" in caplog.text
    assert drop_duplicates(df, dups, kinds=["image_bytes"])["stimulus_id"].tolist() == [
        "s0", "s2", "s3", "s4", "s6", "s7", "s8",
    ]  # fmt: skip
    assert drop_duplicates(df, dups, kinds=["caption"])["stimulus_id"].tolist() == [
        "s0", "s1", "s2", "s4", "s6", "s8",
    ]  # fmt: skip
    with pytest.raises(StimulusError, match=r"kinds must be a non-empty subset"):
        drop_duplicates(df, dups, kinds=["image"])
    with pytest.raises(StimulusError, match=r"not in the manifest \['s7'\]"):
        drop_duplicates(df[df["stimulus_id"] != "s7"], dups)


def test_against_brute_force_pairs(tmp_path):
    """40 stimuli drawn from 12 images (4 of them re-encoded losslessly) and 10 captions."""
    rng = np.random.default_rng(7)
    names = []
    for k in range(12):
        names.append(_img(tmp_path / f"i{k}.png", k))
        if k < 4:  # same pixels, other bytes
            names.append(_img(tmp_path / f"i{k}.bmp", k, fmt="BMP"))
    captions = [f"caption {k}" for k in range(10)]
    m = 40
    df = pd.DataFrame(
        {
            "stimulus_id": [f"{k:03d}" for k in range(m)],
            "image": [names[i] for i in rng.integers(0, len(names), m)],
            "caption": [captions[i] for i in rng.integers(0, len(captions), m)],
        }
    )
    write_manifest(df, tmp_path / "stimuli.tsv")
    df = read_manifest(tmp_path / "stimuli.tsv")
    dups = find_duplicates(df, tmp_path, workers=2)

    raw = [(tmp_path / p).read_bytes() for p in df["image"]]
    pix = [np.asarray(load_rgb(tmp_path / p)) for p in df["image"]]
    same = {
        "image_bytes": lambda i, j: raw[i] == raw[j],
        "pixels": lambda i, j: pix[i].shape == pix[j].shape and np.array_equal(pix[i], pix[j]),
        "caption": lambda i, j: df["caption"][i] == df["caption"][j],
    }
    ids = df["stimulus_id"].tolist()
    for kind, eq in same.items():
        # equality is transitive here, so the groups are the classes of pairs that compare equal
        classes: dict[int, set[str]] = {}
        for i, j in itertools.combinations(range(m), 2):
            if eq(i, j):
                root = min(k for k in range(i + 1) if eq(k, i))
                classes.setdefault(root, {ids[root]}).update({ids[i], ids[j]})
        assert _as_sets(dups, kind) == {frozenset(c) for c in classes.values()}, kind
    assert len(dups) > 0


def test_scan_table_is_reused_and_checked(planted):
    df = read_manifest(planted)
    scan = scan_images(df, planted.parent)
    assert list(scan.columns) == [
        "stimulus_id", "image", "format", "mode", "width", "height", "n_frames",
        "exif_orientation", "conversion", "bytes_sha256", "pixels_sha256",
    ]  # fmt: skip
    assert scan["format"].tolist()[:3] == ["PNG", "PNG", "BMP"]
    pd.testing.assert_frame_equal(
        find_duplicates(df, planted.parent, images=scan), find_duplicates(df, planted.parent)
    )
    with pytest.raises(StimulusError, match="does not list the manifest's stimuli"):
        find_duplicates(df, planted.parent, images=scan.iloc[::-1])


def test_no_duplicates_is_an_empty_table(tmp_path, caplog):
    rows = [(f"s{k}", _img(tmp_path / f"{k}.png", k), f"c{k}") for k in range(3)]
    df = pd.DataFrame(rows, columns=["stimulus_id", "image", "caption"])
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        dups = find_duplicates(df, tmp_path)
    assert dups.empty and list(dups.columns) == ["kind", "group", "stimulus_id"]
    assert caplog.text == ""
    pd.testing.assert_frame_equal(drop_duplicates(df, dups), df)


def test_the_kept_stimuli_are_numbered_from_0():
    """The manifest left after dropping duplicates has the index 0..n−1 of a manifest as read,
    not the dropped rows' gaps."""
    df = pd.DataFrame(
        {"stimulus_id": ["a", "b", "c"], "image": "x.png", "caption": ["p", "p", "q"]}
    )
    dups = pd.DataFrame(
        {"kind": ["caption", "caption"], "group": [0, 0], "stimulus_id": ["a", "b"]}
    )
    kept = drop_duplicates(df, dups, kinds=["caption"])
    assert kept["stimulus_id"].tolist() == ["a", "c"]
    assert kept.index.tolist() == [0, 1]
