"""Stimulus sets (docs/method.md, "Stimulus sets")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from xmodal import selection as sel

IDS = [f"s{i:03d}" for i in range(40)]


def scores(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(40), rng.standard_normal(40)


def test_low_high_sizes_disjoint_and_ordered():
    s, _ = scores()
    low, high = sel.low_set(s, 10), sel.high_set(s, 10)
    assert len(low) == len(high) == 10
    assert not set(low) & set(high)
    assert s[low].max() <= s[high].min()
    ties = np.zeros(6)
    assert sel.low_set(ties, 2).tolist() == [0, 1] and sel.high_set(ties, 2).tolist() == [4, 5]


def test_random_sets_deterministic():
    a = sel.random_sets(40, 10, 5, seed=3)
    b = sel.random_sets(40, 10, 5, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (5, 10)
    assert all(len(set(row)) == 10 for row in a)
    assert not np.array_equal(a, sel.random_sets(40, 10, 5, seed=4))
    assert sel.random_sets(40, 10, 0, seed=3).shape == (0, 10)  # no draws: an empty table


def test_drop_fractions():
    s, _ = scores()
    drop_high, drop_low = sel.drop_fraction_sets(s, 0.25)
    assert len(drop_high) == len(drop_low) == 30
    assert s[drop_high].max() <= np.sort(s)[29]
    assert s[drop_low].min() >= np.sort(s)[10]


@pytest.mark.parametrize("f", [0.25, 0.3])
def test_drop_sets_have_the_drop_set_size_for_every_m(f):
    """Both drop sets keep drop_set_size(m, f) = m − round(f·m) stimuli for every m: truncating
    f·m (``int(f·m)``) on either side would make the two differ by one at some m."""
    rng = np.random.default_rng(0)
    for m in range(8, 120):
        drop_high, drop_low = sel.drop_fraction_sets(rng.standard_normal(m), f)
        assert len(drop_high) == len(drop_low) == sel.drop_set_size(m, f), m


def test_make_sets_long_format():
    s, p = scores()
    sets = sel.make_sets(IDS, s, p, set_size=10, n_random=7, drop_fraction=0.25, seed=1)
    assert list(sets.columns) == ["set", "summary", "draw", "stimulus_id"]
    counts = sets.groupby(["set", "summary", "draw"]).size()
    assert counts[("low", "mean", 0)] == 10 and counts[("high", "pc1", 0)] == 10
    assert counts[("drop_high", "mean", 0)] == 30
    assert sorted(sets.query("set == 'random'").draw.unique()) == list(range(7))
    assert set(sets.query("set == 'random'").summary) == {"none"}
    again = sel.make_sets(IDS, s, p, set_size=10, n_random=7, drop_fraction=0.25, seed=1)
    pd.testing.assert_frame_equal(sets, again)
    low = set(sets.query("set == 'low' and summary == 'mean'").stimulus_id)
    high = set(sets.query("set == 'high' and summary == 'mean'").stimulus_id)
    assert not low & high


def test_validation_errors():
    s, p = scores()
    with pytest.raises(ValueError, match="set_size"):
        sel.make_sets(IDS, s, p, set_size=41, n_random=1, drop_fraction=0.25, seed=0)
    with pytest.raises(ValueError, match="drop_fraction"):
        sel.make_sets(IDS, s, p, set_size=10, n_random=1, drop_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="drop_fraction"):
        sel.make_sets(IDS, s, p, set_size=10, n_random=1, drop_fraction=0.0, seed=0)


def test_sets_to_indices_unknown_ids():
    s, p = scores()
    sets = sel.make_sets(IDS, s, p, set_size=10, n_random=2, drop_fraction=0.25, seed=0)
    idx = sel.sets_to_indices(sets, IDS)
    assert len(idx[("low", "mean", 0)]) == 10
    with pytest.raises(ValueError, match="s000|s039"):
        sel.sets_to_indices(sets, IDS[1:-1])


@pytest.mark.parametrize("draw", [0, 1, 2])
def test_a_random_draw_deleted_whole_is_refused_naming_it(tmp_path, draw):
    """A whole random draw deleted from sets.tsv left every set its usual size, and the mean over
    random draws used one fewer with exit code 0. Draws must run 0..n-1 in every split; the
    last draw deleted in every split at once is caught only against the config's number."""
    from xmodal.io import write_table

    rng = np.random.default_rng(3)
    m = 60
    ids = [f"{j:03d}" for j in range(m)]
    tables = {
        "sets": (sel.make_sets(ids, rng.normal(size=m), rng.normal(size=m), 10, 3, 0.25, 0), ""),
        "heldout": (
            sel.heldout_sets(ids, rng.normal(size=m), rng.normal(size=m), 16, 3, 2, 0, 3),
            ", split 1",
        ),
    }
    for name, (sets, where) in tables.items():
        cut = (sets["set"] == "random") & (sets["draw"] == draw)
        if where:
            cut &= sets["split"] == 1
        write_table(sets[~cut], tmp_path / f"{name}.tsv")
        if not where and draw == 2:  # the last draw of the only group: only the config knows
            sel.read_sets(tmp_path / f"{name}.tsv")
            with pytest.raises(
                ValueError,
                match=rf"{name}.tsv: set 'random' \(none\) lacks draw\(s\) \[2\] of 0..2 "
                r"\(analysis.n_random is 3\); was it edited, or made with another config\?",
            ):
                sel.read_sets(tmp_path / f"{name}.tsv", {"random": 3})
            continue
        with pytest.raises(
            ValueError,
            match=rf"{name}.tsv: set 'random' \(none{where}\) lacks draw\(s\) \[{draw}\] of 0..2",
        ):
            sel.read_sets(tmp_path / f"{name}.tsv")


