"""The report captions say what the figures and tables show: rendered as the Snakemake report
renders them (jinja2, trim_blocks and lstrip_blocks), with the values a run fills in."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from docutils.core import publish_parts
from jinja2 import Environment

from xmodal.figures import render_figure
from xmodal.figures.synthetic import synthetic_inputs

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "workflow" / "report"


def render(name: str, vision_layer: int = -2, metric: str = "cknna", **analysis: object) -> str:
    """Caption ``name`` rendered with the demo config (``analysis.vision_layer`` and the keys
    ``analysis`` names replaced), for the figure of ``metric``."""
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["analysis"]["vision_layer"] = vision_layer
    config["analysis"].setdefault("metrics", ["cknna"])
    config["analysis"].update(analysis)
    snakemake = SimpleNamespace(
        config=config,
        params=SimpleNamespace(metric=metric, metric_label=metric),
        wildcards=SimpleNamespace(dataset="demo"),
    )
    env = Environment(trim_blocks=True, lstrip_blocks=True)
    text = (REPORT / name).read_text()
    return " ".join(env.from_string(text).render(snakemake=snakemake).split())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return synthetic_inputs(tmp_path_factory.mktemp("captions"), n_stimuli=40)


def test_every_caption_renders():
    for path in sorted(REPORT.glob("*.rst")):
        assert "{{" not in render(path.name) and "{%" not in render(path.name), path.name


@pytest.mark.parametrize(
    ("layer", "said"),
    [(-2, "(-2 in this run: the penultimate block, the default)"),
     (-3, "(-3 in this run; the default, -2, is the penultimate block)")],
)  # fmt: skip
def test_workflow_names_the_configured_vision_layer(layer, said):
    """Before, the overview said "penultimate-block features" whatever the config held."""
    text = render("workflow.rst", vision_layer=layer)
    assert f"features at the block ``analysis.vision_layer`` {said} gives" in text
    assert "penultimate-block" not in text


def test_captions_follow_the_configured_metrics_and_drop_fraction():
    """A run without CKNNA has no CKNNA figure to point to, and its overview does not say that
    alignment is CKNNA; the drop captions state no fixed 25% / 75% (audit of the report)."""
    other = render("sets_rank.rst", metric="mutual_knn", metrics=["mutual_knn", "cknna"])
    assert "the CKNNA figure is ``sets_rank.png``" in other
    alone = render("sets_rank.rst", metric="mutual_knn", metrics=["mutual_knn"])
    assert "CKNNA figure" not in alone
    overview = render("workflow.rst", metrics=["mutual_knn"])
    assert "this report: mutual_knn;" in overview and "alignment is CKNNA" not in overview
    for name in ("workflow.rst", "drop25.rst"):
        text = render(name, drop_fraction=0.1)
        assert "(0.1" in text and "75%" not in text and "drop-25%" not in text, name


def test_residuals_caption_describes_panel_c(inputs):
    """Every panel title of the figure is described in the caption, C (Spearman ρ of mean
    dispersion with mean distance from the centre) included."""
    fig = render_figure("residuals", inputs)
    text = render("residuals.rst")
    for ax in fig.axes:
        title = ax.get_title(loc="left")
        if not title:
            continue
        letter, words = re.match(r"(\w)\s+(.*)", title).groups()
        assert f"({letter})" in text, letter
        if letter == "C":
            assert f"({letter}) {words}" in text
    assert "Spearman ρ" in text and "rho_dispersion_distance" in text


@pytest.mark.parametrize(("n_stimuli", "n"), [(40, 12), (24, 12), (22, 11), (10, 5)])
def test_gallery_caption_states_the_rule_the_figure_follows(tmp_path, n_stimuli, n):
    """The caption states no fixed number: n = 12, or half the stimuli below 24; the figure
    shows n per group (before, the caption said "the 12 … top two rows" whatever m)."""
    text = render("gallery.rst")
    assert "the 12" not in text and "two rows" not in text
    assert "n is 12, or half the number of stimuli when there are fewer than 24" in text
    inp = synthetic_inputs(tmp_path, n_stimuli=n_stimuli, set_size=3, n_random=2, images=False)
    with pytest.warns(UserWarning, match="missing or unreadable"):  # no images written
        fig = render_figure("gallery", inp)
    assert fig.get_suptitle().startswith(f"{n} lowest")
    assert len(fig.axes) == 2 * n


def test_gallery_caption_names_the_manifest_columns_under_each_image():
    text = render("gallery.rst")
    assert "then the values of the manifest's own numeric columns that are properties" in text
    assert "In the demo these are the planted nuisance level and its four components" in text


def test_captions_state_the_summary_rules():
    summary = render("summary_table.rst")
    for words in (
        "``n_with_ci``: valid pairs whose bootstrap 95% interval of low − high has two finite ends",
        "among those ``n_with_ci`` pairs only",
        "``n_ratio``: valid pairs with low > 0 and high > 0",
        "are over these ``n_ratio`` pairs",
        "must appear once",
    ):
        assert words in summary, words
    contrasts = render("contrasts.rst")
    assert 'as "n = …", the number of pairs it is taken over' in contrasts
    assert "low > 0 and high > 0 (``n_ratio``" in contrasts
    held = render("heldout_layer.rst")
    assert "the pair's means and its fraction are all n/a" in held
    language = render("language_dispersion.rst")
    assert "an average of the pairs' 95% intervals, not a 95% interval" in language


@pytest.mark.parametrize(
    ("annotations", "says"),
    [
        (None, "every column besides stimulus_id, image and caption whose fields are all numbers"),
        (
            ["blur", "nuisance"],
            "the columns ``analysis.annotations`` lists (``blur``, ``nuisance``).",
        ),
        ([], "the columns ``analysis.annotations`` lists (none)."),
        # reStructuredText would read these as a reference, emphasis and a substitution: literals
        (["rating_", "*x", "|a|"], "lists (``rating_``, ``*x``, ``|a|``)."),
    ],
)
def test_the_properties_caption_states_which_manifest_columns(annotations, says):
    config = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    config["analysis"]["annotations"] = annotations
    snakemake = SimpleNamespace(config=config, params=SimpleNamespace(), wildcards=None)
    env = Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string((REPORT / "properties.rst").read_text()).render(snakemake=snakemake)
    html = publish_parts(text, writer="html")["body"]  # as Snakemake's report renders it
    assert "system-message" not in html, html
    text = " ".join(text.split())
    assert says in text, text
    # the demo's own columns only when the manifest's are taken as they are (audit: the
    # sentence followed "lists (blur)" too)
    demo = "In the demo the columns are the planted nuisance level" in text
    assert demo == (annotations is None), text
    for name, said in (("gallery", "In the demo these are the planted"),):
        other = env.from_string((REPORT / f"{name}.rst").read_text()).render(snakemake=snakemake)
        assert (said in other) == (annotations is None), other
    config["stimuli"]["source"] = "local"
    text = env.from_string((REPORT / "properties.rst").read_text()).render(snakemake=snakemake)
    assert "In the demo" not in text
