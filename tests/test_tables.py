"""The one table reader/writer (xmodal.io): identifiers stay text, numbers stay exact, files are
readable by the user's group; and stimulus ids survive every pipeline table unchanged."""

from __future__ import annotations

import csv
import errno
import importlib.metadata
import json
import os
import re
import stat
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import xmodal
from xmodal import pipeline
from xmodal.features import write_features
from xmodal.io import (
    DiskFullError,
    TableError,
    UnwritableOutputError,
    atomic_path,
    read_table,
    write_table,
)

#: ids researchers really have: leading zeros, floats, missing-value words, unicode, spaces
TRICKY_IDS = ["0180", "180", "1.50", "1.5", "NA", "nan", "NaN", "null", "None", "", "True",
              "1e3", "-0", "007", "7", " 7", "7 ", "a b", "Ünïcødé", "日本", '"q"', "'s'", "#1"]  # fmt: skip
ids_strategy = st.one_of(
    st.sampled_from([i for i in TRICKY_IDS if i.strip()]),
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\t\r\n"),
        min_size=1,
        max_size=12,
    ).filter(lambda s: s.strip() != ""),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(ids_strategy, min_size=1, max_size=20, unique=True),
    values=st.lists(
        st.floats(allow_nan=True, allow_infinity=False, width=64), min_size=20, max_size=20
    ),
)
def test_round_trip_keeps_ids_as_text_and_numbers_exact(tmp_path: Path, ids, values) -> None:
    n = len(ids)
    df = pd.DataFrame(
        {
            "stimulus_id": ids,
            "model": [f"{i:03d}" for i in range(n)],  # numeric-looking model keys stay text too
            "value": values[:n],
            # a float32 column reads back as its float64 value (pandas 3 wrote 0.1 for
            # float32(0.1), which is 0.10000000149011612)
            "value32": np.clip(values[:n], -1e38, 1e38).astype(np.float32),
            "nullable32": pd.array(np.clip(values[:n], -1e38, 1e38), dtype="Float32"),
            "draw": np.arange(n, dtype=np.int64),
            "chosen": [i % 2 == 0 for i in range(n)],
        }
    )
    path = tmp_path / "t.tsv"
    write_table(df, path)
    back = read_table(path)
    assert back["stimulus_id"].tolist() == ids
    assert back["model"].tolist() == df["model"].tolist()
    np.testing.assert_array_equal(back["value"].to_numpy(float), df["value"].to_numpy(float))
    np.testing.assert_array_equal(
        back["value32"].to_numpy(float), df["value32"].to_numpy(np.float64)
    )
    np.testing.assert_array_equal(
        back["nullable32"].to_numpy(float, na_value=np.nan),
        df["nullable32"].to_numpy(np.float64, na_value=np.nan),
    )
    assert (
        back["draw"].tolist() == list(range(n)) and back["chosen"].tolist() == df["chosen"].tolist()
    )


def test_pandas_default_reading_would_have_changed_these_ids(tmp_path: Path) -> None:
    """The failure this reader prevents: pandas' defaults turn 0180 into 180 and NA into NaN."""
    ids = ["0180", "1.50", "NA", "007"]
    write_table(
        pd.DataFrame({"stimulus_id": ids, "value": [1.0, 2.0, 3.0, 4.0]}), tmp_path / "t.tsv"
    )
    naive = pd.read_csv(tmp_path / "t.tsv", sep="\t")["stimulus_id"].tolist()
    assert naive != ids
    assert read_table(tmp_path / "t.tsv")["stimulus_id"].tolist() == ids


def _documented_pandas_recipes() -> list[str]:
    """The ``pandas.read_csv(path, …)`` calls README.md and docs/contracts.md tell a reader."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for doc in ("README.md", "docs/contracts.md"):
        text = (root / doc).read_text()
        found += [
            " ".join(m.split()) for m in re.findall(r"`(pandas\.read_csv\(path,.*?\))`", text, re.S)
        ]
    assert len(found) == 2, found
    return found


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(ids_strategy, min_size=1, max_size=12, unique=True))
@example(ids=['"open', "b", 'close"', "d", '"dq"'])  # stray quotes: rows joined before
def test_the_documented_pandas_recipe_reads_every_id_as_written(tmp_path: Path, ids) -> None:
    """The docs' pandas recipe read an id written with quotes, ``"dq"``, as ``dq``, and joined
    the rows between two ids holding one quote each (``"open``, ``close"``) into one (audit);
    it now names ``quoting=csv.QUOTE_NONE`` and reads each id as the file has it."""
    path = tmp_path / "t.tsv"
    write_table(pd.DataFrame({"stimulus_id": ids, "value": np.arange(len(ids), dtype=float)}), path)
    for recipe in _documented_pandas_recipes():
        got = eval(recipe, {"pandas": pd, "csv": csv, "path": path})  # noqa: S307
        assert got["stimulus_id"].tolist() == ids, recipe
        assert got["value"].astype(float).tolist() == list(range(len(ids)))
    assert read_table(path)["stimulus_id"].tolist() == ids


@pytest.mark.parametrize("bad", ["a\tb", "two\nlines", "cr\r"])
def test_text_with_tab_or_line_break_is_refused_naming_column_and_row(
    tmp_path: Path, bad: str
) -> None:
    df = pd.DataFrame({"stimulus_id": ["ok", bad], "value": [1.0, 2.0]})
    with pytest.raises(TableError, match=r"column 'stimulus_id', row 2"):
        write_table(df, tmp_path / "t.tsv")
    assert not (tmp_path / "t.tsv").exists()


@pytest.mark.parametrize(
    ("columns", "match"),
    [
        (["stimulus_id", "value", "value"], r"column name\(s\) \['value'\] appear more than once"),
        (["stimulus_id", "a\tb", "c"], r"column name 'a\\tb' is empty or holds a tab"),
        (["stimulus_id", "", "c"], r"column name '' is empty"),
    ],
)
def test_column_names_that_cannot_be_read_back_are_refused(
    tmp_path: Path, columns: list[str], match: str
) -> None:
    # read back, a repeated name comes back as "value.1" and a tab splits the header: the
    # numbers would land under another column (AttributeError before, naming no file)
    df = pd.DataFrame([["s1", 1.0, 2.0]], columns=columns)
    with pytest.raises(TableError, match=match) as err:
        write_table(df, tmp_path / "t.tsv")
    assert str(tmp_path / "t.tsv") in str(err.value)
    assert not (tmp_path / "t.tsv").exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives_new_files(
    tmp_path: Path, umask: int, mode: int
) -> None:
    old = os.umask(umask)
    try:
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
        with atomic_path(tmp_path / "f.h5") as tmp:
            with h5py.File(tmp, "w") as f:
                f["x"] = [1]
    finally:
        os.umask(old)
    for name in ("t.tsv", "f.h5"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_results_folder_is_one_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UnwritableOutputError, match=r"cannot write .*t\.tsv: no permission"):
            write_table(pd.DataFrame({"a": [1]}), out / "t.tsv")
    finally:
        out.chmod(0o755)


def test_read_only_folder_message_as_root_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root ignores folder permissions; simulate the refusal a normal user gets."""
    import xmodal.io

    def refuse(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(xmodal.io, "_create_new", refuse)
    with pytest.raises(UnwritableOutputError) as err:
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "sub" / "t.tsv")
    msg = str(err.value)
    assert "t.tsv" in msg and "make that folder writable" in msg and ".tmp" not in msg