@pytest.mark.parametrize("n_random", [1, 3])
@pytest.mark.parametrize(
    "drop_control, n_drop",
    [(None, "n_random"), ({"enabled": False}, 0), ({"n_random": 2}, 2)],
)
def test_sets_tables_hold_the_draws_the_config_asks_for(tmp_path, n_random, drop_control, n_drop):
    """Against the config's numbers of draws (config_draws), the tables the pipeline writes are
    accepted, and each is refused, naming the config key, when its config had other numbers."""
    from xmodal.io import write_table

    analysis = {"n_random": n_random}
    if drop_control is not None:
        analysis["drop_control"] = drop_control
    draws = sel.config_draws({"analysis": analysis})
    n_drop = n_random if n_drop == "n_random" else n_drop
    assert draws == {"random": n_random, "random_drop": n_drop}
    rng = np.random.default_rng(5)
    ids = [f"{j:03d}" for j in range(60)]
    x, y = rng.normal(size=60), rng.normal(size=60)
    sets = sel.make_sets(ids, x, y, 10, n_random, 0.25, 0, draws["random_drop"])
    held = sel.heldout_sets(ids, x, y, 16, n_random, 2, 0, 3)
    for name, table, asked in (("sets", sets, draws), ("heldout", held, {"random": n_random})):
        path = tmp_path / f"{name}.tsv"
        write_table(table, path)
        sel.read_sets(path, asked)
        for family, n in asked.items():
            if n == 0:
                continue
            with pytest.raises(ValueError, match=rf"'{family}'.*\({sel.DRAW_KEYS[family]} is"):
                sel.read_sets(path, {**asked, family: n + 1})
            if n > 1:  # made with more draws than the config now asks for
                with pytest.raises(ValueError, match=rf"has draw\(s\) \[{n - 1}\] outside"):
                    sel.read_sets(path, {**asked, family: n - 1})
    # a family the config switches off is not checked (a table from a run with it on)
    if n_drop:
        sel.read_sets(tmp_path / "sets.tsv", {**draws, "random_drop": 0})
    # a family the config asks for, missing from the table
    write_table(sets[sets["set"] != "random"], tmp_path / "sets.tsv")
    with pytest.raises(ValueError, match=r"holds no 'random' set, where analysis.n_random asks"):
        sel.read_sets(tmp_path / "sets.tsv", draws)
    with pytest.raises(sel.ConfigError, match="analysis.n_random"):
        sel.config_draws({"analysis": {"n_random": "20"}})


