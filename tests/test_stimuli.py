"""The stimulus manifest: its one format (read, write, round trip), validation errors, decoding."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xmodal import io as xio
from xmodal import stimuli as xstim
from xmodal.logs import forward_to
from xmodal.stimuli import (
    DECODED_IMAGES,
    ImageDataset,
    StimulusError,
    check_images_decode,
    image_file_digests,
    manifest_stamp,
    read_manifest,
    write_manifest,
    write_manifest_stamp,
)


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


# ======================================================================= the manifest format
# One reader, one rule: one stimulus per line, fields split on tabs, no quoting, text kept as is.
HEADER = "stimulus_id\timage\tcaption"


def _manifest(tmp_path, body: str, header: str = HEADER, newline: str = "\n", bom: bool = False):
    """Write a manifest whose rows all point at one image; ``body`` lines use ``\\n``."""
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "a.png")
    text = (header + "\n" + body).replace("\n", newline)
    path = tmp_path / "stimuli.tsv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def test_caption_starting_with_a_quote_keeps_its_quotes(tmp_path):
    # before: CSV quoting read '"The Scream" by Munch' as 'The Scream by Munch'
    body = 's1\ta.png\t"The Scream" by Munch\ns2\ta.png\t""\ns3\ta.png\t\'single\' "double"\n'
    df = read_manifest(_manifest(tmp_path, body))
    assert df["caption"].tolist() == ['"The Scream" by Munch', '""', "'single' \"double\""]


def test_unbalanced_quote_does_not_swallow_the_following_rows(tmp_path):
    # before: s2 and s3 vanished into the caption of s1, which ran on to the closing quote in s3
    body = 's1\ta.png\t"open quote\ns2\ta.png\tplain\ns3\ta.png\tclose" quote\ns4\ta.png\tlast\n'
    df = read_manifest(_manifest(tmp_path, body))
    assert df["stimulus_id"].tolist() == ["s1", "s2", "s3", "s4"]
    assert df["caption"].tolist() == ['"open quote', "plain", 'close" quote', "last"]


@pytest.mark.parametrize(
    "body, match",
    [
        # before: a pandas ParserError (one line) or TypeError (every line), naming nothing
        ("s1\ta.png\tone\ns2\ta.png\ttwo\t\n", r"line 3, stimulus_id 's2' has 4 .* header has 3"),
        ("s1\ta.png\tone\t\ns2\ta.png\ttwo\t\n", r"line 2, stimulus_id 's1' has 4.*lines: \[2, 3\]"),
        ("s1\ta.png\tone\ttab\n", r"line 2, stimulus_id 's1' has 4 .*a tab inside a field"),
        # before: "line 3, stimulus_id 'caption'", a piece of s1's caption taken for an id
        ("s1\ta.png\tbroken\ncaption\ns2\ta.png\tok\n",
         r"line 3 has 1 .*caption of the line before it \(line 2, stimulus_id 's1'\)"),
        ('s0\ta.png\tok\ns1\ta.png\t"a cat\nsitting on a mat"\n',
         r"line 4 has 1 .*\(line 3, stimulus_id 's1'\).*opens a quote this line closes: the file "
         r"was written with CSV quoting"),
        ("s1\ta.png\tone\ns2\ta.png\n", r"line 3, stimulus_id 's2' has 2 .*a missing field\?"),
        ("s1\ta.png\tone\n\ns2\ta.png\ttwo\n", r"empty line\(s\) \[3\] between stimuli"),
        ("s1\ta.png\tone\rtwo\n", r"line\(s\) \[2\] contain a carriage return"),
        ("s1\ta.png\tone\n   \ns2\ta.png\ttwo\n", r"empty line\(s\) \[3\] between stimuli"),
        # before: accepted here, then h5py's "VLEN strings do not support embedded NULLs" once
        # the model had run, naming nothing
        ("s1\ta.png\tone\ns\x002\ta.png\ttwo\n", r"id\(s\) \['s\\x002'\].*line\(s\) \[3\].*NUL"),
        # before: Python's bare "ValueError: embedded null byte", naming no file or line
        ("s1\ta.png\tone\ns2\ta\x00.png\ttwo\n",
         r"image path\(s\) on line\(s\) \[3\] hold a NUL .*\['s2'\].*\['a\\x00\.png'\]"),
        ("s1\ta.png\t\u200b \u2060\n", r"empty caption on line\(s\) \[2\]"),
        ("\u200b\ta.png\tone\n", r"empty stimulus_id on line\(s\) \[2\]"),
        # marks with nothing to mark and blank letters show nothing either
        ("s1\ta.png\tone\ns2\ta.png\t\ufe0f\u0301\u3164\u2800\n",
         r"empty caption on line\(s\) \[3\]"),
        ("s1\ta.png\tone\nstimulus_id\timage\tcaption\ns2\ta.png\ttwo\n",
         r"line 3 repeats the header \(two manifests joined\?\)"),
        ("s1\ta.png\tone\n\ufeffstimulus_id\timage\tcaption\n",
         r"line 3 repeats the header"),
    ],
    ids=["trailing_tab", "trailing_tab_everywhere", "tab_in_caption", "newline_in_caption",
         "csv_quoted_newline", "missing_field", "empty_line_inside", "bare_cr", "spaces_line_inside", "nul_in_id", "nul_in_image",
         "invisible_caption",
         "invisible_id", "marks_only_caption", "header_again", "header_again_with_bom"],
)  # fmt: skip
def test_malformed_lines_are_errors_naming_the_line(tmp_path, body, match):
    path = _manifest(tmp_path, body)
    with pytest.raises(StimulusError, match=match) as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}: ")


def test_an_image_path_with_a_nul_is_named_without_the_image_checks_too(tmp_path):
    """Readers that skip the image checks (the gallery) would meet Python's bare ValueError."""
    path = _manifest(tmp_path, "s1\ta.png\tone\ns2\ta\x00.png\ttwo\n")
    with pytest.raises(StimulusError, match=r"stimuli\.tsv: image path\(s\) on line\(s\) \[3\]"):
        read_manifest(path, check_images=False)


@pytest.mark.parametrize(
    "header, match",
    [
        (HEADER + "\t", r"empty column name at position\(s\) \[4\] \(a trailing tab\?\)"),
        (HEADER + "\tcaption", r"names column\(s\) \['caption'\] more than once"),
        ("stimulus_id\timage\tCaption ", r"missing column\(s\) \['caption'\].*differ in case"),
    ],
)
def test_bad_header_is_an_error(tmp_path, header, match):
    with pytest.raises(StimulusError, match=match):
        read_manifest(_manifest(tmp_path, "s1\ta.png\tone\n", header=header))


def test_ids_are_text(tmp_path):
    """``007``, ``7``, ``7.0``, ``1.50``, ``NA``, ``null`` and `` 7`` are seven ids, kept as written."""
    ids = ["007", "7", "7.0", "1.50", "NA", "null", " 7"]
    body = "".join(f"{s}\ta.png\tcaption {k}\n" for k, s in enumerate(ids))
    df = read_manifest(_manifest(tmp_path, body))
    assert df["stimulus_id"].tolist() == ids
    assert all(isinstance(s, str) for s in df["stimulus_id"])


def test_crlf_bom_trailing_empty_lines_and_extra_columns(tmp_path):
    body = "s1\ta.png\tone\t0.10\ns2\ta.png\ttwo \t1e3\n\n\n"
    path = _manifest(tmp_path, body, header=HEADER + "\tclutter", newline="\r\n", bom=True)
    df = read_manifest(path)
    assert list(df.columns) == ["stimulus_id", "image", "caption", "clutter"]
    assert df["caption"].tolist() == ["one", "two "] and df["clutter"].tolist() == ["0.10", "1e3"]