def test_a_read_only_file_system_is_one_clear_error_naming_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EROFS (a results folder on a read-only mount) named the hidden temporary file, as a bare
    OSError; it is now the output's refusal, as a folder without permission is."""
    import errno

    import xmodal.io

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(xmodal.io, "_create_new", refuse)
    with pytest.raises(UnwritableOutputError, match=r"t\.tsv: it is on a read-only file system"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")


def _default_acl(folder: Path, gid: int) -> bool:
    """Give ``folder`` the default ACL of a lab's shared folder (owner and group rwx, the lab's
    group ``gid`` rwx, others nothing), as raw xattrs (no setfacl here); False where the file
    system has no ACLs."""
    import struct

    entries = [(1, 7, None), (4, 7, None), (8, 7, gid), (16, 7, None), (32, 0, None)]
    raw = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF if ident is None else ident)
        for tag, perm, ident in entries
    )
    try:
        os.setxattr(folder, "system.posix_acl_default", raw)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_outputs_get_the_mode_any_new_file_gets_in_their_folder(tmp_path: Path, umask: int):
    """The results were made 0600 (mkstemp) and then chmod-ed to 0666 & ~umask: in a shared
    folder with a default ACL that set the ACL's mask to nothing (the lab's group could not
    read a result that `touch` would have let it read), and chmod_like_new cleared the setgid
    bit of the demo's model folders (audit). Every output now gets what a file opened there
    gets: in a plain folder, a setgid folder and one with a default ACL."""
    import stat

    from xmodal.io import atomic_path, chmod_like_new

    old = os.umask(umask)
    try:
        folders = {"plain": tmp_path / "plain", "setgid": tmp_path / "setgid"}
        for f in folders.values():
            f.mkdir()
        folders["setgid"].chmod(0o2770)
        acl = tmp_path / "acl"
        acl.mkdir()
        if _default_acl(acl, os.getgid() + 1):
            folders["acl"] = acl
        for name, folder in folders.items():
            with open(folder / "opened.tsv", "w") as fh:  # what any program gets
                fh.write("a\n")
            (folder / "made").mkdir()
            write_table(pd.DataFrame({"a": [1]}), folder / "table.tsv")
            with atomic_path(folder / "stamp.json") as tmp:
                tmp.write_text("{}\n")
            with atomic_path(folder / "remade.pt") as tmp:  # a writer that makes it again
                tmp.unlink()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            # a model folder as safetensors leaves it: 0700, a weights file 0600
            model = folder / "model"
            model.mkdir(mode=0o700)
            model.chmod(0o700)
            (model / "sub").mkdir(mode=0o700)
            (model / "sub").chmod(0o700)
            weights = model / "sub" / "weights.safetensors"
            weights.write_bytes(b"w")
            weights.chmod(0o600)
            chmod_like_new(model)
            new_file = stat.S_IMODE((folder / "opened.tsv").stat().st_mode)
            new_dir = stat.S_IMODE((folder / "made").stat().st_mode)
            for out in ("table.tsv", "stamp.json", "remade.pt"):
                got = stat.S_IMODE((folder / out).stat().st_mode)
                assert got == new_file, (name, out, oct(got), oct(new_file))
            for d in (model, model / "sub"):
                got = stat.S_IMODE(d.stat().st_mode)
                assert got == new_dir, (name, d.name, oct(got), oct(new_dir))
            assert stat.S_IMODE(weights.stat().st_mode) == new_file, name
        assert stat.S_IMODE(folders["setgid"].joinpath("made").stat().st_mode) & stat.S_ISGID
        if "acl" in folders:  # the lab's group can read, whatever the umask
            assert stat.S_IMODE((acl / "table.tsv").stat().st_mode) & 0o040
    finally:
        os.umask(old)


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """A job killed (SIGKILL, out of memory) inside atomic_path leaves its hidden temporary
    file; the next write of that output removes it, and leaves other outputs' alone."""
    stale = tmp_path / ".grid.tsv.abc123.tmp.tsv"
    stale.write_text("half")
    other = tmp_path / ".contrasts.tsv.def456.tmp.tsv"
    other.write_text("half")
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "grid.tsv")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "grid.tsv"]


