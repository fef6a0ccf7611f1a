"""Input-layer checks found by mutation testing: each test kills a plausible bug that the other
tests let through (a bad manifest accepted, a pixel value or a row changed, a config key ignored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_image_modes import _png16

from xmodal.config import (
    MIN_RANDOM,
    ConfigError,
    check_against_stimuli,
    check_config,
    resolve_layer,
)
from xmodal.io import read_table, write_table
from xmodal.stimuli import (
    StimulusError,
    convert_to_rgb,
    drop_duplicates,
    find_duplicates,
    load_rgb,
    read_manifest,
    write_manifest,
)


def _manifest(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    path = root / "stimuli.tsv"
    lines = ["stimulus_id\timage\tcaption", *("\t".join(r) for r in rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ============================================================================ the manifest
def test_a_folder_named_as_image_is_refused_when_the_manifest_is_read(tmp_path):
    """Bug guarded: the image check tests ``exists()`` instead of ``is_file()``, so a folder
    passes as an image and the error comes only mid-extraction."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    path = _manifest(tmp_path, [("s1", "a.png", "a cat"), ("s2", "sub", "a dog")])
    with pytest.raises(
        StimulusError, match=r"not a regular file \(a folder\?\).*line\(s\) \[3\].*s2"
    ):
        read_manifest(path)


@pytest.mark.parametrize("column", ["caption", "stimulus_id", "image"])
def test_write_manifest_refuses_a_missing_float_value(tmp_path, column):
    """Bug guarded: a float NaN (pandas' missing value) passes the number branch and is written
    as the text ``nan``: a caption 'nan' would reach the language models."""
    df = pd.DataFrame(
        {"stimulus_id": ["s1", "s2"], "image": ["a.png", "b.png"], "caption": ["a cat", "a dog"]}
    )
    df[column] = df[column].astype(object)
    df.loc[1, column] = float("nan")
    with pytest.raises(StimulusError, match=rf"row 1 .*column '{column}' is a missing value"):
        write_manifest(df, tmp_path / "m.tsv")
    assert not (tmp_path / "m.tsv").exists()


# ============================================================================== images
def test_mode_i_just_outside_16_bits_is_refused_and_the_top_of_16_bits_is_white():
    """Bug guarded: the 0..65535 bound of mode I off by one (65536 accepted), which
    ``v >> 8`` maps to 256 and uint8 wraps to 0: the brightest pixel turns black."""
    top = Image.fromarray(np.array([[0, 256, 65535]], dtype=np.int32), "I")
    rgb, _ = convert_to_rgb(top, "ok")
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 1, 255])
    over = Image.fromarray(np.array([[0, 256, 65536]], dtype=np.int32), "I")
    with pytest.raises(StimulusError, match=r"'over'.*mode I.*0\.\.65536"):
        convert_to_rgb(over, "over")


def test_float_overshoot_beyond_half_a_level_is_refused():
    """Bug guarded: a wider tolerance on [0, 1] (e.g. one 8-bit level) silently clips floats
    that overshoot by more than the stated half level."""
    ok = Image.fromarray(np.array([[-0.4 / 255, 0.5, 1 + 0.4 / 255]], dtype=np.float32), "F")
    rgb, _ = convert_to_rgb(ok, "ok")
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 128, 255])
    for bad in (1 + 0.7 / 255, -0.7 / 255):
        im = Image.fromarray(np.array([[0.5, bad]], dtype=np.float32), "F")
        with pytest.raises(StimulusError, match=r"'f'.*mode F"):
            convert_to_rgb(im, "f")


def test_a_black_16bit_rgba_png_is_refused(tmp_path):
    """Bug guarded: the 16-bit colour check skips RGBA, so an RGBA PNG holding 8-bit values
    in 16-bit samples reaches the models black."""
    a = np.random.default_rng(1).integers(0, 256, (5, 6, 4), dtype=np.uint16)
    (tmp_path / "dark.png").write_bytes(_png16(a, 6))
    with pytest.raises(StimulusError, match=r"'d'.*16-bit RGBA image.*black"):
        load_rgb(tmp_path / "dark.png", "d")


# ========================================================================== duplicates
def _dup_manifest(root: Path, images: dict[str, np.ndarray], captions: dict[str, str]) -> Path:
    for sid, a in images.items():
        Image.fromarray(a).save(root / f"{sid}.png")
    return _manifest(root, [(sid, f"{sid}.png", captions[sid]) for sid in images])