def test_doubled_bom_and_trailing_lines_of_spaces_are_ignored(tmp_path):
    path = _manifest(tmp_path, "s1\ta.png\tone\n  \n \n", bom=True)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # a BOM added twice
    df = read_manifest(path)
    assert df["stimulus_id"].tolist() == ["s1"] and df["caption"].tolist() == ["one"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_manifest_is_named(tmp_path, encoding):
    """Excel's "Unicode Text" is UTF-16 (with or without a byte-order mark)."""
    path = _manifest(tmp_path, "s1\ta.png\tone\n")
    path.write_bytes(path.read_text(encoding="utf-8").encode(encoding))
    with pytest.raises(
        StimulusError, match=r"stimuli.tsv: the manifest is UTF-16.*iconv -f utf-16"
    ):
        read_manifest(path)


@pytest.mark.parametrize(
    ("magic", "kind"),
    [(b"PK\x03\x04", "a zip file"), (b"\xd0\xcf\x11\xe0", "an .xls"), (b"\x1f\x8b", "gzip")],
)
def test_a_spreadsheet_or_compressed_manifest_is_named(tmp_path, magic, kind):
    """An .xlsx saved as stimuli.tsv was "line 1 is not valid UTF-8 ... iconv -f latin1", advice
    that gives garbage."""
    path = tmp_path / "stimuli.tsv"
    path.write_bytes(magic + b"\x00\x01binary")
    with pytest.raises(StimulusError, match=rf"stimuli.tsv: the manifest is {kind}.*not text"):
        read_manifest(path)


def _read_warnings(tmp_path, caplog, body: str) -> tuple[pd.DataFrame, str]:
    """The manifest of ``body`` as read, and the warnings reading it logged (those alone)."""
    return _read_warnings_of(_manifest(tmp_path, body), caplog)


def test_garbled_and_quote_wrapped_captions_are_warned_about(tmp_path, caplog):
    """UTF-8 decoded as Windows-1252 and saved again (an Excel round trip) and captions wrapped
    in quotes (a spreadsheet's export of a field with a comma) reach the language models as
    written: read as they are, with a warning naming the lines; plain captions warn nothing."""
    body = ("s1\ta.png\ta café with “quotes”\ns2\ta.png\ta cafÃ© with â€œquotesâ€\x9d\n"
            's3\ta.png\t"a dog, sitting"\ns4\ta.png\tSão Paulo Â\xa0at night\n')  # fmt: skip
    df, warned = _read_warnings(tmp_path, caplog, body)
    assert df["caption"][2] == '"a dog, sitting"'  # kept as written
    assert "the captions of 2 stimuli hold UTF-8 text decoded as Windows-1252" in warned
    assert "lines [3, 5], e.g. stimulus 's2'" in warned
    assert "the captions of 1 stimuli are wrapped in double quotes" in warned
    assert "lines [4], e.g. stimulus 's3'" in warned
    assert _read_warnings(tmp_path, caplog, "s1\ta.png\tÂge, São Paulo, “x” — y\n")[1] == ""


def test_a_windows_1252_manifest_gets_advice_that_keeps_its_quotes(tmp_path, caplog):
    """Excel on Windows saves tab-delimited text as Windows-1252: the UTF-8 error's advice was
    ``iconv -f latin1``, which turns its curly quotes and dashes into invisible C1 control
    characters (U+0093 …) that then reached the tokenizer unsaid. The advice is cp1252, which
    gives the real characters; a caption holding C1 controls is warned about by line."""
    text = HEADER + "\ns1\ta.png\t“A dog” – café\n"
    path = _manifest(tmp_path, "")  # and its image
    path.write_bytes(text.encode("cp1252"))
    with pytest.raises(StimulusError, match=r"line 2 \(stimulus 's1'\).*iconv -f cp1252 -t utf-8"):
        read_manifest(path)
    path.write_text(path.read_bytes().decode("cp1252"), encoding="utf-8")  # the advice
    df, warned = _read_warnings_of(path, caplog)
    assert df["caption"][0] == "“A dog” – café" and warned == ""
    path.write_text(text.encode("cp1252").decode("latin1"), encoding="utf-8")  # -f latin1
    df, warned = _read_warnings_of(path, caplog)
    assert df["caption"][0] == "\x93A dog\x94 \x96 café"  # kept as written, with a warning
    assert "the captions of 1 stimuli hold invisible C1 control characters" in warned
    assert "iconv -f cp1252 -t utf-8" in warned and "lines [2], e.g. stimulus 's1'" in warned


def _read_warnings_of(path: Path, caplog) -> tuple[pd.DataFrame, str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xmodal.stimuli"):
        df = read_manifest(path)
    return df, caplog.text


def test_captions_not_in_nfc_are_warned_about(tmp_path, caplog):
    """A decomposed accent ('e' + U+0301, as macOS file names have it) is another token sequence
    for byte-level tokenizers than 'é': read as written, with a warning naming the lines; the
    composed spelling (and text without accents) warns nothing."""
    body = "s1\ta.png\ta caf\u00e9\ns2\ta.png\ta cafe\u0301\ns3\ta.png\tplain\n"
    df, warned = _read_warnings(tmp_path, caplog, body)
    assert df["caption"][1] == "a cafe\u0301"  # kept as written
    assert "the captions of 1 stimuli are not in Unicode's composed form (NFC)" in warned
    assert "lines [3], e.g. stimulus 's2'" in warned
    assert _read_warnings(tmp_path, caplog, "s1\ta.png\ta caf\u00e9, 北京, कुत्ता\n")[1] == ""


def test_csv_quoted_captions_are_refused(tmp_path):
    """pandas' ``to_csv(sep="\t")`` quotes a caption with a quote in it; read verbatim, the
    language models would see ``\"\"\"The Scream\"\" by Munch\"``. The same table written by
    ``write_manifest`` reads back as it was."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    captions = ["plain", '"The Scream" by Munch', 'a "quoted" word', '"', '""']
    df = pd.DataFrame({"stimulus_id": [f"s{k}" for k in range(5)], "image": "a.png",
                       "caption": captions})  # fmt: skip
    df.to_csv(tmp_path / "stimuli.tsv", sep="\t", index=False)
    raw = (tmp_path / "stimuli.tsv").read_text().splitlines()
    assert raw[2].endswith('\t"""The Scream"" by Munch"')  # what pandas wrote
    with pytest.raises(StimulusError, match=r"stimulus 's1' on line 3 is CSV-quoted") as err:
        read_manifest(tmp_path / "stimuli.tsv")
    # '"' and '""' are quoted too ('""""' and '""""""'), and named
    assert "4 caption(s) in all, on line(s) [3, 4, 5, 6]" in str(err.value)
    # the quoted file read without unquoting (the docs' recipe for result tables): write_manifest
    # names how to read it, not "write it with write_manifest", which it is (audit)
    quoted = pd.read_csv(tmp_path / "stimuli.tsv", sep="\t", dtype=str, quoting=csv.QUOTE_NONE)
    with pytest.raises(
        StimulusError, match=r"\(not written\): the caption of stimulus 's1'"
    ) as err:
        write_manifest(quoted, tmp_path / "new.tsv")
    assert "read that file with CSV quoting, pandas' default" in str(err.value)
    assert "write_manifest" not in str(err.value) and not (tmp_path / "new.tsv").exists()
    back = read_manifest(write_manifest(df, tmp_path / "stimuli.tsv"))
    assert back["caption"].tolist() == captions
    # quoting everything (csv.QUOTE_ALL or QUOTE_NONNUMERIC) quotes the header and the paths
    df.to_csv(tmp_path / "stimuli.tsv", sep="\t", index=False, quoting=csv.QUOTE_ALL)
    with pytest.raises(StimulusError, match=r"wrapped in quotes: the file was written with CSV"):
        read_manifest(tmp_path / "stimuli.tsv")
    body = "\n".join(['s1\t"a.png"\tone', "s2\ta.png\ttwo"])
    with pytest.raises(StimulusError, match=r"line\(s\) \[2\].*paths wrapped in quotes"):
        read_manifest(_manifest(tmp_path, body))


def test_columns_in_any_order(tmp_path):
    df = read_manifest(
        _manifest(tmp_path, "one\ta.png\ts1\n", header="caption\timage\tstimulus_id")
    )
    assert df.loc[0, "stimulus_id"] == "s1" and df.loc[0, "caption"] == "one"


# ---------------------------------------------------------------- write -> read, byte-identical
# adversarial text: quotes (balanced or not), CSV/NA spellings, spaces, unicode (combining marks,
# RTL, emoji, a BOM) and the characters that str.splitlines() would treat as line breaks
_NASTY = ['"', "'", '""', ",", ";", "#", "\\", "NA", "null", "nan", " ", "\u00a0", "\ufeff",
          "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\x00", "é", "e\u0301",
          "\u05d0", "👩‍🔬", "\u200b"]  # fmt: skip


def _visible(text: str) -> bool:
    """Shows something: a character that is neither whitespace nor a control or format one,
    nor a mark with nothing to mark (Mn, Me), nor a blank letter (Hangul fillers, blank
    Braille)."""
    blank = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}
    return any(
        not ch.isspace() and ch not in blank
        and unicodedata.category(ch) not in ("Cc", "Cf", "Mn", "Me")
        for ch in text
    )  # fmt: skip


def is_csv_quoted(text: str) -> bool:
    """As csv.writer quotes a field with a quote in it (read_manifest refuses such captions)."""
    inner = text[1:-1]
    doubled = inner.replace('""', '"').replace('"', '""')
    return len(text) >= 4 and text[0] == text[-1] == '"' and '""' in inner and inner == doubled


_TEXT = st.lists(
    st.one_of(
        st.sampled_from(_NASTY),
        st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\r\n"),
    ),
    min_size=1,
    max_size=20,
).map("".join)
_IDS = st.one_of(
    st.from_regex(r"0{0,3}[0-9]{1,4}", fullmatch=True),  # 007, 7, 0007
    st.floats(allow_nan=True, allow_infinity=True).map(str),  # 1.5, nan, inf, -0.0
    st.decimals(allow_nan=False, allow_infinity=False, places=2).map(str),  # 1.50
    st.sampled_from(["NA", "N/A", "null", "None", "NaN", "TRUE", "false", "#N/A", "-", '"7"']),
    _TEXT,
).filter(lambda s: _visible(s) and "\x00" not in s)
_CAPTIONS = st.one_of(
    _TEXT,
    st.sampled_from(['"The Scream" by Munch', '"unbalanced', 'ends with "', '"', "it's"]),
    st.tuples(_TEXT, st.integers(100, 3000)).map(lambda t: t[0] * t[1]),  # very long
).filter(lambda s: _visible(s) and not is_csv_quoted(s))


@st.composite
def _manifests(draw):
    ids = draw(st.lists(_IDS, min_size=1, max_size=12, unique=True))
    m = len(ids)
    columns = {
        "stimulus_id": ids,
        "image": ["a.png"] * m,
        "caption": draw(st.lists(_CAPTIONS, min_size=m, max_size=m)),
        "extra": draw(st.lists(st.one_of(st.just(""), _TEXT), min_size=m, max_size=m)),
    }
    order = draw(st.permutations(list(columns)))
    return pd.DataFrame({c: columns[c] for c in order})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=_manifests())
