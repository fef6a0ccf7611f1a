"""Mutation audit of putting a manifest's rows back in a feature file's order (order_manifest_like,
``python -m xmodal.stimuli order-like``) and of the warning about rows only reordered (the rows
record next to a stamp): each test fails on a plausible change that the other tests let through.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_stimuli import _stamp_of_sizes

from xmodal import stimuli as xstim
from xmodal.features import STIMULI_DIGEST
from xmodal.stimuli import (
    BEFORE,
    StimulusError,
    main,
    manifest_stamp,
    order_manifest_like,
    read_manifest,
    stamp_rows_path,
    write_manifest_stamp,
)

HEADER = b"stimulus_id\timage\tcaption"
COLOURS = ["red", "green", "blue", "white", "black"]


def _line(k: int) -> bytes:
    return f"s{k}\ts{k}.png\tcaption {k}".encode()


def _folder(root: Path, n: int = 5) -> Path:
    """A folder with ``n`` distinct images, s1.png ... (one colour each); returns it."""
    root.mkdir(exist_ok=True)
    for k in range(1, n + 1):
        Image.new("RGB", (4, 4), COLOURS[k - 1]).save(root / f"s{k}.png")
    return root


def _write(path: Path, order: list[int]) -> Path:
    """The manifest with the stimuli of ``order`` in that order (LF line ends)."""
    path.write_bytes(b"\n".join([HEADER, *(_line(k) for k in order)]) + b"\n")
    return path


def _features_under(path: Path, digest: str) -> Path:
    """A stand-in feature file: only the digest of the stamp it was extracted under."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs[STIMULI_DIGEST] = digest
    return path


def _feature_file(path: Path, ids: list[str]) -> Path:
    from xmodal.features import write_features

    return write_features(
        path, np.zeros((1, len(ids), 2), np.float32), ids, ["layers.0"],
        {"model_id": "org/tiny", "model_key": "tiny", "modality": "vision", "source": "test"},
        abs_q95=np.ones(len(ids), np.float32),
    )  # fmt: skip


def _stamp(manifest: Path, stamp: Path, modality: str = "vision", **kw) -> tuple[bool, list[str]]:
    """write_manifest_stamp, and the warnings it logged."""
    logger = logging.getLogger("xmodal")
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    try:
        changed = write_manifest_stamp(manifest, stamp, modality, check_images=False, **kw)
    finally:
        logger.removeHandler(handler)
    return changed, seen


# ======================================================================= order_manifest_like
def test_a_manifest_a_run_would_refuse_is_not_put_back(tmp_path):
    """Mutant: the manifest not read as a run reads it before its lines are moved. A stimulus
    id on two lines then passes (the order given lists it once) and one of its lines is
    silently dropped from the file; it must be refused, the file left as it was."""
    path = _folder(tmp_path) / "stimuli.tsv"
    path.write_bytes(b"\n".join([HEADER, _line(2), _line(1), b"s1\ts3.png\tanother"]) + b"\n")
    before = path.read_bytes()
    with pytest.raises(StimulusError, match=r"duplicate stimulus ids \['s1'\]"):
        order_manifest_like(path, ["s1", "s2"])
    assert path.read_bytes() == before


def test_the_refusal_names_each_kind_once_and_left_out_stimuli_in_line_order(tmp_path):
    """Mutants: the left-out stimuli sorted by id instead of by their line, a kind with no
    stimulus still said (``0 ... ([])``), the preview cut to one id, ids given as a numpy
    array named as ``np.str_('new')``. The refusal lists what the order given lacks in the
    manifest's line order, and only the kinds that occur, each id as plain text."""
    path = _write(_folder(tmp_path) / "stimuli.tsv", [5, 4, 3, 2, 1])
    with pytest.raises(StimulusError) as err:
        order_manifest_like(path, ["s1", "s3", "s4"])
    said = str(err.value)
    assert (
        f"{path}: cannot put its rows in the order given, which lists other stimuli: 2 in the "
        "manifest but not in the order given (['s5', 's2'] (2 in all)). Only a manifest"
    ) in said
    assert "twice" not in said and "not in the manifest" not in said

    with pytest.raises(StimulusError) as err:  # ids as an array (numpy's own text type)
        order_manifest_like(path, np.array(["s1", "s3", "s1", "new", "s4"]))
    assert (
        "stimuli: 1 listed twice in the order given (['s1'] (1 in all)); 1 in the order given "
        "but not in the manifest (['new'] (1 in all)); 2 in the manifest but not in the order "
        "given (['s5', 's2'] (2 in all)). Only"
    ) in str(err.value)


