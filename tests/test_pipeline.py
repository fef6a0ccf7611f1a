"""The seam between rules and library (xmodal.pipeline): feature files checked against the
registry, prepared layers, and messages that name the model, file and config key at fault."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from xmodal import metrics, pipeline
from xmodal.config import ConfigError
from xmodal.features import FeatureFile, FeatureFileError, write_features

IDS = [f"s{i:02d}" for i in range(16)]


def _write(path: Path, key: str, modality: str, x: np.ndarray | None = None, ids=IDS) -> Path:
    rng = np.random.default_rng(abs(hash(key)) % 2**32)
    if x is None:
        x = rng.standard_normal((3, len(ids), 6)).astype(np.float32)
    names = [f"layer{i}" for i in range(x.shape[0])]
    return write_features(
        path, x, ids, names, {"model_id": key, "model_key": key, "modality": modality}
    )


def test_language_file_registered_as_vision_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "llm.h5", "llm", "language")
    with pytest.raises(FeatureFileError) as err:
        pipeline.open_features(p, IDS, model="llm", modality="vision")
    msg = str(err.value)
    assert "modality='language'" in msg and "config key 'models.llm.modality'" in msg


def test_another_models_file_under_this_key_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.h5", "model-b", "vision")
    with pytest.raises(FeatureFileError, match="model_key='model-b'.*used as model 'model-a'"):
        pipeline.open_features(p, IDS, model="model-a", modality="vision")


def test_file_without_provenance_attributes_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.h5", "a", "vision")
    with h5py.File(p, "a") as f:
        del f.attrs["modality"]
    with pytest.raises(FeatureFileError, match="attribute 'modality' is missing"):
        pipeline.open_features(p, IDS, model="a", modality="vision")


def test_duplicated_id_in_a_file_is_reported_as_duplicated_not_missing(tmp_path: Path) -> None:
    p = _write(tmp_path / "a.h5", "a", "vision")
    with h5py.File(p, "a") as f:
        ids = f["stimulus_ids"].asstr()[()].tolist()
        ids[3] = ids[2]
        del f["stimulus_ids"]
        f.create_dataset(
            "stimulus_ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype()
        )
    with pytest.raises(FeatureFileError) as err:
        FeatureFile(p, expected_ids=IDS)
    assert "more than once: ['s02'" in str(err.value) and "missing" not in str(err.value)


def test_constant_vision_layer_names_model_file_and_config_key(tmp_path: Path) -> None:
    paths = [_write(tmp_path / f"v{i}.h5", f"v{i}", "vision") for i in range(3)]
    x = np.random.default_rng(0).standard_normal((3, 16, 6)).astype(np.float32)
    x[1] = 2.5  # layer 1 (= -2) is the same vector for every stimulus
    paths[2] = _write(tmp_path / "v2.h5", "v2", "vision", x)
    with pytest.raises(FeatureFileError) as err:
        pipeline.read_vision_layers(paths, ["v0", "v1", "v2"], -2)
    msg = str(err.value)
    assert "v2.h5" in msg and "'v2'" in msg and "analysis.vision_layer" in msg
    assert "reps[" not in msg


def test_vision_layer_out_of_range_names_the_config_key(tmp_path: Path) -> None:
    paths = [_write(tmp_path / f"v{i}.h5", f"v{i}", "vision") for i in range(3)]
    with pytest.raises(
        ConfigError, match=r"'analysis.vision_layer': layer 7 does not exist .* 3 layers"
    ):
        pipeline.read_vision_layers(paths, ["v0", "v1", "v2"], 7)


def test_identical_vision_features_are_warned_about(tmp_path: Path, caplog) -> None:
    x = np.random.default_rng(1).standard_normal((3, 16, 6)).astype(np.float32)
    paths = [
        _write(tmp_path / "a.h5", "a", "vision", x),
        _write(tmp_path / "b.h5", "b", "vision", x),
    ]
    paths.append(_write(tmp_path / "c.h5", "c", "vision"))
    with caplog.at_level(logging.WARNING, logger="xmodal.pipeline"):
        pipeline.read_vision_layers(paths, ["a", "b", "c"], -2)
    assert "models 'a' and 'b' have identical features" in caplog.text


def test_vision_features_equal_up_to_rotation_and_scale_are_warned_about(
    tmp_path: Path, caplog
) -> None:
    """A model listed twice under two keys, once rotated (another basis) and rescaled, is fitted
    exactly by GPA and counts twice; the bit-identical check missed it, and leave-one-model-out
    then reported correlations of rounding noise."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 16, 6)).astype(np.float32)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    turned = (3 * x @ q + 5).astype(np.float32)  # rotated, scaled and shifted
    near = (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32)  # another model
    paths = [
        _write(tmp_path / f"{k}.h5", k, "vision", v)
        for k, v in (("a", x), ("b", turned), ("c", near), ("d", None))
    ]
    with caplog.at_level(logging.WARNING, logger="xmodal.pipeline"):
        pipeline.read_vision_layers(paths, ["a", "b", "c", "d"], -2)
    assert re.search(
        r"models 'a' and 'b' have the same features up to a rotation, reflection and scale "
        r"\(GPA fits one onto the other exactly: 1 − ‖N_iᵀN_j‖_\* = [0-9.e+-]+\)",
        caplog.text,
    ), caplog.text
    assert caplog.text.count("have the same features up to") == 1  # not the near copy, nor d
    # the same model extracted twice, stored in float32, with a large common mean: the
    # distances from the centre differ by rounding (1e-6 to 1e-5 relative), which a test of
    # each distance to 1e-6 took for another model before the fit was tried (GPA audit)
    y = (rng.standard_normal((3, 256, 384)) + 10.0).astype(np.float32)
    again = (y.astype(np.float64) * (1 + 1e-6 * rng.standard_normal(y.shape))).astype(np.float32)
    many = [f"s{i:03d}" for i in range(256)]
    paths = [
        _write(tmp_path / f"{k}.h5", k, "vision", v, ids=many) for k, v in (("e", y), ("f", again))
    ]
    caplog.clear()
    # and with no third model, no two that differ remain: every residual 0, the dispersion
    # rounding noise (1e-17, written with intervals for two identical language models, audit)
    with (
        caplog.at_level(logging.WARNING, logger="xmodal.pipeline"),
        pytest.raises(
            FeatureFileError,
            match=r"the vision models \['e', 'f'\] have the same "
            r"features up to .*'analysis\.vision_layer'.*every residual is 0",
        ),  # fmt: skip
    ):
        pipeline.read_vision_layers(paths, ["e", "f"], -2)
    assert "models 'e' and 'f' have the same features up to a rotation" in caplog.text
    x2 = rng.standard_normal((3, 16, 6)).astype(np.float32)
    paths = [_write(tmp_path / f"{k}.h5", k, "language", x2) for k in ("l1", "l2", "l3")]
    with pytest.raises(FeatureFileError, match=r"the language models \['l1', 'l2', 'l3'\]"):
        pipeline.read_gpa_layers(paths, ["l1", "l2", "l3"], [0, 0, 0], "language", "k")
    pipeline.read_gpa_layers(paths[:2] + [paths[0]], ["l1", "l2", "l1"], [0, 1, 0], "language", "k")
    # leave-one-model-out over A, a rotated copy of A and C: the fit without C was a GPA of one
    # model (partial dispersion 4e-17, yet r = 0.18, p = 0.0498 in loo.tsv; review)
    near = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    paths = [
        _write(tmp_path / f"{k}.h5", k, "vision", v)
        for k, v in (("a", x), ("b", turned), ("c", near))
    ]
    pipeline.read_vision_layers(paths, ["a", "b", "c"], -2)  # GPA: warned, not refused
    with pytest.raises(FeatureFileError, match=r"without 'c', the vision models \['a', 'b'\]"):
        pipeline.read_vision_layers(paths, ["a", "b", "c"], -2, each_left_out=True)