def test_write_then_read_is_byte_identical(tmp_path_factory, df):
    folder = tmp_path_factory.mktemp("rt")
    Image.new("RGB", (2, 2)).save(folder / "a.png")
    path = write_manifest(df, folder / "stimuli.tsv")
    back = read_manifest(path)
    assert list(back.columns) == list(df.columns)
    for col in df.columns:
        assert [v.encode("utf-8") for v in back[col]] == [v.encode("utf-8") for v in df[col]], col


@pytest.mark.parametrize(
    "col, value, match",
    [
        ("caption", "a\tb", r"row 1 \(line 3, stimulus_id 's2'\), column 'caption' contains a tab"),
        ("caption", "a\nb", r"row 1 .* column 'caption' contains a LF"),
        ("stimulus_id", "s\r2", r"row 1 .*, column 'stimulus_id' contains a CR"),
        ("extra", None, r"row 1 .* column 'extra' is a missing value"),
        ("stimulus_id", "s1", r"duplicate stimulus ids \['s1'\]"),
        ("caption", " ", r"empty caption on line\(s\) \[3\]"),
    ],
)
def test_write_manifest_refuses_what_cannot_be_read_back(tmp_path, col, value, match):
    df = pd.DataFrame(
        {"stimulus_id": ["s1", "s2"], "image": ["a.png"] * 2, "caption": ["c1", "c2"],
         "extra": ["x", "y"]}
    )  # fmt: skip
    df[col] = df[col].astype(object)
    df.loc[1, col] = value
    with pytest.raises(StimulusError, match=match):
        write_manifest(df, tmp_path / "stimuli.tsv")
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_write_manifest_numbers_as_text(tmp_path):
    """The demo writes its planted ``clutter`` as floats: written with ``str``, read back as text."""
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    df = pd.DataFrame(
        {"stimulus_id": ["d0", "d1"], "image": ["a.png"] * 2, "caption": ["x", "y"],
         "clutter": [0.1234, 1.0]}
    )  # fmt: skip
    back = read_manifest(write_manifest(df, tmp_path / "stimuli.tsv"))
    assert back["clutter"].tolist() == ["0.1234", "1.0"]
    assert back["clutter"].astype(float).tolist() == [0.1234, 1.0]


# ---------------------------------------------------------------- what an extraction reads


@settings(max_examples=100, deadline=None)
@given(df=_manifests(), data=st.data())
def test_manifest_stamp_sees_exactly_the_columns_a_modality_reads(df, data):
    """Column order and annotation columns never change a stamp; a caption changes the
    language stamp only, or both with drop_duplicates (a duplicate is same image and caption);
    an image path the vision stamp only; the order of the stimuli both."""
    stamps = {
        (mod, drop): manifest_stamp(df, mod, drop)
        for mod in ("vision", "language")
        for drop in (False, True)
    }
    shuffled = df[data.draw(st.permutations(list(df.columns)))].assign(extra="edited", new="x")
    assert {k: manifest_stamp(shuffled, *k) for k in stamps} == stamps

    i = data.draw(st.integers(0, len(df) - 1))
    caption = df.assign(
        caption=[c + " (fixed)" if j == i else c for j, c in enumerate(df["caption"])]
    )
    image = df.assign(image=["b.png" if j == i else p for j, p in enumerate(df["image"])])
    for edited, changes in (
        (caption, {("language", False), ("language", True), ("vision", True)}),
        (image, {("vision", False), ("vision", True), ("language", True)}),
    ):
        changed = {k for k in stamps if manifest_stamp(edited, *k) != stamps[k]}
        assert changed == changes
    if len(df) > 1:
        reversed_rows = df.iloc[::-1].reset_index(drop=True)
        assert all(manifest_stamp(reversed_rows, *k) != stamps[k] for k in stamps)


def test_manifest_stamp_is_rewritten_only_when_it_changes(tmp_path):
    folder = tmp_path / "stim"
    folder.mkdir()
    Image.new("RGB", (2, 2)).save(folder / "a.png")
    df = pd.DataFrame({"stimulus_id": ["s0", "s1"], "image": ["a.png"] * 2,
                       "caption": ["A cat.", "A dog."]})  # fmt: skip
    manifest = write_manifest(df, folder / "stimuli.tsv")
    stamp = tmp_path / "results" / "extract_language.json"
    assert write_manifest_stamp(manifest, stamp, "language")
    record = json.loads(stamp.read_text())
    assert record["columns"] == ["stimulus_id", "caption"] and record["n_stimuli"] == 2
    os.utime(stamp, (1, 1))
    write_manifest(df.assign(rater=["ab", "cd"]), manifest)
    assert not write_manifest_stamp(manifest, stamp, "language")
    assert stamp.stat().st_mtime == 1  # untouched: the extraction is up to date
    write_manifest(df.assign(caption=["A cat.", "A fox."]), manifest)
    assert write_manifest_stamp(manifest, stamp, "language")
    assert json.loads(stamp.read_text())["sha256"] != record["sha256"]
    stamp.write_text("{not json")  # a damaged stamp is rewritten
    assert write_manifest_stamp(manifest, stamp, "language")
    with pytest.raises(ValueError, match="modality"):
        manifest_stamp(df, "audio")


