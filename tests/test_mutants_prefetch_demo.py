"""Tests that kill mutants which the other tests of prefetch, the demo's world and targets, and
the logging helpers let through (mutation testing; each test names the bug it guards against).

No network: the hub endpoint is a closed local port and caches are written by hand, as in
tests/test_prefetch.py.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest
from test_prefetch import fake_repo, image_bytes, parquet_bytes

from xmodal.prefetch import (
    PrefetchError,
    _reason,
    _split_files,
    is_offline,
    missing_shards,
    prefetch_model,
    prefetch_stimuli,
)

SECRET = "hf_notARealTokenButSecret123"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """A closed local port as the hub; no offline flag; a token in the environment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)


# ----------------------------------------------------------------------------- prefetch
@pytest.mark.parametrize(
    "name, value, offline",
    [
        ("HF_HUB_OFFLINE", "true", True),
        ("HF_HUB_OFFLINE", " Yes ", True),
        ("TRANSFORMERS_OFFLINE", "1", True),
        ("HF_HUB_OFFLINE", "0", False),
    ],
)
def test_every_offline_spelling_keeps_prefetch_off_the_hub(
    no_network: None, monkeypatch: pytest.MonkeyPatch, name: str, value: str, offline: bool
) -> None:
    """Bugs: 'TRUE' missing from the accepted values; TRANSFORMERS_OFFLINE not read."""
    monkeypatch.setenv(name, value)
    assert is_offline() is offline


def test_a_download_error_reason_never_shows_the_token(no_network: None) -> None:
    """Bug: the one-line reason of a failed request (which may quote the Authorization header)
    is put into the error message without redacting the token."""
    reason = _reason(RuntimeError(f"401 Client Error for Bearer {SECRET}\nsecond line"))
    assert reason == "RuntimeError: 401 Client Error for Bearer ***"