def test_a_rank_deficient_vision_model_is_named_and_its_rank_recorded(
    tmp_path: Path, caplog
) -> None:
    """Duplicate stimuli (or a degenerate layer) leave a model wider than m spanning fewer
    dimensions than m − 1: GPA fits it as a model that narrow, and the run says which model,
    recording every model's numerical rank in gpa.json (given order, not fitting order)."""
    rng = np.random.default_rng(5)
    # c, a, b: its sorting permutation is not its own inverse, so fitting order and given order
    # tell apart (b, a, c did not: ranks in fitting order passed, mutation audit)
    x = {k: rng.standard_normal((3, 16, 24)).astype(np.float32) for k in ("c", "a", "b")}
    x["c"][:, 9] = x["c"][:, 3]  # two stimuli with the same features in model c only
    x["a"] = np.tile(x["a"][:, :, :4], (1, 1, 6))  # model a: 4 units, each repeated 6 times
    paths = [_write(tmp_path / f"{k}.h5", k, "vision", v) for k, v in x.items()]
    out = [tmp_path / n for n in ("r.tsv", "d.tsv", "g.json")]
    with caplog.at_level(logging.WARNING, logger="xmodal.pipeline"):
        pipeline.run_gpa(paths, list(x), -2, 1e-10, 2000, *out)
    record = json.loads(out[2].read_text())
    assert record["ranks"] == [14, 4, 15] and record["slow_regime"] is True
    assert "vision GPA: model 'a' has numerical rank 4, below min(its width, m − 1) = 15" in (
        caplog.text
    )
    assert "model 'c' has numerical rank 14" in caplog.text and "model 'b'" not in caplog.text