def test_a_manifest_whose_content_changed_gets_the_current_time(tmp_path):
    """A corrected manifest copied in with an older time (cp -p, rsync -a) left the steps
    that read it by time (the stimulus properties, the report, the provenance, the gallery)
    as they were, with exit 0 (audit: the correlation of an inverted annotation kept its old
    sign). follow_manifest_content gives such a manifest the current time; the same content,
    touched or copied, is left alone; the first call, and one without touch, only record."""
    import os

    from xmodal.stimuli import follow_manifest_content

    manifest, record = tmp_path / "stimuli.tsv", tmp_path / "r" / "manifest_content.json"
    record.parent.mkdir()
    manifest.write_text("stimulus_id\timage\tcaption\trating\ns1\ta.png\ta cat\t0.25\n")
    old = 1_000_000_000
    os.utime(manifest, (old, old))
    assert not follow_manifest_content(manifest, record)  # first call: recorded
    assert manifest.stat().st_mtime == old
    assert not follow_manifest_content(manifest, record)  # unchanged
    manifest.write_text(manifest.read_text().replace("0.25", "0.75"))
    os.utime(manifest, (old - 10, old - 10))  # an older time than before
    assert follow_manifest_content(manifest, record)
    assert manifest.stat().st_mtime > old  # now: newer than any result
    assert not follow_manifest_content(manifest, record)
    manifest.write_text(manifest.read_text().replace("0.75", "0.5"))
    os.utime(manifest, (old, old))
    assert not follow_manifest_content(manifest, record, touch=False)  # recorded only
    assert manifest.stat().st_mtime == old
    assert not follow_manifest_content(manifest, record)
    # a manifest whose time cannot be set (root can set any; a user cannot in a read-only
    # folder of someone else's): the call stops, naming it
    from xmodal.stimuli import StimulusError

    manifest.write_text(manifest.read_text().replace("0.5", "0.125"))

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "utime", refuse)
        with pytest.raises(StimulusError, match=r"stimuli\.tsv: its content changed .* cannot"):
            follow_manifest_content(manifest, record)
    # ... unless it is newer than every result of the steps that read it (they rerun anyway):
    # one as new as the manifest, or newer, stops it, named; older ones and missing ones not
    edited = manifest.stat().st_mtime_ns
    older, same, missing = tmp_path / "older.tsv", tmp_path / "same.tsv", tmp_path / "none.tsv"
    for path, ns in ((older, edited - 10**9), (same, edited)):
        path.write_text("x\n")
        os.utime(path, ns=(ns, ns))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "utime", refuse)
        with pytest.raises(StimulusError, match=r"newer than it: \[.*same\.tsv'\] \(1 in all\)"):
            follow_manifest_content(manifest, record, readers=[older, same, missing])
        assert follow_manifest_content(manifest, record, readers=[older, missing])
    assert manifest.stat().st_mtime_ns == edited  # not touched, but recorded:
    assert not follow_manifest_content(manifest, record)


def test_manifest_stamp_sees_a_replaced_image_but_not_a_copy(tmp_path):
    """An image file replaced under the same path changes the stamps that read images, and
    only those; a touch, a copy of the folder, or the file put back, none."""
    folder = tmp_path / "stim"
    folder.mkdir()
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(folder / name)
    df = pd.DataFrame({"stimulus_id": ["s0", "s1"], "image": ["a.png", "b.png"],
                       "caption": ["A cat.", "A dog."]})  # fmt: skip
    write_manifest(df, folder / "stimuli.tsv")
    kinds = [(mod, drop) for mod in ("vision", "language") for drop in (False, True)]

    def stamps(root=folder) -> dict:
        return {k: manifest_stamp(df, *k, root=root) for k in kinds}

    before = stamps()
    assert before[("vision", False)]["image_file_sha256"]
    assert "image_file_sha256" not in before[("language", False)]  # as before images entered
    original = (folder / "a.png").read_bytes()
    noisy = Image.effect_noise((8, 8), 64).convert("RGB")  # another image, another size
    noisy.save(folder / "a.png")
    assert (folder / "a.png").stat().st_size != len(original)
    changed = {k for k, v in stamps().items() if v != before[k]}
    assert changed == {("vision", False), ("vision", True), ("language", True)}

    (folder / "a.png").write_bytes(original)
    os.utime(folder / "b.png", (1, 1))
    assert stamps() == before
    shutil.copytree(folder, tmp_path / "copy", copy_function=shutil.copy)  # new mtimes
    assert stamps(tmp_path / "copy") == before
    (folder / "b.png").unlink()  # a missing image still gives a stamp (the extraction names it)
    assert stamps()[("vision", False)] != before[("vision", False)]
    assert stamps()[("language", False)] == before[("language", False)]


def test_images_are_checked_to_decode_once_each_before_any_extraction(manifest_copy, monkeypatch):
    """Every image is decoded as the extraction will, once per file content (a copy elsewhere
    or a touch is not decoded again, a replaced file is); a truncated and a missing image are
    one error naming both stimuli and the first file, and are never recorded as decoded."""
    root, record = manifest_copy.parent, manifest_copy.parent / "stamps" / DECODED_IMAGES
    df = read_manifest(manifest_copy)
    # another process's write in progress, which this one must not remove
    record.parent.mkdir()
    theirs = record.parent / f".{DECODED_IMAGES}.other.tmp.json"
    theirs.write_text("[]")
    assert check_images_decode(df, root, record, workers=2) == len(df) == 12
    assert theirs.exists()
    digests = image_file_digests(df["image"].tolist(), root)
    assert json.loads(record.read_text())["digests"] == sorted(set(digests))
    scans = []
    real_scan = xstim._scan
    monkeypatch.setattr(
        xstim, "_scan", lambda m, *a, **k: scans.append(len(m)) or real_scan(m, *a, **k)
    )
    assert check_images_decode(df, root, record) == 0 and scans == []  # nothing decoded again
    copy = manifest_copy.parent.parent / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # new paths and times, same bytes
    assert check_images_decode(read_manifest(copy / "stimuli.tsv"), copy, record) == 0
    first = root / df["image"][0]
    Image.effect_noise((9, 7), 40).convert("RGB").save(first, format=Image.open(first).format)
    assert check_images_decode(df, root, record) == 1 and scans == [1]  # the replaced one only
    good = record.read_text()
    second, third = root / df["image"][1], root / df["image"][2]
    second.write_bytes(second.read_bytes()[:60])  # truncated
    third.unlink()
    with pytest.raises(StimulusError) as err:
        check_images_decode(df, root, record)
    text = str(err.value)
    assert "2 image(s) cannot be decoded" in text and "'stim-01', 'stim-02'" in text, text
    assert f"first: stimulus 'stim-01': cannot decode image {second}" in text, text
    assert record.read_text() == good  # what failed is not recorded
    # an unreadable record is no record: everything is decoded again
    record.write_text("{not json")
    second.write_bytes(b"")
    with pytest.raises(StimulusError, match="stim-01"):
        check_images_decode(df, root, record)


