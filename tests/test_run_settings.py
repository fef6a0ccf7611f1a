"""The settings a report states are those its results were made with (xmodal.config).

The report's captions read the config given to ``--report``; a run records the settings it
made its results with, and ``--report`` with other settings is refused, naming them.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xmodal.config import (
    DEFAULTS,
    REPORT_SETTINGS,
    ConfigError,
    check_report_settings,
    record_run_settings,
    report_settings,
    setting,
)

CONFIG = {
    "dataset": "d",
    "stimuli": {"source": "local"},
    "analysis": {"knn_k": 10, "set_size": 120, "n_random": 20, "n_boot": 200, "seed": 0,
                 "drop_fraction": 0.25, "vision_layer": -2},
}  # fmt: skip


def _with(**changes):
    cfg = copy.deepcopy(CONFIG)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


def test_absent_keys_are_their_defaults():
    """A config that leaves metrics and drop_duplicates out states the same as one that writes
    their defaults: no refusal for spelling a default out."""
    explicit = _with(analysis__metrics=["cknna"], stimuli__drop_duplicates=False)
    assert report_settings(CONFIG) == report_settings(explicit)
    assert report_settings(CONFIG)["analysis.metrics"] == ["cknna"]
    assert set(report_settings(CONFIG)) == set(REPORT_SETTINGS)


def test_setting_reads_a_dotted_key_or_its_one_default():
    """The defaults are written down once (DEFAULTS): an absent or null key, or a missing
    section, is its default; a written value is itself; a list default is a fresh copy."""
    assert setting(CONFIG, "analysis.metrics") == ["cknna"] == DEFAULTS["analysis.metrics"]
    assert setting({}, "stimuli.drop_duplicates") is False
    assert setting({"stimuli": None}, "stimuli.drop_duplicates") is False
    assert setting(_with(analysis__metrics=None), "analysis.metrics") == ["cknna"]
    assert setting(_with(analysis__metrics=["cka"]), "analysis.metrics") == ["cka"]
    assert setting(_with(stimuli__drop_duplicates=True), "stimuli.drop_duplicates") is True
    assert setting(CONFIG, "analysis.knn_k") == 10 and setting(CONFIG, "analysis.gpu") is None
    setting(CONFIG, "analysis.metrics").append("cka")  # a caller's list, not the default
    assert DEFAULTS["analysis.metrics"] == ["cknna"]


def test_a_whole_run_records_and_the_same_config_passes(tmp_path):
    path = tmp_path / "report" / "d_run_settings.json"
    check_report_settings(path, CONFIG)  # no record (results made before records): passes
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    assert json.loads(path.read_text()) == {"settings": report_settings(CONFIG), "mixed": False}
    check_report_settings(path, CONFIG)


@given(
    key=st.sampled_from(["knn_k", "set_size", "n_random", "n_boot", "seed", "vision_layer"]),
    delta=st.integers(1, 5),
)
def test_a_report_with_another_value_is_refused_naming_both(tmp_path_factory, key, delta):
    path = tmp_path_factory.mktemp("rec") / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    old = CONFIG["analysis"][key]
    other = _with(**{f"analysis__{key}": old + delta})
    with pytest.raises(ConfigError) as err:
        check_report_settings(path, other)
    msg = str(err.value)
    assert f"made with analysis.{key} = {old!r}" in msg
    assert f"this config says analysis.{key} = {old + delta!r}" in msg and str(path) in msg


def test_the_controls_switches_are_compared_with_their_one_default(tmp_path):
    """The report's overview says "off in this run" for a control the config turns off: a
    config that turns one on or off against the run's is refused, and spelling a default out
    is not a change (the defaults, xmodal.config.DEFAULTS, are also the settings classes')."""
    from xmodal.selection import DropControl, HeldOutLayer, SelfSelection

    assert (DropControl().enabled, HeldOutLayer().enabled, SelfSelection().enabled) == (
        DEFAULTS["analysis.drop_control.enabled"],
        DEFAULTS["analysis.heldout_layer.enabled"],
        DEFAULTS["analysis.self_selection.enabled"],
    )
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    spelled = copy.deepcopy(CONFIG)
    spelled["analysis"].update(
        drop_control={"enabled": True}, heldout_layer=None, self_selection={"enabled": False}
    )
    check_report_settings(path, spelled)
    for name, now in (("drop_control", False), ("heldout_layer", True), ("self_selection", True)):
        other = copy.deepcopy(CONFIG)
        other["analysis"][name] = {"enabled": now}
        with pytest.raises(ConfigError, match=rf"made with analysis\.{name}\.enabled = {not now}"):
            check_report_settings(path, other)


def test_metrics_and_duplicates_and_fractions_are_compared(tmp_path):
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    for other in (
        _with(analysis__metrics=["cknna", "mutual_knn"]),
        _with(stimuli__drop_duplicates=True),
        _with(analysis__drop_fraction=0.2),
    ):
        with pytest.raises(ConfigError, match="made with"):
            check_report_settings(path, other)


@pytest.mark.parametrize(("whole", "succeeded"), [(False, True), (True, False), (False, False)])
def test_a_partial_or_failed_run_that_changed_settings_refuses_either_config(
    tmp_path, whole, succeeded
):
    """Some results made with the new settings and some with the old: the report states one
    of them for all, so it is refused under both until a whole run succeeds."""
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    new = _with(analysis__knn_k=7)
    record_run_settings(path, new, whole=whole, succeeded=succeeded)
    for cfg in (CONFIG, new):
        with pytest.raises(ConfigError, match="made with two different configs"):
            check_report_settings(path, cfg)
    record_run_settings(path, new, whole=True, succeeded=True)
    check_report_settings(path, new)


def test_a_partial_or_failed_run_with_the_same_settings_changes_nothing(tmp_path):
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    before = path.read_bytes()
    record_run_settings(path, CONFIG, whole=False, succeeded=True)
    record_run_settings(path, CONFIG, whole=True, succeeded=False)
    assert path.read_bytes() == before
    check_report_settings(path, CONFIG)


def test_a_first_partial_run_records_its_settings_unmixed(tmp_path):
    """Without an earlier record there is nothing to mix with: the results on disk were made
    with this run's settings (or before records existed)."""
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=False, succeeded=True)
    check_report_settings(path, CONFIG)
    with pytest.raises(ConfigError, match="analysis.knn_k = 10"):
        check_report_settings(path, _with(analysis__knn_k=11))