def test_prepared_layer_is_the_reference_preprocessing(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((3, 16, 6)).astype(np.float32) * 3
    p = _write(tmp_path / "a.h5", "a", "language", x)
    with pipeline.open_features(p, IDS, model="a", modality="language") as f:
        got = [pipeline.prepared_layer(f, i) for i in range(3)]
    want = metrics.prepare(x)  # threshold over all layers, clamp, row l2 per layer
    np.testing.assert_array_equal(np.stack(got), want)


def test_rows_are_matched_to_the_expected_order_once(tmp_path: Path, caplog) -> None:
    x = np.random.default_rng(3).standard_normal((2, 16, 6)).astype(np.float32)
    order = np.random.default_rng(4).permutation(16)
    p = _write(tmp_path / "a.h5", "a", "vision", x[:, order], ids=[IDS[i] for i in order])
    with caplog.at_level(logging.INFO, logger="xmodal.features"):
        with pipeline.open_features(p, IDS, model="a", modality="vision") as f:
            np.testing.assert_array_equal(f.layer(1), x[1])
    assert caplog.text.count("another order") == 1


def test_gpa_tables_do_not_depend_on_the_order_of_the_models(tmp_path: Path) -> None:
    """The GPA is fitted in the order of the models' names and reported in the given order, so
    listing the models in another order in config.yaml gives the same dispersion, to the bit."""
    import json

    from _planted import planted_reps

    from xmodal.io import read_table

    reps, _ = planted_reps(np.random.default_rng(5), 30, 10, (14, 18, 22, 12), max_noise=0.6)
    ids = [f"s{i}" for i in range(30)]
    names = ["mae", "dino", "clip", "clipft"]

    def run(order: list[int], tag: str):
        outs = [tmp_path / f"{tag}_{n}" for n in ("res.tsv", "disp.tsv", "gpa.json")]
        pipeline._gpa_and_dispersion(
            ids, [names[i] for i in order], [reps[i] for i in order], 1e-10, 1000, *outs, "vision"
        )
        res, disp = read_table(outs[0]), read_table(outs[1])
        return res.sort_values(["stimulus_id", "model"]).reset_index(drop=True), disp, outs[2]

    res_a, disp_a, json_a = run([0, 1, 2, 3], "a")  # mae, dino, clip, clipft: not sorted
    res_b, disp_b, json_b = run([2, 3, 1, 0], "b")  # sorted
    # each table lists the models in the order given, not the order fitted
    assert json.loads(json_a.read_text())["models"] == names
    unsorted = read_table(tmp_path / "a_res.tsv")
    assert list(unsorted["model"][:4]) == names
    import pandas as pd

    pd.testing.assert_frame_equal(res_a, res_b, check_exact=True)
    pd.testing.assert_frame_equal(disp_a, disp_b, check_exact=True)
    summary = json.loads(json_b.read_text())
    assert summary["models"] == ["clip", "clipft", "dino", "mae"]  # as given
    assert summary["widths"] == [22, 12, 18, 14]


def test_the_layer_search_prepares_each_llm_layer_with_the_files_one_threshold(
    tmp_path: Path,
) -> None:
    """Every LLM layer is clamped at the file's threshold over all its layers, as the conditions
    job does (docs/method.md, "Alignment"): a threshold per layer moved the demo's chosen layer
    in 3 of 12 pairs and passed every test (mutation audit). Layers of very different scales
    tell the two apart."""
    from xmodal.io import read_table

    rng = np.random.default_rng(11)
    ids = [f"s{i:02d}" for i in range(40)]
    z = rng.standard_normal((40, 4))
    vision = [
        _write(tmp_path / f"v{i}.h5", f"v{i}", "vision", np.stack(
            [z @ rng.standard_normal((4, 12)) + rng.standard_normal((40, 12)) for _ in range(2)]
        ).astype(np.float32), ids=ids)
        for i in range(3)
    ]  # fmt: skip
    heavy = rng.standard_t(2, size=(3, 40, 10)) * np.array([1.0, 30.0, 0.05])[:, None, None]
    llm = _write(tmp_path / "l.h5", "l", "language", heavy.astype(np.float32), ids=ids)
    out = tmp_path / "layers.tsv"
    pipeline.run_layer_search(vision, llm, ["v0", "v1", "v2"], "l", -1, 3, out)
    table = read_table(out)
    with pipeline.open_features(llm, ids, model="l", modality="language") as f:
        ys = [pipeline.prepared_layer(f, i) for i in range(3)]  # the file's one threshold
    for v, path in zip(["v0", "v1", "v2"], vision, strict=True):
        with pipeline.open_features(path, ids, model=v, modality="vision") as f:
            x = pipeline.prepared_layer(f, 1)
        got = table[table["vision"] == v].sort_values("llm_layer")["value"].to_numpy()
        want = [metrics.cknna(x, y, 3) for y in ys]
        np.testing.assert_allclose(got, want, atol=1e-6)
