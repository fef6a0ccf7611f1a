"""Fast grid path agrees with the one-pair metric; tables follow docs/contracts.md."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal import alignment as al
from xmodal import metrics as mt
from xmodal import selection as sel

M = 120
IDS = [f"s{i:03d}" for i in range(M)]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    shared = rng.standard_normal((M, 8))
    sigma = rng.uniform(0, 1.5, M)
    vision = mt.prepare(
        shared @ rng.standard_normal((8, 20)) + sigma[:, None] * rng.standard_normal((M, 20))
    )
    layers = [
        mt.prepare_layer(
            a * shared @ rng.standard_normal((8, 24))
            + sigma[:, None] * rng.standard_normal((M, 24)),
            10.0,
        )
        for a in (0.2, 1.0, 3.0, 0.5)
    ]
    sets = sel.make_sets(
        IDS,
        sigma,
        sigma + 0.1 * rng.standard_normal(M),
        set_size=30,
        n_random=8,
        drop_fraction=0.25,
        seed=0,
    )
    return vision, layers, sets


def test_layer_search_equals_pairwise(data):
    vision, layers, _ = data
    values = al.layer_search(vision, iter(layers), k=10)
    expected = [mt.cknna(vision, y, 10) for y in layers]
    np.testing.assert_allclose(values, expected, atol=1e-12)
    many = al.layer_search_many([vision, layers[0]], iter(layers), k=10)
    assert many.shape == (2, 4)
    np.testing.assert_allclose(many[0], expected, atol=1e-12)
    assert many[1, 0] == pytest.approx(1.0)


def test_layer_profile_table(data):
    vision, layers, _ = data
    table = al.layer_profile_table(
        "v", "l", 7, vision, ((i, f"layers.{i}", y) for i, y in enumerate(layers)), k=10
    )
    assert list(table.columns) == [
        "vision",
        "llm",
        "vision_layer",
        "llm_layer",
        "layer_name",
        "metric",
        "value",
        "chosen",
    ]
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "llm_layer"].item() == int(np.argmax(table["value"]))
    assert (table["metric"] == "cknna").all() and (table["vision_layer"] == 7).all()


def test_condition_table_values(data):
    vision, layers, sets = data
    y = layers[2]
    conditions, contrasts = al.condition_table(
        "v", "l", 2, vision, y, sets, IDS, k=10, n_boot=40, seed=0
    )
    assert list(conditions.columns) == [
        "vision",
        "llm",
        "llm_layer",
        "condition",
        "summary",
        "draw",
        "n_stimuli",
        "metric",
        "value",
    ]
    full = conditions.query("condition == 'full'")
    assert len(full) == 1 and full.summary.item() == "none" and full.draw.item() == 0
    assert full.value.item() == pytest.approx(mt.cknna(vision, y, 10), abs=1e-12)
    pos = {s: i for i, s in enumerate(IDS)}
    for (name, summary, draw), group in sets.groupby(["set", "summary", "draw"]):
        idx = [pos[s] for s in group.stimulus_id]
        row = conditions[
            (conditions.condition == name)
            & (conditions.summary == summary)
            & (conditions.draw == draw)
        ]
        assert len(row) == 1 and row.n_stimuli.item() == len(idx)
        assert row.value.item() == pytest.approx(mt.cknna(vision[idx], y[idx], 10), abs=1e-6)
    assert len(conditions) == 1 + len(sets.groupby(["set", "summary", "draw"]))
    assert list(contrasts.columns) == [
        "vision",
        "llm",
        "summary",
        "low",
        "high",
        "random_mean",
        "random_ci_low",
        "random_ci_high",
        "frac_random_ge_low",
        "diff_low_high",
        "diff_ci_low",
        "diff_ci_high",
        "n_boot",
    ]
    assert sorted(contrasts.summary) == ["mean", "pc1"]
    row = contrasts.set_index("summary").loc["mean"]
    rand = conditions.query("condition == 'random'").value
    assert row.random_mean == pytest.approx(rand.mean())
    assert row.frac_random_ge_low == pytest.approx(np.mean(rand >= row.low))
    assert row.diff_low_high == pytest.approx(row.low - row.high)
    assert row.diff_ci_low <= row.diff_ci_high and row.n_boot == 40
    again = al.condition_table("v", "l", 2, vision, y, sets, IDS, k=10, n_boot=40, seed=0)
    pd.testing.assert_frame_equal(contrasts, again[1])


def test_condition_table_unknown_ids(data):
    vision, layers, sets = data
    bad = sets.copy()
    bad.loc[0, "stimulus_id"] = "nope"
    with pytest.raises(ValueError, match="nope"):
        al.condition_table("v", "l", 0, vision, layers[0], bad, IDS, n_boot=0)
