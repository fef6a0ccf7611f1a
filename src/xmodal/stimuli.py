"""The stimulus manifest (``stimulus_id``, ``image``, ``caption``), image decoding and duplicates.

The manifest is a TSV next to its images (``image`` paths are relative to the manifest's folder),
read by one rule: one stimulus per line, fields split on tabs, no quoting, no escapes, every
value kept as text exactly as written (``007``, ``7``, ``1.50`` and ``NA`` are four ids;
``"The Scream" by Munch`` keeps its quotes). :func:`read_manifest` reads and validates it,
:func:`write_manifest` writes one that reads back byte-identical.

Images: :func:`load_rgb` decodes one image to 8-bit RGB. Every PIL mode is converted by a stated
rule (16-bit: ``v >> 8``; float: ``round(255 v)`` on [0, 1]; alpha discarded, as timm's
``.convert("RGB")``; EXIF orientation ignored, as timm); what was done is logged per stimulus,
and an image no rule maps to 8 bits is refused naming the stimulus, the mode and the value range
(docs/contracts.md, "Image decoding"). :class:`ImageDataset` decodes for a DataLoader.

Duplicates: :func:`scan_images` decodes every image once (hashes of the file and of the decoded
pixels, mode, EXIF orientation); :func:`find_duplicates` groups identical image files, identical
decoded pixels and identical captions; :func:`drop_duplicates` keeps the first of each group.

Stamps: :func:`manifest_stamp` digests what one modality's extraction reads (ids and images, or
ids and captions); :func:`write_manifest_stamp` rewrites a stamp file only when that changed,
so that the workflow re-extracts only what a manifest edit changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shlex
import stat
import sys
import threading
import unicodedata
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import PIL
from PIL import Image

from xmodal.attempts import passing_error
from xmodal.io import atomic_path, file_digests
from xmodal.logs import Progress, preview

log = logging.getLogger(__name__)

COLUMNS = ("stimulus_id", "image", "caption")
#: Images with a longer side are reduced (by an integer factor, box filter) after conversion to
#: RGB and before the model's own preprocessing, which resizes to a few hundred pixels anyway.
MAX_SIDE = 4096
#: Images up to this many pixels are decoded even though PIL would call them a decompression bomb.
MAX_PIXELS = 1 << 30
#: The kinds of duplicate :func:`find_duplicates` reports.
DUPLICATE_KINDS = ("image_bytes", "pixels", "caption")
#: What :func:`drop_duplicates` drops by default: same decoded image *and* same caption.
DEFAULT_DROP_KINDS = ("pixels", "caption")
#: 16-bit data whose maximum is below this uses at most 12 of its 16 bits: it is converted by the
#: same rule (``v >> 8``) but comes out dark, which is logged as a warning.
_DARK_16BIT = 1 << 12
_FIX_IMAGE = "replace the image file, or remove the stimulus from the manifest"
_OPEN_LOCK = threading.Lock()  # Image.open changes process-wide warning filters and PIL limits
_EXIF_ORIENTATION = 0x0112
#: What a viewer does to display an image with each EXIF orientation (1 = nothing).
_ORIENTATION_NAMES = {
    2: "mirror horizontally",
    3: "rotate 180°",
    4: "mirror vertically",
    5: "mirror horizontally, rotate 270° CW",
    6: "rotate 90° CW",
    7: "mirror horizontally, rotate 90° CW",
    8: "rotate 270° CW",
}
#: Modes whose samples Pillow holds in 8 bits (a TIFF declaring more bits must not decode to them).
_EIGHT_BIT_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB")

__all__ = [
    "COLUMNS",
    "DECODED_IMAGES",
    "DEFAULT_DROP_KINDS",
    "DUPLICATE_KINDS",
    "EXTRACTION_COLUMNS",
    "IMAGE_DIGESTS",
    "MANIFEST_CONTENT",
    "MANIFEST_SETTINGS",
    "MAX_SIDE",
    "ImageDataset",
    "StimulusError",
    "analysed_stimuli",
    "check_images_decode",
    "convert_to_rgb",
    "drop_duplicates",
    "extraction_columns",
    "find_duplicates",
    "follow_manifest_content",
    "image_file_digests",
    "is_blank",
    "is_csv_quoted",
    "load_rgb",
    "manifest_settings_changed",
    "manifest_stamp",
    "read_manifest",
    "scan_images",
    "stamp_rows_path",
    "write_manifest",
    "write_manifest_settings",
    "write_manifest_stamp",
]


class StimulusError(ValueError):
    """A stimulus manifest or one of its images is invalid."""


#: the remedy named when a manifest was written with CSV quoting
_NO_QUOTING = (
    "the file was written with CSV quoting, and a manifest has none; write it with "
    "xmodal.stimuli.write_manifest"
)
#: the remedy write_manifest names for CSV-quoted text in its table (which it was told to use)
_READ_UNQUOTED = (
    "the table was read from a CSV-quoted file without unquoting it (as pandas does with "
    "quoting=csv.QUOTE_NONE); read that file with CSV quoting, pandas' default"
)


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# ============================================================================== the manifest
def read_manifest(
    path: str | os.PathLike, *, verify_images: bool = False, check_images: bool = True
) -> pd.DataFrame:
    """Read and validate a stimulus manifest; returns its rows in file order, every column text.

    Format: UTF-8 (leading byte-order marks are skipped; UTF-16 is refused), lines end in LF or
    CRLF; line 1 is the header naming the columns (``stimulus_id``, ``image``, ``caption``
    required, in any order; extra columns are kept); then one stimulus per line with exactly one
    tab-separated field per column. No quoting and no escapes: every field is kept exactly as
    written, so a field cannot contain a tab or a line break. Empty lines (or lines of spaces)
    at the end are ignored; anywhere else they are an error. Checks: ids unique, non-empty and
    without NUL (which HDF5 cannot store); captions neither empty (only whitespace or invisible
    characters such as a zero-width space) nor CSV-quoted (a caption as a CSV writer quotes it,
    ``"a ""quoted"" word"``, would reach the language models with its quotes); every image file
    exists (an image path with a NUL, which no file name holds, is an error whatever
    ``check_images``). With ``verify_images`` every image is also decoded and converted
    (:func:`scan_images`), so that an image no rule converts fails here rather than
    mid-extraction. ``check_images=False`` skips the image checks (for readers that
    only need the table, such as the gallery figure, which shows a placeholder for a missing
    image). Errors name the file, the lines (header = line 1) and the ids.
    """
    path = Path(path)
    if not path.is_file():
        raise StimulusError(f"{path}: stimulus manifest not found")
    text = _decode_utf8(path, path.read_bytes())
    header, rows, lines = _parse_tsv(path, text)
    columns = {name: [r[j] for r in rows] for j, name in enumerate(header)}
    _check_stimuli(str(path), columns["stimulus_id"], columns["caption"], lines)
    root = path.parent
    nul = [k for k, img in enumerate(columns["image"]) if "\x00" in img]
    if nul:  # before: Python's bare "ValueError: embedded null byte", naming nothing
        raise StimulusError(
            f"{path}: image path(s) on line(s) {[lines[k] for k in nul][:10]} hold a NUL "
            f"character, which no file name can (stimulus ids "
            f"{preview([columns['stimulus_id'][k] for k in nul])}, images "
            f"{preview([columns['image'][k] for k in nul])}): remove it"
        )
    missing = [
        k
        for k, img in enumerate(columns["image"])
        if check_images and not (img.strip() and (root / img).is_file())
    ]
    folders = [k for k in missing if (img := columns["image"][k]).strip() and (root / img).is_dir()]
    if folders and len(folders) == len(missing):
        raise StimulusError(
            f"{path}: image path(s) not a regular file (a folder?), relative to {root}, on "
            f"line(s) {[lines[k] for k in folders][:10]}: stimulus ids "
            f"{preview([columns['stimulus_id'][k] for k in folders])}, images "
            f"{preview([columns['image'][k] for k in folders])}; name the image file itself"
        )
    if missing:
        images = [columns["image"][k] for k in missing]
        quoted = any(map(_wrapped_in_quotes, images))
        raise StimulusError(
            f"{path}: image file(s) not found (relative to {root}) on line(s) "
            f"{[lines[k] for k in missing][:10]}: stimulus ids "
            f"{preview([columns['stimulus_id'][k] for k in missing])}, "
            f"images {preview(images)}"
            + (f" (paths wrapped in quotes: {_NO_QUOTING})" if quoted else "")
            + (
                f"; {len(folders)} of them are folders, not files: stimulus ids "
                f"{preview([columns['stimulus_id'][k] for k in folders])}"
                if folders
                else ""
            )
            + _missing_image_hints(path, images)
        )
    df = pd.DataFrame(columns, dtype=str)
    if verify_images and check_images:
        _scan(df, root, where=str(path), lines=lines, workers=1)
    return df


def _missing_image_hints(manifest: Path, images: Sequence[str], n: int = 10) -> str:
    """Why the first ``n`` missing images may be missing, when it is one of two causes that
    print alike: a file named in another Unicode form (é as one character or as e + accent,
    as macOS writes names), or a manifest that is a symbolic link (paths are relative to the
    link's folder, and the images lie next to its target)."""
    root, hints = manifest.parent, []
    target = manifest.resolve()
    if manifest.is_symlink() and target.parent != root.resolve():
        beside = [img for img in images[:n] if img.strip() and (target.parent / img).is_file()]
        if beside:
            hints.append(
                f"{manifest} is a symbolic link to {target}, and the images are next to the "
                f"target: paths are read relative to the link's folder {root}; link the images "
                f"folder there too, or give absolute paths"
            )
    listings: dict[Path, dict[str, str]] = {}
    for img in images[:n]:
        want = root / img
        folder = want.parent
        if folder not in listings:
            try:
                names = [e.name for e in os.scandir(folder)]
            except OSError:
                names = []
            listings[folder] = {unicodedata.normalize("NFC", e): e for e in names}
        found = listings[folder].get(unicodedata.normalize("NFC", want.name))
        if found is not None and found != want.name:
            hints.append(
                f"{ascii(img)} is on disk as {ascii(found)}: the same name in another Unicode "
                "form (accents as one character or as letter + accent); rename the file or "
                "write the name as it is on disk"
            )
    return "".join(f". {h}" for h in hints)


#: File signatures of what is sometimes saved under a manifest's name.
_NOT_TEXT = {
    b"PK\x03\x04": "a zip file (an .xlsx or .ods spreadsheet?)",
    b"\xd0\xcf\x11\xe0": "an .xls spreadsheet",
    b"\x1f\x8b": "gzip-compressed",
}


def _field_of(data: bytes, line: str, column: str) -> str | None:
    """``column``'s field of a manifest ``line``, by the header of ``data`` (the columns come in
    any order: the first field was named as the stimulus, a caption where it came first,
    audit); None where the header has no such column or the line no such field."""
    header = data.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    names = [n.strip() for n in header.lstrip("\ufeff").rstrip("\r").split("\t")]
    fields = line.rstrip("\r").split("\t")
    k = names.index(column) if column in names else len(fields)
    return fields[k] if k < len(fields) else None


def _decode_utf8(path: Path, data: bytes) -> str:
    """The manifest's text; a StimulusError names the line (and stimulus) of a non-UTF-8 byte."""
    for magic, kind in _NOT_TEXT.items():
        if data.startswith(magic):
            raise StimulusError(
                f"{path}: the manifest is {kind}, not text; save it as tab-separated text in "
                "UTF-8 (from a spreadsheet: tab-delimited text, UTF-8), or decompress it"
            )
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(data) >= 2 and b"\x00" in data[:2]):
        raise StimulusError(
            f"{path}: the manifest is UTF-16 (as Excel's 'Unicode Text' saves it), not UTF-8; "
            "save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        start = data.rfind(b"\n", 0, err.start) + 1
        end = data.find(b"\n", err.start)
        line = data[start : end if end >= 0 else len(data)].decode("utf-8", errors="replace")
        sid = _field_of(data, line, "stimulus_id") if line_no > 1 else None
        raise StimulusError(
            f"{path}: line {line_no}"
            + (f" (stimulus {sid!r})" if sid else "")
            + f" is not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start}); "
            "save the manifest as UTF-8 (e.g. iconv -f cp1252 -t utf-8 for a file a Windows "
            "program such as Excel saved: -f latin1 would read its curly quotes and dashes as "
            "invisible control characters)"
        ) from err
    return text.lstrip("\ufeff")  # a byte-order mark, or several from a doubled conversion


def _parse_tsv(path: Path, text: str) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, rows (one list of fields per stimulus) and each row's 1-based line number."""
    lines = text.split("\n")  # not splitlines(): \x0b, \x1c, \x85, \u2028 are caption text
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    # a line of spaces is empty too (never a stimulus: a manifest has at least three fields)
    lines = [ln if ln.strip(" ") else "" for ln in lines]
    while lines and lines[-1] == "":
        lines.pop()
    cr = [k for k, ln in enumerate(lines, start=1) if "\r" in ln]
    if cr:
        raise StimulusError(
            f"{path}: line(s) {cr[:10]} contain a carriage return (CR) that does not end the "
            "line; lines end in LF or CRLF, and a field cannot contain a line break"
        )
    if not lines:
        raise StimulusError(
            f"{path}: the manifest is empty; it needs a header line "
            f"{'<TAB>'.join(COLUMNS)} and one tab-separated line per stimulus"
        )
    header = lines[0].split("\t")
    _check_header(path, header)
    n = len(header)
    id_col = header.index("stimulus_id")
    rows: list[list[str]] = []
    row_lines: list[int] = []
    empty: list[int] = []
    bad: list[tuple[int, list[str]]] = []
    for k, line in enumerate(lines[1:], start=2):
        if line == "":
            empty.append(k)
            continue
        fields = line.split("\t")
        if [fields[0].lstrip("\ufeff"), *fields[1:]] == header:  # a BOM the join kept too
            raise StimulusError(
                f"{path}: line {k} repeats the header (two manifests joined?): the header is line "
                "1 only; remove it"
            )
        if len(fields) != n:
            bad.append((k, fields))
        rows.append(fields)
        row_lines.append(k)
    if empty:
        raise StimulusError(
            f"{path}: empty line(s) {empty[:10]} between stimuli; every line after the header "
            "is one stimulus: remove the empty lines"
        )
    if bad:
        k, fields = bad[0]
        before = lines[k - 2].split("\t") if k > 2 else []  # the line before it, if a stimulus
        if len(fields) == 1 and len(before) == n:
            # no tab: most likely the rest of the line before, whose caption a line break split
            # (then its one field is a piece of that caption, not an id)
            sid = ""
            hint = (
                "a line break inside the caption of the line before it (line "
                f"{k - 1}, stimulus_id {_short(before[id_col])!r}), or missing fields? Each "
                "stimulus is one line"
            )
            if before[-1].startswith('"') and before[-1].count('"') % 2:
                hint += f" (its caption opens a quote this line closes: {_NO_QUOTING})"
        else:
            sid = f", stimulus_id {_short(fields[id_col])!r}" if id_col < len(fields) else ""
            hint = (
                "a tab inside a field, or a trailing tab? Fields are split on every tab (no "
                "quoting)"
                if len(fields) > n
                else "a line break inside a caption, or a missing field? Each stimulus is one line"
            )
        more = f"; {len(bad)} such lines: {[b[0] for b in bad][:10]}" if len(bad) > 1 else ""
        raise StimulusError(
            f"{path}: line {k}{sid} has {len(fields)} tab-separated fields, the header has {n} "
            f"({', '.join(header)}): {hint}{more}"
        )
    if not rows:
        raise StimulusError(f"{path}: the manifest has no stimuli")
    return header, rows, row_lines


def _check_header(path: Path, header: list[str]) -> None:
    empty = [j + 1 for j, name in enumerate(header) if name == ""]
    if empty:
        raise StimulusError(
            f"{path}: the header (line 1) has an empty column name at position(s) {empty} "
            f"(a trailing tab?); found {header}"
        )
    dup = sorted({name for name in header if header.count(name) > 1})
    if dup:
        raise StimulusError(f"{path}: the header (line 1) names column(s) {dup} more than once")
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        near = [name for name in header if name.strip().lower() in missing]
        quoted = [name for name in header if _wrapped_in_quotes(name)]
        raise StimulusError(
            f"{path}: missing column(s) {missing}; a manifest needs {list(COLUMNS)}, "
            f"found {header}"
            + (f" (names are exact: {near} differ in case or spaces)" if near else "")
            + (f" ({quoted} are wrapped in quotes: {_NO_QUOTING})" if quoted else "")
        )


#: Letters and symbols that show nothing (Hangul fillers, the blank Braille pattern).
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: only whitespace, control and format characters (such
    as a zero-width space or a byte-order mark), marks with no letter to mark (a lone
    combining accent, a variation selector) and blank letters (a Hangul filler)."""
    return all(
        ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf", "Mn", "Me")
        for ch in text
    )


def _wrapped_in_quotes(text: str) -> bool:
    """True when ``text`` starts and ends with a double quote (two of them at least)."""
    return len(text) >= 2 and text[0] == text[-1] == '"'


def is_csv_quoted(text: str) -> bool:
    """True when ``text`` is a field as a CSV writer quotes it: wrapped in double quotes, every
    quote inside doubled, at least one of them (pandas' ``to_csv`` writes a caption with a
    quote in it so, whatever the separator)."""
    inner = text[1:-1]
    return _wrapped_in_quotes(text) and '""' in inner and '"' not in inner.replace('""', "")


#: What UTF-8 text decoded as Windows-1252 (or Latin-1) and encoded again looks like: an
#: accented letter as 'Ã' + a symbol, a curly quote or dash as 'â€' + one more, 'Â' + NBSP.
_MOJIBAKE = re.compile("Ã[\u0080-\u00bf]|â€|Â[\u00a0-\u00bf]")
#: C1 control characters: invisible, and what Windows-1252 quotes and dashes become when the
#: text is decoded as Latin-1 (iconv -f latin1)
_C1_CONTROL = re.compile("[\u0080-\u009f]")


def _check_stimuli(
    where: str, ids: list[str], captions: list[str], lines: list[int], quoted_fix: str = _NO_QUOTING
) -> None:
    """Ids unique, visible and without NUL; captions visible and not CSV-quoted (refused with
    ``quoted_fix``); errors name ``where``, lines and ids. Garbled or quote-wrapped captions are
    warned about by line."""
    empty_id = [k for k, s in enumerate(ids) if is_blank(s)]
    if empty_id:
        raise StimulusError(
            f"{where}: empty stimulus_id on line(s) {[lines[k] for k in empty_id][:10]} "
            "(only spaces or invisible characters)"
        )
    nul = [k for k, s in enumerate(ids) if "\x00" in s]
    if nul:
        raise StimulusError(
            f"{where}: stimulus id(s) {preview([ids[k] for k in nul])} on line(s) "
            f"{[lines[k] for k in nul][:10]} contain a NUL character, which the HDF5 feature "
            "files cannot store: remove it"
        )
    counts = Counter(ids)
    dup_rows = [k for k, s in enumerate(ids) if counts[s] > 1]
    if dup_rows:
        raise StimulusError(
            f"{where}: duplicate stimulus ids {preview(sorted({ids[k] for k in dup_rows}))} on "
            f"lines {[lines[k] for k in dup_rows][:10]}"
        )
    forms = Counter(unicodedata.normalize("NFC", s) for s in ids)
    alike = [k for k, s in enumerate(ids) if forms[unicodedata.normalize("NFC", s)] > 1]
    if alike:  # distinct ids that print alike: e.g. 'café' typed and 'café' from a Mac file name
        log.warning(
            "%s: stimulus ids on lines %s differ only in Unicode form (they print alike but are "
            "different ids): %s",
            where,
            [lines[k] for k in alike][:10],
            ", ".join(ascii(ids[k]) for k in alike[:10]),
        )
    empty_cap = [k for k, c in enumerate(captions) if is_blank(c)]
    if empty_cap:
        raise StimulusError(
            f"{where}: empty caption on line(s) {[lines[k] for k in empty_cap][:10]} "
            f"(only spaces or invisible characters; stimulus ids "
            f"{preview([ids[k] for k in empty_cap])})"
        )
    quoted = [k for k, c in enumerate(captions) if is_csv_quoted(c)]
    if quoted:
        k = quoted[0]
        raise StimulusError(
            f"{where}: the caption of stimulus {ids[k]!r} on line {lines[k]} is CSV-quoted "
            f"({_short(captions[k], 60)!r}: wrapped in quotes, the quotes inside doubled); "
            f"{len(quoted)} caption(s) in all, on line(s) {[lines[j] for j in quoted][:10]}. "
            "Read as written, the quotes would reach the language models: "
            f"{quoted_fix}, or unquote those fields"
        )
    # read as written, with a warning (CSV-quoted captions are refused above)
    for flagged, what in (
        ([k for k, c in enumerate(captions) if _MOJIBAKE.search(c)],
         "hold UTF-8 text decoded as Windows-1252 and saved again ('cafÃ©' for 'café', 'â€œ' "
         "for a curly quote): re-save the manifest from the original as UTF-8"),
        ([k for k, c in enumerate(captions) if _C1_CONTROL.search(c)],
         "hold invisible C1 control characters (U+0080..U+009F), which is what the curly "
         "quotes and dashes of a Windows-1252 text become when it is decoded as Latin-1: "
         "convert the original with iconv -f cp1252 -t utf-8 unless meant"),
        ([k for k, c in enumerate(captions) if _wrapped_in_quotes(c)],
         "are wrapped in double quotes, which reach the language models as written (a "
         "spreadsheet's export quotes fields that hold a comma): remove them unless meant"),
        ([k for k, c in enumerate(captions) if not unicodedata.is_normalized("NFC", c)],
         "are not in Unicode's composed form (NFC): a decomposed accent ('e' + U+0301, as "
         "macOS writes file names) reaches the language models as other tokens than 'é', and "
         "two such spellings of one caption are not found as duplicates: normalise the "
         "manifest to NFC (unicodedata.normalize) unless meant"),
    ):  # fmt: skip
        if flagged:
            log.warning(
                "%s: the captions of %d stimuli %s; lines %s, e.g. stimulus %r: %r",
                where, len(flagged), what, [lines[k] for k in flagged][:10], ids[flagged[0]],
                _short(captions[flagged[0]], 60),
            )  # fmt: skip


def _field_text(value: Any, where: str) -> str:
    """A table value as manifest text: str as is, numbers by ``str``; missing values refused."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)) and not pd.isna(
        value
    ):
        return str(value)
    what = "a missing value" if value is None or pd.isna(value) else f"a {type(value).__name__}"
    raise StimulusError(f"{where} is {what}; a manifest field is text (or a number)")


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``df`` as a stimulus manifest that :func:`read_manifest` reads back byte-identical.

    UTF-8 without byte-order mark, LF line ends, the header from ``df``'s columns (which must
    include ``stimulus_id``, ``image``, ``caption``), one line per row, fields joined by tabs.
    Strings are written as they are, numbers with ``str``. Refused, naming the row (its line in
    the file and its stimulus id) and the column: a field containing a tab, CR or LF (the format
    has no quoting), a missing value, an empty or duplicate id, an empty caption. Written to a
    temporary file and renamed into place: nothing is left at ``path`` on error. Image files are
    not checked here (read_manifest does that).
    """
    path = Path(path)
    cols = [str(c) for c in df.columns]
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise StimulusError(f"{path}: cannot write a manifest without column(s) {missing}")
    for c in cols:
        if not c or any(ch in c for ch in "\t\r\n") or c.startswith("\ufeff"):
            raise StimulusError(
                f"{path}: column name {c!r} cannot be written (empty, or contains a tab, CR, LF "
                "or a leading byte-order mark)"
            )
    if len(set(cols)) != len(cols):
        raise StimulusError(f"{path}: duplicate column names {cols}")
    id_pos = cols.index("stimulus_id")
    out = ["\t".join(cols)]
    rows: list[list[str]] = []
    for i, values in enumerate(df.itertuples(index=False, name=None)):
        sid = values[id_pos]
        row = []
        for col, value in zip(cols, values, strict=True):
            where = f"{path}: row {i} (line {i + 2}, stimulus_id {sid!r}), column {col!r}"
            text = _field_text(value, where)
            bad = [name for ch, name in (("\t", "tab"), ("\r", "CR"), ("\n", "LF")) if ch in text]
            if bad:
                raise StimulusError(
                    f"{where} contains a {'/'.join(bad)}: a manifest field cannot (one stimulus "
                    "per line, fields split on tabs, no quoting); replace it, e.g. by a space"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise StimulusError(f"{where} is not encodable as UTF-8 ({err})") from err
            row.append(text)
        rows.append(row)
        out.append("\t".join(row))
    if not rows:
        raise StimulusError(f"{path}: cannot write a manifest with no stimuli")
    cap_pos = cols.index("caption")
    _check_stimuli(
        f"{path} (not written)",
        [r[id_pos] for r in rows],
        [r[cap_pos] for r in rows],
        list(range(2, len(rows) + 2)),
        _READ_UNQUOTED,  # not "write it with write_manifest", which it is doing (audit)
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(("\n".join(out) + "\n").encode("utf-8"))
    return path


def order_manifest_like(
    path: str | os.PathLike, ids: Sequence[str], out: str | os.PathLike | None = None
) -> Path:
    """Write the manifest at ``path`` with its stimulus lines in the order of ``ids`` (a feature
    file's ``stimulus_ids``), each line kept byte for byte, to ``out`` (None: the manifest
    itself, through a symbolic link to its target, its permissions kept); returns where.

    For a manifest whose rows were only reordered since its features were extracted: put back
    in the features' order, its stamps are what they were and nothing is extracted again
    (docs/cluster.md, "What reruns"). Refused, naming the stimuli, when ``ids`` and the
    manifest do not list the same stimuli (a stimulus added or removed since, or one that
    ``stimuli.drop_duplicates`` left out of the features: where its line stood is not known).
    """
    path = Path(path)
    read_manifest(path, check_images=False)  # refused here as a run would refuse it
    data = path.read_bytes()
    header, rows, lines = _parse_tsv(path, _decode_utf8(path, data))
    id_col = header.index("stimulus_id")
    line_of = {r[id_col]: k for r, k in zip(rows, lines, strict=True)}
    ids = [str(i) for i in ids]
    twice = [i for i, n in Counter(ids).items() if n > 1]
    unknown = [i for i in ids if i not in line_of]
    left = sorted(set(line_of) - set(ids), key=line_of.__getitem__)
    if twice or unknown or left:
        said = [
            f"{len(what)} {how} ({preview(what)})"
            for what, how in (
                (twice, "listed twice in the order given"),
                (unknown, "in the order given but not in the manifest"),
                (left, "in the manifest but not in the order given"),
            )
            if what
        ]
        raise StimulusError(
            f"{path}: cannot put its rows in the order given, which lists other stimuli: "
            f"{'; '.join(said)}. Only a manifest whose rows were reordered, and "
            "nothing else, can be put back (with stimuli.drop_duplicates, the stimuli it left "
            "out are not in the feature files)"
        )
    chunks = data.split(b"\n")  # line k is chunks[k - 1], its CR kept (as _parse_tsv splits)
    crlf = chunks[0].endswith(b"\r")
    body = [chunks[0]]
    for i in ids:
        line = chunks[line_of[i] - 1]
        body.append(line + b"\r" if crlf and not line.endswith(b"\r") else line)
    target = path.resolve() if out is None else Path(out)
    mode = stat.S_IMODE(target.stat().st_mode) if out is None else None
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"\n".join(body) + b"\n")
    if mode is not None:
        os.chmod(target, mode)  # the user's file: its group may read it, or may not
    return target


# ============================================================== what an extraction reads
#: The manifest columns each modality's extraction reads. With ``stimuli.drop_duplicates`` both
#: read all three: a duplicate is the same decoded image *and* the same caption.
EXTRACTION_COLUMNS = {"vision": ("stimulus_id", "image"), "language": ("stimulus_id", "caption")}


def extraction_columns(modality: str, drop_duplicates: bool = False) -> tuple[str, ...]:
    """The manifest columns whose content defines ``modality``'s features (in manifest order)."""
    if modality not in EXTRACTION_COLUMNS:
        raise ValueError(f"modality must be one of {sorted(EXTRACTION_COLUMNS)}, got {modality!r}")
    return COLUMNS if drop_duplicates else EXTRACTION_COLUMNS[modality]


