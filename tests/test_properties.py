"""Stimulus properties on images and captions whose answer is known, token counts against the
tokenizer, and their correlation with dispersion against scipy."""

from __future__ import annotations

import logging
import re

import numpy as np
import pandas as pd
import pytest
import regex
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from xmodal import correlate
from xmodal.dispersion import stable_rank
from xmodal.features import FeatureFile, FeatureFileError, write_features
from xmodal.io import read_table, write_table
from xmodal.pipeline import (
    run_image_properties,
    run_property_correlations,
    run_stimulus_properties,
)
from xmodal.properties import (
    ANNOTATION_PREFIX,
    EDGE_SIDE,
    EDGE_THRESHOLD,
    IMAGE_PROPERTIES,
    NUMBER_LIKE,
    annotations,
    caption_words,
    check_annotations,
    colourfulness,
    edge_density,
    grey_entropy,
    image_properties,
    property_correlations,
    stimulus_properties,
)
from xmodal.stimuli import load_rgb, read_manifest, scan_images


# ---------------------------------------------------------------- one image
def _brute_sobel_density(grey: np.ndarray) -> float:
    """Sobel magnitude with mirrored borders ('reflect': the edge pixel repeated), by loops, in
    exact integers: g = √(gx² + gy²)/(4·255) > 0.1  ⇔  gx² + gy² > 102²."""
    assert EDGE_THRESHOLD == 0.1
    h, w = grey.shape
    x = grey.astype(np.int64)

    def at(i, j):
        i = -i - 1 if i < 0 else (2 * h - i - 1 if i >= h else i)
        j = -j - 1 if j < 0 else (2 * w - j - 1 if j >= w else j)
        return x[i, j]

    edges = 0
    for i in range(h):
        for j in range(w):
            gx = sum(
                wt * (at(i + di, j + 1) - at(i + di, j - 1)) for di, wt in ((-1, 1), (0, 2), (1, 1))
            )
            gy = sum(
                wt * (at(i + 1, j + dj) - at(i - 1, j + dj)) for dj, wt in ((-1, 1), (0, 2), (1, 1))
            )
            edges += gx * gx + gy * gy > 102 * 102
    return edges / (h * w)


def test_flat_grey_image_has_no_colour_edges_or_entropy():
    flat = Image.new("RGB", (300, 200), (128, 128, 128))
    assert colourfulness(flat) == 0.0
    assert edge_density(flat) == 0.0
    assert grey_entropy(flat) == 0.0


def test_pure_colour_and_known_colourfulness():
    red = np.zeros((10, 12, 3), dtype=np.uint8)
    red[..., 0] = 255
    # rg = 255, yb = 127.5 everywhere: no spread, mean term only
    assert colourfulness(red) == pytest.approx(0.3 * np.hypot(255, 127.5))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    rg = [int(p[0]) - int(p[1]) for row in img for p in row]
    yb = [(int(p[0]) + int(p[1])) / 2 - int(p[2]) for row in img for p in row]
    want = np.sqrt(np.var(rg) + np.var(yb)) + 0.3 * np.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2)
    assert colourfulness(img) == pytest.approx(want, rel=1e-12)