def test_same_pixel_bytes_in_another_shape_are_not_duplicates(tmp_path):
    """Bug guarded: the pixel digest leaves out the image size, so a 1 x 4 and a 2 x 2 image
    with the same bytes (and the same caption) count as one stimulus and one is dropped."""
    flat = np.arange(12, dtype=np.uint8).reshape(1, 4, 3)
    images = {"wide": flat, "square": flat.reshape(2, 2, 3)}
    path = _dup_manifest(tmp_path, images, {"wide": "a grid", "square": "a grid"})
    m = read_manifest(path)
    dups = find_duplicates(m, tmp_path)
    assert dups["kind"].tolist() == ["caption", "caption"]
    assert drop_duplicates(m, dups)["stimulus_id"].tolist() == ["wide", "square"]


# ============================================================================== tables
def test_columns_ending_in_id_stay_text(tmp_path):
    """Bug guarded: only the listed identifier columns kept as text, so a ``*_id`` column
    (``pair_id``) of numeric-looking ids is read as numbers: '007' and '7' both become 7."""
    ids = ["007", "7", "1.50", "1e3"]
    df = pd.DataFrame({"pair_id": ids, "value": [0.5, 1.0, 2.0, 3.0]})
    write_table(df, tmp_path / "t.tsv")
    got = read_table(tmp_path / "t.tsv")
    assert got["pair_id"].tolist() == ids
    assert got["value"].tolist() == [0.5, 1.0, 2.0, 3.0]


def test_a_true_false_column_with_a_missing_value_does_not_turn_it_into_false(tmp_path):
    """Bug guarded: a column of True/False with one missing value read as booleans, the
    missing one silently becoming False."""
    df = pd.DataFrame({"stimulus_id": ["a", "b", "c"], "flag": [True, None, False]})
    write_table(df, tmp_path / "t.tsv")
    assert (tmp_path / "t.tsv").read_text() == "stimulus_id\tflag\na\tTrue\nb\tNaN\nc\tFalse\n"
    got = read_table(tmp_path / "t.tsv")
    assert got["flag"].tolist() == ["True", "NaN", "False"]  # text, not [True, False, False]
    write_table(df.assign(flag=[True, True, False]), tmp_path / "u.tsv")
    assert read_table(tmp_path / "u.tsv")["flag"].tolist() == [True, True, False]


# ============================================================================== config
def _cfg() -> dict:
    vision = {"modality": "vision"}
    return {
        "dataset": "demo",
        "stimuli": {"source": "local"},
        "models": {"v1": vision, "v2": vision, "v3": vision, "lm": {"modality": "language"}},
        "analysis": {"knn_k": 2, "set_size": 8, "n_boot": 0, "drop_fraction": 0.25},
    }


@pytest.mark.parametrize(
    "key", ["n", "seed", "nuisance_beta", "train", "repo", "revision", "split"]
)
def test_a_falsy_value_of_another_sources_key_is_still_refused(key):
    """Bug guarded: the other-source check tests the value (``seed: 0``, ``train: false``,
    ``revision: ''``) instead of the key's presence, so such a key is silently ignored."""
    cfg = _cfg()
    check_config(cfg)
    cfg["stimuli"][key] = {"n": 0, "seed": 0, "train": False, "nuisance_beta": []}.get(key, "")
    with pytest.raises(ConfigError, match=rf"'stimuli\.{key}' is read only with"):
        check_config(cfg)


@pytest.mark.parametrize("key", ["-mae", ".mae", "_mae"])
def test_model_keys_must_start_with_a_letter_or_digit(key):
    """Bug guarded: the model-key pattern allows a leading '-', '.' or '_' (a hidden file, a
    command-line option as a wildcard value)."""
    cfg = _cfg()
    cfg["models"][key] = cfg["models"].pop("v1")
    with pytest.raises(ConfigError, match=rf"'models\.{key}'.*must match"):
        check_config(cfg)


def test_a_name_ending_in_a_newline_is_refused():
    """Bug guarded: the key pattern used with ``match``, whose ``$`` also matches before a
    trailing newline, so ``dataset: |`` with the name on the next line ("demo\\n") and a model
    key "v1\\n" passed and became path components and wildcard values."""
    import yaml

    cfg = _cfg()
    cfg["dataset"] = yaml.safe_load("dataset: |\n  demo\n")["dataset"]
    assert cfg["dataset"] == "demo\n"
    with pytest.raises(ConfigError, match=r"'dataset'"):
        check_config(cfg)
    cfg = _cfg()
    cfg["models"]["v1\n"] = cfg["models"].pop("v1")
    with pytest.raises(ConfigError, match=r"'models\.v1\n'.*must match"):
        check_config(cfg)


@pytest.mark.parametrize("gpu_model", ["a100\n", "a100-80gb", "a 100"])
def test_a_gpu_model_sbatch_would_not_take_is_refused(gpu_model):
    """Bug: ``extraction.gpu_model`` checked only by the schema's pattern, whose ``$`` lets
    "a100\\n" (YAML ``gpu_model: |``) through to sbatch's --gpus."""
    cfg = _cfg()
    cfg.setdefault("extraction", {})["gpu_model"] = gpu_model
    with pytest.raises(ConfigError, match=r"'extraction\.gpu_model'"):
        check_config(cfg)
    cfg["extraction"]["gpu_model"] = "a100_80gb"
    check_config(cfg)