def _image_file_sizes(images: Sequence[str], root: Path) -> list[int | None]:
    """Each image file's size in bytes (None where it cannot be read): what the stamps held
    before the files' contents entered them (read only to carry such a stamp over)."""
    sizes: list[int | None] = []
    for img in images:
        try:
            sizes.append(os.stat(root / img).st_size)
        except OSError:
            sizes.append(None)
    return sizes


#: a stamp's field for the digest it had in the earlier form it was carried over from
BEFORE = "sha256_before"
#: the cache of image file digests that :func:`write_manifest_stamp` keeps next to its stamps
IMAGE_DIGESTS = "image_digests.json"
#: the digests of the image files that :func:`check_images_decode` has seen decode
DECODED_IMAGES = "decoded_images.json"
#: threads that decode images for :func:`check_images_decode` (at most; one per core)
DECODE_THREADS = 8


def _decoder() -> str:
    """What decodes the images: Pillow's version and the digest of this module, which holds
    the decoding rules (:func:`load_rgb`). A record of decoded images holds for this only."""
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    return f"Pillow {PIL.__version__}; xmodal.stimuli {code}"


def image_file_digests(
    images: Sequence[str],
    root: str | os.PathLike,
    cache: str | os.PathLike | None = None,
) -> list[str | None]:
    """Each image file's SHA-256 (None where it is not a readable file: the extraction names
    it), for paths relative to ``root``; ``cache`` as in :func:`xmodal.io.file_digests`, which
    reads only new or changed files."""
    return file_digests([Path(root) / img for img in images], cache)