def test_a_failed_flush_stops_the_write_and_a_file_system_that_cannot_flush_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO from fsync (an NFS write-back that failed) means the data are not on disk: the output
    is not renamed into place. EINVAL (a file system without fsync) is let through."""
    import errno

    def fail(code: int):
        def fsync(fd: int) -> None:
            raise OSError(code, os.strerror(code))

        return fsync

    monkeypatch.setattr(os, "fsync", fail(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"):
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
    assert not list(tmp_path.iterdir())  # neither the output nor its temporary
    monkeypatch.setattr(os, "fsync", fail(errno.EINVAL))
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
    assert read_table(tmp_path / "t.tsv")["a"].tolist() == [1]


def test_a_digest_cache_write_leaves_another_writers_temporary_file(tmp_path: Path) -> None:
    """Two manifest-stamp jobs (or a dry run during a run) may write one digest cache at once:
    the sweep of stale temporaries must not remove the other writer's (its rename failed)."""
    import time

    from xmodal.io import file_digests

    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    time.sleep(2.1)  # a file changed in the last 2 s is not cached (its time may not show it)
    cache = tmp_path / "image_digests.json"
    with atomic_path(cache, sweep=False) as other:
        other.write_text("{}")
        file_digests([img], cache=cache)  # the second writer, while the first one writes
        assert cache.is_file() and other.exists()
    assert cache.read_text() == "{}"  # the first writer's rename still worked (last one wins)