def test_checkerboard_edges_against_brute_force():
    side = EDGE_SIDE  # no resize at this size: the detector sees the pixels as drawn
    ii, jj = np.indices((side, side))
    board = np.where((ii // 8 + jj // 8) % 2 == 0, 255, 0).astype(np.uint8)
    img = Image.fromarray(np.stack([board] * 3, axis=-1), "RGB")
    density = edge_density(img)
    assert density > 0.3  # 2 edge pixels at every 8-pixel boundary, in both directions
    assert density == pytest.approx(_brute_sobel_density(board), abs=1e-12)
    # one vertical step: exactly the two columns either side of it
    step = np.zeros((side, side), dtype=np.uint8)
    step[:, side // 2 :] = 255
    assert edge_density(Image.fromarray(step).convert("RGB")) == pytest.approx(2 / side)


def test_a_pixel_at_the_edge_threshold_exactly_is_not_an_edge():
    """g > 0.1, in exact arithmetic: Sobel components (90, 48) give g = 102/1020 = 0.1, which
    floating point put above 0.1 at about half the grey levels (49 of the demo's 480 images
    were off by 1-4 pixels). Planted at every grey offset: never counted."""
    patch = np.array([[0, 0, 30], [0, 0, 15], [0, 24, 30]])  # centre: Sx = 90, Sy = 48
    for k in range(0, 226, 5):
        grey = np.full((EDGE_SIDE, EDGE_SIDE), k, np.uint8)
        grey[99:102, 99:102] = patch + k
        got = edge_density(np.dstack([grey] * 3))
        # every edge lies next to the patch: count them on a crop whose border is flat
        crop = grey[95:106, 95:106]
        want = _brute_sobel_density(crop) * crop.size / grey.size
        assert got == pytest.approx(want, abs=1e-15), k
    assert want == 0  # the tie is the only candidate, and it is not above 0.1


def test_edge_density_resizes_to_the_stated_side():
    ii, jj = np.indices((2 * EDGE_SIDE, 3 * EDGE_SIDE))
    board = np.where((ii // 32 + jj // 32) % 2 == 0, 255, 0).astype(np.uint8)
    big = Image.fromarray(board).convert("RGB")
    small = big.convert("L").resize((3 * EDGE_SIDE // 2, EDGE_SIDE), Image.Resampling.BILINEAR)
    assert edge_density(big) == pytest.approx(_brute_sobel_density(np.asarray(small)), abs=1e-12)


def test_entropy_of_known_histograms():
    half = np.zeros((8, 8, 3), dtype=np.uint8)
    half[:4] = 255
    assert grey_entropy(half) == pytest.approx(1.0)
    ramp = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3)
    assert grey_entropy(ramp) == pytest.approx(8.0)


@pytest.mark.parametrize(
    ("caption", "n"),
    [
        ("a red cube on a wooden table", 7),
        ("cat", 1),
        ("", 0),
        ("  Two dogs,   running!  ", 3),
        ("don't stop", 2),
        ("rock'n'roll", 1),  # any number of inner apostrophes join (two gave 2 words)
        ("l’enfant d’à côté", 3),  # typographic apostrophes join, accented letters count
        ("state-of-the-art 3D model", 6),
        ('"The Scream" by Munch (1893)', 5),
        ("— … !!", 0),
        # no spaces between Chinese or Japanese words: each ideograph or Hiragana is one (as
        # Unicode's word boundaries, UAX #29, count them; before, a whole sentence was 1 word)
        ("北京 is big", 4),
        ("一只狗坐在沙发上。", 8),
        ("ソファの上の犬", 5),  # ソファ (Katakana) | の | 上 | の | 犬
        # combining vowel signs belong to their word (before: 9 and 7 "words")
        ("कुत्ता सोफे पर बैठा है", 5),
        ("ஒரு நாய் சோபாவில்", 3),
        ("Une fille s\u0301", 3),  # a decomposed accent
        # emoji with a variation selector or zero-width joiners are no words
        ("\u2764\ufe0f love", 1),
        ("\U0001f468\u200d\U0001f469\u200d\U0001f467 family", 1),
    ],
)
def test_caption_words_exact(caption, n):
    assert caption_words(caption) == n


@settings(max_examples=300)
@given(
    st.text(
        st.characters(exclude_categories=("Mn", "Mc", "Me", "Cs", "Cn")).filter(
            lambda c: not regex.match(r"[\p{Han}\p{Hiragana}]", c)
        ),
        max_size=60,
    )
)
def test_caption_words_unchanged_for_text_without_marks_or_ideographs(text):
    """Text without combining marks, Han or Hiragana counts as it did with the standard
    library's \\w (runs of letters, digits, underscore; inner apostrophes joined). Unassigned
    code points are left out: ``regex`` may know a newer Unicode than Python's unicodedata."""
    assert caption_words(text) == len(re.findall(r"\w+(?:['’]\w+)*", text))


@given(st.lists(st.from_regex(r"[A-Za-z0-9]{1,8}", fullmatch=True), max_size=20), st.data())
def test_caption_words_counts_words_between_any_separators(words, data):
    seps = [data.draw(st.sampled_from([" ", "  ", ", ", " - ", "\u00a0", ". "])) for _ in words]
    text = "".join(w + s for w, s in zip(words, seps, strict=True))
    assert caption_words(text) == len(words)


# ---------------------------------------------------------------- tables


def test_image_properties_of_a_manifest(tiny_manifest):
    df = read_manifest(tiny_manifest)
    root = tiny_manifest.parent
    scan = scan_images(df, root)
    table = image_properties(df, root, scan, workers=2)
    assert list(table.columns) == ["stimulus_id", "property", "model", "value"]
    assert len(table) == len(df) * len(IMAGE_PROPERTIES)
    wide = table.pivot(index="stimulus_id", columns="property", values="value")
    for sid, img in zip(df["stimulus_id"], df["image"], strict=True):
        path = root / img
        with Image.open(path) as im:
            w, h = im.size
        rgb = load_rgb(path, sid)
        row = wide.loc[sid]
        assert row["image_pixels"] == w * h and row["aspect_ratio"] == pytest.approx(w / h)
        assert row["bytes_per_pixel"] == pytest.approx(path.stat().st_size / (w * h))
        assert row["colourfulness"] == pytest.approx(colourfulness(rgb))
        assert row["edge_density"] == pytest.approx(edge_density(rgb))
        assert row["entropy"] == pytest.approx(grey_entropy(rgb))
    # the pipeline step reads sizes from the stimuli report's table
    write_table(scan, tiny_manifest.parent / "images.tsv")
    out = tiny_manifest.parent / "props.tsv"
    run_image_properties(tiny_manifest, tiny_manifest.parent / "images.tsv", out)
    pd.testing.assert_frame_equal(read_table(out), table, check_dtype=False)


def test_token_counts_equal_the_tokenizer_and_reach_the_table(
    tiny_lms, tiny_manifest, captions, tmp_path
):
    from transformers import AutoTokenizer

    from xmodal.extract import extract_features

    paths = []
    for arch in ("bloom", "llama"):
        out = tmp_path / f"{arch}.h5"
        cfg = {"modality": "language", "id": str(tiny_lms[arch])}
        extract_features(arch, cfg, tiny_manifest, out, progress=False)
        tok = AutoTokenizer.from_pretrained(tiny_lms[arch])
        want = [len(tok(c)["input_ids"]) for c in captions]
        with FeatureFile(out) as f:
            np.testing.assert_array_equal(f.n_tokens(), want)
        paths.append(out)
    df = read_manifest(tiny_manifest)
    scan = scan_images(df, tiny_manifest.parent)
    write_table(image_properties(df, tiny_manifest.parent, scan), tmp_path / "images.tsv")
    run_stimulus_properties(
        tiny_manifest, tmp_path / "images.tsv", paths, ["bloom", "llama"], tmp_path / "p.tsv"
    )
    table = read_table(tmp_path / "p.tsv")
    tokens = table[table["property"] == "caption_tokens"]
    assert tokens["model"].tolist() == ["bloom"] * 12 + ["llama"] * 12
    with FeatureFile(paths[1]) as f:
        np.testing.assert_array_equal(tokens["value"].to_numpy()[12:], f.n_tokens())
    words = table[table["property"] == "caption_words"]
    assert words["value"].tolist() == [caption_words(c) for c in captions]
    assert (words["model"] == "").all()
    assert table["stimulus_id"].tolist()[:12] == df["stimulus_id"].tolist()


def test_a_supplied_file_without_token_counts_is_told_to_hold_them(tiny_manifest, tmp_path, caplog):
    """A supplied LLM file (models.<key>.features) without n_tokens: the warning named a
    re-extraction, but the model is never extracted, and deleting its copy imported the same
    file again (metamorphic audit). It names the supplied file and its config key."""
    from xmodal.features import import_features

    df = read_manifest(tiny_manifest)
    ids = df["stimulus_id"].tolist()
    feats = np.random.default_rng(0).normal(size=(2, len(ids), 4)).astype(np.float32)
    attrs = {"model_id": "lab/lm", "model_key": "lm", "modality": "language"}
    src = write_features(tmp_path / "mine.h5", feats, ids, ["e", "l0"], attrs)
    copy = tmp_path / "results" / "lm.h5"
    import_features(src, copy, "lm", "language", ids)
    scan = scan_images(df, tiny_manifest.parent)
    write_table(image_properties(df, tiny_manifest.parent, scan), tmp_path / "images.tsv")
    with caplog.at_level(logging.WARNING):
        run_stimulus_properties(tiny_manifest, tmp_path / "images.tsv", [copy], ["lm"],
                                tmp_path / "p.tsv")  # fmt: skip
    said = f"lm: the feature file supplied for it, {src.resolve()} (config key models.lm.features)"
    assert said in caplog.text, caplog.text
    assert "Add a dataset n_tokens" in caplog.text and "re-extract" not in caplog.text
    table = read_table(tmp_path / "p.tsv")
    assert np.isnan(table.loc[table["property"] == "caption_tokens", "value"]).all()


def test_token_counts_after_truncation(tiny_lms):
    from xmodal.extract.language import extract_language_features, load_language_model

    model, tok, _ = load_language_model(str(tiny_lms["llama"]))  # 48-token context
    long = " ".join(["a red cube on a wooden table"] * 20)
    res = extract_language_features(
        model, tok, [long, "cat"], stimulus_ids=["a", "b"], progress=False
    )
    assert res.n_tokens.tolist() == [48, len(tok("cat")["input_ids"])]


def test_feature_file_token_counts_are_optional_and_follow_the_ids(tmp_path):
    feats = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    attrs = {"model_key": "m", "modality": "language"}
    p = write_features(
        tmp_path / "t.h5", feats, ["x", "y", "z"], ["e", "l0"], attrs, n_tokens=[5, 7, 9]
    )
    with FeatureFile(p, expected_ids=["z", "x", "y"]) as f:
        assert f.n_tokens().tolist() == [9, 5, 7]
    q = write_features(tmp_path / "u.h5", feats, ["x", "y", "z"], ["e", "l0"], attrs)
    with FeatureFile(q) as f:
        assert f.n_tokens() is None
    for bad in ([1, 2], [1, -2, 3], [1.5, 2, 3]):
        with pytest.raises(FeatureFileError, match="n_tokens"):
            write_features(
                tmp_path / "b.h5", feats, ["x", "y", "z"], ["e", "l0"], attrs, n_tokens=bad
            )
        assert not (tmp_path / "b.h5").exists()


def test_missing_token_counts_are_nan_with_a_warning(caplog):
    man = pd.DataFrame({"stimulus_id": ["1", "01"], "image": ["a", "b"], "caption": ["a b", "c"]})
    img = pd.DataFrame(
        [(s, p, "", 1.0) for s in ("01", "1") for p in IMAGE_PROPERTIES],
        columns=["stimulus_id", "property", "model", "value"],
    )
    with caplog.at_level(logging.WARNING):
        table = stimulus_properties(man, img, {"lm": None, "lm2": np.array([3, 2])})
    assert "lm: the feature file records no token counts" in caplog.text
    tok = table[table["property"] == "caption_tokens"]
    assert np.isnan(tok[tok["model"] == "lm"]["value"]).all()
    assert tok[tok["model"] == "lm2"]["value"].tolist() == [3, 2]
    # image properties follow the manifest order, whatever the image table's order
    assert table[table["property"] == "entropy"]["stimulus_id"].tolist() == ["1", "01"]


# ---------------------------------------------------------------- the manifest's own columns
def _fmt(x: float, style: int) -> str:
    """A finite float written as people write numbers (none of them nan, inf or a comma)."""
    return [
        repr(x),
        f"{x:.6e}",
        f"  {x:.12g} ",
        f"{x:+.3f}",
        str(int(x)) if x.is_integer() else repr(x),
    ][style]


@given(
    st.lists(
        st.one_of(
            st.none(),
            st.tuples(
                st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), st.integers(0, 4)
            ),
        ),
        min_size=1,
        max_size=30,
    ),
    st.data(),
)
def test_numeric_manifest_columns_become_properties_with_their_values(cells, data):
    """A column of numbers (any usual notation, empty where unknown) is read back exactly as
    the numbers written; empty fields are NaN. One field that is not a number (a decimal
    comma, n/a, nan, inf, a word) leaves the column out, with a warning naming the column, the
    stimulus and the field."""
    ids = [f"{i:03d}" for i in range(len(cells))]
    fields = ["" if c is None else _fmt(*c) for c in cells]
    man = pd.DataFrame(
        {"stimulus_id": ids, "image": "x.png", "caption": "a b", "rating": fields, "kind": "cat"}
    )
    found = annotations(man)
    if all(c is None for c in cells):
        assert found == {}
        return
    assert list(found) == ["rating"]  # the text column is no property
    expected = [np.nan if c is None else float(_fmt(*c)) for c in cells]
    np.testing.assert_array_equal(found["rating"], expected)
    # the written number, read back: within the rounding of the notation used
    for got, c in zip(found["rating"], cells, strict=True):
        if c is not None:
            assert got == pytest.approx(c[0], rel=1e-6, abs=6e-4)

    bad = data.draw(
        st.sampled_from(["0,5", "n/a", "nan", "NaN", "inf", "-", "1_000", "0x1f", "1e999", "high"])
    )
    where = data.draw(st.integers(0, len(cells) - 1))
    man.loc[where, "rating"] = bad
    logger = logging.getLogger("xmodal.properties")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        assert "rating" not in annotations(man)
    finally:
        logger.removeHandler(handler)
    text = " ".join(r.getMessage() for r in records)
    if any(f.strip() for i, f in enumerate(man["rating"]) if i != where):  # numbers and text
        assert "manifest column 'rating'" in text and f"{ids[where]}: {bad!r}" in text, text
    elif NUMBER_LIKE.fullmatch(bad):  # the only field, a number in a form not read
        assert "manifest column 'rating' holds numbers in a form that is not read" in text, text
    else:  # text only: no numbers to lose
        assert text == ""


def test_annotation_columns_follow_the_built_in_properties_in_column_order():
    man = pd.DataFrame(
        {
            "stimulus_id": ["b", "a", "c"],
            "typicality": ["0.9", "", "0.1"],
            "image": ["i1", "i2", "i3"],
            "category": ["dog", "cat", "dog"],
            "caption": ["x", "y z", "w"],
            "entropy": ["3", "2", "1"],  # the name of a built-in property: kept apart
        }
    )
    img = pd.DataFrame(
        [(s, p, "", 1.0) for s in ("a", "b", "c") for p in IMAGE_PROPERTIES],
        columns=["stimulus_id", "property", "model", "value"],
    )
    table = stimulus_properties(man, img, {})
    props = list(dict.fromkeys(table["property"]))
    assert props == ["caption_words", *IMAGE_PROPERTIES, "manifest:typicality", "manifest:entropy"]
    typ = table[table["property"] == ANNOTATION_PREFIX + "typicality"]
    assert typ["stimulus_id"].tolist() == ["b", "a", "c"]
    np.testing.assert_array_equal(typ["value"], [0.9, np.nan, 0.1])
    assert (table.loc[table["property"] == "entropy", "value"] == 1.0).all()


def test_chosen_annotation_columns_are_exactly_those_and_must_be_numbers(tmp_path):
    """``analysis.annotations`` lists the columns: only those, in its order; a listed column
    that is missing, is a stimulus column, holds text only or mixes numbers with text is an
    error naming the config key, the manifest and the column (not a warning: it was asked
    for)."""
    from xmodal.config import ConfigError

    man = pd.DataFrame(
        {
            "stimulus_id": ["a", "b", "c"],
            "image": ["i1", "i2", "i3"],
            "caption": ["x", "y", "z"],
            "memorability": ["0.5", "0.7", ""],
            "typicality": ["1", "2", "3"],
            "category": ["dog", "cat", "dog"],
            "rating": ["1", "n/a", "2"],
        }
    )
    got = annotations(man, ["typicality", "memorability"])
    assert list(got) == ["typicality", "memorability"]
    np.testing.assert_array_equal(got["memorability"], [0.5, 0.7, np.nan])
    assert annotations(man, []) == {}
    assert list(annotations(man)) == ["memorability", "typicality"]  # rating: left out
    for columns, says in (
        (["typicality", "memorabilty"], "no column 'memorabilty' in the manifest"),
        (["caption"], "'caption' is not an annotation column"),
        (["category"], "manifest column 'category' holds no numbers"),
        (["rating"], "manifest column 'rating': 1 of its 3 filled fields are not finite numbers, "
                     "e.g. [\"b: 'n/a'\"] (1 in all)"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            annotations(man, columns)
        with pytest.raises(ConfigError, match=re.escape(f"'analysis.annotations' ({columns}), "
                                                        f"manifest {tmp_path}: {says}")):  # fmt: skip
            check_annotations(man, columns, tmp_path)
    check_annotations(man, None, tmp_path)  # every numeric column: nothing to check


def _annotation_logs(man: pd.DataFrame, columns=None) -> tuple[dict, list[logging.LogRecord]]:
    """:func:`annotations` of ``man`` and the records it logged (INFO and above)."""
    logger = logging.getLogger("xmodal.properties")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return annotations(man, columns), records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _column(fields: list[str]) -> pd.DataFrame:
    ids = [f"s{i:02d}" for i in range(len(fields))]
    return pd.DataFrame({"stimulus_id": ids, "image": "x.png", "caption": "a b", "col": fields})


@pytest.mark.parametrize(
    "fields",
    [
        ["87%", "12%", "", "100 %"],  # percentages (one unit, spaced or not)
        ["0,87", "0,5", "1,25"],  # decimal commas
        ["1,000", "12,500", "1 000 000"],  # digit groups
        ["−0.5", "−1", "−2.25"],  # a typographic minus (U+2212)
        ["12 px", "8px", "3 px"],
        ["20 °C", "18.5 °C", "-3°C"],
        ["$5", "$ 10", "$2.50"],
        ["3.5s", "12s", "0.25 s"],
        ["12 pixels", "1 pixel", "30 Pixels"],  # a unit of more than three letters (audit)
        ["3 items", "", "12 items"],
    ],
)
def test_a_column_of_numbers_in_another_form_is_left_out_with_a_warning(fields):
    """A measure written with a unit, a decimal comma or digit groups used to be read as a
    category and left out at info level: its column vanished from the properties unnoticed.
    Now a warning names the column, its fields and their stimuli (the same with one field per
    stimulus of them); chosen, it is an error saying the same."""
    man = _column(fields)
    found, records = _annotation_logs(man)
    assert found == {}
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in records]
    first = next(i for i, f in enumerate(fields) if f)
    assert warned[0].startswith("manifest column 'col' holds numbers in a form that is not read")
    assert f"s{first:02d}: {fields[first]!r}" in warned[0]
    assert "left out of the stimulus properties: write plain numbers" in warned[0]
    with pytest.raises(ValueError, match="manifest column 'col' holds numbers in a form that is"):
        annotations(man, ["col"])


@pytest.mark.parametrize(
    "fields",
    [
        ["0,87", "NA", "0,12", "0,5"],  # R's write.table(dec = ",") and its NA
        ["87%", "n/a", "12%"],
        ["12 px", "?", "3 px", "-"],
        ["0,87", "nan", "#N/A", "1,5", "missing"],
    ],
)
def test_numbers_in_another_form_with_missing_markers_are_warned_about(fields):
    """A column of numbers with a decimal comma (or a unit) and a written missing value
    ("NA", "n/a", "?", "-") was taken for a category: left out of the properties with an info
    line that said it "holds no numbers", and chosen, an error saying the same (audit). The
    missing markers do not make a measure a category: the warning names the column."""
    man = _column(fields)
    found, records = _annotation_logs(man)
    assert found == {}
    warned = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in records]
    assert warned[0].startswith("manifest column 'col' holds numbers in a form that is not read")
    with pytest.raises(ValueError, match="manifest column 'col' holds numbers in a form that is"):
        annotations(man, ["col"])
    # markers alone, or with words: still no property and no warning
    for other in (["NA", "n/a", "?"], ["dog", "NA", "cat"]):
        found, records = _annotation_logs(_column(other))
        assert found == {} and [r.levelname for r in records] == ["INFO"]


@pytest.mark.parametrize(
    "fields",
    [
        ["dog", "cat", ""],
        ["12A", "13B", "7C"],  # codes: a different letter each
        ["3 apples", "2 pears", "1 fig"],  # a different word each
        ["001.jpg", "002.jpg"],  # file names
        ["img_001", "img_002"],  # a prefix of letters: ids
        ["2024-01-05", "2024-02-11"],  # dates
        ["3-5", "2-4"],  # ranges
        ["12:30", "08:15"],  # times
        ["", "  "],
    ],
)
def test_a_column_of_text_is_no_property_and_no_warning(fields):
    found, records = _annotation_logs(_column(fields))
    assert found == {}
    assert [r.levelname for r in records] == ["INFO"], [r.getMessage() for r in records]
    assert records[0].getMessage() == "manifest column 'col' holds no numbers: not a property"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=20),
    st.sampled_from(["comma", "percent", "unit", "minus"]),
)
def test_any_numbers_written_in_another_form_warn(values, form):
    """Whatever the numbers, a column that writes them all in one other form is warned about
    (and a category of words with no digit never is)."""
    write = {
        "comma": lambda x: f"{abs(x):.3f}".replace(".", ","),
        "percent": lambda x: f"{abs(x):g}%",
        "unit": lambda x: f"{abs(x):.2f} ms",
        "minus": lambda x: f"−{abs(x):g}",
    }[form]
    found, records = _annotation_logs(_column([write(x) for x in values]))
    assert found == {}
    assert [r.levelname for r in records] == ["WARNING"], [r.getMessage() for r in records]


@pytest.mark.parametrize(
    ("fields", "warns"),
    [
        ([str(100 + 3 * i) for i in range(10)], True),  # rising whole numbers: ids
        ([f"{i}.0" for i in range(12)], True),  # row numbers written with a decimal point
        ([str(i) for i in range(9)], False),  # too few stimuli to tell
        ([str((7 * i) % 12) for i in range(12)], False),  # whole numbers, not rising
        ([str(i) for i in range(11)] + [""], False),  # one unknown: a measure
        ([f"{i + 0.5}" for i in range(12)], False),  # rising, not whole
        ([str(i // 2) for i in range(12)], False),  # repeated values
    ],
)
def test_a_column_like_ids_is_kept_with_a_warning(fields, warns):
    """With every numeric column chosen (``analysis.annotations: null``), a column of ids
    (whole numbers rising down the manifest) is analysed as a property, as before, with a
    warning saying so and how to leave it out; a column chosen by name is not warned about."""
    man = _column(fields)
    found, records = _annotation_logs(man)
    assert list(found) == ["col"]
    warned = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    if warns:
        assert warned == [
            "manifest column 'col' holds a whole number for every stimulus, rising down the "
            "manifest, like an id or a row number; it is analysed as a stimulus property. To "
            "analyse only the columns that measure something, list them in config key "
            "'analysis.annotations'"
        ]
    else:
        assert warned == []
    chosen, records = _annotation_logs(man, ["col"])
    assert list(chosen) == ["col"] and records == []


def test_annotation_correlation_uses_the_stimuli_that_have_a_value(tmp_path):
    """ρ of an annotation with empty fields equals scipy's over the stimuli that have one; n
    counts them."""
    rng = np.random.default_rng(2)
    m = 40
    ids = [f"s{j}" for j in range(m)]
    mean, pc1 = rng.gamma(2, 1, m), rng.normal(size=m)
    rating = np.round(mean + rng.normal(0, 1, m), 2)
    known = rng.uniform(size=m) > 0.3
    man = pd.DataFrame(
        {
            "stimulus_id": ids,
            "image": "x",
            "caption": "a",
            "rating": [f"{r}" if k else "" for r, k in zip(rating, known, strict=True)],
        }
    )
    img = pd.DataFrame(
        [(s, p, "", float(i)) for i, s in enumerate(ids) for p in IMAGE_PROPERTIES],
        columns=["stimulus_id", "property", "model", "value"],
    )
    corr = property_correlations(
        stimulus_properties(man, img, {}), _dispersion(ids, mean, pc1), 0, 0
    ).set_index(["property", "summary"])
    for summary, y in (("mean", mean), ("pc1", pc1)):
        row = corr.loc[("manifest:rating", summary)]
        ref = scipy.stats.spearmanr(rating[known], y[known])
        assert row["spearman_rho"] == pytest.approx(ref.statistic, abs=1e-12)
        assert row["n"] == known.sum()


def test_long_steps_log_their_progress(tiny_manifest, monkeypatch, caplog):
    """Decoding images, their properties and the correlations logged nothing until the end:
    about 8 minutes at 20,000 images, 5 at 16,384 stimuli with n_boot 1000 (audit)."""
    import threading

    from xmodal import logs

    monkeypatch.setattr(logs, "PROGRESS_EVERY_S", 0.0)
    df = read_manifest(tiny_manifest)
    n = len(df)
    with caplog.at_level(logging.INFO):
        scan = scan_images(df, tiny_manifest.parent, workers=2)
        table = image_properties(df, tiny_manifest.parent, scan, workers=2)
        ids = df["stimulus_id"].tolist()
        disp = _dispersion(ids, np.arange(n, dtype=float), np.arange(n, dtype=float)[::-1])
        property_correlations(table, disp, 0, 0)
    text = caplog.text
    groups = len(IMAGE_PROPERTIES)
    for what, total in (("images decoded", n), ("image properties", n),
                        ("correlations with dispersion (mean and PC1)", 2 * groups)):  # fmt: skip
        done = [int(k) for k in re.findall(rf"{re.escape(what)}: (\d+) of {total}, ", text)]
        assert sorted(done) == list(range(1, total)), (what, done)  # the last is the step's own
    # counted exactly from many threads
    progress = logs.Progress(logging.getLogger("t"), "x", 4000)
    threads = [threading.Thread(target=lambda: [progress.step() for _ in range(500)])
               for _ in range(8)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert progress.done == 4000


def _dispersion(ids, mean, pc1) -> pd.DataFrame:
    return pd.DataFrame(
        {"stimulus_id": ids, "position": range(len(ids)), "mean_dispersion": mean,
         "pc1_score": pc1, "rank_mean": stable_rank(mean), "rank_pc1": stable_rank(pc1)}
    )  # fmt: skip


def test_property_correlations_against_scipy(tmp_path):
    rng = np.random.default_rng(5)
    m, n_boot, seed = 50, 200, 3
    ids = [f"{j:02d}" for j in range(m)]
    mean, pc1 = rng.gamma(2, 1, m), rng.normal(size=m)
    edges = mean + rng.normal(0, 1, m)
    tokens = np.round(3 * mean + rng.normal(0, 2, m)) + 10  # ties, as counts have
    props = pd.concat(
        [
            pd.DataFrame({"stimulus_id": ids, "property": "edge_density", "model": "", "value": edges}),
            pd.DataFrame({"stimulus_id": ids, "property": "aspect_ratio", "model": "", "value": 1.0}),
            pd.DataFrame({"stimulus_id": ids, "property": "caption_tokens", "model": "lm", "value": tokens}),
            pd.DataFrame({"stimulus_id": ids, "property": "caption_tokens", "model": "old", "value": np.nan}),
            # a stimulus without dispersion (a dropped duplicate) is left out
            pd.DataFrame({"stimulus_id": ["zz"], "property": "edge_density", "model": "", "value": [9.0]}),
        ]
    )  # fmt: skip
    write_table(props, tmp_path / "p.tsv")
    write_table(_dispersion(ids, mean, pc1), tmp_path / "d.tsv")
    run_property_correlations(
        tmp_path / "p.tsv", tmp_path / "d.tsv", n_boot, seed, tmp_path / "c.tsv"
    )
    corr = read_table(tmp_path / "c.tsv").set_index(["property", "model", "summary"])
    assert len(corr) == 8
    idx = np.random.default_rng(seed).integers(0, m, size=(n_boot, m))
    for prop, model, x in (("edge_density", "", edges), ("caption_tokens", "lm", tokens)):
        for summary, y in (("mean", mean), ("pc1", pc1)):
            row = corr.loc[(prop, model, summary)]
            ref = scipy.stats.spearmanr(x, y)
            assert row["spearman_rho"] == pytest.approx(ref.statistic, abs=1e-12)
            assert row["p_value"] == pytest.approx(ref.pvalue, rel=1e-9)
            boot = [scipy.stats.spearmanr(x[i], y[i]).statistic for i in idx]
            lo, hi = np.nanquantile(boot, [0.025, 0.975])
            assert (row["ci_low"], row["ci_high"]) == pytest.approx((lo, hi), abs=1e-10)
            assert row["n"] == m and row["reason"] == ""
    flat = corr.loc[("aspect_ratio", "", "mean")]
    assert np.isnan(flat["spearman_rho"]) and flat["reason"] == "constant property"
    old = corr.loc[("caption_tokens", "old", "pc1")]
    assert np.isnan(old["spearman_rho"]) and "no token counts" in old["reason"]


def test_properties_must_cover_every_dispersed_stimulus():
    props = pd.DataFrame({"stimulus_id": ["a"], "property": "entropy", "model": "", "value": [1.0]})
    with pytest.raises(ValueError, match="no properties"):
        property_correlations(props, _dispersion(["a", "b"], [1, 2], [1, 2]), 10, 0)


def test_a_constant_resample_gives_nan_not_a_number():
    """A property that differs for only a few stimuli gives some constant resamples; each gives
    NaN (left out of an interval), the others scipy's ρ on the same resample."""
    from xmodal.correlate import bootstrap_coefficients

    rng = np.random.default_rng(3)
    x = np.zeros(40)
    x[:3] = [1.0, 2.0, 3.0]  # 37 stimuli alike: some resamples hold none of the three
    y = rng.normal(size=40)
    boot = bootstrap_coefficients(x, y, "spearman", 400, 0)
    draws = np.random.default_rng(0).integers(0, 40, (400, 40))
    constant = np.array([np.all(x[d] == x[d][0]) for d in draws])
    assert 0 < constant.sum() < 400
    assert np.isnan(boot[constant]).all()
    ref = [scipy.stats.spearmanr(x[d], y[d]).statistic for d in draws[~constant]]
    np.testing.assert_allclose(boot[~constant], ref, atol=1e-12)


def test_a_constant_pearson_resample_is_nan_whatever_its_float_mean():
    """x = 0.3 (36 times) and one 0.9: the float mean of a resample of 0.3s is off in the last
    bit, centring left ±1e-17 and Pearson gave r ≈ -3e-16 instead of NaN, which an interval
    then counted (its lower end was -1.5e-16 instead of 0.237)."""
    from xmodal.correlate import bootstrap_coefficients

    x = np.array([0.3] * 36 + [0.9])
    y = np.arange(37.0)
    boot = bootstrap_coefficients(x, y, "pearson", 2000, 0)
    draws = np.random.default_rng(0).integers(0, 37, (2000, 37))
    constant = np.array([np.all(x[d] == x[d][0]) for d in draws])
    assert 500 < constant.sum() < 1500
    assert np.isnan(boot[constant]).all()
    ref = [scipy.stats.pearsonr(x[d], y[d]).statistic for d in draws[~constant]]
    np.testing.assert_allclose(boot[~constant], ref, atol=1e-12)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_no_interval_when_fewer_than_ten_stimuli_differ_from_the_most_common_value(method):
    """A property that marks 1 of 100 stimuli, unrelated to y, had a 95% interval excluding 0 in
    77% of simulations (the percentile interval follows how many copies of that stimulus each
    resample holds). Below MIN_OUTSIDE_MODE stimuli off the most common value there is no
    interval, with the reason naming the variable; the estimate and p-value stay. At
    MIN_OUTSIDE_MODE the interval is computed; a y with few distinct values counts too."""
    from xmodal.correlate import MIN_OUTSIDE_MODE, correlation_ci

    rng = np.random.default_rng(5)
    y = rng.normal(size=60)
    for g in (1, MIN_OUTSIDE_MODE - 1, MIN_OUTSIDE_MODE):
        x = np.full(60, 2.5)
        x[:g] = rng.normal(size=g)
        out = correlation_ci(x, y, method=method, n_boot=200, names=("rating", "dispersion"))
        fn = scipy.stats.spearmanr if method == "spearman" else scipy.stats.pearsonr
        assert out["estimate"] == pytest.approx(fn(x, y).statistic, abs=1e-12)
        assert np.isfinite(out["p_value"])
        if g < MIN_OUTSIDE_MODE:
            assert np.isnan(out["ci_low"]) and np.isnan(out["ci_high"]) and out["n_boot"] == 0
            assert out["reason"] == (
                f"no interval: only {g} of 60 stimuli differ from the rating's most common value "
                f"(2.5), and a bootstrap interval needs {MIN_OUTSIDE_MODE}"
            )
        else:
            assert np.isfinite(out["ci_low"]) and out["n_boot"] == 200 and out["reason"] == ""
    x = rng.normal(size=60)
    y = np.r_[np.zeros(57), 1.0, 2.0, 3.0]
    out = correlation_ci(x, y, method=method, n_boot=200)
    assert out["reason"].startswith("no interval: only 3 of 60 stimuli differ from the y's")


def test_property_marking_few_stimuli_has_its_rho_but_no_interval():
    """Through property_correlations: a manifest column that marks 2 of 40 stimuli keeps ρ and
    p, and says why it has no interval."""
    ids = [f"s{i}" for i in range(40)]
    rng = np.random.default_rng(0)
    flag = np.zeros(40)
    flag[[4, 9]] = 1.0
    props = pd.DataFrame(
        {"stimulus_id": ids, "property": "manifest:flag", "model": "", "value": flag}
    )
    disp = _dispersion(ids, rng.random(40), rng.random(40))
    out = property_correlations(props, disp, 100, 0).set_index("summary")
    for summary, col in (("mean", "mean_dispersion"), ("pc1", "pc1_score")):
        row = out.loc[summary]
        ref = scipy.stats.spearmanr(flag, disp[col]).statistic
        assert row["spearman_rho"] == pytest.approx(ref, abs=1e-12)
        assert np.isnan(row["ci_low"]) and row["n_boot"] == 0
        assert row["reason"].startswith(
            "no interval: only 2 of 40 stimuli differ from the property's most common value (0)"
        )


def test_a_stimulus_with_y_nan_is_left_out():
    """Stimuli are kept where x *and* y are finite: ``isfinite(x)`` alone would keep the two
    with y NaN (n 40, not 38)."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal(40), rng.standard_normal(40)
    y[[3, 17]] = np.nan
    out = correlate.correlation_ci(x, y, n_boot=50, seed=0)
    ok = np.isfinite(y)
    assert out["n"] == 38
    assert out["estimate"] == pytest.approx(
        scipy.stats.spearmanr(x[ok], y[ok]).statistic, abs=1e-12
    )
    assert np.isfinite(out["ci_low"])


def test_resamples_drawn_in_blocks_are_all_drawn(monkeypatch):
    """Blocks of 3 resamples give the 10 drawn at once: a step past each block's end
    (``done += step + 1``) would skip resamples and return fewer."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal(30), rng.standard_normal(30)
    whole = correlate.bootstrap_coefficients(x, y, "pearson", 10, 0)
    monkeypatch.setattr(correlate, "_BLOCK_ELEMS", 100)  # blocks of 3 resamples
    blocked = correlate.bootstrap_coefficients(x, y, "pearson", 10, 0)
    assert blocked.shape == (10,)
    np.testing.assert_allclose(blocked, whole, atol=1e-14)


def test_reason_names_both_constant_variables():
    props = pd.DataFrame(
        {"stimulus_id": list("abcd"), "property": "entropy", "model": "", "value": 2.0}
    )
    out = property_correlations(props, _dispersion(list("abcd"), [1, 1, 1, 1], [0, 0, 0, 0]), 10, 0)
    assert set(out["reason"]) == {"constant property and dispersion"}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=3, max_size=6),
    st.lists(st.integers(0, 3), min_size=3, max_size=6),
)
def test_the_exact_spearman_p_counts_pairings_in_exact_arithmetic(a, b):
    """The exact p (n ≤ 8) from scipy compared permuted ρ with a tolerance relative to the
    observed ρ, none at ρ = 0: pairings at ±1e-17 fell on the wrong side and gave p 0.95 or
    0.97 where the exact p is 1 (audit). Against every pairing in fractions: the permuted
    covariance of the average ranks (the variances do not change with the pairing)."""
    import itertools
    from fractions import Fraction

    from xmodal.correlate import correlation_ci

    n = min(len(a), len(b))
    x, y = np.array(a[:n], float), np.array(b[:n], float)
    if len(set(a[:n])) < 2 or len(set(b[:n])) < 2:
        return  # constant: no p
    rx = [Fraction(r).limit_denominator(4) for r in scipy.stats.rankdata(x)]
    ry = [Fraction(r).limit_denominator(4) for r in scipy.stats.rankdata(y)]
    mx, my = sum(rx) / n, sum(ry) / n

    def cov(order):
        return sum((rx[i] - mx) * (ry[j] - my) for i, j in enumerate(order))

    observed = cov(range(n))
    covs = [cov(p) for p in itertools.permutations(range(n))]
    greater = Fraction(sum(c >= observed for c in covs), len(covs))
    less = Fraction(sum(c <= observed for c in covs), len(covs))
    want = float(min(Fraction(1), 2 * min(greater, less)))
    assert correlation_ci(x, y, method="spearman", n_boot=0)["p_value"] == pytest.approx(want)


def test_an_exact_rho_of_zero_has_p_one():
    """The audit's cases: ρ exactly 0 (with and without ties) on 5 stimuli: p is 1."""
    from xmodal.correlate import correlation_ci

    for x, y in (
        ([1, 2, 2, 0, 1], [1, 4, 2, 3, 5]),
        ([1, 2, 2, 0, 1], [2, 1, 5, 3, 4]),
        ([0, 1, 2, 3, 4], [2, 3, 4, 5, 1]),
    ):
        for method in ("spearman", "pearson"):
            out = correlation_ci(np.array(x, float), np.array(y, float), method=method, n_boot=0)
            if method == "spearman":
                assert out["estimate"] == pytest.approx(0, abs=1e-15)
            assert out["p_value"] == 1.0, (x, y, method, out)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_few_stimuli_get_the_exact_permutation_p_value(method):
    """scipy's approximation gave p = 0 for ρ = 1 on 3 stimuli (every pairing is one of 3! =
    6, two of which reach |ρ| = 1: p = 1/3), and 6.7e-5 against 6.0e-4 on 8 tied values. Up
    to EXACT_P_MAX_N stimuli the p-value is counted over all n! pairings, brute force here."""
    import itertools

    from xmodal.correlate import EXACT_P_MAX_N, correlation_ci

    def coefficient(a, b):
        if method == "spearman":
            a, b = scipy.stats.rankdata(a), scipy.stats.rankdata(b)
        return np.corrcoef(a, b)[0, 1]

    out = correlation_ci([1.0, 2.0, 3.0], [1.0, 5.0, 9.0], method=method, n_boot=0)
    assert out["estimate"] == pytest.approx(1.0) and out["p_value"] == pytest.approx(1 / 3)
    rng = np.random.default_rng(3)
    for n in (4, 6, EXACT_P_MAX_N):
        x = rng.integers(0, 4, n).astype(float)  # ties
        y = x + rng.integers(0, 3, n)
        r = coefficient(x, y)
        ys = y[np.array(list(itertools.permutations(range(n))))]  # every pairing, one per row
        xr = x
        if method == "spearman":
            xr, ys = scipy.stats.rankdata(x), scipy.stats.rankdata(ys, axis=1)
        xc, yc = xr - xr.mean(), ys - ys.mean(axis=1, keepdims=True)
        perms = yc @ xc / np.sqrt((xc @ xc) * np.einsum("ij,ij->i", yc, yc))
        # two-sided as scipy's permutation tests: twice the smaller one-sided p
        tol = 1e-12 * abs(r)
        want = min(1.0, 2 * min(np.mean(perms <= r + tol), np.mean(perms >= r - tol)))
        got = correlation_ci(x, y, method=method, n_boot=0)
        assert got["p_value"] == pytest.approx(want, rel=1e-9), n
    x = rng.standard_normal(EXACT_P_MAX_N + 1)
    y = x + rng.standard_normal(x.size)  # above: scipy's own p-value, as before
    ref = scipy.stats.spearmanr(x, y) if method == "spearman" else scipy.stats.pearsonr(x, y)
    assert correlation_ci(x, y, method=method, n_boot=0)["p_value"] == ref.pvalue


def test_a_perfect_rank_order_on_many_stimuli_gets_a_permutation_bound_not_zero():
    """From 9 stimuli on scipy's t approximation gave p = 0 for |ρ| = 1 (the docs promised 0
    only below 1e-308). No permutation p is below 2/n!, the exact p of a perfect order without
    ties (both orders of n! pairings): brute force at 9, the bound at 30, unchanged elsewhere."""
    import itertools
    import math

    from xmodal.correlate import correlation_ci

    x = np.arange(9.0)
    ys = x[np.array(list(itertools.permutations(range(9))))]
    xc, yc = x - x.mean(), ys - ys.mean(axis=1, keepdims=True)
    perms = yc @ xc / np.sqrt((xc @ xc) * np.einsum("ij,ij->i", yc, yc))
    exact = np.mean(np.abs(perms) >= 1 - 1e-12)
    for y in (x**3, -np.exp(x)):  # monotone: ρ = ±1
        got = correlation_ci(x, y, method="spearman", n_boot=0)
        assert abs(got["estimate"]) == 1 and got["p_value"] == pytest.approx(exact, rel=1e-9)
        assert scipy.stats.spearmanr(x, y).pvalue == 0  # what was reported
    x30 = np.arange(30.0)
    assert correlation_ci(x30, x30, method="spearman", n_boot=0)["p_value"] == pytest.approx(
        2 / math.factorial(30), rel=1e-9
    )
    y = x30.copy()
    y[[3, 4]] = y[[4, 3]]  # one swap: the approximation's 2.9e-44 is below any permutation p
    assert correlation_ci(x30, y, method="spearman", n_boot=0)["p_value"] >= 2 / math.factorial(
        30
    ) * (1 - 1e-9)
    # with ties more pairings share each ρ: one tied pair at 9 (brute force over the midranks),
    # two groups of 5 at 10 (exact 2/C(10, 5) = 0.0079; the bound of no ties gave 5.5e-7)
    xt = np.array([0.0, 0, 1, 2, 3, 4, 5, 6, 7])
    rt = scipy.stats.rankdata(xt)
    yc = rt[np.array(list(itertools.permutations(range(9))))]
    yc = yc - yc.mean(axis=1, keepdims=True)
    xc = rt - rt.mean()
    rhos = yc @ xc / np.sqrt((xc @ xc) * np.einsum("ij,ij->i", yc, yc))
    exact = np.mean(np.abs(rhos) >= 1 - 1e-12)
    got = correlation_ci(xt, xt, method="spearman", n_boot=0)["p_value"]
    assert got == pytest.approx(exact, rel=1e-9)  # 2!/9!: the two orders of the tied pair
    binary = np.repeat([0.0, 1.0], 5)
    got = correlation_ci(binary, binary, method="spearman", n_boot=0)["p_value"]
    assert got == pytest.approx(2 / math.comb(10, 5), rel=1e-9)  # both orders reach |ρ| = 1
    # the Pearson p is the t distribution's (exact for normal data): unchanged
    assert (
        correlation_ci(x30, x30, method="pearson", n_boot=0)["p_value"]
        == scipy.stats.pearsonr(x30, x30).pvalue
    )


@pytest.mark.parametrize(
    ("x_groups", "y_groups"),
    [((1,) * 9, (4, 5)), ((3, 3, 3), (3, 3, 3)), ((2, 7), (3, 6)), ((2, 2, 2, 3), (3, 3, 3)),
     ((1, 1, 7), (2, 7)), ((1,) * 9, (1,) * 9)],
)  # fmt: skip
def test_the_p_floor_is_the_smallest_permutation_p_with_ties(x_groups, y_groups):
    """The floor was ∏t!/n! of the variable with more ties: a lower bound, 2–4× below the
    smallest p any pairing gives where both variables have ties or the reverse order reaches
    the same |ρ| (review). It is now that smallest p: over all 9! pairings, the share whose
    |ρ| reaches the largest |ρ| any pairing has, or the other end's where it is smaller."""
    import itertools

    from xmodal.correlate import smallest_permutation_p

    x = np.repeat(np.arange(len(x_groups), dtype=float), x_groups)
    y = np.repeat(np.arange(len(y_groups), dtype=float), y_groups)
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    yc = ry[np.array(list(itertools.permutations(range(9))))]
    yc, xc = yc - yc.mean(axis=1, keepdims=True), rx - rx.mean()
    rho = np.abs(yc @ xc / np.sqrt((xc @ xc) * np.einsum("ij,ij->i", yc, yc)))
    # the p of each pairing: the share of pairings at its |ρ| or beyond
    smallest = min(np.mean(rho >= r - 1e-9) for r in np.unique(rho.round(9))[-3:])
    assert smallest_permutation_p(x, y) == pytest.approx(smallest, rel=1e-9)
    assert smallest_permutation_p(y, x) == pytest.approx(smallest, rel=1e-9)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 3), min_size=3, max_size=7),
    st.lists(st.integers(0, 3), min_size=7, max_size=7),
)
def test_the_p_floor_is_the_smallest_permutation_p_for_any_ties(xs, ys):
    """Against every pairing of n ≤ 7 values with ties drawn at random (the 9! cases above fix
    the structures)."""
    import itertools

    from xmodal.correlate import smallest_permutation_p

    x, y = np.array(xs, float), np.array(ys[: len(xs)], float)
    if len(set(xs)) < 2 or len(set(y)) < 2:
        return  # a constant variable has no correlation (correlation_ci says so)
    rx, ry = scipy.stats.rankdata(x), scipy.stats.rankdata(y)
    yc = ry[np.array(list(itertools.permutations(range(len(x)))))]
    yc, xc = yc - yc.mean(axis=1, keepdims=True), rx - rx.mean()
    rho = np.abs(yc @ xc / np.sqrt((xc @ xc) * np.einsum("ij,ij->i", yc, yc)))
    smallest = np.mean(rho >= rho.max() - 1e-9)
    # the smallest p of any pairing is the share at the largest |ρ|
    assert smallest_permutation_p(x, y) == pytest.approx(smallest, rel=1e-9)


def _sobel_density(grey: np.ndarray) -> float:
    """Edge density written from docs/method.md: Sobel of the grey levels with the border
    mirrored (d c b a | a b c d), an edge where Sx² + Sy² > 102² (g > 0.1 of 4·255)."""
    x = np.pad(grey.astype(np.int64), 1, mode="symmetric")

    def at(di: int, dj: int) -> np.ndarray:
        return x[1 + di : x.shape[0] - 1 + di, 1 + dj : x.shape[1] - 1 + dj]

    sx = (at(-1, 1) - at(-1, -1)) + 2 * (at(0, 1) - at(0, -1)) + (at(1, 1) - at(1, -1))
    sy = (at(1, -1) - at(-1, -1)) + 2 * (at(1, 0) - at(-1, 0)) + (at(1, 1) - at(-1, 1))
    return float(np.mean(sx * sx + sy * sy > 102 * 102))


def test_edge_density_against_the_documented_recipe():
    """A 224-px grey image as it is; larger ones resized (Pillow bilinear) so that the shorter
    side is 224 px, the other side rounded (305 × 200 → 342 × 224). A threshold of 4·256
    instead of 4·255, a 256-px side, and a truncated 341 passed every test (mutation audit)."""
    grey = np.random.default_rng(0).integers(0, 40, (224, 224)).astype(np.uint8)
    assert edge_density(np.dstack([grey] * 3)) == _sobel_density(grey)
    for (h, w), cell, size in (((448, 672), 20, (336, 224)), ((200, 305), 7, (342, 224))):
        ii, jj = np.indices((h, w))
        board = np.where((ii // cell + jj // cell) % 2 == 0, 255, 0).astype(np.uint8)
        small = Image.fromarray(board).resize(size, Image.Resampling.BILINEAR)
        got = edge_density(Image.fromarray(board).convert("RGB"))
        assert got == _sobel_density(np.asarray(small)), (h, w)


def test_numbers_of_the_documented_forms_are_read():
    """docs/method.md, ``manifest:<column>``: ``.5`` is a number, and a field of spaces is an
    empty field (NaN), not text; each of them once made the column be left out with a
    warning (mutation audit)."""
    for fields, want in ((["-0.25", ".5", "1e-3"], [-0.25, 0.5, 1e-3]),
                         (["1", "   ", "2"], [1.0, np.nan, 2.0])):  # fmt: skip
        found, records = _annotation_logs(_column(fields))
        assert list(found) == ["col"] and records == []
        np.testing.assert_array_equal(found["col"], want)


def test_a_three_letter_unit_is_a_number_in_another_form():
    """``12 sec`` (a unit of 3 letters, like ``12 px``) is a measure: the column is left out
    with the warning, not taken for a category of text at info level."""
    found, records = _annotation_logs(_column(["12 sec", "3 sec", "40 sec"]))
    assert found == {}
    assert [r.levelname for r in records] == ["WARNING"], [r.getMessage() for r in records]
    assert "holds numbers in a form that is not read" in records[0].getMessage()


def test_a_plural_s_is_not_taken_from_a_two_letter_unit():
    """``ms`` and ``m`` are two units (a plural ``s`` is dropped from units of more than two
    letters only): the column is a category, at info level, not one measure (mutation)."""
    found, records = _annotation_logs(_column(["3 ms", "5 m", "7 ms"]))
    assert found == {}
    assert [r.levelname for r in records] == ["INFO"], [r.getMessage() for r in records]


def test_the_warning_counts_the_filled_fields():
    """``1 of its 2 filled fields``: an empty field is not counted as filled."""
    found, records = _annotation_logs(_column(["1", "", "n/a"]))
    assert found == {}
    assert (
        records[0]
        .getMessage()
        .startswith(
            "manifest column 'col': 1 of its 2 filled fields are not finite numbers, "
            "e.g. [\"s02: 'n/a'\"] (1 in all)"
        )
    )


def test_image_pixels_are_the_size_as_stored(tmp_path):
    """image_pixels, aspect ratio and bytes per pixel use the stored size (4200 × 300), not the
    size after load_rgb's reduction of a side over 4096 px."""
    path = tmp_path / "wide.png"
    Image.fromarray(np.zeros((300, 4200, 3), np.uint8)).save(path)
    man = pd.DataFrame({"stimulus_id": ["w"], "image": ["wide.png"], "caption": ["c"]})
    t = image_properties(man, tmp_path).set_index("property")["value"]
    assert t["image_pixels"] == 1_260_000.0
    assert t["aspect_ratio"] == 14.0
    assert t["bytes_per_pixel"] == pytest.approx(path.stat().st_size / 1_260_000)


def test_dispersion_is_matched_to_properties_by_stimulus_id():
    """A dispersion table listing the stimuli in another order: ρ is scipy's on the values
    matched by id (taken by row order, it was −0.04 instead of 0.92)."""
    rng = np.random.default_rng(3)
    n = 30
    ids = [f"s{i}" for i in range(n)]
    xs = rng.standard_normal(n)
    ys = xs + 0.5 * rng.standard_normal(n)
    props = pd.DataFrame({"stimulus_id": ids, "property": "entropy", "model": "", "value": xs})
    disp = _dispersion(ids, ys, ys).iloc[::-1]
    corr = property_correlations(props, disp, 0, 0).set_index("summary")
    want = scipy.stats.spearmanr(xs, ys).statistic
    assert corr.loc["mean", "spearman_rho"] == pytest.approx(want, abs=1e-12)
    assert corr.loc["pc1", "spearman_rho"] == pytest.approx(want, abs=1e-12)


def test_tables_of_other_stimuli_or_shapes_are_refused():
    """An image table from another manifest and token counts that are not one per stimulus
    (shape (n, 1)) are refused with messages that say so."""
    man = pd.DataFrame({"stimulus_id": ["a", "b"], "image": "x", "caption": ["one", "two"]})

    def images(ids):
        rows = [(s, p, "", 1.0) for s in ids for p in IMAGE_PROPERTIES]
        return pd.DataFrame(rows, columns=["stimulus_id", "property", "model", "value"])

    with pytest.raises(ValueError, match=r"list different stimuli; rerun .*rule image_properties"):
        stimulus_properties(man, images(["a", "z"]), {})
    with pytest.raises(ValueError, match="^lm: 2 token counts for 2 stimuli$"):
        stimulus_properties(man, images(["a", "b"]), {"lm": np.array([[3], [4]])})


def test_only_token_counts_are_said_to_need_re_extraction():
    """An image property that is NaN for every stimulus (model "") is not a feature file without
    token counts: only a model's rows get that reason."""
    ids = [f"s{i}" for i in range(12)]
    nan = np.full(12, np.nan)
    props = pd.concat(
        [
            pd.DataFrame({"stimulus_id": ids, "property": "entropy", "model": "", "value": nan}),
            pd.DataFrame(
                {"stimulus_id": ids, "property": "caption_tokens", "model": "lm", "value": nan}
            ),
        ]
    )
    disp = _dispersion(ids, np.arange(12.0), np.arange(12.0))
    corr = property_correlations(props, disp, 0, 0).set_index(["property", "summary"])
    assert "token counts" not in corr.loc[("entropy", "mean"), "reason"]
    assert "token counts" in corr.loc[("caption_tokens", "mean"), "reason"]


def test_grey_of_a_ycbcr_image_is_the_grey_of_its_rgb():
    """The grey image is Pillow's L of the RGB image (docs/method.md, ``edge_density``); a
    YCbCr image's own L (its Y channel) differs by a grey level."""
    rng = np.random.default_rng(0)
    ycc = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("YCbCr")
    grey = np.asarray(ycc.convert("RGB").convert("L"))
    p = np.bincount(grey.reshape(-1), minlength=256) / grey.size
    p = p[p > 0]
    assert grey_entropy(ycc) == pytest.approx(-(p * np.log2(p)).sum(), abs=1e-12)