def check_images_decode(
    manifest: pd.DataFrame,
    root: str | os.PathLike,
    record: str | os.PathLike,
    digest_cache: str | os.PathLike | None = None,
    *,
    digests: Sequence[str | None] | None = None,
    workers: int | None = None,
) -> int:
    """Decode every image of ``manifest`` that ``record`` has not seen decode, by the rules
    the vision extraction decodes it by (:func:`load_rgb`), and add it there; returns how
    many were decoded now.

    A missing, damaged or unconvertible image is one :class:`StimulusError` naming every such
    stimulus and the first file, raised before any extraction job is submitted: found by the
    extraction instead, it failed each vision model's GPU job, once per retry. ``record`` (a
    JSON list of file digests, rewritten atomically; a write that fails is a warning) holds
    what has decoded, so each image file is decoded once, wherever it is moved or copied, until
    the decoder changes (:func:`_decoder`: Pillow's version or this module's code).
    ``root`` is the manifest's folder; ``digests`` the image files' digests where already
    computed (:func:`image_file_digests` with ``digest_cache`` otherwise); ``workers`` threads
    (default: one per core, at most :data:`DECODE_THREADS`).
    """
    from xmodal.parallel import available_cores

    record = Path(record)
    decoder = _decoder()
    try:
        held = json.loads(record.read_text(encoding="utf-8"))
        seen = set(held["digests"]) if held["decoder"] == decoder else set()
    except (OSError, ValueError, TypeError, KeyError):
        seen = set()  # none yet, unreadable, or from another decoder: decode again
    if digests is None:
        digests = image_file_digests(manifest["image"].astype(str).tolist(), root, digest_cache)
    todo = [k for k, d in enumerate(digests) if d is None or d not in seen]
    if not todo:
        return 0
    threads = workers if workers is not None else min(DECODE_THREADS, available_cores())
    log.info("%s: checking that %d image(s) decode, once each", root, len(todo))
    # one StimulusError naming every image that does not decode (xmodal.stimuli._scan)
    table = _scan(manifest.iloc[todo], Path(root), where=str(root), lines=None,
                  workers=max(1, threads))  # fmt: skip
    try:  # no sweep: two processes may write it at once (the two stamp jobs, two starts)
        with atomic_path(record, sweep=False) as tmp:
            done = sorted(seen | set(table["bytes_sha256"]))
            tmp.write_text(json.dumps({"decoder": decoder, "digests": done}) + "\n")
    except OSError as err:  # a record is a cache: without it, the images decode again
        log.warning("could not record the decoded images in %s (%s)", record, err)
    return len(todo)