def test_images_are_decoded_again_by_another_decoder(manifest_copy, monkeypatch):
    """The record holds for the decoder that made it (Pillow's version, the decoding code):
    after an update of either, and for a record in the list layout of earlier versions, every
    image is decoded again, once."""
    root, record = manifest_copy.parent, manifest_copy.parent / DECODED_IMAGES
    df = read_manifest(manifest_copy)
    assert check_images_decode(df, root, record) == 12
    assert check_images_decode(df, root, record) == 0
    made_by = json.loads(record.read_text())["decoder"]
    assert made_by.startswith("Pillow ") and "xmodal.stimuli " in made_by
    monkeypatch.setattr(xstim, "_decoder", lambda: made_by + " (updated)")
    assert check_images_decode(df, root, record) == 12
    assert check_images_decode(df, root, record) == 0
    monkeypatch.undo()
    record.write_text(json.dumps(image_file_digests(df["image"].tolist(), root)))  # old layout
    assert check_images_decode(df, root, record) == 12


def test_a_decoded_images_record_that_cannot_be_written_is_a_warning(
    manifest_copy, monkeypatch, caplog
):
    """The record is a cache: a failed write (a full disk, two processes at once) logs a
    warning and the images count as checked for this run."""
    root, record = manifest_copy.parent, manifest_copy.parent / DECODED_IMAGES

    def fail(*args, **kwargs):
        raise FileNotFoundError("another process renamed it")

    monkeypatch.setattr(xstim, "atomic_path", fail)
    with caplog.at_level(logging.WARNING, logger="xmodal.stimuli"):
        assert check_images_decode(read_manifest(manifest_copy), root, record) == 12
    assert "could not record the decoded images" in caplog.text and not record.exists()


def test_a_vision_stamp_refuses_an_image_that_does_not_decode(manifest_copy):
    """write_manifest_stamp, as the stamp job calls it, checks the images of the stamps that
    read them (vision; language too with drop_duplicates), unless told not to (the workflow's
    start-up, which checks them itself)."""
    df = read_manifest(manifest_copy)
    bad = manifest_copy.parent / df["image"][3]
    bad.write_bytes(b"not an image")
    out = manifest_copy.parent / "stamps"
    out.mkdir()
    for modality, drop in (("vision", False), ("language", True)):
        with pytest.raises(StimulusError, match="'stim-03'"):
            write_manifest_stamp(manifest_copy, out / f"{modality}.json", modality, drop)
        assert not (out / f"{modality}.json").exists()
    assert write_manifest_stamp(manifest_copy, out / "language.json", "language")
    assert write_manifest_stamp(manifest_copy, out / "vision.json", "vision", check_images=False)
    assert not (out / DECODED_IMAGES).exists()


def _wait_for_a_new_change_time(path: Path, before: int) -> None:
    """File systems stamp changes with a coarse clock (a few ms): wait until it has moved on."""
    for _ in range(300):
        if os.stat(path).st_ctime_ns != before:
            return
        time.sleep(0.01)
        os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns))
    raise AssertionError(f"{path}: change time did not move in 3 s")


def _replace_keeping_size_and_time(path: Path, data: bytes) -> None:
    """Overwrite ``path`` in place with ``data`` (same length), its modification time put back
    (as ``rsync -a`` or ``cp -p`` of a re-rendered file would leave it)."""
    st = os.stat(path)
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    _wait_for_a_new_change_time(path, st.st_ctime_ns)


def test_manifest_stamp_sees_an_image_replaced_by_one_of_the_same_size(tmp_path, monkeypatch):
    """Uncompressed formats (BMP, TIFF, PPM) give every image of one size the same file size:
    a re-rendered stimulus replaced under its path changes the vision stamp even with its size
    and modification time unchanged (before: the stamp held file sizes, and missed it), and
    with the digests cached."""
    monkeypatch.setattr(xio, "_RACY_NS", 0)  # cache the fresh files' digests too
    for name in ("a.bmp", "b.bmp"):
        Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / name)
    df = pd.DataFrame({"stimulus_id": ["s0", "s1"], "image": ["a.bmp", "b.bmp"],
                       "caption": ["A cat.", "A dog."]})  # fmt: skip
    manifest, stamp = tmp_path / "stimuli.tsv", tmp_path / "out" / "extract_vision.json"
    write_manifest(df, manifest)
    assert write_manifest_stamp(manifest, stamp, "vision")
    assert (stamp.parent / "image_digests.json").is_file()  # the cache lies next to the stamp
    assert not write_manifest_stamp(manifest, stamp, "vision")
    size = (tmp_path / "a.bmp").stat().st_size
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf := tmp_path / "blue.bmp")
    _replace_keeping_size_and_time(tmp_path / "a.bmp", buf.read_bytes())
    assert (tmp_path / "a.bmp").stat().st_size == size
    assert write_manifest_stamp(manifest, stamp, "vision")


def test_image_digests_read_only_new_or_changed_files(tmp_path, monkeypatch):
    """The digests equal SHA-256 of each file's bytes; with the cache, a call reads only files
    whose size, times or inode changed; a missing file, a folder or a pipe gives None (none is
    read); a damaged cache is rebuilt."""
    reads: list[str] = []
    real = xio._file_sha256
    monkeypatch.setattr(xio, "_file_sha256", lambda p: reads.append(p) or real(p))
    monkeypatch.setattr(xio, "_RACY_NS", 0)  # the files below are fresh: cache them anyway
    root, cache = tmp_path / "stim", tmp_path / "cache" / "digests.json"
    root.mkdir()
    payload = {f"im{i}.raw": os.urandom(64) for i in range(4)}
    for name, data in payload.items():
        (root / name).write_bytes(data)
    os.mkfifo(root / "pipe.raw")  # would block a reader forever
    (root / "folder.raw").mkdir()
    # a path twice, a missing file, and no file at all
    names = [*payload, "im0.raw", "gone.raw", "pipe.raw", "folder.raw"]
    want = [hashlib.sha256(payload[n]).hexdigest() if n in payload else None for n in names]

    def digests(where=root) -> list[str | None]:
        reads.clear()
        return image_file_digests(names, where, cache)

    assert digests() == want and len(reads) == 4  # each file read once
    assert digests() == want and reads == []
    os.utime(root / "im1.raw", (1, 1))  # a touch: read again, same digest
    assert digests() == want and len(reads) == 1
    new = os.urandom(64)
    _replace_keeping_size_and_time(root / "im2.raw", new)
    want[2] = hashlib.sha256(new).hexdigest()
    assert digests() == want and reads == [str(root / "im2.raw")]
    # another folder (the pipe left behind): read, and the cache holds it only
    shutil.copytree(root, tmp_path / "copy", ignore=shutil.ignore_patterns("pipe.raw"))
    assert digests(tmp_path / "copy") == want and len(reads) == 4
    cached = json.loads(cache.read_text())["files"]
    assert sorted(cached) == sorted(str(tmp_path / "copy" / n) for n in payload)
    cache.write_text("{damaged")
    assert digests(tmp_path / "copy") == want and len(reads) == 4


def test_image_digests_of_files_changed_just_now_are_not_cached(tmp_path, monkeypatch):
    """A file changed less than 2 s before it is read may change again without a new timestamp
    (file systems that keep whole seconds): it is read again on the next call."""
    reads: list[str] = []
    real = xio._file_sha256
    monkeypatch.setattr(xio, "_file_sha256", lambda p: reads.append(p) or real(p))
    (tmp_path / "a.raw").write_bytes(b"fresh")
    cache = tmp_path / "digests.json"
    for _ in range(2):
        assert image_file_digests(["a.raw"], tmp_path, cache) == [
            hashlib.sha256(b"fresh").hexdigest()
        ]
    assert len(reads) == 2
    assert not cache.exists() or json.loads(cache.read_text())["files"] == {}