def test_a_split_without_a_set_or_with_a_renumbered_draw_is_refused(tmp_path):
    """Every random draw of one split deleted left no group to compare; a draw renumbered
    beyond n-1 was reported as n missing ones."""
    from xmodal.io import write_table

    rng = np.random.default_rng(4)
    ids = [f"{j:03d}" for j in range(60)]
    # three splits: the usual number of draws is the one most splits have
    sets = sel.heldout_sets(ids, rng.normal(size=60), rng.normal(size=60), 16, 3, 3, 0, 3)
    path = tmp_path / "heldout.tsv"
    write_table(sets[~((sets["set"] == "random") & (sets["split"] == 1))], path)
    with pytest.raises(ValueError, match=r"set 'random' \(none\) is missing for split 1; was it"):
        sel.read_sets(path)
    moved = (sets["set"] == "random") & (sets["split"] == 0) & (sets["draw"] == 2)
    write_table(sets.assign(draw=sets["draw"].where(~moved, 7)), path)
    with pytest.raises(
        ValueError,
        match=r"'random' \(none, split 0\) lacks draw\(s\) \[2\] and has draw\(s\) \[7\] outside 0..2",
    ):
        sel.read_sets(path)
    # a draw edited to 1.5 is not draw 1 (it used to be truncated to it)
    write_table(sets.assign(draw=sets["draw"].where(~moved, 1.5)), path)
    with pytest.raises(ValueError, match=r"lacks draw\(s\) \[2\] and has draw\(s\) \[1.5\]"):
        sel.read_sets(path)


def test_a_sets_table_with_a_row_deleted_is_refused_naming_the_set(tmp_path):
    """sets.tsv with one row deleted scored a low set of 119 against a high set of 120 with exit
    code 0; its reader refuses any set whose size differs from the others of its kind."""
    from xmodal.io import write_table

    rng = np.random.default_rng(2)
    m = 60
    ids = [f"{j:03d}" for j in range(m)]
    tables = {
        "sets": sel.make_sets(ids, rng.normal(size=m), rng.normal(size=m), 10, 3, 0.25, 0, 2),
        "heldout": sel.heldout_sets(ids, rng.normal(size=m), rng.normal(size=m), 16, 3, 2, 0, 3),
    }
    for name, sets in tables.items():
        path = tmp_path / f"{name}.tsv"
        write_table(sets, path)
        back = sel.read_sets(path)
        if "split" in back:  # a text column of the contract (io.TEXT_COLUMNS)
            back["split"] = back["split"].astype(np.int64)
        pd.testing.assert_frame_equal(back, sets)
        for key, rows in sets.groupby(
            ["set", "summary", "draw", *sets.columns[:1]]
        ).indices.items():
            write_table(sets.drop(index=sets.index[rows[-1]]), path)
            where = f", split {key[3]}" if name == "heldout" else ""
            where += f", draw {key[2]}" if key[2] else ""
            with pytest.raises(
                ValueError,
                match=rf"{name}.tsv: set '{key[0]}' \({key[1]}{where}\) holds {len(rows) - 1} stimuli where the table's other sets of its kind hold {len(rows)}",
            ):
                sel.read_sets(path)


def test_each_summarys_drop_sets_and_the_random_draws_follow_their_definitions():
    """The pc1 drop sets follow the PC1 score, the random sets are default_rng(seed)'s draws in
    order (docs/method.md, "Seeds"): pc1 drop sets taken from the mean score, and random sets
    drawn with seed + 1, passed every test (mutation audit). Here PC1 falls as the mean rises."""
    m, ids = 12, [f"s{i}" for i in range(12)]
    mean, pc1 = np.arange(m, dtype=float), np.arange(m, dtype=float)[::-1].copy()
    t = sel.make_sets(ids, mean, pc1, 3, n_random=2, drop_fraction=0.25, seed=5)

    def members(name, summary, draw=0):
        rows = t[(t.set == name) & (t.summary == summary) & (t.draw == draw)]
        return sorted(int(s[1:]) for s in rows.stimulus_id)

    assert members("drop_high", "mean") == list(range(0, 9))  # the 3 highest means dropped
    assert members("drop_low", "mean") == list(range(3, 12))
    assert members("drop_high", "pc1") == list(range(3, 12))  # the 3 highest PC1 scores
    assert members("drop_low", "pc1") == list(range(0, 9))
    rng = np.random.default_rng(5)
    for draw in range(2):
        assert members("random", "none", draw) == sorted(rng.choice(m, 3, replace=False).tolist())