def _stamp(
    manifest: pd.DataFrame,
    modality: str,
    drop_duplicates: bool,
    per_image: Sequence[Any] | None = None,
    flag: str | None = None,
    *,
    paths: bool = True,
    ordered: bool = True,
) -> dict[str, Any]:
    """The stamp record; ``per_image`` (one value per stimulus) enters each row, and ``flag``
    (set to true) names it in the record; ``paths=False`` leaves the image paths' text out
    (their files' digests stand for them); ``ordered=False`` digests the rows in any order
    (sorted), which a manifest whose rows were only reordered keeps."""
    columns = extraction_columns(modality, drop_duplicates)
    if not paths:
        columns = tuple(c for c in columns if c != "image")
    rows = manifest.loc[:, list(columns)].astype(str).to_numpy().tolist()
    record: dict[str, Any] = {"modality": modality, "columns": list(columns)}
    if per_image is not None:
        rows = [[*row, value] for row, value in zip(rows, per_image, strict=True)]
        record[flag] = True
    if not ordered:
        rows = sorted(rows, key=lambda row: json.dumps(row, ensure_ascii=False))
    payload = json.dumps(rows, ensure_ascii=False).encode("utf-8")  # one list per stimulus
    return {**record, "n_stimuli": len(manifest), "sha256": hashlib.sha256(payload).hexdigest()}


def manifest_stamp(
    manifest: pd.DataFrame,
    modality: str,
    drop_duplicates: bool = False,
    root: str | os.PathLike | None = None,
    digest_cache: str | os.PathLike | None = None,
    image_digests: Sequence[str | None] | None = None,
    *,
    ordered: bool = True,
) -> dict[str, Any]:
    """What ``modality``'s extraction reads from a manifest, as a small record: the columns,
    the number of stimuli and the SHA-256 of those columns' fields, row by row in manifest
    order (``ordered=False``: in any order, the same for the manifest's rows reordered).
    Other columns (annotations) and the other modality's column do not enter it.

    With ``root`` (the folder the image paths are relative to) and an ``image`` column among
    them, each image file's SHA-256 enters instead of its path's text
    (:func:`image_file_digests`, with ``digest_cache``): an image replaced under the same path
    changes the stamp, whatever its size; a copy, a ``touch`` or a path written another way
    (``./images/…``, a renamed folder), which keep the contents, do not (docs/cluster.md,
    "What reruns"). ``image_digests`` (one per row; None: not known) gives digests already
    computed from the bytes an extraction decoded; only the files without one are read.
    """
    if root is None or "image" not in extraction_columns(modality, drop_duplicates):
        # a stamp that reads no image keeps the record it had before images entered
        return _stamp(manifest, modality, drop_duplicates, ordered=ordered)
    images = manifest["image"].astype(str).tolist()
    digests = list(image_digests) if image_digests is not None else [None] * len(images)
    if len(digests) != len(images):
        raise ValueError(f"{len(digests)} image digests for {len(images)} stimuli")
    missing = [k for k, d in enumerate(digests) if d is None]
    if missing:
        read = image_file_digests([images[k] for k in missing], root, digest_cache)
        for k, d in zip(missing, read, strict=True):
            digests[k] = d
    return _stamp(
        manifest, modality, drop_duplicates, digests, "image_file_sha256", paths=False,
        ordered=ordered,
    )  # fmt: skip


def _size_stamp(
    manifest: pd.DataFrame, modality: str, drop_duplicates: bool, root: Path
) -> dict[str, Any]:
    """The stamp as written before the images' contents entered it (their sizes did)."""
    sizes = _image_file_sizes(manifest["image"].astype(str).tolist(), root)
    return _stamp(manifest, modality, drop_duplicates, sizes, "image_file_sizes")


#: The settings a workflow rule made the manifest from, written next to it after it.
MANIFEST_SETTINGS = "settings.json"