def test_sigterm_removes_the_unfinished_outputs_temporary_file(tmp_path: Path) -> None:
    """SLURM's time limit and scancel send SIGTERM: a step script (log_to first) exits 143 and
    its unfinished output's temporary file is removed, as on an error; before, it stayed."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "step.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(pipeline.__file__).parents[1])!r})\n"
        "from xmodal.logs import log_to\n"
        f"log_to({str(tmp_path / 'step.log')!r})\n"
        "from xmodal.io import atomic_path\n"
        f"with atomic_path({str(tmp_path / 'out.tsv')!r}) as tmp:\n"
        "    tmp.write_text('partial')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(list(tmp_path.glob(".out.tsv.*.tmp.tsv"))) == 1
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert proc.wait(timeout=30) == 143 and time.monotonic() - t0 < 30
    assert not list(tmp_path.glob(".out.tsv.*")) and not (tmp_path / "out.tsv").exists()
    assert "terminated (SIGTERM" in (tmp_path / "step.log").read_text()


def test_an_outputs_data_reach_the_disk_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a node crash a renamed file can be empty unless its data were flushed first."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.tsv")
    assert events == ["fsync", "replace", "fsync"]  # the file, the rename, the folder's entry


# ---------------------------------------------------------------- ids through every pipeline table


def _feature_files(root: Path, ids: list[str], rng: np.random.Generator) -> dict[str, Path]:
    """Three vision models (2 layers) and one language model (3 layers) with shared structure."""
    m = len(ids)
    shared = rng.standard_normal((m, 6))
    paths = {}
    for key, modality, width, n_layers in (
        ("v0", "vision", 7, 2), ("v1", "vision", 8, 2), ("v2", "vision", 9, 2),
        ("l0", "language", 10, 3),
    ):  # fmt: skip
        layers = [
            shared @ rng.standard_normal((6, width)) + 0.3 * rng.standard_normal((m, width))
            for _ in range(n_layers)
        ]
        paths[key] = write_features(
            root / f"{key}.h5",
            np.stack(layers).astype(np.float32),
            ids,
            [f"layer{i}" for i in range(n_layers)],
            {"model_id": key, "model_key": key, "modality": modality},
        )
    return paths


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ids=st.lists(ids_strategy, min_size=24, max_size=24, unique=True), seed=st.integers(0, 99))
def test_ids_survive_every_pipeline_table(tmp_path_factory, ids: list[str], seed: int) -> None:
    root = tmp_path_factory.mktemp("ids")
    rng = np.random.default_rng(seed)
    files = _feature_files(root, ids, rng)
    vision = [files[k] for k in ("v0", "v1", "v2")]
    analysis = dict(set_size=8, n_random=3, drop_fraction=0.25, knn_k=3, seed=seed)
    out = {
        n: root / f"{n}.tsv"
        for n in ("res", "disp", "sets", "loo", "loo_st", "layers", "cond", "con")
    }
    pipeline.run_gpa(
        vision, ["v0", "v1", "v2"], -1, 1e-10, 1000, out["res"], out["disp"], root / "gpa.json"
    )
    pipeline.run_stimulus_sets(out["disp"], analysis, out["sets"])
    pipeline.run_leave_one_model_out(
        vision, ["v0", "v1", "v2"], -1, 1e-10, 1000, out["loo"], out["loo_st"]
    )
    pipeline.run_layer_search(vision, files["l0"], ["v0", "v1", "v2"], "l0", -1, 3, out["layers"])
    # the drop control is off in these sets (n_drop_random 0): the config's draws say so
    draws = {"random": 3, "random_drop": 0}
    pipeline.run_conditions(
        vision, files["l0"], out["layers"], out["sets"], ["v0", "v1", "v2"], "l0", -1, 3, 20, seed,
        out["cond"], out["con"], draws=draws,
    )  # fmt: skip
    assert read_table(out["disp"])["stimulus_id"].tolist() == ids
    residuals = read_table(out["res"])
    assert residuals["stimulus_id"].tolist() == [s for s in ids for _ in range(3)]
    sets = read_table(out["sets"])
    assert set(sets["stimulus_id"]) <= set(ids)
    assert len(sets[sets["set"] == "low"]) == 2 * 8  # by mean and by pc1: no id lost or merged
    loo = read_table(out["loo_st"])
    assert loo["stimulus_id"].tolist() == ids * 3
    cond = read_table(out["cond"])
    # sets of 8 with k = 3: a CKNNA beyond ±1 (a few sets) is NaN (docs/method.md, "Alignment")
    value = cond["value"]
    assert value.notna().mean() >= 0.5 and value.dropna().abs().le(1 + 1e-6).all(), value
    n_random = cond[cond["condition"] == "random"]
    assert len(n_random) == 3 * 3  # 3 vision models × 3 draws, every id of every draw found
    # sets made with 3 draws, where the config now asks for 4: refused before any alignment
    with pytest.raises(ValueError, match=r"sets.tsv: set 'random' .*analysis.n_random is 4"):
        pipeline.run_conditions(
            vision, files["l0"], out["layers"], out["sets"], ["v0", "v1", "v2"], "l0", -1, 3, 20,
            seed, root / "c2.tsv", root / "k2.tsv", draws={**draws, "random": 4},
        )  # fmt: skip
    assert not (root / "c2.tsv").exists()


def test_numeric_looking_ids_give_the_same_numbers_as_prefixed_ids(tmp_path: Path) -> None:
    """The same stimuli under ids "0001", "1.50", "NA"... and under "stim-…": equal results."""
    m = 24
    tricky = [i for i in TRICKY_IDS if i.strip()][:m]
    tricky += [f"{i:04d}" for i in range(m - len(tricky))]
    plain = [f"stim-{i}" for i in range(m)]
    results = []
    for name, ids in (("tricky", tricky), ("plain", plain)):
        root = tmp_path / name
        root.mkdir()
        files = _feature_files(root, ids, np.random.default_rng(5))
        vision = [files[k] for k in ("v0", "v1", "v2")]
        analysis = dict(set_size=8, n_random=3, drop_fraction=0.25, knn_k=3, seed=1)
        pipeline.run_gpa(
            vision,
            ["v0", "v1", "v2"],
            -1,
            1e-10,
            1000,
            root / "r.tsv",
            root / "d.tsv",
            root / "g.json",
        )
        pipeline.run_stimulus_sets(root / "d.tsv", analysis, root / "s.tsv")
        pipeline.run_layer_search(
            vision, files["l0"], ["v0", "v1", "v2"], "l0", -1, 3, root / "l.tsv"
        )
        # the tricky ids also go through the stored vision bootstrap structures
        stored = root / "vb.pt" if name == "tricky" else None
        if stored is not None:
            pipeline.run_vision_bootstrap(vision, root / "s.tsv", ["v0", "v1", "v2"], -1, 3, 50, 1,
                                          stored)  # fmt: skip
        pipeline.run_conditions(
            vision, files["l0"], root / "l.tsv", root / "s.tsv", ["v0", "v1", "v2"], "l0", -1, 3,
            50, 1, root / "c.tsv", root / "k.tsv", vision_bootstrap_path=stored,
        )  # fmt: skip
        results.append(
            (read_table(root / "d.tsv"), read_table(root / "c.tsv"), read_table(root / "k.tsv"))
        )
    (d1, c1, k1), (d2, c2, k2) = results
    np.testing.assert_array_equal(d1["mean_dispersion"], d2["mean_dispersion"])
    np.testing.assert_array_equal(c1["value"], c2["value"])
    num = k1.select_dtypes("number").columns
    np.testing.assert_array_equal(k1[num].to_numpy(), k2[num].to_numpy())


def test_vision_bootstrap_from_other_features_is_rebuilt_with_a_warning(
    tmp_path: Path, caplog
) -> None:
    """A stored vision bootstrap made from another vision layer is not taken: the conditions
    job rebuilds those sides, says so, and writes the numbers of a job without the file."""
    ids = [f"s{i}" for i in range(24)]
    files = _feature_files(tmp_path, ids, np.random.default_rng(9))
    vision, keys = [files[k] for k in ("v0", "v1", "v2")], ["v0", "v1", "v2"]
    analysis = dict(set_size=8, n_random=3, drop_fraction=0.25, knn_k=3, seed=1)
    pipeline.run_gpa(vision, keys, -1, 1e-10, 1000, tmp_path / "r.tsv", tmp_path / "d.tsv",
                     tmp_path / "g.json")  # fmt: skip
    pipeline.run_stimulus_sets(tmp_path / "d.tsv", analysis, tmp_path / "s.tsv")
    pipeline.run_layer_search(vision, files["l0"], keys, "l0", -1, 3, tmp_path / "l.tsv")
    stale = tmp_path / "vb.pt"
    pipeline.run_vision_bootstrap(vision, tmp_path / "s.tsv", keys, 0, 3, 50, 1, stale)
    out = {}
    for name, stored in (("plain", None), ("stale", stale)):
        caplog.clear()
        with caplog.at_level("INFO", logger="xmodal.pipeline"):
            pipeline.run_conditions(
                vision, files["l0"], tmp_path / "l.tsv", tmp_path / "s.tsv", keys, "l0", -1, 3,
                50, 1, tmp_path / f"c_{name}.tsv", tmp_path / f"k_{name}.tsv",
                vision_bootstrap_path=stored,
            )  # fmt: skip
        out[name] = read_table(tmp_path / f"k_{name}.tsv")
    assert "12 of the vision models' bootstrap structures did not match" in caplog.text
    assert "vb.pt" in caplog.text
    pd.testing.assert_frame_equal(out["stale"], out["plain"])


def test_provenance_names_the_stimuli_commit_and_each_models_revision_and_weights(
    tmp_path: Path,
) -> None:
    """The provenance table: the manifest's digest and the hub commit from prefetch's
    source.json, then each feature file's model id, revisions, weights digest and versions,
    read back as text (a commit or version that looks like a number stays as written)."""
    import hashlib
    import json

    stim = tmp_path / "stimuli"
    stim.mkdir()
    manifest = stim / "stimuli.tsv"
    manifest.write_text(
        "stimulus_id\timage\tcaption\n007\timages/a.png\ta cat\n1.50\timages/b.png\ta dog\n"
    )
    (stim / "source.json").write_text(json.dumps({
        "repo": "org/captions", "split": "train", "revision_requested": "wit_1024",
        "revision": "0123456789", "n_stimuli": 2, "created": "2026-01-01T00:00:00+00:00",
    }))  # fmt: skip
    ids = ["007", "1.50"]
    x = np.random.default_rng(0).standard_normal((2, 2, 3)).astype(np.float32)
    files = []
    for key, modality, rev in (("vit", "vision", "1e3"), ("llm", "language", "abc")):
        versions = {"torch": "2.13.0", "timm": "1.10", "transformers": "5.0", "xmodal": "0.1.0"}
        attrs = {
            "model_id": f"org/{key}", "model_key": key, "modality": modality,
            "source": "timm" if modality == "vision" else "transformers",
            "requested_revision": "main", "revision": rev, "weights_sha256": "f" * 64,
            "compute_dtype": "float32", "library_versions": json.dumps(versions),
            "stimuli_sha256": "0123",
        }  # fmt: skip
        files.append(write_features(tmp_path / f"{key}.h5", x, ids, ["l0", "l1"], attrs))
    out = tmp_path / "provenance.tsv"
    pipeline.write_provenance(manifest, "hub", files, out)
    table = read_table(out)
    assert list(table.columns) == list(pipeline.PROVENANCE_COLUMNS)
    assert list(table["kind"]) == ["stimuli", "model", "model", "analysis"]
    s = table.iloc[0]
    assert s["id"] == "org/captions" and s["key"] == "train" and s["source"] == "hub"
    assert s["requested_revision"] == "wit_1024" and s["revision"] == "0123456789"
    assert s["sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert list(table["n_stimuli"]) == [2, 2, 2, 2]
    assert list(table["key"][1:3]) == ["vit", "llm"] and list(table["revision"][1:3]) == [
        "1e3",
        "abc",
    ]
    assert list(table["id"][1:3]) == ["org/vit", "org/llm"]
    assert list(table["stimuli_sha256"]) == ["", "0123", "0123", ""]  # text, not 123
    assert set(table["sha256"][1:3]) == {"f" * 64} and set(table["timm"][1:3]) == {"1.10"}
    # last, the analysis code that made the tables, by the digest its rules rerun on
    a = table.iloc[-1]
    assert a["key"] == "xmodal" and a["xmodal"] == xmodal.__version__
    assert a["sha256"] == xmodal.analysis_code_digest() and len(a["sha256"]) == 64
    assert (a["numpy"], a["scipy"]) == (np.__version__, scipy.__version__)  # text: "2.10" stays
    assert a["torch"].split("+")[0] == importlib.metadata.version("torch").split("+")[0]
    # a local manifest: its path and digest, no hub fields (a stray source.json is not read)
    pipeline.write_provenance(manifest, "local", files[:1], out)
    s = read_table(out).iloc[0]
    assert s["id"] == str(manifest) and s["source"] == "local"
    assert s["revision"] == "" and s["requested_revision"] == ""
    assert read_table(out)["revision"].tolist() == ["", "1e3", ""]  # not 1000.0
    # the config's labels name the models: a file keeps the label it was extracted under
    pipeline.write_provenance(manifest, "local", files, out, labels={"vit": "ViT-H (MAE)"})
    assert read_table(out)["label"].tolist() == ["", "ViT-H (MAE)", "", ""]


def test_gpa_records_and_warns_how_well_pc1_is_oriented(tmp_path: Path, caplog, monkeypatch):
    """gpa.json holds r(PC1 score, mean dispersion) as the dispersion table gives it; an
    unoriented PC1 (r within ±2/√m of 0: its sign, and so which PC1 set is low, is noise) is
    recorded and warned about, naming what to read instead."""
    ids = [f"s{i}" for i in range(40)]
    files = _feature_files(tmp_path, ids, np.random.default_rng(3))
    vision, keys = [files[k] for k in ("v0", "v1", "v2")], ["v0", "v1", "v2"]
    args = (vision, keys, -1, 1e-10, 1000, tmp_path / "r.tsv", tmp_path / "d.tsv")
    pipeline.run_gpa(*args, tmp_path / "g.json")
    table = read_table(tmp_path / "d.tsv")
    record = json.loads((tmp_path / "g.json").read_text())
    r = np.corrcoef(table["pc1_score"], table["mean_dispersion"])[0, 1]
    assert record["pc1_r_mean_dispersion"] == pytest.approx(r, abs=1e-12)
    assert record["pc1_oriented"] is bool(abs(r) >= 2 / np.sqrt(40))
    from xmodal import dispersion as xdispersion

    monkeypatch.setattr(xdispersion, "pc1_orientation", lambda t: (0.01, False))
    with caplog.at_level("WARNING", logger="xmodal.pipeline"):
        pipeline.run_gpa(*args, tmp_path / "g2.json")
    assert "PC1 is nearly uncorrelated with the mean dispersion (Pearson r 0.01" in caplog.text
    assert json.loads((tmp_path / "g2.json").read_text())["pc1_oriented"] is False


NOT_NUMBERS = ["0,5", '"0.5"', "n/a", "1.2.3", "-", "½", " ", "0.5 0.6", "TRUE"]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=12
    ),
    row=st.integers(0, 11),
    bad=st.sampled_from(NOT_NUMBERS),
)
def test_a_value_that_is_not_a_number_is_refused_naming_column_row_and_value(
    tmp_path: Path, values: list[float], row: int, bad: str
) -> None:
    """A number column edited in a spreadsheet (a comma decimal, a quoted cell) stayed text and
    failed later in a step that named nothing; now the reader names the file, column and row:
    always where the caller needs the column as numbers, and where most of it is numbers."""
    row %= len(values)
    path = tmp_path / "t.tsv"
    write_table(
        pd.DataFrame({"stimulus_id": [f"s{i}" for i in range(len(values))], "value": values}), path
    )
    lines = path.read_text().splitlines()
    cells = lines[row + 1].split("\t")
    lines[row + 1] = "\t".join([cells[0], bad])
    path.write_text("\n".join(lines) + "\n")
    where = rf"{re.escape(str(path))}: column 'value', row {row + 1} \(line {row + 2}\) holds {re.escape(repr(bad))}"
    with pytest.raises(TableError, match=where):
        read_table(path, numbers=("value",))
    if 2 * 1 < len(values) or bad in ("0,5", '"0.5"'):  # most values are numbers, or the one
        # that is not is a number misspelt: refused without being asked for
        with pytest.raises(TableError, match=where):
            read_table(path)
    else:  # a column of text the contract does not list stays text
        assert read_table(path)["value"].tolist()[row] == bad


def test_text_columns_and_missing_number_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("stimulus_id\tnote\tvalue\n007\ta\tNaN\n1e3\tb\t\n2\t3\t2.5\n")
    back = read_table(path, numbers=("value",))
    assert back["stimulus_id"].tolist() == ["007", "1e3", "2"]
    assert back["note"].tolist() == ["a", "b", "3"]  # mostly text: stays text
    assert np.isnan(back["value"][:2]).all() and back["value"][2] == 2.5
    with pytest.raises(TableError, match=r"t.tsv: no column\(s\) \['rank'\]"):
        read_table(path, numbers=("value", "rank"))


def test_a_whole_column_of_comma_decimals_is_refused_and_image_modes_stay_text(
    tmp_path: Path,
) -> None:
    """A spreadsheet in a comma-decimal locale rewrites every number of a column: kept as text,
    it failed later naming no file. Pillow's bilevel mode "1" is a mode, not a number, even in
    a table where most images have it."""
    path = tmp_path / "t.tsv"
    path.write_text("stimulus_id\tvalue\ns1\t0,25\ns2\t1,5\n")
    with pytest.raises(TableError, match=r"t.tsv: column 'value', row 1 \(line 2\) holds '0,25'"):
        read_table(path)
    path.write_text('stimulus_id\tvalue\ns1\t"0.25"\ns2\t1.5\n')  # one of two edited
    with pytest.raises(TableError, match=r"column 'value', row 1 \(line 2\) holds '\"0.25\"'"):
        read_table(path)
    path.write_text("stimulus_id\tmode\tformat\ns1\t1\tPNG\ns2\t1\tPNG\ns3\tL\tPNG\n")
    assert read_table(path)["mode"].tolist() == ["1", "1", "L"]


def test_an_unwritable_output_folder_stops_an_extraction_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mark of an extraction's attempt (xmodal.attempts.begin_attempt) is its first write: an
    output folder it cannot write to is the output's clear refusal there, before the model is
    loaded, not a bare PermissionError (or one after the GPU work)."""
    import errno

    from xmodal.attempts import attempt_marker, begin_attempt, end_attempt, unfinished_outputs

    out = tmp_path / "f" / "m.h5"
    begin_attempt(out)
    assert attempt_marker(out).is_file() and unfinished_outputs([out]) == [out]
    end_attempt(out)
    assert unfinished_outputs([out]) == [] and not attempt_marker(out).exists()
    for code, match in ((errno.EACCES, "no permission"), (errno.EROFS, "read-only file system")):

        def refuse(self, *args, code=code, **kwargs):
            raise PermissionError(code, "refused") if code == errno.EACCES else OSError(code, "ro")

        monkeypatch.setattr(Path, "write_text", refuse)
        with pytest.raises(UnwritableOutputError, match=rf"cannot write .*m\.h5: .*{match}"):
            begin_attempt(out)
        monkeypatch.undo()