def test_set_guards_at_their_bounds():
    """set_size may be m (not m + 1, not 2.5); n_random may be 0 (not −1); drop_fraction must be
    inside (0, 1), and must remove at least one stimulus."""
    assert sel.low_set(np.arange(4.0), 4).tolist() == [0, 1, 2, 3]
    assert sel.high_set(np.arange(4.0), 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"set_size must be an integer in \[1, m=6\], got 2.5"):
        sel.low_set(np.arange(6.0), 2.5)
    assert sel.random_sets(10, 3, 0, 0).shape == (0, 3)
    with pytest.raises(ValueError, match="n_random must be ≥ 0, got -1"):
        sel.random_sets(10, 3, -1, 0)
    with pytest.raises(ValueError, match="0 < drop_fraction < 1, got 0"):
        sel.drop_set_size(40, 0)
    with pytest.raises(ValueError, match="removes 0 of 20 stimuli; need 0 < n < m"):
        sel.drop_fraction_sets(np.arange(20.0), 0.01)


def test_no_random_baseline_is_a_valid_config():
    """analysis.n_random: 0 turns the random baseline off (0 draws), not a config error."""
    assert sel.config_draws({"analysis": {"n_random": 0}})["random"] == 0


def test_scores_of_another_length_than_the_ids_are_refused():
    with pytest.raises(ValueError, match="^4 stimulus ids but 4 mean and 5 pc1 scores$"):
        sel.make_sets(["a", "b", "c", "d"], np.arange(4.0), np.array([0, 1, 2, 3, -1.0]), 1, 0)


def test_a_set_listing_a_stimulus_twice_is_refused():
    t = pd.DataFrame(
        {"set": ["low"] * 3, "summary": "mean", "draw": 0, "stimulus_id": ["a", "b", "a"]}
    )
    with pytest.raises(
        ValueError, match=r"set \('low', 'mean', 0\) lists a stimulus more than once"
    ):
        sel.sets_to_indices(t, ["a", "b", "c"])


def test_a_leave_one_model_out_table_with_a_stimulus_twice_is_refused():
    """Six ids and seven rows for one held-out model (s0 twice): refused naming the model, not
    an IndexError."""
    ids = [f"s{i}" for i in range(6)]
    loo = pd.DataFrame({"held_out": "vitA", "stimulus_id": ids + ["s0"],
                        "partial_dispersion": np.arange(7.0), "partial_pc1": np.arange(7.0)})  # fmt: skip
    with pytest.raises(ValueError, match="the partial dispersion without 'vitA' covers"):
        sel.others_sets(ids, loo, 2)


def test_an_edited_set_is_the_one_off_the_most_common_size():
    """Three sets of 4 and one of 5 (an added row): the set named is the one of 5, measured
    against the most common size (4), not the largest."""
    rows = [("low", "mean", 0, f"a{i}") for i in range(4)]
    rows += [("high", "mean", 0, f"b{i}") for i in range(5)]
    rows += [("low", "pc1", 0, f"c{i}") for i in range(4)] + [
        ("high", "pc1", 0, f"d{i}") for i in range(4)
    ]
    t = pd.DataFrame(rows, columns=["set", "summary", "draw", "stimulus_id"])
    with pytest.raises(
        ValueError,
        match=r"set 'high' \(mean\) holds 5 stimuli where the table's other sets of its kind hold 4",
    ):
        sel.check_set_sizes(t, "sets.tsv")


def test_heldout_sets_need_max_4_2k_stimuli_in_half_b():
    """Sets inside half B of 10 × 20/40 = 5 stimuli are fewer than max(4, 2 × 3) = 6: refused
    (5 = 6 − 1 was accepted); 6 are enough."""
    m = 40
    ids = [f"s{i}" for i in range(m)]
    with pytest.raises(
        ValueError, match=r"would hold 5 stimuli .* fewer than max\(4, 2 × knn_k\) = 6"
    ):
        sel.heldout_sets(ids, np.arange(m * 1.0), np.arange(m * 1.0), 10, 0, 1, knn_k=3)
    t = sel.heldout_sets(ids, np.arange(m * 1.0), np.arange(m * 1.0), 12, 0, 1, knn_k=3)
    assert len(t) > 0