def write_manifest_settings(manifest: str | os.PathLike, settings: Mapping[str, Any]) -> None:
    """Record, next to a manifest a rule just made, the settings it was made from (config
    ``stimuli.*``: a hub dataset's repo, revision and split; the demo's size and seed)."""
    record = {key: settings[key] for key in sorted(settings)}
    with atomic_path(Path(manifest).with_name(MANIFEST_SETTINGS)) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def manifest_settings_changed(
    manifest: str | os.PathLike, settings: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The settings the manifest on disk was made from, when they differ from ``settings``
    (the config's); None when they are the same or unknown (no manifest, or one made before
    they were recorded, or by hand).

    Different settings mean the rule that makes the manifest reruns, and Snakemake 9 does not
    re-extract in that run (docs/cluster.md, "What reruns"): the workflow then stops, saying
    to make the manifest alone first.
    """
    path = Path(manifest).with_name(MANIFEST_SETTINGS)
    if not Path(manifest).is_file():
        return None
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    want = {key: settings[key] for key in sorted(settings)}
    return None if recorded == want else recorded


def write_manifest_stamp(
    manifest_path: str | os.PathLike,
    out: str | os.PathLike,
    modality: str,
    drop_duplicates: bool = False,
    manifest: pd.DataFrame | None = None,
    check_images: bool = True,
    features: Sequence[str | os.PathLike] | None = None,
) -> bool:
    """Write ``modality``'s :func:`manifest_stamp` of a manifest to ``out`` (JSON) unless ``out``
    already holds exactly that record; returns whether a changed stamp was written.

    A manifest whose rows were only reordered since the last call changes the stamp: a warning
    says so, and how to keep the features (the digest of the rows in any order is kept next to
    the stamp, :func:`stamp_rows_path`), when one of ``features`` (the modality's feature
    files; None: without looking at them) was extracted under the old stamp.

    The stamp is what an extraction depends on instead of the manifest's modification time
    (docs/cluster.md, "What reruns"): left untouched when an edit does not change what the
    modality reads, so that adding an annotation column re-extracts nothing and fixing a
    caption re-extracts only the language models. Image file contents enter it (paths relative
    to the manifest's folder, as the manifest's paths are), their digests cached in
    ``image_digests.json`` next to ``out`` (:func:`image_file_digests`). With ``check_images``,
    a stamp of what reads the images first checks that each decodes
    (:func:`check_images_decode`, once per file, recorded in ``decoded_images.json`` next to
    ``out``). ``manifest`` is the manifest already read (read here, without the image checks,
    when None).

    A stamp of an earlier form (image file sizes; image paths with the digests) that still
    matches the manifest and the files is rewritten in the current form with its modification
    time kept, its digest kept as ``sha256_before`` for the feature files extracted under it
    (:func:`xmodal.features.check_against_stamp`), and False is returned: the upgrade
    re-extracts nothing.
    """
    out = Path(out)
    root = Path(manifest_path).parent
    if manifest is None:
        manifest = read_manifest(manifest_path, check_images=False)
    args = (modality, drop_duplicates)
    digests = None  # the image files' digests, read once for the stamp and the check
    if "image" in extraction_columns(modality, drop_duplicates):
        images = manifest["image"].astype(str).tolist()
        digests = image_file_digests(images, root, out.with_name(IMAGE_DIGESTS))
    stamp = manifest_stamp(manifest, *args, root, image_digests=digests)
    if check_images and digests is not None:
        # the extraction will decode every image: find what it cannot before it runs
        check_images_decode(manifest, root, out.with_name(DECODED_IMAGES), digests=digests)
    record = {"manifest": str(manifest_path), **stamp}
    try:
        old, st = json.loads(out.read_text(encoding="utf-8")), out.stat()
    except (OSError, ValueError):
        old, st = None, None  # missing or unreadable: written below

    def any_order() -> str:
        return manifest_stamp(manifest, *args, root, image_digests=digests, ordered=False)["sha256"]

    _note_rows(out, manifest_path, modality, old, stamp["sha256"], any_order, features)
    if isinstance(old, dict) and {k: v for k, v in old.items() if k != BEFORE} == record:
        return False
    # an earlier form of the stamp: its time is kept if the manifest and files still match it
    earlier = None
    if isinstance(old, dict) and old.get("image_file_sizes") is True:
        earlier = _size_stamp(manifest, *args, root)
    elif (
        isinstance(old, dict) and old.get("image_file_sha256") and "image" in old.get("columns", ())
    ):
        earlier = _stamp(manifest, *args, digests, "image_file_sha256", paths=True)
    carried = earlier is not None and old == {"manifest": str(manifest_path), **earlier}
    if carried:
        record[BEFORE] = old["sha256"]
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if carried:
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        log.info("%s: carried over to the stamp's current form; time kept", out)
        return False
    return True


def stamp_rows_path(stamp: str | os.PathLike) -> Path:
    """Where :func:`write_manifest_stamp` keeps, next to a stamp, the digest of the stamp's
    rows in any order (not a result, and no rule reads it: safe to delete)."""
    stamp = Path(stamp)
    return stamp.with_name(f"{stamp.stem}.rows.json")


def _note_rows(
    out: Path,
    manifest_path: str | os.PathLike,
    modality: str,
    old: Any,
    sha256: str,
    any_order: Callable[[], str],
    features: Sequence[str | os.PathLike] | None,
) -> None:
    """Record the stamp's digest and its rows' digest in any order (``any_order()``, computed
    only when the stamp's digest is not the one recorded) next to the stamp, and warn
    when the manifest lists the stimuli the stamp was written from in another order: the
    stamp then changes, and with it every feature file of the modality extracted under the old
    one (of ``features``; None: any) is extracted again, though each stimulus's features would
    come out the same up to rounding (docs/cluster.md, "What reruns")."""
    path = stamp_rows_path(out)
    try:
        seen = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        seen = None
    if (
        isinstance(seen, dict)
        and seen.keys() == {"sha256", "rows_sha256"}
        and seen["sha256"] == sha256
    ):
        return  # the same rows in the same order: the same digest in any order
    rows_sha256 = any_order()
    if (
        isinstance(seen, dict)
        and isinstance(old, dict)
        and seen.get("sha256") == old.get("sha256") != sha256
        and seen.get("rows_sha256") == rows_sha256
    ):
        from xmodal.features import extracted_under

        again, like = "every", "FEATURES"
        if features is not None:
            stale = extracted_under(features, {old["sha256"], old.get(BEFORE, old["sha256"])})
            again = f"{len(stale)} of {len(features)}" if stale else ""
            like = str(stale[0]) if stale else like
        if again:
            log.warning(
                "%s: the manifest lists the same stimuli as before, in another order. The %s "
                "stamp %s, and the feature files, hold them in manifest order, so %s %s "
                "model(s) will be extracted again, though each stimulus's features come out "
                "the same (up to rounding). To keep them, put the rows back in their earlier "
                "order before the next run: python -m xmodal.stimuli order-like %s %s (nothing "
                "then reruns: docs/cluster.md, \"What reruns\")",
                manifest_path, modality, out, again, modality, shlex.quote(like),
                shlex.quote(str(manifest_path)),
            )  # fmt: skip
    record = {"sha256": sha256, "rows_sha256": rows_sha256}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


#: The record of the manifest's content that :func:`follow_manifest_content` keeps next to the
#: stamps (not a result: safe to delete).
MANIFEST_CONTENT = "manifest_content.json"


def follow_manifest_content(
    manifest_path: str | os.PathLike,
    record: str | os.PathLike,
    touch: bool = True,
    readers: Sequence[str | os.PathLike] | None = None,
) -> bool:
    """Give the manifest the current time when its bytes differ from ``record``'s (the SHA-256
    of the manifest when the last call saw it), and record them; True when the steps that read
    it by time will run again (it was given the time, or is newer than their results).

    The steps that read the whole manifest (the stimuli report, the stimulus properties, the
    provenance, the gallery) follow its modification time; a corrected manifest copied in with
    an older one (``cp -p``, ``rsync -a``) left them as they were, the properties' correlations
    from the old annotations, with exit 0 (audit). With a new time, Snakemake reruns them (the
    extractions follow their stamps, :func:`write_manifest_stamp`, not the time). A manifest
    whose time cannot be set (someone else's, in a folder the lab shares read-only) needs none
    when it is already newer than every result of those steps (``readers``, their outputs:
    edited in place, or the results deleted); otherwise it is a :class:`StimulusError` naming
    it and the newer results. The first call only records, and so does one without ``touch``
    (at the end of a run, whose own rules may have made the manifest again: those give it a
    new time themselves).
    """
    manifest, record = Path(manifest_path), Path(record)
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    try:
        seen = json.loads(record.read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        seen = None
    if seen == digest:
        return False
    touched = touch and seen is not None
    if touched:
        try:
            os.utime(manifest)
        except OSError as err:
            # Snakemake reruns a step whose output is older than the manifest, strictly
            edited = manifest.stat().st_mtime_ns
            newer = [
                str(p)
                for p in readers or ()
                if os.path.exists(p) and os.stat(p).st_mtime_ns >= edited
            ]
            if readers is None or newer:
                held = f" (newer than it: {preview(newer, 12)})" if newer else ""
                raise StimulusError(
                    f"{manifest}: its content changed since the last run, and its modification "
                    f"time cannot be set ({err.strerror}); the steps that read it by time "
                    "(stimuli_report, image_properties, stimulus_properties, provenance, the "
                    f"gallery) would keep results from the old content{held}. Make the "
                    "manifest writable, copy it in with a new time (cp without -p), or delete "
                    "those results"
                ) from None
            log.info(
                "%s: its time cannot be set (%s), but it is newer than every result of the "
                "steps that read it by time, so they run again",
                manifest,
                err.strerror,
            )
    with atomic_path(record) as tmp:
        tmp.write_text(
            json.dumps({"manifest": str(manifest_path), "sha256": digest}, indent=1) + "\n",
            encoding="utf-8",
        )
    return touched


# ============================================================================== images
def _image_label(stimulus_id: str, path: str | os.PathLike | None) -> str:
    return f"stimulus {stimulus_id!r}" + (f": image {path}" if path is not None else "")


def _alpha_note(alpha: Image.Image) -> str:
    a = np.asarray(alpha)
    frac = float(np.mean(a < 255)) if a.size else 0.0
    if frac == 0:
        return "alpha discarded (every pixel opaque)"
    return (
        f"alpha discarded ({100 * frac:.1f}% of pixels not fully opaque; their stored colour is "
        "used, as timm does)"
    )


def _sixteen_bit_to_rgb(
    image: Image.Image, stimulus_id: str, path: str | os.PathLike | None
) -> tuple[Image.Image, str]:
    """I;16* and I (0..65535): ``v >> 8`` to 8 bits, replicated to RGB."""
    mode = image.mode
    a = np.asarray(image)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    label = _image_label(stimulus_id, path)
    kind = "16-bit grayscale" if mode != "I" else "32-bit integer grayscale"
    if mode == "I" and (lo < 0 or hi > 0xFFFF):
        raise StimulusError(
            f"{label}: {kind} image (mode I) with values {lo}..{hi}: outside 0..65535, so no rule "
            f"maps it to 8 bits; save it as an 8- or 16-bit image; {_FIX_IMAGE}"
        )
    if hi < 256:
        raise StimulusError(
            f"{label}: {kind} image (mode {mode}) with values {lo}..{hi}, all below 256: "
            "scaled from 16 to 8 bits (v >> 8) it would be black. If it holds 8-bit values, save "
            f"it as an 8-bit image; if it is dark 16-bit data, rescale it; {_FIX_IMAGE}"
        )
    if hi < _DARK_16BIT:
        log.warning(
            "%s: %s image (mode %s) uses only values %d..%d of 0..65535 (at most 12 bits): "
            "scaled by the 16-bit rule (v >> 8) it comes out dark (max %d of 255); rescale it "
            "if that is not intended",
            label, kind, mode, lo, hi, hi >> 8,
        )  # fmt: skip
    out = Image.fromarray((a.astype(np.int64) >> 8).astype(np.uint8)).convert("RGB")
    return out, f"{kind} (values {lo}..{hi}) scaled to 8 bits (v >> 8) and replicated to RGB"


def _float_to_rgb(
    image: Image.Image, stimulus_id: str, path: str | os.PathLike | None
) -> tuple[Image.Image, str]:
    """F on [0, 1]: ``round(255 v)`` (half an 8-bit level of overshoot is clipped)."""
    a = np.asarray(image, dtype=np.float64)
    label = _image_label(stimulus_id, path)
    finite = np.isfinite(a)
    if not finite.all():
        raise StimulusError(
            f"{label}: float image (mode F) with {int((~finite).sum())} NaN or infinite pixel(s): "
            f"no 8-bit value is defined for them; {_FIX_IMAGE}"
        )
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    tol = 0.5 / 255
    if lo < -tol or hi > 1 + tol:
        raise StimulusError(
            f"{label}: float image (mode F) with values {lo:.6g}..{hi:.6g}: only values in "
            "[0, 1] have a defined 8-bit scaling (round(255 v)); rescale it to [0, 1] or save it "
            f"as an 8-bit image; {_FIX_IMAGE}"
        )
    out = Image.fromarray(np.clip(np.rint(a * 255), 0, 255).astype(np.uint8)).convert("RGB")
    return out, f"float grayscale (values {lo:.4g}..{hi:.4g}) scaled to 8 bits as round(255 v)"


#: Modes Pillow converts to RGB by a rule we accept as is: mode -> what the conversion does.
_PILLOW_RULES = {
    "1": "bilevel (1) mapped to black and white",
    "L": "grayscale (L) replicated to RGB",
    "P": "palette (P) mapped through its palette",
    "PA": "palette with alpha (PA) mapped through its palette",
    "LA": "grayscale with alpha (LA) replicated to RGB",
    "RGBA": "RGBA to RGB",
    "RGBX": "padding band of RGBX dropped",
    "CMYK": "CMYK to RGB as R = (255 - C)(255 - K)/255 (no colour management)",
    "YCbCr": "YCbCr (JPEG, full range) to RGB",
    "LAB": "CIELAB to sRGB (Pillow's conversion)",
    "HSV": "HSV to RGB",
}
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def convert_to_rgb(
    image: Image.Image, stimulus_id: str = "?", *, path: str | os.PathLike | None = None
) -> tuple[Image.Image, str | None]:
    """Convert a decoded image to 8-bit RGB; returns it and what was done (None if already RGB).

    Rules (docs/contracts.md, "Image decoding"): 16-bit (I;16, I;16L, I;16B, I;16N, and I with
    values in 0..65535) -> ``v >> 8``; float (F) on [0, 1] -> ``round(255 v)``; alpha (LA, PA,
    RGBA, and P with a transparent colour) discarded, keeping the stored colour as timm's
    ``.convert("RGB")`` does; premultiplied La / RGBa un-premultiplied first; 1, L, P, CMYK,
    YCbCr, LAB, HSV, RGBX by Pillow's conversion. Refused (:class:`StimulusError` naming the
    stimulus, the mode and the value range): integers outside 0..65535, 16-bit data all below 256
    (black after scaling), floats outside [0, 1] or non-finite, any other mode.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in _SIXTEEN_BIT:
        return _sixteen_bit_to_rgb(image, stimulus_id, path)
    if mode == "F":
        return _float_to_rgb(image, stimulus_id, path)
    if mode in ("La", "RGBa"):
        straight = image.convert(mode.upper())
        rgb, what = convert_to_rgb(straight, stimulus_id, path=path)
        return rgb, f"premultiplied {mode} un-premultiplied; {what}"
    if mode not in _PILLOW_RULES:
        raise StimulusError(
            f"{_image_label(stimulus_id, path)}: image mode {mode!r} is not supported (supported: "
            f"RGB, {', '.join([*_PILLOW_RULES, *_SIXTEEN_BIT, 'F', 'La', 'RGBa'])}); save it as an "
            f"8-bit RGB or grayscale image; {_FIX_IMAGE}"
        )
    what = _PILLOW_RULES[mode]
    if mode in ("LA", "PA", "RGBA"):
        what += "; " + _alpha_note(image.getchannel("A"))
    elif mode == "P" and "transparency" in image.info:
        what += "; transparent colour " + _alpha_note(image.convert("RGBA").getchannel("A"))
    return image.convert("RGB"), what


@dataclass(frozen=True)
class _Decoded:
    image: Image.Image
    format: str
    mode: str
    size: tuple[int, int]
    n_frames: int
    orientation: int  # EXIF orientation tag, 0 when absent
    conversion: str  # what was done to reach RGB at MAX_SIDE ("" when nothing)


@contextlib.contextmanager
def _huge_images_allowed() -> Iterator[None]:
    """PIL's decompression-bomb limit raised to :data:`MAX_PIXELS` inside the block (held under
    a lock: the limit is a global of PIL's)."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _beyond_bomb_limit(im: Image.Image) -> bool:
    """Whether ``im`` has more pixels than PIL's limit lets it load (its decompression-bomb
    error: twice :data:`PIL.Image.MAX_IMAGE_PIXELS`)."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and im.size[0] * im.size[1] > 2 * limit