def _stamp_of_sizes(manifest: pd.DataFrame, path: Path) -> dict:
    """A vision stamp as the release before image digests wrote it: ids, paths, file sizes."""
    rows = [[sid, img, (path.parent / img).stat().st_size]
            for sid, img in zip(manifest["stimulus_id"], manifest["image"], strict=True)]  # fmt: skip
    payload = json.dumps(rows, ensure_ascii=False).encode("utf-8")
    return {"manifest": str(path), "modality": "vision", "columns": ["stimulus_id", "image"],
            "image_file_sizes": True, "n_stimuli": len(manifest),
            "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip


def test_a_stamp_of_image_sizes_is_carried_over_without_a_rerun(manifest_copy):
    """Upgrading re-extracts nothing: a stamp of the earlier form (file sizes) that matches the
    files gets the digests with its modification time kept; one that no longer matches is
    rewritten as a change."""
    df = read_manifest(manifest_copy, check_images=False)
    stamp = manifest_copy.parent / "extract_vision.json"
    stamp.write_text(json.dumps(_stamp_of_sizes(df, manifest_copy), indent=1) + "\n")
    os.utime(stamp, (1, 1))
    assert not write_manifest_stamp(manifest_copy, stamp, "vision")
    assert json.loads(stamp.read_text())["image_file_sha256"] and stamp.stat().st_mtime == 1
    assert not write_manifest_stamp(manifest_copy, stamp, "vision")  # and stays so

    stamp.write_text(json.dumps(_stamp_of_sizes(df, manifest_copy), indent=1) + "\n")
    os.utime(stamp, (1, 1))
    image = manifest_copy.parent / df.loc[0, "image"]
    image.write_bytes(image.read_bytes() + b"\0")  # another size since the stamp was written
    assert write_manifest_stamp(manifest_copy, stamp, "vision")
    assert stamp.stat().st_mtime > 1


def _feature_file_of(path: Path, stamp: Path) -> Path:
    """A stand-in feature file: only the digest of the stamp it was extracted under."""
    import h5py

    from xmodal.features import STIMULI_DIGEST

    with h5py.File(path, "w") as f:
        f.attrs[STIMULI_DIGEST] = json.loads(stamp.read_text())["sha256"]
    return path


@pytest.mark.parametrize("modality", ["vision", "language"])
def test_rows_only_reordered_are_named_before_they_re_extract(manifest_copy, modality, caplog):
    """A manifest whose rows were only reordered changes the stamp (the feature files hold the
    stimuli in manifest order), so every model is extracted again: a warning says so, with
    the number of files, and how to keep them (before: silent). An edit of one row, the first
    call after an upgrade (no record of the rows yet) and the rows put back in the order the
    features have warn about nothing."""
    from xmodal.stimuli import stamp_rows_path

    df = read_manifest(manifest_copy, check_images=False)
    stamp = manifest_copy.parent / f"extract_{modality}.json"
    features = [manifest_copy.parent / "a.h5", manifest_copy.parent / "missing.h5"]

    def write(table: pd.DataFrame) -> tuple[bool, list[str]]:
        write_manifest(table, manifest_copy)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="xmodal"):
            changed = write_manifest_stamp(manifest_copy, stamp, modality, features=features)
        return changed, [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    assert write(df) == (True, [])
    _feature_file_of(features[0], stamp)
    stamp_rows_path(stamp).unlink()  # as the release before the record left it
    os.utime(stamp, (1, 1))
    assert write(df) == (False, []) and stamp.stat().st_mtime == 1  # recorded, nothing changed
    assert stamp_rows_path(stamp).is_file()

    changed, warned = write(df.iloc[::-1])
    assert changed and len(warned) == 1, warned
    assert "lists the same stimuli as before, in another order" in warned[0]
    assert f"so 1 of 2 {modality} model(s) will be extracted again" in warned[0]
    assert "put the rows back in their earlier order" in warned[0]
    assert f"python -m xmodal.stimuli order-like {features[0]} {manifest_copy}" in warned[0]
    assert write(df) == (True, [])  # back in the features' order: nothing to re-extract

    column = "image" if modality == "vision" else "caption"
    other = df[column].tolist()
    other[0], other[1] = other[1], other[0]  # two stimuli swap: another set of rows
    reordered = df.assign(**{column: other}).iloc[::-1]
    assert write(reordered) == (True, [])
    assert write(df.assign(rater="ab").iloc[::-1])[1] == []  # reordered from the swap's

    # without the feature files (features=None): warned whatever they hold
    write_manifest(df, manifest_copy)
    write_manifest_stamp(manifest_copy, stamp, modality)
    write_manifest(df.iloc[::-1], manifest_copy)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        assert write_manifest_stamp(manifest_copy, stamp, modality)
    assert "so every " + modality in caplog.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(df=_manifests(), data=st.data())
def test_a_reordered_manifest_is_put_back_line_for_line(tmp_path_factory, df, data):
    """order_manifest_like puts each stimulus's line back where the features' order has it,
    byte for byte (a BOM, CRLF ends, a last line without its line end, empty lines at the
    end): the manifest reads as before, and its stamps are the stamps the features were
    extracted under."""
    from xmodal.stimuli import order_manifest_like

    folder = tmp_path_factory.mktemp("order")
    Image.new("RGB", (2, 2)).save(folder / "a.png")
    lines = write_manifest(df, folder / "written.tsv").read_bytes().decode().split("\n")[:-1]
    eol = data.draw(st.sampled_from(["\n", "\r\n"]))
    bom = data.draw(st.sampled_from(["", "\ufeff"]))
    ends = data.draw(st.sampled_from(["", eol, eol + eol, eol + "  " + eol]))
    order = [0, *(1 + k for k in data.draw(st.permutations(range(len(df)))))]
    original = folder / "stimuli.tsv"
    original.write_bytes((bom + eol.join(lines) + ends).encode())
    moved = folder / "moved.tsv"
    moved.write_bytes((bom + eol.join(lines[k] for k in order) + ends).encode())

    out = order_manifest_like(moved, df["stimulus_id"].tolist(), folder / "back.tsv")
    assert out.read_bytes() == (bom + eol.join(lines) + eol).encode()
    assert read_manifest(out).equals(read_manifest(original))
    for modality in ("vision", "language"):
        before = manifest_stamp(read_manifest(original), modality)
        assert manifest_stamp(read_manifest(out), modality) == before


def test_putting_rows_back_refuses_other_stimuli_and_keeps_the_file(manifest_copy, tmp_path):
    """Only the manifest's own stimuli can be put back, each once (a stimulus added, removed,
    or left out as a duplicate is named); in place, a symbolic link's target is rewritten
    with its permissions, and the command line takes the order from a feature file."""
    from xmodal.features import write_features
    from xmodal.stimuli import main, order_manifest_like

    df = read_manifest(manifest_copy, check_images=False)
    ids = df["stimulus_id"].tolist()
    write_manifest(df.iloc[::-1], manifest_copy)
    reordered = manifest_copy.read_bytes()
    for order, match in (
        (ids[1:], r"1 in the manifest but not in the order given \(\['stim-00'\]"),
        ([*ids, "new"], r"1 in the order given but not in the manifest \(\['new'\]"),
        ([*ids, ids[0]], r"1 listed twice in the order given \(\['stim-00'\]"),
    ):
        with pytest.raises(StimulusError, match=match):
            order_manifest_like(manifest_copy, order)
        assert manifest_copy.read_bytes() == reordered

    manifest_copy.chmod(0o640)
    link = tmp_path / "link.tsv"
    link.symlink_to(manifest_copy)
    features = write_features(
        tmp_path / "f.h5", np.zeros((1, len(ids), 2), np.float32), ids, ["layers.0"],
        {"model_id": "org/tiny", "model_key": "tiny", "modality": "vision", "source": "test"},
        abs_q95=np.ones(len(ids), np.float32),
    )  # fmt: skip
    assert main(["order-like", str(features), str(link)]) == 0
    assert link.is_symlink() and manifest_copy.stat().st_mode & 0o777 == 0o640
    assert read_manifest(manifest_copy)["stimulus_id"].tolist() == ids
    assert main(["order-like", str(features), str(tmp_path / "none.tsv")]) == 2


def test_image_paths_written_another_way_leave_the_vision_stamp_as_it_is(manifest_copy):
    """What a vision extraction reads is each stimulus's id and image bytes: the same files
    named ``./images/…``, by an absolute path or under a renamed folder re-extract nothing,
    while two stimuli that swap their images do."""
    df = read_manifest(manifest_copy, check_images=False)
    root = manifest_copy.parent
    stamp = root / "extract_vision.json"
    assert write_manifest_stamp(manifest_copy, stamp, "vision")
    before = json.loads(stamp.read_text())
    assert before["columns"] == ["stimulus_id"] and before["image_file_sha256"]
    folder = Path(df.loc[0, "image"]).parent
    (root / "renamed").symlink_to(root / folder, target_is_directory=True)
    for spelling in (
        lambda p: f"./{p}",
        lambda p: str(root / p),
        lambda p: str(Path("renamed") / Path(p).relative_to(folder)),
    ):
        write_manifest(df.assign(image=df["image"].map(spelling)), manifest_copy)
        assert not write_manifest_stamp(manifest_copy, stamp, "vision")
        assert json.loads(stamp.read_text()) == before
    swapped = df["image"].tolist()
    swapped[0], swapped[1] = swapped[1], swapped[0]
    write_manifest(df.assign(image=swapped), manifest_copy)
    assert write_manifest_stamp(manifest_copy, stamp, "vision")


def test_a_stamp_with_image_paths_is_carried_over_without_a_rerun(manifest_copy):
    """Upgrading re-extracts nothing: a vision stamp of the earlier form (ids, paths and
    digests) that matches the manifest and files is rewritten without the paths, its time kept
    and its digest kept as ``sha256_before`` (which the stale-file check accepts); one that no
    longer matches is rewritten as a change."""
    from xmodal.stimuli import BEFORE, image_file_digests

    df = read_manifest(manifest_copy, check_images=False)
    root = manifest_copy.parent
    stamp = root / "extract_vision.json"

    def earlier_form(frame):
        digests = image_file_digests(frame["image"].tolist(), root)
        ids, images = frame["stimulus_id"], frame["image"]
        rows = [list(row) for row in zip(ids, images, digests, strict=True)]
        payload = json.dumps(rows, ensure_ascii=False).encode("utf-8")
        return {"manifest": str(manifest_copy), "modality": "vision",
                "columns": ["stimulus_id", "image"], "image_file_sha256": True,
                "n_stimuli": len(frame), "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip

    old = earlier_form(df)
    stamp.write_text(json.dumps(old, indent=1) + "\n")
    os.utime(stamp, (1, 1))
    assert not write_manifest_stamp(manifest_copy, stamp, "vision")
    now = json.loads(stamp.read_text())
    assert stamp.stat().st_mtime == 1 and now[BEFORE] == old["sha256"]
    assert now["columns"] == ["stimulus_id"] and now["sha256"] != old["sha256"]
    assert not write_manifest_stamp(manifest_copy, stamp, "vision")  # and stays so
    assert stamp.stat().st_mtime == 1

    stamp.write_text(json.dumps(old, indent=1) + "\n")
    os.utime(stamp, (1, 1))
    image = root / df.loc[0, "image"]
    image.write_bytes(image.read_bytes() + b"\0")  # changed since the stamp was written
    assert write_manifest_stamp(manifest_copy, stamp, "vision")
    assert stamp.stat().st_mtime > 1 and BEFORE not in json.loads(stamp.read_text())


def test_the_stamps_messages_reach_the_workflows_log(manifest_copy, tmp_path):
    """What the stamps do while the workflow parses (no step log there) reaches the callable
    given to ``forward_to`` (Snakemake's logger), redacted, and nothing after the block."""
    seen: list[str] = []
    df = read_manifest(manifest_copy, check_images=False)
    stamp = manifest_copy.parent / "extract_vision.json"
    stamp.write_text(json.dumps(_stamp_of_sizes(df, manifest_copy)))
    many = [f"{i:04d}.raw" for i in range(1000)]
    for name in many:
        (tmp_path / name).write_bytes(name.encode())
    with forward_to(seen.append):
        write_manifest_stamp(manifest_copy, stamp, "vision")
        image_file_digests(many, tmp_path)
        logging.getLogger("xmodal.test").info("token hf_%s", "a" * 30)
    logging.getLogger("xmodal.test").warning("after the block")
    assert any("carried over to the stamp's current form; time kept" in m for m in seen), seen
    assert any("reading 1000 files for their SHA-256" in m for m in seen), seen
    assert seen[-1] == "token ***"


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=16), min_size=1, max_size=4),
    st.data(),
)
def test_vision_stamp_changes_exactly_when_an_image_file_does(old, data):
    """Images rewritten in place with contents of the same length and the old modification
    time: the vision stamp is unchanged exactly when every file's bytes are."""
    new = [data.draw(st.binary(min_size=len(b), max_size=len(b))) for b in old]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = [f"{i:03d}.png" for i in range(len(old))]
        for name, content in zip(names, old, strict=True):
            (root / name).write_bytes(content)
        df = pd.DataFrame({"stimulus_id": names, "image": names, "caption": "A cat."})
        write_manifest(df, root / "stimuli.tsv")
        stamp = root / "extract_vision.json"
        # random bytes, not images: the stamp's digests, without the decoding check
        write_manifest_stamp(root / "stimuli.tsv", stamp, "vision", check_images=False)
        for name, content in zip(names, new, strict=True):
            st_ = os.stat(root / name)
            (root / name).write_bytes(content)
            os.utime(root / name, ns=(st_.st_atime_ns, st_.st_mtime_ns))
        changed = write_manifest_stamp(root / "stimuli.tsv", stamp, "vision", check_images=False)
        assert changed == (old != new)