@pytest.mark.parametrize(("whole", "succeeded"), [(False, True), (True, False)])
def test_without_a_record_a_partial_run_over_earlier_results_is_mixed(tmp_path, whole, succeeded):
    """The record deleted (as the refusal advises after 'Nothing to be done'), then a run of one
    step with knn_k 5: it was recorded as the results' settings, unmixed, and the report stated
    k = 5 in every caption over tables made with 10 (the report audit). Where results of an
    earlier run are on disk, nothing tells their settings; a whole successful run settles it."""
    path = tmp_path / "r.json"
    new = _with(analysis__knn_k=5)
    record_run_settings(path, new, whole=whole, succeeded=succeeded, earlier=True)
    for cfg in (CONFIG, new):
        with pytest.raises(ConfigError, match="ran over results whose settings no record told"):
            check_report_settings(path, cfg)
    # a later run of some targets with the same settings still does not tell them (review)
    record_run_settings(path, new, whole=False, succeeded=True)
    with pytest.raises(ConfigError, match="ran over results whose settings no record told"):
        check_report_settings(path, new)
    path.unlink()
    record_run_settings(path, new, whole=False, succeeded=True, touched=True, earlier=True)
    with pytest.raises(
        ConfigError, match="marked the results as made with that run's settings, over results"
    ):
        check_report_settings(path, new)
    # a later whole run, not forced, keeps the note and what it says (review)
    record_run_settings(path, new, whole=True, succeeded=True)
    with pytest.raises(ConfigError, match="that run's settings, over results whose settings"):
        check_report_settings(path, new)
    path.unlink()
    record_run_settings(path, new, whole=True, succeeded=True, earlier=True)
    check_report_settings(path, new)


@pytest.mark.parametrize("content", ["", "{trunc", "[]", '"x"', '{"settings": null}', "\udcff"])
def test_an_unreadable_record_is_named_and_never_breaks_a_run(tmp_path, content):
    """A corrupt or foreign record: --report is refused naming the file and the way out; a
    whole run replaces it; a partial run counts it as other settings (mixed)."""
    path = tmp_path / "r.json"
    path.write_text(content, errors="surrogateescape")
    with pytest.raises(ConfigError, match=rf"{path} is not a .*delete {path}"):
        check_report_settings(path, CONFIG)
    record_run_settings(path, CONFIG, whole=False, succeeded=True)
    with pytest.raises(ConfigError, match="two different configs"):
        check_report_settings(path, CONFIG)
    path.write_text(content, errors="surrogateescape")
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    check_report_settings(path, CONFIG)


def test_a_key_the_record_lacks_is_not_compared(tmp_path):
    """A record written before a key joined REPORT_SETTINGS must not refuse every report."""
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    record = json.loads(path.read_text())
    del record["settings"]["analysis.metrics"]
    path.write_text(json.dumps(record))
    check_report_settings(path, _with(analysis__metrics=["cknna", "cka"]))
    with pytest.raises(ConfigError, match="analysis.seed = 0"):
        check_report_settings(path, _with(analysis__seed=1))