def _open_image(source: Any, stimulus_id: str, path: str | os.PathLike) -> Image.Image:
    """``Image.open`` that accepts huge images (up to MAX_PIXELS) instead of calling them bombs
    (:func:`_load` loads them as such)."""
    with _OPEN_LOCK, warnings.catch_warnings():  # open reads the header only: the lock is cheap
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(source)
        except Image.DecompressionBombError:
            if hasattr(source, "seek"):
                source.seek(0)
    with _huge_images_allowed():
        im = Image.open(source)
    log.info(
        "stimulus %r: image %s has %d x %d pixels, more than PIL's decompression-bomb limit; "
        "decoding it anyway",
        stimulus_id,
        path,
        *im.size,
    )
    return im


def _load(im: Image.Image) -> None:
    """``im.load()``; for an image beyond PIL's decompression-bomb limit with the limit raised
    as when it was opened (Pillow's TIFF loader checks it again while loading: a compressed
    TIFF of 182 million pixels was refused as a bomb, which a PNG of that size was not,
    audit)."""
    with _OPEN_LOCK:  # not while another thread has the limit raised (review)
        beyond = _beyond_bomb_limit(im)
    if not beyond:
        im.load()
        return
    with _huge_images_allowed():
        im.load()


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1..8), 0 when there is none or the EXIF block is unreadable."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 0)
    except Exception:  # a malformed EXIF block must not make a decodable image fail (timm: ignored)
        return 0
    return value if isinstance(value, int) and 1 <= value <= 8 else 0


#: Pillow raw modes with 16-bit samples (``I;16B``, ``RGB;16B``, ``RGBA;16L``, ``I;16S``), not
#: packed 16-bit pixels (``BGR;16``, ``RGB;16``: 5-6-5 bits, which Pillow expands to 8).
_SIXTEEN_BIT_RAW = re.compile(r"I;16.*|[A-Za-z]+;16[BLN]S?")  # RGBa: associated alpha


def _tile_args(im: Image.Image) -> list[tuple[str, tuple]]:
    """(decoder name, its arguments) of each of the image's tiles, read before ``load()``
    clears them."""
    out = []
    for tile in getattr(im, "tile", None) or []:
        # (decoder, extents, offset, args): a named tuple from Pillow 11 on, a tuple before
        args = tile[3] if len(tile) > 3 else ()
        out.append((str(tile[0]), args if isinstance(args, tuple) else (args,)))
    return out


def _raw_modes(im: Image.Image) -> list[str]:
    """The decoder's raw modes (e.g. ``RGB;16B``, ``I;16S``), read before ``load()`` clears them."""
    return [a for _, args in _tile_args(im) for a in args if isinstance(a, str)]


def _pnm_maxval(im: Image.Image) -> int:
    """A PPM/PGM's declared maximum sample value (its white level), read from the decoder's
    arguments before ``load()``; 255 for any other image."""
    for decoder, args in _tile_args(im):
        values = [a for a in args if isinstance(a, int)]
        if decoder.startswith("ppm") and values:
            return int(values[0])
    return 255


def _check_tiff_depth(im: Image.Image, bits: int, stimulus_id: str, path: Any) -> None:
    """Refuse a TIFF whose declared sample depth (BitsPerSample) Pillow decodes as 8-bit samples:
    uncompressed 16-bit colour stored as separate planes (PlanarConfiguration 2, tifffile's
    default for a (3, H, W) array) comes out as interleaved high and low bytes."""
    depth = getattr(im, "tag_v2", {}).get(258)
    depths = depth if isinstance(depth, tuple) else (depth,)
    if (
        bits == 8
        and im.mode in _EIGHT_BIT_MODES
        and any(isinstance(d, int) and d > 8 for d in depths)
    ):
        planar = getattr(im, "tag_v2", {}).get(284)
        raise StimulusError(
            f"{_image_label(stimulus_id, path)}: TIFF with {max(depths)}-bit samples "
            f"(BitsPerSample {depth}, PlanarConfiguration {planar}) that Pillow would decode as "
            f"8-bit {im.mode} samples, mixing high and low bytes; save it with interleaved "
            "samples (PlanarConfiguration 1, e.g. tifffile's planarconfig='contig') or "
            f"compressed, or as an 8-bit image; {_FIX_IMAGE}"
        )


def _check_tiff_orientation(im: Image.Image, stimulus_id: str, path: Any) -> None:
    """Refuse a TIFF with an Orientation tag other than 1: Pillow's TIFF loader applies it while
    decoding (Pillow 13; older versions did not), and for some sample layouts it scrambles the
    pixels, so neither "as stored" (the rule for every other format) nor "as displayed" holds."""
    orientation = _exif_orientation(im)  # before load(), which applies the tag and drops it
    if orientation > 1:
        raise StimulusError(
            f"{_image_label(stimulus_id, path)}: TIFF with Orientation {orientation} (viewers "
            f"{_ORIENTATION_NAMES[orientation]} to display it), which Pillow applies while "
            "decoding, for some sample layouts wrongly; save the pixels the way its caption "
            "describes them, with Orientation 1 or none (e.g. ImageOps.exif_transpose, then save)"
            f"; {_FIX_IMAGE}"
        )


def _tiff_is_white_is_zero(im: Image.Image, raw: list[str], stimulus_id: str, path: Any) -> bool:
    """Whether a TIFF is white-is-zero with 16-bit or float samples, which Pillow does not
    invert (it does invert 8-bit ones); signed 8- and 16-bit samples are refused."""
    tags = getattr(im, "tag_v2", None)
    formats = tags.get(339, ()) if tags is not None else ()
    signed_8 = im.mode != "I" and 2 in (formats if isinstance(formats, tuple) else (formats,))
    if signed_8 or any(";16" in r and r.endswith("S") for r in raw):
        bits = 8 if signed_8 else 16
        raise StimulusError(
            f"{_image_label(stimulus_id, path)}: signed {bits}-bit samples (TIFF SampleFormat 2): "
            "no rule maps signed values to unsigned 8 bits (Pillow reads signed 8-bit samples "
            "as unsigned, -1 as 255; v >> 8 would show a 0..32767 image at half brightness); "
            f"save it as an unsigned 16-bit or 8-bit image; {_FIX_IMAGE}"
        )
    if tags is None or tags.get(262) != 0 or im.mode not in (*_SIXTEEN_BIT, "F"):
        return False
    if im.mode == "I":
        raise StimulusError(
            f"{_image_label(stimulus_id, path)}: 32-bit integer grayscale stored white-is-zero "
            "(TIFF PhotometricInterpretation 0): its white level is undefined; save it as a "
            f"black-is-zero 8- or 16-bit image; {_FIX_IMAGE}"
        )
    return True


def _white_is_zero(im: Image.Image) -> Image.Image:
    """The black-is-zero image of a white-is-zero one: 65535 − v (16-bit), 1 − v (float)."""
    if im.mode == "F":
        return Image.fromarray(1.0 - np.asarray(im, dtype=np.float32))
    return Image.fromarray((65535 - np.asarray(im).astype(np.int64)).astype(np.uint16))