def test_missing_image_messages_say_why_when_names_print_alike(tmp_path, caplog):
    """Two causes of 'not found' whose messages printed paths that looked right: a file named in
    another Unicode form (macOS writes decomposed accents) and a manifest that is a symbolic
    link (paths are relative to the link's folder). Ids that differ only in Unicode form are
    warned about."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(data / "img" / "cafe\u0301.png")  # NFD on disk
    Image.new("RGB", (4, 4)).save(data / "img" / "b.png")
    (data / "stimuli.tsv").write_text(
        "stimulus_id\timage\tcaption\nc1\timg/caf\u00e9.png\ta cafe\n", encoding="utf-8"
    )
    with pytest.raises(
        StimulusError, match=r"'img/caf\\xe9\.png' is on disk as 'cafe\\u0301\.png'"
    ):
        read_manifest(data / "stimuli.tsv")
    (data / "stimuli.tsv").write_text("stimulus_id\timage\tcaption\nb\timg/b.png\ta b\n")
    link = tmp_path / "elsewhere" / "stimuli.tsv"
    link.parent.mkdir()
    link.symlink_to(data / "stimuli.tsv")
    with pytest.raises(StimulusError, match=r"is a symbolic link to .*link the images folder"):
        read_manifest(link)
    (data / "stimuli.tsv").write_text(
        "stimulus_id\timage\tcaption\ncaf\u00e9\timg/b.png\ta\ncafe\u0301\timg/b.png\tb\n",
        encoding="utf-8",
    )
    with caplog.at_level("WARNING", logger="xmodal.stimuli"):
        assert len(read_manifest(data / "stimuli.tsv")) == 2
    assert "differ only in Unicode form" in caplog.text and "'caf\\xe9'" in caplog.text


def test_manifest_settings_are_compared_with_the_config(tmp_path):
    """Unknown (no manifest, or no record: a manifest made before records, or by hand) is no
    change, so an existing project never stops; the same settings in another order are no
    change; other settings return what the manifest was made from."""
    from xmodal.stimuli import manifest_settings_changed, write_manifest_settings

    manifest = tmp_path / "stimuli.tsv"
    assert manifest_settings_changed(manifest, {"n": 480, "seed": 0}) is None
    manifest.write_text("stimulus_id\timage\tcaption\n")
    assert manifest_settings_changed(manifest, {"n": 480, "seed": 0}) is None
    write_manifest_settings(manifest, {"seed": 0, "n": 480})
    assert json.loads((tmp_path / "settings.json").read_text()) == {"n": 480, "seed": 0}
    assert manifest_settings_changed(manifest, {"n": 480, "seed": 0}) is None
    assert manifest_settings_changed(manifest, {"n": 480, "seed": 1}) == {"n": 480, "seed": 0}
    write_manifest_settings(manifest, {"repo": "r", "revision": None, "split": "train"})
    assert (
        manifest_settings_changed(manifest, {"repo": "r", "revision": None, "split": "train"})
        is None
    )


def test_a_digest_is_of_the_file_the_extraction_reads_through_a_linked_folder(tmp_path):
    """'link/../d.jpg' with link a symbolic link to another folder: the OS opens d.jpg next to
    the link's target, but the digest collapsed the path as text and read the manifest
    folder's d.jpg (or nothing): a replaced image reran nothing, and every run refused the
    freshly extracted feature file as another stimuli's (manifest audit)."""
    root, far = tmp_path / "stimuli", tmp_path / "elsewhere"
    (far / "sub").mkdir(parents=True)
    root.mkdir()
    (root / "link").symlink_to(far / "sub")
    (far / "d.jpg").write_bytes(b"the image the extraction reads")
    (root / "d.jpg").write_bytes(b"another file")
    (digest,) = image_file_digests(["link/../d.jpg"], root)
    assert digest == hashlib.sha256(b"the image the extraction reads").hexdigest()
    assert (root / "link/../d.jpg").read_bytes() == b"the image the extraction reads"