def test_each_line_keeps_its_own_line_end(tmp_path):
    """Mutants: CRLF decided from any line of the file rather than the header's, the CR not
    added to a last line without its line end. Under an LF header a CRLF line stays CRLF and
    the LF lines stay LF; under a CRLF header (and a BOM) a last line that had no line end
    gets CRLF when it moves up."""
    folder = _folder(tmp_path)
    lines = [HEADER + b"\n", _line(1) + b"\r\n", _line(2) + b"\n", _line(3) + b"\n"]
    original = b"".join(lines)
    moved = folder / "moved.tsv"
    moved.write_bytes(b"".join([lines[0], lines[3], lines[1], lines[2]]))
    out = order_manifest_like(moved, ["s1", "s2", "s3"], folder / "back.tsv")
    assert out.read_bytes() == original

    bom = "\ufeff".encode()
    moved.write_bytes(bom + b"\r\n".join([HEADER, _line(2), _line(3), _line(1)]))  # no end
    order_manifest_like(moved, ["s1", "s2", "s3"])
    assert (
        moved.read_bytes() == bom + b"\r\n".join([HEADER, _line(1), _line(2), _line(3)]) + b"\r\n"
    )


def test_in_place_through_a_link_returns_and_prints_the_file_written(tmp_path, capsys):
    """Mutant: the path given returned instead of the file written. Through a symbolic link
    the file written is the link's target: returned, and named by the command's one line on
    standard output (nothing on standard error)."""
    folder = _folder(tmp_path / "data")
    target = _write(folder / "stimuli.tsv", [3, 1, 2])
    link = tmp_path / "link.tsv"
    link.symlink_to(target)
    assert order_manifest_like(link, ["s1", "s2", "s3"]) == target.resolve()

    _write(target, [3, 1, 2])
    features = _feature_file(tmp_path / "f.h5", ["s1", "s2", "s3"])
    capsys.readouterr()
    assert main(["order-like", str(features), str(link)]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"{target.resolve()}: 3 stimuli, in the order of {features}\n", "")
    assert target.read_bytes() == b"\n".join([HEADER, _line(1), _line(2), _line(3)]) + b"\n"