def test_missing_weight_shards_count_from_one_to_m() -> None:
    """Bug: range(first, M) instead of range(first, M + first) drops the last weight shard."""
    assert missing_shards(["model-00002-of-00003.safetensors"]) == [
        "model-00001-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]


def test_a_weights_index_in_a_subfolder_and_a_pickle_index_are_read(tmp_path: Path) -> None:
    """Bugs in the helper, for any file set (a dataset's shards sit in folders; prefetch_model
    passes top-level files only): a shard an index in a subfolder names looked up at the top
    level; only ``*.safetensors.index.json`` read (a pickle index's missing shard passed)."""
    (tmp_path / "sub").mkdir()
    index = {"weight_map": {"a": "part_a.safetensors", "b": "part_b.safetensors"}}
    (tmp_path / "sub" / "model.safetensors.index.json").write_text(json.dumps(index))
    files = ["sub/model.safetensors.index.json", "sub/part_a.safetensors", "part_b.safetensors"]
    assert missing_shards(files, tmp_path) == ["sub/part_b.safetensors"]
    pickles = {"weight_map": {"a": "first.bin", "b": "second.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(pickles))
    files = ["pytorch_model.bin.index.json", "first.bin"]
    assert missing_shards(files, tmp_path) == ["second.bin"]


def test_allow_pickle_keeps_the_index_of_pickle_shards(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: ``*.bin.index.json`` dropped even when pickles are allowed: sharded pickle weights
    then cannot be loaded in the (offline) GPU job."""
    index = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin",
                            "b": "pytorch_model-00002-of-00002.bin"}}  # fmt: skip
    files = {
        "config.json": b"{}",
        "tokenizer.json": b"{}",
        "pytorch_model-00001-of-00002.bin": b"p1",
        "pytorch_model-00002-of-00002.bin": b"p2",
        "pytorch_model.bin.index.json": json.dumps(index).encode(),
    }
    fake_repo(tmp_path, "model", "org/sharded-pickle", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = prefetch_model("org/sharded-pickle", "language", None, tmp_path, allow_pickle=True)
    assert rec["files"] == sorted(files)


def test_a_cached_model_missing_a_shard_only_its_index_names_is_refused(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: prefetch_model checks the shard names but not the index it holds (``path`` not
    passed): a shard named only in ``model.safetensors.index.json`` may be missing."""
    index = {"weight_map": {"a": "part_a.safetensors", "b": "part_b.safetensors"}}
    files = {"config.json": b"{}", "tokenizer.json": b"{}", "part_a.safetensors": b"w1",
             "model.safetensors.index.json": json.dumps(index).encode()}  # fmt: skip
    fake_repo(tmp_path, "model", "org/odd-shards", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        PrefetchError, match=r"lacks the weight shard\(s\) \['part_b\.safetensors'\]"
    ):
        prefetch_model("org/odd-shards", "language", None, tmp_path)


def test_a_timm_repo_without_the_weights_timm_loads_is_refused(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: safetensors looked for among all files instead of the ones selected: a repo whose
    only safetensors file is not timm's ``model.safetensors`` passed with no weights at all."""
    files = {"config.json": b"{}", "open_clip_model.safetensors": b"w", "pytorch_model.bin": b"p"}
    fake_repo(tmp_path, "model", "timm/vit_y.fake", "main", files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrefetchError, match="has only pickle checkpoints"):
        prefetch_model("vit_y.fake", "vision", None, tmp_path)


def test_weights_in_a_subfolder_are_not_the_models_weights(
    tmp_path: Path, no_network: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug: files matched by their base name too, so ``sub/model.safetensors`` passed prefetch
    as timm's weights and the GPU job found none (timm and transformers read the top level)."""
    fake_repo(tmp_path, "model", "timm/vit_z.fake", "main",
              {"config.json": b"{}", "sub/model.safetensors": b"w"})  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PrefetchError, match="no model.safetensors .* at its top level"):
        prefetch_model("vit_z.fake", "vision", None, tmp_path)
    # the same file at the top level is taken, and the subfolder's copy is not fetched
    fake_repo(tmp_path, "model", "timm/vit_w.fake", "main",
              {"config.json": b"{}", "model.safetensors": b"w", "sub/model.safetensors": b"w"})  # fmt: skip
    record = prefetch_model("vit_w.fake", "vision", None, tmp_path)
    assert record["files"] == ["config.json", "model.safetensors"]


def test_a_file_named_after_another_split_is_left_out_of_a_split_folder() -> None:
    """Bug: ``validation.parquet`` (no dash or underscore) inside ``train/`` taken as train."""
    files = ["train/part-0.parquet", "train/validation.parquet", "train/test_0.parquet"]
    assert _split_files(files, "train") == ["train/part-0.parquet"]


def test_a_row_without_an_image_is_named_by_its_row_in_its_own_file(
    tmp_path: Path, no_network: None
) -> None:
    """Bug: the row counter not reset per parquet file: the error names a row the file lacks."""
    first = [(image_bytes("PNG", (1, 1, 1)), ["one"]), (image_bytes("PNG", (2, 2, 2)), ["two"])]
    second = [(image_bytes("PNG", (3, 3, 3)), ["three"]), (b"", ["no image"])]
    fake_repo(tmp_path / "hub", "dataset", "fake/gap", "main",
              {"data/train-00000-of-00002.parquet": parquet_bytes(first),
               "data/train-00001-of-00002.parquet": parquet_bytes(second)})  # fmt: skip
    with pytest.raises(
        PrefetchError,
        match=r"train-00001-of-00002\.parquet row 1 \(stimulus s0003\) has no embedded",
    ):
        prefetch_stimuli("fake/gap", None, "train", tmp_path / "out", tmp_path / "hub")


def test_a_configuration_folder_is_matched_whole() -> None:
    """Bug: ``startswith(folder)`` without the slash: 'wit/train' also took 'wit_1024/...'."""
    files = ["wit/train-0.parquet", "wit_1024/train-0.parquet"]
    assert _split_files(files, "wit/train") == ["wit/train-0.parquet"]


def _dataset(tmp_path: Path, rows: list, ref: str = "main") -> tuple[Path, str]:
    hub = tmp_path / "hub"
    sha = fake_repo(hub, "dataset", "fake/ds", ref, {"data/train-0.parquet": parquet_bytes(rows)})
    return hub, sha


def test_a_run_of_tabs_and_line_breaks_becomes_one_space(tmp_path: Path, no_network: None) -> None:
    """Bug: each tab / line break replaced by its own space (the documented contract is one
    space per run), which changes the caption the language models read."""
    rows = [(image_bytes("PNG", (1, 1, 1)), ["a red\t\r\nsquare\n\nhere"])]
    hub, _ = _dataset(tmp_path, rows)
    manifest = prefetch_stimuli("fake/ds", None, "train", tmp_path / "out", hub)
    df = pd.read_csv(manifest, sep="\t", dtype=str, keep_default_na=False)
    assert df["caption"].tolist() == ["a red square here"]


def test_an_unpinned_dataset_records_the_settings_of_the_config(
    tmp_path: Path, no_network: None
) -> None:
    """Bugs: the settings file and source.json record the fallback 'main' instead of the
    requested revision (None): the workflow then sees changed settings on every run."""
    from xmodal.stimuli import manifest_settings_changed

    hub, sha = _dataset(tmp_path, [(image_bytes("PNG", (1, 1, 1)), ["a caption"])])
    manifest = prefetch_stimuli("fake/ds", None, "train", tmp_path / "out", hub)
    settings = {"repo": "fake/ds", "revision": None, "split": "train"}
    assert manifest_settings_changed(manifest, settings) is None
    assert json.loads((tmp_path / "out" / "settings.json").read_text()) == settings
    source = json.loads((tmp_path / "out" / "source.json").read_text())
    assert source["revision_requested"] is None and source["revision"] == sha


# ----------------------------------------------------------------------------- demo world
def test_scenes_hold_one_to_three_objects_at_distinct_positions() -> None:
    """Bugs: ``integers(1, 3)`` (never three objects); positions drawn with replacement (two
    objects drawn on top of each other, both in the caption)."""
    from xmodal.demo.stimuli import sample_scenes

    scenes = sample_scenes(300, 1, "eval")
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    for s in scenes:
        assert len({o.position for o in s.objects}) == len(s.objects)


def test_each_nuisance_component_has_its_own_spread() -> None:
    """Bug: one u drawn per scene instead of one per component: the four components move in
    lockstep (the documented world has c_k = min(1, ν·u_k), u_k drawn per component)."""
    from xmodal.demo.stimuli import NUISANCES, sample_scenes

    unclipped = [s for s in sample_scenes(50, 2, "eval") if s.nuisance * 1.2 < 1]
    assert len(unclipped) > 20
    for s in unclipped:
        assert len({getattr(s, k) for k in NUISANCES}) == len(NUISANCES)


def test_caption_joins_the_objects_with_commas_and_a_final_and() -> None:
    """Bug: the last object joined with a comma instead of ' and '."""
    from xmodal.demo.stimuli import SceneObject, caption_for

    a = SceneObject("circle", "red", "small", "on the left")
    b = SceneObject("square", "blue", "large", "at the top")
    c = SceneObject("triangle", "green", "small", "in the centre")
    assert caption_for([a]) == "A small red circle on the left."
    assert (
        caption_for([a, b]) == "A small red circle on the left and a large blue square at the top."
    )
    assert caption_for((a, b, c)) == (
        "A small red circle on the left, a large blue square at the top and "
        "a small green triangle in the centre."
    )


def _scene(**levels: float):
    from xmodal.demo.stimuli import NUISANCES, Scene, SceneObject

    obj = SceneObject("square", "red", "large", "in the centre")
    values = {"nuisance": 0.0, **dict.fromkeys(NUISANCES, 0.0), **levels}
    return Scene(objects=(obj,), render_seed=123, **values)


def test_the_rendered_occluder_and_clutter_are_the_recorded_components(monkeypatch) -> None:
    """Bugs: the occluder's radius scaled by c instead of √c (its area is then c² of the
    object's box, not c); the clutter count truncated (``int(8c)``) instead of rounded; the
    clutter count taken from the level ν instead of the recorded component."""
    import xmodal.demo.stimuli as ds

    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(
        ds, "_draw_shape", lambda d, shape, cx, cy, r, col: calls.append((shape, r))
    )
    ds.render_scene(_scene(occlusion=0.25, clutter=0.99), size=96)
    r = ds.SIZES["large"] * 96
    assert len(calls) == 1 + 1 + 8  # the object, its occluder, round(8 * 0.99) distractors
    assert calls[0] == ("square", r)
    assert calls[1][1] == pytest.approx(r * 0.5)
    calls.clear()
    ds.render_scene(_scene(occlusion=0.25, clutter=0.05), size=96)
    assert len(calls) == 2  # round(0.4) = 0 distractors


def test_only_the_recorded_components_change_the_image() -> None:
    """Bugs: blur, background or clutter driven by the level ν instead of the component the
    manifest records: a scene whose components are all 0 must render as its clean version."""
    from xmodal.demo.stimuli import render_scene

    clean = np.asarray(render_scene(_scene()))
    np.testing.assert_array_equal(np.asarray(render_scene(_scene(nuisance=1.0))), clean)
    for k in ("clutter", "background", "blur", "occlusion"):
        assert (np.asarray(render_scene(_scene(**{k: 0.6}))) != clean).any(), k
    # the faintest blur the manifest records (radius 3 * 0.05 = 0.15 px) is rendered too
    assert (np.asarray(render_scene(_scene(blur=0.05))) != clean).any()


def test_training_images_are_jpeg_round_trips_of_the_renderings(tmp_path: Path) -> None:
    """Bug: training images stored as raw renderings, while the evaluation stimuli are JPEGs:
    training and evaluation images would then have different statistics."""
    from xmodal.demo.stimuli import (
        _jpeg_round_trip,
        generate_training_scenes,
        load_training_scenes,
        render_scene,
        sample_scenes,
    )

    path = generate_training_scenes(tmp_path / "s.npz", n=2, seed=4)
    images = load_training_scenes(path, ("images",))["images"]
    for img, scene in zip(images, sample_scenes(2, 4, "train"), strict=True):
        np.testing.assert_array_equal(img, np.asarray(_jpeg_round_trip(render_scene(scene))))


# ----------------------------------------------------------------------------- demo targets
def _targets_project(root: Path) -> dict:
    """A finished run's tables with planted values; returns what the targets must be."""
    from xmodal.demo.stimuli import generate_stimuli
    from xmodal.io import write_table

    manifest = generate_stimuli(root / "resources/stimuli/ds", n=8, seed=3)  # n=8: the minimum
    table = pd.read_csv(manifest, sep="\t", dtype={"stimulus_id": str})
    ids, nu = table["stimulus_id"].tolist(), table["nuisance"].to_numpy(float)
    order = np.argsort(np.argsort(nu))  # ranks of ν
    disp = pd.DataFrame(
        {"stimulus_id": ids[::-1], "mean_dispersion": nu[::-1] ** 2, "pc1_score": -nu[::-1]}
    )
    write_table(disp, root / "results/dispersion/ds/dispersion.tsv")
    rng = np.random.default_rng(7)
    rows = []
    for model in ("v1", "v2", "v3"):
        for j in rng.permutation(8):
            dist = 1.0 + rng.random()
            rows.append((ids[j], model, dist * rng.random(), dist))
    residuals = pd.DataFrame(rows, columns=["stimulus_id", "model", "residual", "distance"])
    write_table(residuals, root / "results/dispersion/ds/residuals.tsv")
    path = root / "results/dispersion/ds/gpa.json"
    path.write_text(json.dumps({"rho_dispersion_distance": 0.25}))
    write_table(
        pd.DataFrame({"held_out": ["v1", "v2", "v3"], "pearson_r": [0.9, 0.3, 0.6]}),
        root / "results/dispersion/ds/loo.tsv",
    )
    contrasts = pd.DataFrame(
        {
            "vision": ["v1", "v1", "v2", "v2", "v1", "v2"],
            "llm": ["a"] * 6,
            "summary": ["mean", "pc1", "mean", "pc1", "mean", "mean"],
            "metric": ["cknna"] * 4 + ["mutual_knn"] * 2,
            "low": [0.5, 0.2, 0.4, 0.1, 0.9, 0.9],
            "high": [0.3, 0.3, 0.4, 0.2, 0.1, 0.1],
            "diff_ci_low": [0.0, -0.3, 0.01, -0.2, 0.5, 0.5],
            "diff_ci_high": [0.4, 0.1, 0.2, 0.05, 0.9, 0.9],
        }
    )
    write_table(contrasts, root / "results/alignment/ds/contrasts.tsv")
    grid = pd.DataFrame(
        {
            "vision": ["v1", "v2", "v1", "v2", "v1"],
            "llm": ["a"] * 5,
            "condition": ["full", "full", "low", "high", "full"],
            "metric": ["cknna", "cknna", "cknna", "cknna", "mutual_knn"],
            "value": [0.5, 0.3, 0.01, 0.02, 0.001],
        }
    )
    write_table(grid, root / "results/alignment/ds/grid.tsv")
    diag = pd.DataFrame(
        {
            "model": ["v1", "v1", "l", "l"],
            "modality": ["vision", "vision", "language", "language"],
            "layer": [0, 1, 0, 1],
            "layer_name": ["blocks.0", "blocks.1", "embeddings", "layers.0"],
            "cos_mean": [0.99, 0.4, 0.95, 0.7],
            "frac_unresolved": [0.9, 0.05, 0.8, 0.02],
            "collapsed": [True, False, True, False],
            "warn": [True, False, True, False],
            "used": [False, True, False, True],
        }
    )
    write_table(diag, root / "results/diagnostics/ds/diagnostics.tsv")
    relative = (residuals["residual"] / residuals["distance"]).groupby(residuals["stimulus_id"])
    return {"ids": ids, "nu_ranks": order, "relative": relative.mean().loc[ids].to_numpy()}


def test_demo_targets_from_planted_tables(tmp_path: Path) -> None:
    """Bugs that flatter the README's numbers: ρ of PC1 computed from the mean dispersion;
    relative disagreement as median or distance / residual; other metrics' contrasts or other
    conditions' CKNNA counted; the vision maximum taken over every model; n_pairs counting
    pc1 rows; min LOO r replaced by its mean; pc1 and mean counts mixed."""
    from scipy.stats import spearmanr

    from xmodal.demo.targets import demo_targets

    want = _targets_project(tmp_path)
    t = demo_targets(tmp_path, "ds", ["v1", "v2", "v3"])
    assert t.nuisance_rho == pytest.approx(1.0) and t.nuisance_rho_pc1 == pytest.approx(-1.0)
    rho = spearmanr(want["nu_ranks"], want["relative"])[0]
    assert t.nuisance_rho_relative == pytest.approx(rho, abs=1e-12)
    assert t.full.to_dict() == {("v1", "a"): 0.5, ("v2", "a"): 0.3}
    assert t.summary() == {
        "max_mean_cosine_vision": 0.4,
        "max_mean_cosine": 0.7,
        "max_frac_unresolved": 0.05,
        "nuisance_rho": pytest.approx(1.0),
        "nuisance_rho_pc1": pytest.approx(-1.0),
        "nuisance_rho_relative": pytest.approx(rho, abs=1e-12),
        "rho_dispersion_distance": 0.25,
        "n_pairs": 2,
        "low_gt_high_mean": 1,  # v2's tie is not low > high
        "low_gt_high_pc1": 0,
        "ci_above0_mean": 1,  # v1's interval touches 0: not above it
        "ci_above0_pc1": 0,
        "min_loo_r": 0.3,
        "min_full_cknna": 0.3,
        "median_full_cknna": 0.4,
    }


def test_demo_targets_refuse_a_dispersion_table_missing_a_stimulus(tmp_path: Path) -> None:
    """Bug: a left merge of the manifest with dispersion.tsv lets a missing stimulus through
    (its NaN silently dropped from ρ)."""
    from xmodal.demo.targets import demo_targets
    from xmodal.io import read_table, write_table

    _targets_project(tmp_path)
    path = tmp_path / "results/dispersion/ds/dispersion.tsv"
    write_table(read_table(path).iloc[1:], path)
    with pytest.raises(ValueError, match="dispersion.tsv and the manifest hold different"):
        demo_targets(tmp_path, "ds", ["v1", "v2", "v3"])


def test_low_high_ties_and_an_interval_touching_zero_are_not_the_effect() -> None:
    """Bugs: ``>=`` in low > high (a tie counted as the effect) or in the interval's lower
    bound (an interval that reaches 0 counted as above it)."""
    from xmodal.demo.targets import low_high_table

    contrasts = pd.DataFrame(
        {"vision": ["v"], "llm": ["a"], "summary": ["mean"], "low": [0.4], "high": [0.4],
         "diff_ci_low": [0.0], "diff_ci_high": [0.1]}
    )  # fmt: skip
    table = low_high_table(contrasts)
    assert table[["low_gt_high", "ci_above_0"]].values.tolist() == [[False, False]]


# ----------------------------------------------------------------------------- logs
def test_preview_of_exactly_n_items_has_no_ellipsis() -> None:
    """Bug: ``len(items) >= n``: a complete list shown as if cut."""
    from xmodal.logs import preview

    assert preview(["a", "b", "c"], n=3) == "['a', 'b', 'c'] (3 in all)"


@pytest.mark.parametrize("name", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"])
def test_every_token_variable_is_redacted_from_eight_characters(monkeypatch, name: str) -> None:
    """Bugs: only HF_TOKEN read; a token of exactly 8 characters not redacted."""
    from xmodal.logs import redact

    for other in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, "s3cr3t!8")
    assert redact("auth s3cr3t!8 sent") == "auth *** sent"


def test_hf_shaped_tokens_of_twenty_characters_are_redacted(monkeypatch) -> None:
    """Bug: the ``hf_`` pattern needs more than 20 characters after the prefix."""
    from xmodal.logs import redact

    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert redact("token hf_" + "a1" * 10 + " used") == "token *** used"
    assert redact("hf_short") == "hf_short"


def test_a_rerun_log_holds_only_the_rerun(tmp_path: Path, fresh_root_logging) -> None:
    """Bug: the step log opened for appending: a rerun's log still shows the failed run's error."""
    from xmodal.logs import log_to

    path = tmp_path / "step.log"
    log_to(path)
    logging.getLogger("xmodal.t").error("first run failed")
    for h in logging.getLogger().handlers[:]:
        if isinstance(h, logging.FileHandler):
            logging.getLogger().removeHandler(h)
            h.close()
    log_to(path)
    logging.getLogger("xmodal.t").info("second run")
    for h in logging.getLogger().handlers:
        h.flush()
    text = path.read_text()
    assert "second run" in text and "first run failed" not in text


def test_log_to_keeps_a_sigterm_handler_set_by_someone_else(tmp_path: Path, fresh_root_logging):
    """Bug: log_to replaces a SIGTERM handler another library installed."""
    from xmodal.logs import log_to

    def mine(signum, frame):
        pass

    signal.signal(signal.SIGTERM, mine)
    log_to(None)
    assert signal.getsignal(signal.SIGTERM) is mine


def test_forward_to_restores_the_library_log_level() -> None:
    """Bug: the xmodal logger stays at INFO after the block."""
    from xmodal.logs import forward_to

    lib = logging.getLogger("xmodal")
    before = lib.level
    lib.setLevel(logging.ERROR)
    try:
        with forward_to(lambda m: None):
            assert lib.level == logging.INFO
        assert lib.level == logging.ERROR
    finally:
        lib.setLevel(before)