def test_short_keeps_a_text_of_exactly_n_characters():
    """Texts in messages are cut to n characters, the last one "…"; n characters fit."""
    assert xstim._short("a" * 40) == "a" * 40
    assert xstim._short("a" * 41) == "a" * 39 + "…"


def test_a_caption_of_one_double_quote_is_not_wrapped_in_quotes(tmp_path, caplog):
    """A lone ``"`` opens and closes nothing: no quote-wrapped warning."""
    df, warned = _read_warnings(tmp_path, caplog, 's1\ta.png\t"\n')
    assert df["caption"].tolist() == ['"'] and warned == ""


def test_a_quote_wrapped_caption_with_a_lone_inner_quote_is_not_csv_quoted(tmp_path, caplog):
    """``"a ""b"" c" d"`` holds doubled quotes and a lone one: no CSV writer writes that, so it
    is read as written (with the quote-wrapped warning), not refused as CSV-quoted."""
    df, warned = _read_warnings(tmp_path, caplog, 's1\ta.png\t"a ""b"" c" d"\n')
    assert df["caption"].tolist() == ['"a ""b"" c" d"']
    assert "wrapped in double quotes" in warned


def test_numpy_numbers_in_an_object_column_are_written_with_str(tmp_path):
    """Numbers are written with ``str`` (docstring): 1.5, not repr's ``np.float64(1.5)``."""
    df = pd.DataFrame({"stimulus_id": ["s1"], "image": ["x.png"], "caption": ["cap"],
                       "score": pd.Series([np.float64(1.5)], dtype=object)})  # fmt: skip
    path = write_manifest(df, tmp_path / "m.tsv")
    assert path.read_text().splitlines()[1] == "s1\tx.png\tcap\t1.5"


def test_a_jpeg_over_max_side_is_drafted_to_the_ceiling_factor(tmp_path):
    """A 5000 × 64 JPEG: factor ⌈5000/4096⌉ = 2, decoded by Pillow's draft at (2500, 32) (a
    floor factor drafted nothing and resized; a halved request decoded at 1250 × 16);
    scan_images' width and height are the stored 5000 × 64."""
    rng = np.random.default_rng(0)
    path = tmp_path / "wide.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 5000, 3), dtype=np.uint8)).save(path, quality=90)
    with Image.open(path) as im:
        im.draft("RGB", (2500, 32))
        want = np.asarray(im.convert("RGB"))
    assert want.shape == (32, 2500, 3)
    got = np.asarray(xstim.load_rgb(path, "w", log_conversions=False))
    np.testing.assert_array_equal(got, want)
    man = pd.DataFrame({"stimulus_id": ["w"], "image": ["wide.jpg"], "caption": ["c"]})
    t = xstim.scan_images(man, tmp_path)
    assert t[["width", "height"]].values.tolist() == [[5000, 64]]


def _exif_jpeg(path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", (8, 8), (90, 120, 30)).save(path, exif=exif.tobytes())


def test_exif_orientation_outside_1_to_8_or_the_default_is_no_rotation(tmp_path, caplog):
    """Orientation 9 is no valid tag (read as 0, not a KeyError in the name lookup) and 1 is
    the default: neither is warned about as a non-default orientation; 6 is."""
    for name, value in (("o9", 9), ("o1", 1), ("o6", 6)):
        _exif_jpeg(tmp_path / f"{name}.jpg", value)
    man = pd.DataFrame({"stimulus_id": ["o9", "o1", "o6"], "image": ["o9.jpg", "o1.jpg", "o6.jpg"],
                        "caption": ["c", "c", "c"]})  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xmodal.stimuli"):
        t = xstim.scan_images(man, tmp_path)
    assert t["exif_orientation"].tolist() == [0, 1, 6]
    assert "1 stimuli carry a non-default EXIF orientation ['o6'] (1 in all)" in caplog.text


def test_ids_that_differ_only_in_unicode_form_are_both_named(tmp_path, caplog):
    """'café' composed and decomposed: the warning names both lines and both ids."""
    _, warned = _read_warnings(tmp_path, caplog, "caf\u00e9\ta.png\tone\ncafe\u0301\ta.png\ttwo\n")
    assert "stimulus ids on lines [2, 3] differ only in Unicode form" in warned
    assert "'caf\\xe9', 'cafe\\u0301'" in warned


def test_a_line_of_tabs_is_not_an_empty_line(tmp_path):
    """Only lines of spaces are empty (docs/contracts.md); a last line of tabs is a row whose
    id is empty, refused naming its line."""
    with pytest.raises(StimulusError, match=r"empty stimulus_id on line\(s\) \[3\]"):
        read_manifest(_manifest(tmp_path, "s1\ta.png\tone\n\t\t\n"))
    assert len(read_manifest(_manifest(tmp_path, "s1\ta.png\tone\n   \n"))) == 1


def test_a_bad_byte_in_the_header_names_no_stimulus(tmp_path):
    """Line 1 is the header: its UTF-8 error names no '(stimulus ...)'."""
    path = tmp_path / "stimuli.tsv"
    path.write_bytes("stimulus_id\timage\tcapti\u00f3n\n".encode("latin1") + b"a\ta.png\tone\n")
    with pytest.raises(StimulusError, match=r"line 1 is not valid UTF-8 \(byte 0xf3") as err:
        read_manifest(path)
    assert "(stimulus" not in str(err.value)


def test_a_bad_byte_names_the_stimulus_by_the_headers_id_column(tmp_path):
    """The columns come in any order (docs/contracts.md); the UTF-8 error named the line's
    first field as the stimulus: a caption, where the caption came first (audit). A line
    shorter than the header names none."""
    path = tmp_path / "stimuli.tsv"
    text = "caption\tstimulus_id\timage\r\ncaf\u00e9 au lait\t000123\ta.png\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("cp1252"))  # a BOM, then Excel's bytes
    with pytest.raises(StimulusError, match=r"line 2 \(stimulus '000123'\) is not valid UTF-8"):
        read_manifest(path)
    path.write_bytes(b"caption\timage\tstimulus_id\ncaf\xe9\ta.png\n")
    with pytest.raises(StimulusError, match=r"line 2 is not valid UTF-8") as err:
        read_manifest(path)
    assert "(stimulus" not in str(err.value)


def test_alpha_254_is_not_fully_opaque():
    """The note counts pixels with alpha below 255: half of them here."""
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., 3] = [[255, 254], [255, 254]]
    _, what = xstim.convert_to_rgb(Image.fromarray(a, "RGBA"))
    assert "50.0% of pixels not fully opaque" in what