def test_a_retry_after_an_error_a_retry_repeats_stops_before_any_work(tmp_path: Path) -> None:
    """The profile resubmits a failed job (`retries`) with more memory and time. After an
    attempt that failed with the project's own error about the model, the stimuli or the config
    (xmodal.attempts.fail_attempt), the next attempt stops at its mark, naming that error,
    instead of loading the model for hours to fail the same way; a new run (attempt 1) tries
    again, and errors of the node or the file system are retried."""
    from xmodal.attempts import (
        RepeatedFailureError,
        attempt_marker,
        begin_attempt,
        end_attempt,
        fail_attempt,
    )
    from xmodal.extract._common import DeviceError, NonFiniteFeatureError
    from xmodal.io import FileTooLargeError
    from xmodal.stimuli import StimulusError

    out = tmp_path / "f" / "m.h5"
    for err in (
        NonFiniteFeatureError("model m: NaN in layer blocks.3\nfor stimuli 'a', 'b'."),
        StimulusError("cannot decode img/7.jpg (stimulus '7')"),
        # the same limit on the next node (review)
        FileTooLargeError(errno.EFBIG, "file too large while writing m.h5: ulimit -f"),
    ):
        begin_attempt(out)
        fail_attempt(out, err)
        fail_attempt(out, err)  # the extraction's script, then the bootstrap at exit: one record
        assert attempt_marker(out).read_text().count("fails again on retry") == 1
        name = type(err).__name__
        for attempt in (2, 3):
            with pytest.raises(RepeatedFailureError) as info:
                begin_attempt(out, attempt)
            message = str(info.value)
            assert message.startswith(f"{out}: attempt {attempt} not run: the attempt before")
            one_line = " ".join(str(err).split()).rstrip(".")
            assert f"{name}: {one_line}. Fix that and run Snakemake again" in message
        begin_attempt(out, 1)  # a new run of Snakemake
        assert RepeatedFailureError.__name__ not in attempt_marker(out).read_text()
        end_attempt(out)
    # retried: a node without its GPU, a full disk, an error from outside the project; and
    # (review) a feature file that h5py could not read for a moment (its KeyError names the
    # errno), a download that failed (the hub did not answer)
    from xmodal.features import FeatureFileError
    from xmodal.prefetch import PrefetchError

    for err in (
        DeviceError("device 'cuda' requested but no CUDA device is visible"),
        DiskFullError(28, "No space left on device"),
        ValueError("a third-party error"),
        RepeatedFailureError("an earlier attempt's"),
        FeatureFileError(
            "llm.h5: cannot read: KeyError('Unable to synchronously open object (file read "
            "failed: time = x, filename = llm.h5, file descriptor = 3, errno = 5, error message "
            "= Input/output error)')"
        ),
        PrefetchError("Cannot download org/m (ConnectError: [Errno 111] Connection refused)"),
    ):
        begin_attempt(out)
        fail_attempt(out, err)
        begin_attempt(out, 2)
        assert attempt_marker(out).read_text().startswith("started "), err
    # a file that is not there, named in the text: repeats
    begin_attempt(out)
    fail_attempt(out, FeatureFileError("llm.h5: [Errno 2] No such file or directory: 'llm.h5'"))
    with pytest.raises(RepeatedFailureError):
        begin_attempt(out, 2)
    # the project's errors that wrap one that may pass (review): an I/O error of the file
    # system, memory of the host or the GPU; and an image read error, whose class says so
    # (a DataLoader worker's error reaches the job without its cause)
    from xmodal.extract._common import ExtractionError
    from xmodal.stimuli import ImageReadError

    def wrapped(inner: BaseException, outer: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as err:
                raise outer from err
        except BaseException as err:
            return err

    def load() -> ExtractionError:
        return ExtractionError("org/m: could not load tokenizer/model from /cache/m")

    for err, repeats in (
        (wrapped(OSError(5, "Input/output error"), load()), False),
        (wrapped(OSError(116, "Stale file handle"), load()), False),
        (wrapped(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), load()), False),
        (wrapped(RuntimeError("DefaultCPUAllocator: not enough memory: you tried"), load()), False),
        (wrapped(MemoryError(), load()), False),
        (ImageReadError("stimulus 's3': cannot read image s3.png ([Errno 5] I/O error)"), False),
        (wrapped(FileNotFoundError(2, "No such file or directory"), load()), True),
        (wrapped(OSError("org/m does not appear to have a file named config.json"), load()), True),
        (wrapped(RuntimeError("size mismatch for blocks.0.attn.qkv.weight"), load()), True),
    ):
        begin_attempt(out)
        fail_attempt(out, err)
        assert ("fails again on retry" in attempt_marker(out).read_text()) is repeats, err
    end_attempt(out)
    fail_attempt(out, StimulusError("after the mark is gone: nothing to record"))
    assert not attempt_marker(out).exists()