def test_a_record_older_than_a_recorded_setting_is_compared_on_the_settings_it_has(tmp_path):
    """A record written before the controls' switches were recorded lacks them: a partial run
    with the same config must not mark it mixed (the report would then be refused until a
    whole run, with nothing changed)."""
    path = tmp_path / "r.json"
    old = {k: v for k, v in report_settings(CONFIG).items() if not k.endswith(".enabled")}
    path.write_text(json.dumps({"settings": old, "mixed": False}))
    record_run_settings(path, CONFIG, whole=False, succeeded=True)
    assert json.loads(path.read_text()) == {"settings": old, "mixed": False}
    check_report_settings(path, CONFIG)
    record_run_settings(path, _with(analysis__knn_k=7), whole=False, succeeded=True)
    assert json.loads(path.read_text())["mixed"] is True  # a changed setting still counts


def test_a_touch_run_that_changed_settings_is_named_and_not_advised_away(tmp_path):
    """--touch records the new params in Snakemake's metadata without making anything: every
    later run says "Nothing to be done", and the refusal's advice (delete the record when a
    whole run has nothing to do) led to a report stating settings no table was made with
    (audit). The record notes the touch; the refusal says to force the analysis, and only a
    whole successful run that forced it clears the note (a later whole run that redid one
    figure cleared it, and the report stated knn_k 5 over tables made at 10: review)."""
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    record_run_settings(path, CONFIG, whole=False, succeeded=True, touched=True)
    check_report_settings(path, CONFIG)  # a touch with the same settings changes nothing
    new = _with(analysis__seed=1)
    record_run_settings(path, new, whole=False, succeeded=True, touched=True)
    record_run_settings(path, new, whole=False, succeeded=True)  # a later partial run
    # a whole run that redoes something else (a deleted figure) does not redo what was touched
    record_run_settings(path, new, whole=True, succeeded=True)
    for cfg in (CONFIG, new):
        with pytest.raises(ConfigError, match="--touch run marked") as err:
            check_report_settings(path, cfg, ("gpa", "layer_search"))
        assert "--forcerun gpa layer_search" in str(err.value), err.value
        assert "delete" not in str(err.value)
    record_run_settings(path, new, whole=False, succeeded=True, forced=True)  # some targets
    record_run_settings(path, new, whole=True, succeeded=False, forced=True)  # failed
    with pytest.raises(ConfigError, match="--touch run marked"):
        check_report_settings(path, new)
    record_run_settings(path, new, whole=True, succeeded=True, forced=True)
    check_report_settings(path, new)


def test_a_touch_over_results_of_two_configs_is_noted(tmp_path):
    """One table made with knn_k 5 (recorded as mixed), then --touch with 5: the touch marked
    the tables made with 10 as made with 5, but the record had 5 already and the touch went
    unnoted; the mixed refusal's advice (delete the record when a whole run has nothing to do)
    then led to a report stating k = 5 over tables made with 10 (review)."""
    path = tmp_path / "r.json"
    record_run_settings(path, CONFIG, whole=True, succeeded=True)
    new = _with(analysis__knn_k=5)
    record_run_settings(path, new, whole=False, succeeded=True)
    assert json.loads(path.read_text()) == {"settings": report_settings(new), "mixed": True}
    record_run_settings(path, new, whole=False, succeeded=True, touched=True)
    with pytest.raises(ConfigError, match="--touch run marked") as err:
        check_report_settings(path, new, ("gpa",))
    assert "delete" not in str(err.value)


def test_the_docs_list_every_setting_the_report_checks():
    """README.md and docs/troubleshooting.md list the settings `--report` compares; the lists
    left out `analysis.annotations` (audit). Every key of REPORT_SETTINGS is named in both
    (its last part, the controls' switches as a group or each)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = root.joinpath("README.md").read_text()
    said = {
        "README.md": readme[readme.index("refuses a config whose settings") :][:600],
        "docs/troubleshooting.md": next(
            line
            for line in root.joinpath("docs/troubleshooting.md").read_text().splitlines()
            if line.startswith("| `--report` with other settings")
        ),
    }
    for doc, text in said.items():
        for dotted in REPORT_SETTINGS:
            control = dotted.endswith(".enabled")
            part = dotted.split(".")[-2 if control else -1]
            named = re.search(rf"[`.]{re.escape(part)}[`.]", text) is not None
            assert named or (control and "switches" in text), (doc, dotted)