def test_the_command_line_writes_to_out_and_reports_errors_on_stderr(tmp_path, capsys):
    """Mutants: ``-o`` ignored (or the manifest written instead), an unreadable feature file
    a traceback instead of exit 2, the error on standard output, the command optional. With
    ``-o`` the manifest is left as it is; a missing feature file is named on standard error."""
    folder = _folder(tmp_path)
    manifest = _write(folder / "stimuli.tsv", [2, 3, 1])
    before = manifest.read_bytes()
    features = _feature_file(tmp_path / "f.h5", ["s1", "s2", "s3"])
    out = tmp_path / "back.tsv"
    assert main(["order-like", str(features), str(manifest), "-o", str(out)]) == 0
    assert manifest.read_bytes() == before
    assert out.read_bytes() == b"\n".join([HEADER, _line(1), _line(2), _line(3)]) + b"\n"

    capsys.readouterr()
    assert main(["order-like", str(tmp_path / "none.h5"), str(manifest)]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and stderr.startswith(f"ERROR: {tmp_path / 'none.h5'}: feature file")
    assert manifest.read_bytes() == before
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_the_manifest_given_first_is_not_advised_to_be_deleted(tmp_path, capsys):
    """The two arguments the other way round (review of the mutation audit): the feature file's
    reader called the manifest a truncated feature file and advised deleting it. The message now
    says which comes first; a feature file that is truncated is still told so."""
    folder = _folder(tmp_path)
    manifest = _write(folder / "stimuli.tsv", [2, 3, 1])
    before = manifest.read_bytes()
    features = _feature_file(tmp_path / "f.h5", ["s1", "s2", "s3"])
    capsys.readouterr()
    assert main(["order-like", str(manifest), str(features)]) == 2
    stdout, stderr = capsys.readouterr()
    assert stdout == "" and stderr == (
        f"ERROR: {manifest}: not a feature file (HDF5, results/features/<dataset>/<model>.h5); "
        "the feature file comes first, then the manifest: python -m xmodal.stimuli order-like "
        "FEATURES MANIFEST\n"
    )
    assert "delete" not in stderr and manifest.read_bytes() == before
    cut = tmp_path / "cut.h5"
    cut.write_bytes(features.read_bytes()[:100])
    assert main(["order-like", str(cut), str(manifest)]) == 2
    assert "delete it and rerun" in capsys.readouterr().err
    assert manifest.read_bytes() == before


# ====================================================================== the rows record
def test_the_rows_record_sits_next_to_the_stamp_with_both_digests(tmp_path):
    """Mutant: the record named after the stamp's whole name (``extract_vision.json.rows.json``,
    not ``extract_vision.rows.json`` as docs/cluster.md says). It holds the stamp's digest
    and the digest of the rows in any order (the same for the rows reordered)."""
    assert stamp_rows_path("a/extract_vision.json") == Path("a/extract_vision.rows.json")
    manifest = _write(_folder(tmp_path) / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    assert [p.name for p in tmp_path.glob("*.rows.json")] == ["extract_vision.rows.json"]
    record = json.loads((tmp_path / "extract_vision.rows.json").read_text())
    df = read_manifest(manifest)
    any_order = manifest_stamp(df.iloc[::-1], "vision", root=tmp_path, ordered=False)
    assert record == {
        "sha256": json.loads(stamp.read_text())["sha256"],
        "rows_sha256": any_order["sha256"],
    }


def test_an_unchanged_stamp_does_not_digest_the_rows_in_any_order(tmp_path, monkeypatch):
    """Mutant: the rows digested in any order at every call. With the record's digest the
    stamp's, the rows' digest in any order is not computed (start-up at 20,000 stimuli)."""
    manifest = _write(_folder(tmp_path) / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    calls: list[bool] = []
    real = xstim.manifest_stamp

    def spy(*args, **kw):
        calls.append(kw.get("ordered", True))
        return real(*args, **kw)

    monkeypatch.setattr(xstim, "manifest_stamp", spy)
    assert _stamp(manifest, stamp) == (False, [])
    assert calls == [True]


def test_a_changed_vision_stamp_reads_the_image_files_once(tmp_path, monkeypatch):
    """Mutant: the rows in any order digested without the image digests just read, so that
    every image file is read a second time whenever the stamp changes. The files' digests
    are read once per call, for the stamp and the rows in any order alike."""
    folder = _folder(tmp_path)
    manifest = _write(folder / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    _write(manifest, [3, 2, 1])
    read: list[list[str]] = []
    real = xstim.image_file_digests

    def spy(images, *args, **kw):
        read.append(list(images))
        return real(images, *args, **kw)

    monkeypatch.setattr(xstim, "image_file_digests", spy)
    assert _stamp(manifest, stamp)[0]  # changed (and warned: only reordered)
    assert read == [["s3.png", "s2.png", "s1.png"]]


def test_a_rows_record_of_another_form_is_written_again(tmp_path):
    """Mutant: a record without the two digests read as one (KeyError). A record of another
    form is not one: the call goes on, warns of nothing and writes the record again."""
    manifest = _write(_folder(tmp_path) / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    stamp_rows_path(stamp).write_text('{"rows": 1}\n')
    assert _stamp(manifest, stamp) == (True, [])
    assert (
        json.loads(stamp_rows_path(stamp).read_text())["sha256"]
        == (json.loads(stamp.read_text())["sha256"])
    )


def test_a_deleted_stamp_with_its_rows_record_left_warns_of_nothing(tmp_path):
    """Mutant: the old stamp assumed to be a record (AttributeError on None). A stamp deleted
    (its rows record left) and the rows then reordered: the stamp is written, no warning."""
    manifest = _write(_folder(tmp_path) / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    stamp.unlink()
    _write(manifest, [3, 2, 1])
    assert _stamp(manifest, stamp) == (True, [])


def test_a_rows_record_of_another_stamp_does_not_warn(tmp_path):
    """Mutant: the record's rows compared without checking that the record is the old stamp's.
    A stamp of other stimuli put back (from a backup) beside the record of these: the rows
    reordered are not named as only reordered (the feature files extracted under that stamp
    hold other stimuli, which order-like would refuse)."""
    folder = _folder(tmp_path)
    manifest = folder / "stimuli.tsv"
    manifest.write_bytes(b"\n".join([HEADER, _line(1), _line(2), b"s4\ts4.png\tother"]) + b"\n")
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    backup = stamp.read_text()
    features = [_features_under(tmp_path / "a.h5", json.loads(backup)["sha256"])]
    _write(manifest, [1, 2, 3])
    _stamp(manifest, stamp, features=features)  # other stimuli: re-extracted, no word
    stamp.write_text(backup)
    _write(manifest, [3, 2, 1])
    assert _stamp(manifest, stamp, features=features) == (True, [])


def test_feature_files_under_a_carried_over_stamps_both_digests_count(tmp_path):
    """Mutants: the files extracted under only one of the carried-over stamp's digests
    (``sha256``, or ``sha256_before`` of the form it was carried over from) counted. Both
    are the stimuli in the old order: 2 of 3 files are named."""
    folder = _folder(tmp_path)
    manifest = _write(folder / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    stamp.write_text(json.dumps(_stamp_of_sizes(read_manifest(manifest), manifest)))
    assert not write_manifest_stamp(manifest, stamp, "vision", check_images=False)
    old = json.loads(stamp.read_text())
    features = [
        _features_under(tmp_path / "new.h5", old["sha256"]),
        _features_under(tmp_path / "old.h5", old[BEFORE]),
        _features_under(tmp_path / "other.h5", "0" * 64),
    ]
    _write(manifest, [3, 2, 1])
    changed, warned = _stamp(manifest, stamp, features=features)
    assert changed and len(warned) == 1 and "so 2 of 3 vision model(s)" in warned[0]


def test_the_command_names_a_stale_feature_file_and_quotes_the_paths(tmp_path):
    """Mutants: the command named with the first feature file given (here missing: not one
    extracted under the old stamp), the paths not quoted for a shell (a folder with a
    space). The command printed is the one to paste."""
    folder = _folder(tmp_path / "my stimuli")
    manifest = _write(folder / "stimuli.tsv", [1, 2, 3])
    stamp = folder / "extract_language.json"
    _stamp(manifest, stamp, "language")
    stale = _features_under(folder / "b.h5", json.loads(stamp.read_text())["sha256"])
    _write(manifest, [2, 3, 1])
    changed, warned = _stamp(manifest, stamp, "language", features=[folder / "a.h5", stale])
    assert changed and len(warned) == 1
    command = f"python -m xmodal.stimuli order-like '{stale}' '{manifest}' ("
    assert command in warned[0] and "so 1 of 2 language model(s)" in warned[0]


def test_an_image_replaced_as_the_rows_moved_is_not_only_reordered(tmp_path):
    """Mutant: the rows in any order digested with the image paths, not their files' contents.
    Rows reordered and an image replaced under the same path: the vision features would not
    come out the same, and the warning (and its command) is not given."""
    folder = _folder(tmp_path)
    manifest = _write(folder / "stimuli.tsv", [1, 2, 3])
    stamp = tmp_path / "extract_vision.json"
    _stamp(manifest, stamp)
    features = [_features_under(tmp_path / "a.h5", json.loads(stamp.read_text())["sha256"])]
    _write(manifest, [3, 2, 1])
    Image.new("RGB", (4, 4), "yellow").save(folder / "s2.png")
    assert _stamp(manifest, stamp, features=features) == (True, [])