def _decode(
    source: Any, stimulus_id: str, path: str | os.PathLike, *, log_conversions: bool = True
) -> _Decoded:
    info = log.info if log_conversions else log.debug
    try:
        with _open_image(source, stimulus_id, path) as im:
            fmt, mode, (w, h) = str(im.format or ""), im.mode, im.size
            n_frames = int(getattr(im, "n_frames", 1) or 1)
            raw = _raw_modes(im)  # before load(), which clears the decoder's tiles
            # a 16-bit colour PPM (dcraw -4, netpbm) names its depth by its maximum value only
            maxval = _pnm_maxval(im) if mode == "RGB" else 255
            bits = 16 if maxval > 255 or any(_SIXTEEN_BIT_RAW.fullmatch(r) for r in raw) else 8
            if fmt == "TIFF":
                _check_tiff_depth(im, bits, stimulus_id, path)
                _check_tiff_orientation(im, stimulus_id, path)
            factor = -(-max(w, h) // MAX_SIDE)  # ceil
            if factor > 1:  # JPEG: decode at reduced scale (a side of 0 px divides by 0)
                im.draft("RGB", (max(1, w // factor), max(1, h // factor)))
            _load(im)
            orientation = _exif_orientation(im)  # after load(): PNG keeps EXIF after the pixels
            white = fmt == "TIFF" and _tiff_is_white_is_zero(im, raw, stimulus_id, path)
            twelve = im.mode == "I;16" and any(r.startswith("I;12") for r in raw)
            if twelve:  # TIFF BitsPerSample 12 comes as 0..4095: 16-bit first, then v >> 8
                im = Image.fromarray(np.asarray(im).astype(np.uint16) << 4)
            if white:
                rgb, what = convert_to_rgb(_white_is_zero(im), stimulus_id, path=path)
                what = f"white-is-zero (TIFF PhotometricInterpretation 0) inverted; {what}"
            else:
                rgb, what = convert_to_rgb(im, stimulus_id, path=path)
            if bits == 16 and mode in ("RGB", "RGBA", "LA", "CMYK"):
                pnm = maxval if maxval > 255 else None
                # CMYK: the ink, before the conversion (no ink is white)
                rule = _check_pillow_16bit(
                    im if mode == "CMYK" else rgb, stimulus_id, path, mode, pnm
                )
                what = f"16-bit samples reduced to 8 bits by Pillow ({rule}); {what or 'RGB'}"
            if twelve:
                what = f"12-bit samples (0..4095) scaled to 16 bits (v << 4); {what}"
            if rgb is im:
                rgb = im.copy()
    except (StimulusError, MemoryError):
        raise
    except Exception as err:  # Pillow raises IndexError, TypeError, … on some truncated files
        # Pillow names the bytes read as '<_io.BytesIO object at 0x…>': not the user's file
        said = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(err))
        # an older Pillow refuses some valid files (11 and 12: uncompressed YCbCr TIFFs, as
        # "truncated"): the version is named, and updating it is one way out
        raise StimulusError(
            f"stimulus {stimulus_id!r}: cannot decode image {path} ({type(err).__name__}: "
            f"{said}; Pillow {PIL.__version__}); if other software opens it, update Pillow; "
            f"else {_FIX_IMAGE}"
        ) from err
    notes = []
    if n_frames > 1:
        notes.append(f"first of {n_frames} frames used")
    if what:
        info("stimulus %r: converting %s image %s to RGB: %s", stimulus_id, mode, path, what)
        notes.append(what)
    if max(rgb.size) > MAX_SIDE:
        rgb = rgb.reduce(-(-max(rgb.size) // MAX_SIDE))
    if rgb.size != (w, h):
        info(
            "stimulus %r: huge image %s (%d x %d) reduced to %d x %d before preprocessing",
            stimulus_id, path, w, h, *rgb.size,
        )  # fmt: skip
        notes.append(f"reduced from {w} x {h} to {rgb.size[0]} x {rgb.size[1]}")
    if n_frames > 1:
        info("stimulus %r: image %s has %d frames; using the first", stimulus_id, path, n_frames)
    if orientation > 1:
        info(
            "stimulus %r: image %s has EXIF orientation %d (viewers %s to display it); ignored, "
            "as timm does: the pixels are used as stored (docs/contracts.md, 'Image decoding')",
            stimulus_id, path, orientation, _ORIENTATION_NAMES[orientation],
        )  # fmt: skip
    return _Decoded(rgb, fmt, mode, (w, h), n_frames, orientation, "; ".join(notes))


def _check_pillow_16bit(
    image: Image.Image,
    stimulus_id: str,
    path: str | os.PathLike,
    mode: str,
    pnm_maxval: int | None = None,
) -> str:
    """A 16-bit colour image Pillow reduced to 8 bits (``image``: the RGB result, or for CMYK
    the ink before the conversion): refuse one of maxval 65535 whose values are all what
    8-bit values (≤ 255) become, black (no ink: white), and warn one that uses at most a
    sixteenth of its range, dark (pale), as 16-bit gray; returns the rule
    Pillow applied: v >> 8, or for a PPM with maximum value ``pnm_maxval`` (its white level)
    round(v · 255 / maxval). A 16-bit PPM and a 16-bit CMYK TIFF of 8-bit values came out
    black and white without a word (audit)."""
    maxval = pnm_maxval or 65535
    rule = f"round(v · 255 / {maxval}), the PPM's maxval" if pnm_maxval else "v >> 8"

    def reduced(v: int) -> int:
        return round(v * 255 / maxval) if pnm_maxval else v >> 8

    # what 8-bit values in a 16-bit file (maxval 65535) become, and a sixteenth of the range
    # (12 of 16 bits) at most; a PPM of a smaller maxval is no 16-bit file of 8-bit values
    # (maxval 300 with values up to 255 is 85% white: refused as black, review)
    eight_bit = reduced(255) if maxval == 65535 else -1
    dark = reduced((maxval + 1) * _DARK_16BIT // 65536 - 1)
    hi = max(band_hi for _, band_hi in image.getextrema())
    label = _image_label(stimulus_id, path)
    looks, faint = ("white", "pale") if mode == "CMYK" else ("black", "dark")
    if hi <= eight_bit:
        raise StimulusError(
            f"{label}: 16-bit {mode} image whose values all reduce to at most {eight_bit} of "
            f"255 ({rule}), as 8-bit values (0..255) stored in 16 bits do: it is {looks}. If it "
            f"holds 8-bit values, save it as an 8-bit image; if it is faint 16-bit data, "
            f"rescale it; {_FIX_IMAGE}"
        )
    if hi <= dark:
        used = "12 of its 16 bits" if maxval == 65535 else f"a sixteenth of its maxval {maxval}"
        log.warning(
            "%s: 16-bit %s image uses at most %s: reduced to 8 bits (%s) it comes out %s (max "
            "%d of 255); rescale it if that is not intended",
            label, mode, used, rule, faint, hi,
        )  # fmt: skip
    return rule


def load_rgb(
    path: str | os.PathLike, stimulus_id: str = "?", *, log_conversions: bool = True
) -> Image.Image:
    """Decode one image as 8-bit RGB by the rules of :func:`convert_to_rgb`, logging what was done.

    Only the first frame of a multi-frame file is used; EXIF orientation and embedded ICC
    profiles are ignored (as timm does). Images with a side longer than :data:`MAX_SIDE` are
    reduced by an integer factor after the conversion (JPEGs are decoded at reduced scale); that
    is logged. An image that cannot be decoded (missing, truncated, not an image) or converted
    is a :class:`StimulusError` naming the stimulus and the file.
    """
    return _decode(path, stimulus_id, path, log_conversions=log_conversions).image


def decoded_format(data: bytes, stimulus_id: str, label: str, fix: str = _FIX_IMAGE) -> str:
    """The format (Pillow's name) of encoded image bytes, decoded by the rules of
    :func:`load_rgb`: a :class:`StimulusError`, naming ``stimulus_id`` and ``label`` and
    advising ``fix``, where the vision extraction would refuse them."""
    try:
        return _decode(io.BytesIO(data), stimulus_id, label, log_conversions=False).format
    except StimulusError as err:
        raise StimulusError(str(err).replace(_FIX_IMAGE, fix)) from None


def _pixels_digest(image: Image.Image) -> str:
    h = hashlib.sha256(f"{image.mode} {image.size[0]} {image.size[1]};".encode())
    h.update(image.tobytes())
    return h.hexdigest()


class ImageReadError(StimulusError):
    """An image file that could not be read for a reason that may pass (an I/O error, a stale
    NFS handle: xmodal.attempts.passing_error): a retried job reads it again. The class, not a
    cause, says so, since a DataLoader worker's error reaches the job as a new error of its
    class."""

    repeats_on_retry = False


def _read_image_file(path: Path, stimulus_id: str) -> bytes:
    """An image file's bytes, read once (to digest and to decode); anything but a regular file,
    such as a folder or a named pipe that would block the read, is a StimulusError, and an
    error of reading that may pass on retry an :class:`ImageReadError`."""
    error: type[StimulusError] = StimulusError
    try:
        if stat.S_ISREG(os.stat(path).st_mode):
            return path.read_bytes()
        problem = "not a regular file"
    except OSError as err:
        problem = str(err)
        error = ImageReadError if passing_error(err) else StimulusError
    raise error(f"stimulus {stimulus_id!r}: cannot read image {path} ({problem}); {_FIX_IMAGE}")


def _scan_one(path: Path, stimulus_id: str) -> dict[str, Any]:
    data = _read_image_file(path, stimulus_id)
    d = _decode(io.BytesIO(data), stimulus_id, path, log_conversions=False)
    return {
        "format": d.format,
        "mode": d.mode,
        "width": d.size[0],
        "height": d.size[1],
        "n_frames": d.n_frames,
        "exif_orientation": d.orientation,
        "conversion": d.conversion,
        "bytes_sha256": hashlib.sha256(data).hexdigest(),
        "pixels_sha256": _pixels_digest(d.image),
    }


def _scan(
    manifest: pd.DataFrame,
    root: Path,
    *,
    where: str,
    lines: Sequence[int] | None,
    workers: int,
) -> pd.DataFrame:
    ids = [str(s) for s in manifest["stimulus_id"]]
    paths = [root / str(p) for p in manifest["image"]]

    progress = Progress(log, f"{where}: images decoded", len(ids))

    def one(k: int) -> dict[str, Any] | StimulusError:
        try:
            return _scan_one(paths[k], ids[k])
        except StimulusError as err:
            return err
        finally:
            progress.step()

    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL and hashlib release the GIL
            results = list(pool.map(one, range(len(ids))))
    else:
        results = [one(k) for k in range(len(ids))]
    bad = [k for k, r in enumerate(results) if isinstance(r, StimulusError)]
    if bad:
        k = bad[0]
        at = f"line {lines[k]}, " if lines is not None else ""
        # every image failed for a reason that may pass (an I/O error): so may this
        # (attempts.fail_attempt)
        error = StimulusError
        if all(isinstance(results[j], ImageReadError) for j in bad):
            error = ImageReadError
        raise error(
            f"{where}: {len(bad)} image(s) cannot be decoded or converted, stimulus ids "
            f"{preview([ids[j] for j in bad])}; first: {at}{results[k]}"
        )
    table = pd.DataFrame.from_records(results)
    table.insert(0, "image", [str(p) for p in manifest["image"]])
    table.insert(0, "stimulus_id", ids)
    _log_scan(table, where)
    return table


def _log_scan(table: pd.DataFrame, where: str) -> None:
    modes = Counter(table["mode"])
    converted = int((table["conversion"] != "").sum())
    log.info(
        "%s: %d images decoded; modes %s; %d converted or reduced (rules: docs/contracts.md)",
        where,
        len(table),
        dict(modes.most_common()),
        converted,
    )
    rotated = table.loc[table["exif_orientation"] > 1, "stimulus_id"].tolist()
    if rotated:
        log.warning(
            "%s: %d stimuli carry a non-default EXIF orientation %s; ignored, as timm does: "
            "the models see them as stored, not as viewers display them (rotate the files if "
            "their captions describe them upright; docs/contracts.md, 'Image decoding')",
            where,
            len(rotated),
            preview(rotated),
        )


def scan_images(
    manifest: pd.DataFrame, root: str | os.PathLike, *, workers: int = 1
) -> pd.DataFrame:
    """Decode every image of a manifest once; one row per stimulus, in manifest order.

    Columns: ``stimulus_id``, ``image``, ``format``, ``mode`` (as stored), ``width``,
    ``height`` (as stored), ``n_frames``, ``exif_orientation`` (1..8; 0 = no tag), ``conversion``
    (what :func:`load_rgb` does, "" for none), ``bytes_sha256`` (of the file),
    ``pixels_sha256`` (of the decoded RGB pixels and their size). ``root`` is the manifest's
    folder. Any image that cannot be decoded or converted: one :class:`StimulusError` naming them
    all (count, first ids, the first error). Logs counts of modes, conversions and EXIF
    orientations. ``workers`` threads decode in parallel (decoding and hashing release the GIL).
    """
    return _scan(manifest, Path(root), where=str(root), lines=None, workers=max(1, int(workers)))


# ============================================================================== duplicates
def _groups(ids: Sequence[str], keys: Iterable[Any]) -> list[list[str]]:
    """Ids that share a key, in order of first occurrence; only groups of two or more."""
    by_key: dict[Any, list[str]] = {}
    for sid, key in zip(ids, keys, strict=True):
        by_key.setdefault(key, []).append(sid)
    return [g for g in by_key.values() if len(g) > 1]


def find_duplicates(
    manifest: pd.DataFrame,
    root: str | os.PathLike,
    *,
    images: pd.DataFrame | None = None,
    workers: int = 1,
) -> pd.DataFrame:
    """Groups of stimuli with identical image files, identical decoded pixels or identical captions.

    Returns a tidy table ``kind`` (``image_bytes``: same file content; ``pixels``: same RGB
    pixels after :func:`load_rgb`, which includes same bytes; ``caption``: byte-identical
    caption), ``group`` (0, 1, ... per kind, by first member's manifest position),
    ``stimulus_id`` (manifest order within a group); stimuli without a twin are not listed.
    Found by hashing (O(m)), never by comparing pairs. ``images`` is a :func:`scan_images`
    table of the same manifest (decoded here when None, with ``workers`` threads). Each kind
    found is logged as a warning with its ids.
    """
    ids = [str(s) for s in manifest["stimulus_id"]]
    if images is None:
        images = scan_images(manifest, root, workers=workers)
    elif [str(s) for s in images["stimulus_id"]] != ids:
        raise StimulusError(
            f"{root}: the image scan table does not list the manifest's stimuli in manifest "
            "order; pass scan_images(manifest, root) of this manifest"
        )
    found = {
        "image_bytes": _groups(ids, images["bytes_sha256"]),
        "pixels": _groups(ids, images["pixels_sha256"]),
        "caption": _groups(ids, (str(c) for c in manifest["caption"])),
    }
    records = [
        (kind, g, sid)
        for kind in DUPLICATE_KINDS
        for g, grp in enumerate(found[kind])
        for sid in grp
    ]
    table = pd.DataFrame.from_records(records, columns=["kind", "group", "stimulus_id"])
    table = table.astype({"kind": str, "group": "int64", "stimulus_id": str})
    what = {
        "image_bytes": "identical image files",
        "pixels": "identical decoded images",
        "caption": "identical captions",
    }
    for kind in DUPLICATE_KINDS:
        groups = found[kind]
        if groups:
            log.warning(
                "%s: %d stimuli in %d group(s) of %s: %s%s",
                root,
                sum(len(g) for g in groups),
                len(groups),
                what[kind],
                "; ".join(preview(g) for g in groups[:5]),
                f"; ... ({len(groups)} groups in all)" if len(groups) > 5 else "",
            )
    return table


def analysed_stimuli(
    manifest: pd.DataFrame, root: str | os.PathLike
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The stimuli an analysis with ``stimuli.drop_duplicates`` keeps, and the image scan they
    came from: :func:`scan_images` (every image read and decoded once), :func:`find_duplicates`
    on it, :func:`drop_duplicates` with the default kinds. Every model's extraction and every
    import of a supplied feature file applies this one rule, so all files hold the same stimuli.
    """
    scan = scan_images(manifest, root)
    return drop_duplicates(manifest, find_duplicates(manifest, root, images=scan)), scan


def drop_duplicates(
    manifest: pd.DataFrame,
    duplicates: pd.DataFrame,
    kinds: Sequence[str] = DEFAULT_DROP_KINDS,
) -> pd.DataFrame:
    """The manifest without duplicate stimuli: those in the same group for *every* kind in ``kinds``.

    The first stimulus (manifest order) of each set of duplicates is kept. The default
    (``pixels`` and ``caption``): same decoded image and same caption is one stimulus listed
    twice; a shared caption with different images (or the same image with different captions)
    is reported by :func:`find_duplicates` but kept. Dropped ids are logged with the id kept.
    """
    kinds = tuple(kinds)
    if not kinds or any(k not in DUPLICATE_KINDS for k in kinds):
        raise StimulusError(
            f"drop_duplicates: kinds must be a non-empty subset of {list(DUPLICATE_KINDS)}, "
            f"got {list(kinds)}"
        )
    ids = [str(s) for s in manifest["stimulus_id"]]
    unknown = sorted(set(map(str, duplicates["stimulus_id"])) - set(ids))
    if unknown:
        raise StimulusError(
            f"drop_duplicates: the duplicates table names stimuli not in the manifest "
            f"{preview(unknown)}; it belongs to another manifest"
        )
    group_of = {
        kind: dict(
            zip(
                map(str, duplicates.loc[duplicates["kind"] == kind, "stimulus_id"]),
                duplicates.loc[duplicates["kind"] == kind, "group"],
                strict=True,
            )
        )
        for kind in kinds
    }
    first_of: dict[tuple[int, ...], str] = {}
    keep = []
    dropped: list[tuple[str, str]] = []
    for sid in ids:
        key = tuple(group_of[k].get(sid, -1) for k in kinds)
        if -1 in key:
            keep.append(True)
        elif key in first_of:
            keep.append(False)
            dropped.append((sid, first_of[key]))
        else:
            first_of[key] = sid
            keep.append(True)
    if dropped:
        log.warning(
            "dropped %d duplicate stimuli (same %s as an earlier stimulus): %s",
            len(dropped),
            " and ".join(kinds),
            ", ".join(f"{d!r} (kept {k!r})" for d, k in dropped[:10])
            + (f", ... ({len(dropped)} in all)" if len(dropped) > 10 else ""),
        )
    return manifest.loc[np.array(keep, dtype=bool)].reset_index(drop=True)


class ImageDataset:
    """Map-style dataset over a manifest's images: item ``i`` is ``(transform(rgb_image), i)``,
    or with ``with_digests`` ``(transform(rgb_image), i, sha256)``, the SHA-256 of the file's
    bytes that were decoded (each file is read once, for both).

    ``root`` is the folder the manifest's ``image`` paths are relative to (the manifest's folder).
    Use with ``torch.utils.data.DataLoader(..., num_workers=N)`` so reading and decoding run in
    the workers.
    """

    def __init__(
        self,
        manifest_df: pd.DataFrame,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        with_digests: bool = False,
    ):
        self.root = Path(root)
        self.ids = [str(s) for s in manifest_df["stimulus_id"]]
        self.images = [str(s) for s in manifest_df["image"]]
        self.transform = transform
        self.with_digests = with_digests

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        path = self.root / self.images[i]
        data = _read_image_file(path, self.ids[i])
        img = _decode(io.BytesIO(data), self.ids[i], path).image
        out = self.transform(img) if self.transform is not None else img
        return (out, i, hashlib.sha256(data).hexdigest()) if self.with_digests else (out, i)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xmodal.stimuli order-like FEATURES MANIFEST``: :func:`order_manifest_like`
    with the ids of a feature file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m xmodal.stimuli")
    sub = parser.add_subparsers(dest="command", required=True)
    order = sub.add_parser(
        "order-like",
        help="put a manifest whose rows were only reordered back in a feature file's order",
        description=(
            "Rewrite MANIFEST with its lines in the stimulus order of FEATURES (a feature file "
            "extracted from it), each line kept byte for byte, so that nothing is extracted "
            "again (docs/cluster.md, 'What reruns')."
        ),
    )
    order.add_argument("features", help="a feature file, results/features/<dataset>/<model>.h5")
    order.add_argument("manifest", help="the manifest to put back in that order")
    order.add_argument("-o", "--out", help="write here instead of over MANIFEST")
    args = parser.parse_args(argv)
    import h5py

    from xmodal.features import FeatureFile, FeatureFileError

    def hdf5(path: str) -> bool:
        try:
            return os.path.isfile(path) and h5py.is_hdf5(path)
        except (OSError, ValueError):
            return False

    suffix = Path(args.features).suffix.lower()
    if os.path.isfile(args.features) and not hdf5(args.features):
        if hdf5(args.manifest) or suffix not in (".h5", ".hdf5"):
            # the manifest given first: the feature file's reader would advise deleting it
            print(
                f"ERROR: {args.features}: not a feature file (HDF5, results/features/<dataset>/"
                "<model>.h5); the feature file comes first, then the manifest: python -m "
                "xmodal.stimuli order-like FEATURES MANIFEST",
                file=sys.stderr,
            )
            return 2
    try:
        with FeatureFile(args.features) as f:
            ids = f.stimulus_ids
        where = order_manifest_like(args.manifest, ids, args.out)
    except (StimulusError, FeatureFileError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    print(f"{where}: {len(ids)} stimuli, in the order of {args.features}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