def test_a_new_run_forgets_what_an_earlier_runs_attempts_failed_with(tmp_path: Path) -> None:
    """The workflow calls forget_failures at the start of a run (review: a fix made between
    two runs, then attempt 1 of the new run killed before it wrote its mark, and attempt 2
    was refused for the error already fixed). The mark itself stays: the output is missing."""
    from xmodal.attempts import (
        attempt_marker,
        begin_attempt,
        fail_attempt,
        forget_failures,
        unfinished_outputs,
    )
    from xmodal.extract._common import ExtractionError

    out, other = tmp_path / "m.h5", tmp_path / "never-made.h5"
    begin_attempt(out)
    fail_attempt(out, ExtractionError("llama-65b: weights not in the hub cache"))
    forget_failures([out, other])
    assert "fails again" not in attempt_marker(out).read_text()
    begin_attempt(out, 2)  # runs
    assert unfinished_outputs([out]) == [out] and not attempt_marker(other).exists()


def test_a_retried_analysis_job_stops_after_an_error_a_retry_repeats(tmp_path: Path) -> None:
    """An analysis job (no feature file) that failed with the project's own error was
    resubmitted by the profile's `retries` twice, to fail the same way after a queue wait
    (notes). scripts/_bootstrap.py now records such an error, uncaught at exit, in a mark next
    to the job's log, and the retry stops at once, naming it; errors that may pass (memory)
    are retried, a first attempt always runs, and a new run forgets the record."""
    import subprocess
    import sys

    from xmodal.attempts import attempt_marker, forget_failures, marked_paths

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    log, ran = tmp_path / "logs" / "gpa.log", tmp_path / "ran.txt"
    mark = attempt_marker(log)

    def job(attempt: int | None, error: str) -> subprocess.CompletedProcess:
        res = f"gpu=0, attempt={attempt}" if attempt is not None else "gpu=0"
        body = (
            f"import sys, types; sys.path.insert(0, {str(scripts)!r})\n"
            f"snakemake = types.SimpleNamespace(rule='gpa', threads=1, log=[{str(log)!r}],"
            f" resources=types.SimpleNamespace({res}), output=types.SimpleNamespace())\n"
            "import _bootstrap\n"
            "from xmodal.logs import log_to\n"
            "log_to(snakemake.log[0])\n"
            f"open({str(ran)!r}, 'a').write('{attempt}\\n')\n"
            "from xmodal.io import TableError\n"
            f"{error}\n"
        )
        script = tmp_path / "job.py"
        script.write_text(body)
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True)

    repeats = "raise TableError('results/sets.tsv: column set missing')"
    assert job(1, repeats).returncode != 0
    assert "fails again on retry: TableError: results/sets.tsv: column set missing" in (
        mark.read_text()
    )
    for attempt, which in ((2, "attempt 2"), (3, "attempt 3"), (None, "a retry")):
        proc = job(attempt, "pass")
        assert proc.returncode != 0, proc.stderr
        stopped = f"{log}: {which} not run: the attempt before it failed with an error that a"
        assert stopped in log.read_text() and stopped in proc.stderr
        assert "TableError: results/sets.tsv: column set missing. Fix that" in log.read_text()
    assert ran.read_text() == "1\n"  # only attempt 1 got past the bootstrap
    assert marked_paths(tmp_path) == [log]
    forget_failures(marked_paths(tmp_path))  # a new run (the workflow's onstart)
    assert not mark.exists() and marked_paths(tmp_path) == []
    assert job(2, "pass").returncode == 0 and ran.read_text() == "1\n2\n"
    # not recorded: may pass on retry (memory), or not the project's own error
    for error in ("raise MemoryError()", "raise ValueError('a third-party error')"):
        assert job(1, error).returncode != 0 and not mark.exists()
    # a first attempt runs whatever a mark says, and starts clean
    mark.write_text("fails again on retry: TableError: an earlier run's\n")
    assert job(1, "pass").returncode == 0 and not mark.exists()


