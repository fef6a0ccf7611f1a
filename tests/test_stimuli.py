"""The stimulus manifest: validation errors and image decoding to RGB."""

from __future__ import annotations

import shutil

import pytest

from xmodal.stimuli import ImageDataset, StimulusError, read_manifest


@pytest.fixture
def manifest_copy(tmp_path, tiny_manifest):
    shutil.copytree(tiny_manifest.parent, tmp_path / "m")
    return tmp_path / "m" / "stimuli.tsv"


def _edit(path, fn):
    lines = path.read_text().splitlines()
    path.write_text("\n".join(fn(lines)) + "\n")


def test_reads_valid_manifest(tiny_manifest):
    df = read_manifest(tiny_manifest, verify_images=True)
    assert list(df.columns[:3]) == ["stimulus_id", "image", "caption"]
    assert len(df) == 12 and df["stimulus_id"].is_unique


def test_caption_na_is_text(manifest_copy):
    _edit(manifest_copy, lambda ls: ls[:2] + [ls[2].rsplit("\t", 1)[0] + "\tNA"] + ls[3:])
    assert read_manifest(manifest_copy)["caption"][1] == "NA"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda ls: ["id\timage\tcaption"] + ls[1:], r"missing column\(s\) \['stimulus_id'\]"),
        (lambda ls: ls + [ls[3]], r"duplicate stimulus ids \['stim-02'\].*lines \[4, 14\]"),
        (
            lambda ls: ls[:3] + [ls[3].rsplit("\t", 1)[0] + "\t  "] + ls[4:],
            r"empty caption on line\(s\) \[4\].*'stim-02'",
        ),
        (
            lambda ls: ls + ["stim-x\timg/nope.jpg\ta caption"],
            r"not found.*line\(s\) \[14\].*'stim-x'.*'img/nope.jpg'",
        ),
        (lambda ls: ls[:1], "no stimuli"),
    ],
)
def test_invalid_manifest_errors(manifest_copy, edit, match):
    _edit(manifest_copy, edit)
    with pytest.raises(StimulusError, match=match) as err:
        read_manifest(manifest_copy)
    assert str(manifest_copy) in str(err.value)


def test_undecodable_image(manifest_copy):
    df = read_manifest(manifest_copy)
    bad = manifest_copy.parent / df["image"][5]
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(StimulusError, match="line 7, stimulus 'stim-05'"):
        read_manifest(manifest_copy, verify_images=True)
    ds = ImageDataset(df, manifest_copy.parent)
    with pytest.raises(StimulusError, match="stimulus 'stim-05': cannot decode"):
        ds[5]


def test_images_converted_to_rgb_and_logged(tiny_manifest, caplog):
    df = read_manifest(tiny_manifest)
    ds = ImageDataset(df, tiny_manifest.parent, transform=lambda im: (im.mode, im.size))
    with caplog.at_level("INFO", logger="xmodal.stimuli"):
        items = [ds[i] for i in range(len(ds))]
    assert len(ds) == 12
    assert all(mode == "RGB" for (mode, _), _ in items)
    assert [i for _, i in items] == list(range(12))
    for sid, mode in [("stim-01", "L"), ("stim-02", "CMYK"), ("stim-03", "RGBA"), ("stim-04", "P")]:
        assert f"stimulus '{sid}': converting {mode} image" in caplog.text
    assert "stim-00" not in caplog.text