@pytest.mark.parametrize(("n_boot", "ok"), [(0, True), (1, False), (99, False), (100, True)])
def test_n_boot_is_zero_or_at_least_min_boot(n_boot, ok):
    """Bug guarded: the lower bound of the refused range moved off 0, so ``n_boot: 1`` (an
    'interval' of one resample) is accepted."""
    cfg = _cfg()
    cfg["analysis"]["n_boot"] = n_boot
    if ok:
        check_config(cfg)
    else:
        with pytest.raises(ConfigError, match=rf"'analysis\.n_boot' \({n_boot}\)"):
            check_config(cfg)


def test_set_size_over_half_of_an_odd_number_of_stimuli_is_refused():
    """Bug guarded: half of the stimuli rounded up, so with 9 stimuli sets of 5 are accepted
    and the low and high sets share a stimulus."""
    cfg = _cfg()
    cfg["analysis"].update(set_size=5, knn_k=2, drop_fraction=0.2)
    with pytest.raises(ConfigError, match=r"'analysis\.set_size' \(5\).*9 stimuli.*at most 4"):
        check_against_stimuli(cfg, 9)
    cfg["analysis"]["set_size"] = 4
    check_against_stimuli(cfg, 9)


def test_drop_fraction_is_rounded_to_a_number_of_stimuli_not_truncated():
    """Bug guarded: ``int(f m)`` instead of ``round(f m)``: 0.006 of 100 stimuli (0.6, the drop
    sets' 1 stimulus) refused as dropping none; the count must match the one the analysis uses."""
    cfg = _cfg()
    cfg["analysis"]["drop_fraction"] = 0.006
    check_against_stimuli(cfg, 100)
    cfg["analysis"]["drop_fraction"] = 0.004
    with pytest.raises(ConfigError, match=r"drops 0 of the 100 stimuli and keeps 100"):
        check_against_stimuli(cfg, 100)


def test_resolve_layer_bounds():
    """Bug guarded: the upper bound of the layer index off by one (layer n of an n-layer model
    accepted, then an IndexError or the wrong layer)."""
    assert [resolve_layer(i, 4, "m.h5") for i in (-4, -1, 0, 3)] == [0, 3, 0, 3]
    for bad in (4, -5):
        with pytest.raises(ConfigError, match=rf"layer {bad} does not exist in m\.h5.*-4\.\.3"):
            resolve_layer(bad, 4, "m.h5")


@pytest.mark.parametrize("key", ["n_random", "drop_control"])
def test_fewer_than_20_random_sets_are_refused(key):
    """With 1 or 2 random sets, the drop summary counted drop sets "outside the random 95%
    interval" in 2 of 3 pairs of sets with no effect (100 sets: 0 and 1); at 19 and below a
    set drawn like them lies beyond every draw more often than 1 in 20."""
    cfg = _cfg()
    put = (lambda n: cfg["analysis"].update(n_random=n)) if key == "n_random" else (
        lambda n: cfg["analysis"].update(drop_control={"n_random": n})
    )  # fmt: skip
    put(MIN_RANDOM)
    check_config(cfg)
    put(MIN_RANDOM - 1)
    dotted = "analysis.n_random" if key == "n_random" else "analysis.drop_control.n_random"
    with pytest.raises(ConfigError, match=rf"'{dotted}' \(19\) is too few random sets"):
        check_config(cfg)


def test_a_bad_byte_names_the_stimulus_by_the_id_column_whatever_the_line_ends(tmp_path):
    """The UTF-8 error reads the stimulus from the header's stimulus_id column: first after a
    BOM, last before CRLF line ends; no such column, no stimulus named (mutation audit)."""
    path = tmp_path / "stimuli.tsv"
    path.write_bytes(b"\xef\xbb\xbfstimulus_id\timage\tcaption\ns1\ta.png\tcaf\xe9\n")
    with pytest.raises(StimulusError, match=r"line 2 \(stimulus 's1'\)"):
        read_manifest(path)
    path.write_bytes(b"image\tcaption\tstimulus_id\r\na.png\tcaf\xe9\ts1\r\n")
    with pytest.raises(StimulusError, match=r"line 2 \(stimulus 's1'\) is not"):
        read_manifest(path)
    path.write_bytes(b"image\tcaption\na.png\tcaf\xe9\n")
    with pytest.raises(StimulusError) as err:
        read_manifest(path)
    assert "(stimulus" not in str(err.value)