def test_an_image_that_cannot_be_read_for_now_is_an_image_read_error(tmp_path, monkeypatch):
    """An I/O error while reading an image may pass on retry (ImageReadError); a missing file
    or one without permission does not (StimulusError)."""
    import errno

    from xmodal.stimuli import ImageReadError, StimulusError, _read_image_file

    path = tmp_path / "s3.png"
    path.write_bytes(b"x")
    for code, kind in ((errno.EIO, ImageReadError), (errno.EACCES, StimulusError)):

        def fail(self, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(Path, "read_bytes", fail)
        with pytest.raises(StimulusError, match="stimulus 's3': cannot read image") as info:
            _read_image_file(path, "s3")
        assert type(info.value) is kind
    monkeypatch.undo()
    with pytest.raises(StimulusError) as info:
        _read_image_file(tmp_path / "missing.png", "s4")
    assert type(info.value) is StimulusError
    # the scan of every image (stimuli.drop_duplicates, the stimuli report) says so as a whole
    # only where every failure may pass (review: it raised a StimulusError without the cause)
    import pandas as pd
    from PIL import Image

    from xmodal.stimuli import scan_images

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    manifest = pd.DataFrame({"stimulus_id": ["a", "b"], "image": ["a.png", "b.png"],
                             "caption": ["x", "y"]})  # fmt: skip
    read = Path.read_bytes

    def eio(self):
        if self.name == "a.png":
            raise OSError(errno.EIO, "Input/output error")
        return read(self)

    monkeypatch.setattr(Path, "read_bytes", eio)
    with pytest.raises(ImageReadError, match="1 image.*Input/output error"):
        scan_images(manifest, tmp_path)
    (tmp_path / "b.png").write_bytes(b"not an image")
    with pytest.raises(StimulusError, match="2 image") as info:
        scan_images(manifest, tmp_path)
    assert type(info.value) is StimulusError


def test_a_file_past_the_size_limit_does_not_pass_on_retry():
    """EFBIG is the file's own limit (``ulimit -f``, the file system's largest file), the same
    on the next node: neither the OSError nor h5py's text of it passes (mutation); an I/O
    error of the node does."""
    from xmodal.attempts import passing_error

    assert not passing_error(OSError(errno.EFBIG, "File too large"))
    h5py_text = "Can't write data (file write failed: errno = 27, error message = 'File too large')"
    assert not passing_error(RuntimeError(h5py_text))
    assert passing_error(OSError(errno.EIO, "Input/output error"))


def test_a_model_folders_link_to_a_file_outside_keeps_that_files_mode(tmp_path: Path) -> None:
    """chmod_like_new gives a model folder's files the mode of new files; a symbolic link in it
    (a hub snapshot links to its blobs) is left alone, and a private file it points to outside
    the folder keeps its mode (mutation)."""
    import stat

    from xmodal.io import chmod_like_new

    secret = tmp_path / "private.key"
    secret.write_text("x")
    secret.chmod(0o600)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "link").symlink_to(secret)
    chmod_like_new(model)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
