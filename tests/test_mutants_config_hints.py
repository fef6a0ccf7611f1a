"""Mutation audit of the config's error hints (xmodal.config.schema_errors and its helpers) and
of the strict YAML loader (load_config_file): each test fails on a plausible change that the
other tests let through, and pins the message a user reads.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jsonschema
import pytest
from test_faults_inputs import _demo_cfg

from xmodal.config import (
    ConfigError,
    _forms,
    _schema_homes,
    _unexpected_keys,
    load_config_file,
    schema_errors,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
IN_FILE = "Invalid configuration in config/x.yaml: key "
IN_CLI = "Invalid configuration in --config: key "


def _line(edit: Callable[[dict], object], given: dict | None = None) -> str:
    """The one schema error of the demo config edited by ``edit``, ``given`` with --config."""
    cfg = _demo_cfg()
    edit(cfg)
    (line,) = schema_errors(cfg, SCHEMA, "config/x.yaml", command_line=given)
    return line


def _layer(value: object) -> Callable[[dict], object]:
    return lambda cfg: cfg["analysis"].setdefault("language_dispersion", {}).update(layer=value)


def _analysis(**kw: object) -> Callable[[dict], object]:
    return lambda cfg: cfg["analysis"].update(kw)


def _tol(value: object) -> Callable[[dict], object]:
    return lambda cfg: cfg["analysis"]["gpa"].update(tol=value)


LAYER_FORMS = "('chosen' was expected; {v} is not of type 'number')"
NULL_HINT = (
    " (YAML reads a key with nothing after it as null: give it a value, or remove the key where "
    "it has a default)"
)


# ---------------------------------------------------------------- hints for a value in the file
def test_a_number_where_a_key_takes_text_or_null_gets_the_quoting_hint() -> None:
    """Mutant: the hint only where the schema's type is exactly "string", not a list of types
    (``revision: [string, "null"]``); and the kind always "number", a boolean included."""
    assert _line(lambda c: c["stimuli"].update(revision=10)) == (
        f"{IN_FILE}'stimuli.revision': 10 is not of type 'string', 'null' (YAML read the value "
        "as a number: unquoted 012 is the octal number 10, 1.0 a number, true/false booleans; "
        "put it in quotes)"
    )
    assert _line(lambda c: c["models"]["tiny-mae"].update(id=True)) == (
        f"{IN_FILE}'models.tiny-mae.id': True is not of type 'string' (YAML read the value as a "
        "boolean: unquoted 012 is the octal number 10, 1.0 a number, true/false booleans; put "
        "it in quotes)"
    )


def test_number_like_text_refused_for_another_reason_than_its_type_gets_no_yaml_hint() -> None:
    """Mutant: the YAML 1.1 hint for any violation, not only a type one: '1e5' is no source
    whether YAML reads it as text or a number."""
    assert _line(lambda c: c["stimuli"].update(source="1e5")) == (
        f"{IN_FILE}'stimuli.source': '1e5' is not one of ['hub', 'local', 'demo']"
    )


@pytest.mark.parametrize("text", [" 0.5", ".5"])
def test_a_quoted_number_of_a_key_of_several_forms_is_told_to_be_written_unquoted(
    text: str,
) -> None:
    """Mutant: the number matched or shown without stripping its spaces (no hint, or 'write
    0.5' with the space); NUMBER_TEXT without the '.5' form (YAML 1.1 reads .5 as a number)."""
    assert _line(_layer(text)) == (
        f"{IN_FILE}'analysis.language_dispersion.layer': {text!r} is not valid under any of the "
        f"given schemas {LAYER_FORMS.format(v=repr(text))} (a number in quotes is text: write "
        f"{text.strip()} unquoted)"
    )


def test_a_key_of_several_forms_with_nothing_after_it_gets_its_forms_and_the_null_hint() -> None:
    """Mutant: the null hint only for a type violation (``layer:`` is a oneOf one), or replacing
    the forms instead of following them."""
    assert _line(_layer(None)) == (
        f"{IN_FILE}'analysis.language_dispersion.layer': None is not valid under any of the "
        "given schemas (None is not of type 'string'; 'chosen' was expected; None is not of "
        "type 'number')" + NULL_HINT
    )


@pytest.mark.parametrize("text", ["1E-10", "-5e-1", "+1e-3", "1e10"])
def test_every_exponent_form_yaml_reads_as_text_gets_the_exponent_hint(text: str) -> None:
    """Mutant: NUMBER_TEXT without its sign, with a lower-case 'e' only, or with the exponent's
    sign required (YAML 1.1 reads all four as text: no decimal point, or no signed exponent)."""
    assert _line(_tol(text)) == (
        f"{IN_FILE}'analysis.gpa.tol': {text!r} is not of type 'number' (YAML 1.1 reads {text} "
        "as text: write the number with a decimal point and a signed exponent, e.g. 1.0e-10, or "
        "in full)"
    )


def test_the_leading_zero_hint_is_for_the_whole_value_stripped() -> None:
    """Mutant: the '8 and 9 are no octal digits' pattern matched at the start only ('09x' is
    no number at all), or without stripping the text (' 08')."""
    assert _line(_analysis(knn_k="09x")) == (
        f"{IN_FILE}'analysis.knn_k': '09x' is not of type 'integer'"
    )
    assert _line(_analysis(knn_k=" 08")) == (
        f"{IN_FILE}'analysis.knn_k': ' 08' is not of type 'integer' (YAML 1.1 reads 08 as text: "
        "a leading zero makes a number octal, and 8 and 9 are no octal digits; write the number "
        "without the leading zero)"
    )


def test_an_empty_config_file_is_the_files_fault_not_the_command_lines() -> None:
    """Mutant: the violation checked against --config's values when none were given: an empty
    config (``{}``) equals an empty --config, and the missing keys were blamed on --config."""
    lines = schema_errors({}, SCHEMA, "config/x.yaml", command_line={})
    assert lines[0] == f"{IN_FILE}'(top level)': 'dataset' is a required property"
    assert all(line.startswith(IN_FILE) for line in lines) and len(lines) == 5, lines


# ------------------------------------------------------------------- values given with --config
def test_a_top_level_text_value_of_config_gets_no_hint_about_nested_values() -> None:
    """Mutant: the "inside analysis={...} as text" hints for a top-level value too:
    ``--config analysis=true`` reaches the workflow as 'true', not as a value inside a mapping
    (and YAML's true is no section either)."""
    assert _line(lambda c: c.update(analysis="true"), {"analysis": "true"}) == (
        f"{IN_CLI}'analysis': 'true' is not of type 'object'"
    )


def test_a_mapping_given_where_a_number_goes_is_named_without_a_hint() -> None:
    """Mutant: the unknown-key hint for any violation of a mapping (a type one here), and the
    text hints tried on a value that is not text (it crashed on .strip())."""
    given = {"analysis": {"knn_k": {"a": "1"}}}
    assert _line(_analysis(knn_k={"a": "1"}), given) == (
        f"{IN_CLI}'analysis.knn_k': {{'a': '1'}} is not of type 'integer'"
    )


def test_text_refused_for_another_reason_than_its_type_gets_no_text_hint() -> None:
    """Mutant: the "as text" hints for any violation: '5' is not one of the sources, as text or
    as the number 5, and a YAML file would not make it one."""
    assert _line(lambda c: c["stimuli"].update(source="5"), {"stimuli": {"source": "5"}}) == (
        f"{IN_CLI}'stimuli.source': '5' is not one of ['hub', 'local', 'demo']"
    )


def test_the_first_reason_a_yaml_file_would_refuse_the_value_is_given() -> None:
    """Mutant: the last of the reasons instead of the first (its type, which says most)."""
    given = {"analysis": {"knn_k": "-1.5"}}
    assert _line(_analysis(knn_k="-1.5"), given).endswith(
        "'-1.5' is not of type 'integer' (--config gives every value inside analysis={...} as "
        "text; in a YAML file it would be refused too: -1.5 is not of type 'integer')"
    )


@pytest.mark.parametrize("text", [" 010", "1:10", "null", "{"])
def test_config_text_a_yaml_file_refuses_too_or_cannot_read_gets_no_text_hint(text: str) -> None:
    """Mutant: the text not stripped (' 010' then counted as a number a file accepts, where YAML
    1.1 reads it as octal 8), base 60 compared as a decimal (it crashed on float('1:10')), null
    taken for a value (told "in a YAML file it would be refused too: None is ..."), and YAML's
    error not caught on text it cannot read."""
    given = {"analysis": {"knn_k": text}}
    assert _line(_analysis(knn_k=text), given) == (
        f"{IN_CLI}'analysis.knn_k': {text!r} is not of type 'integer'"
    )


# ------------------------------------------------------------------------------------ helpers
def test_schema_homes_are_nested_sections_in_order() -> None:
    """Mutant: a top-level key counted as a home of the name (``dataset``); the dotted keys as
    the unknown-key hint lists them."""
    schema = load_config_file(SCHEMA)
    assert _schema_homes(schema, "dataset") == []
    assert _schema_homes(schema, "seed") == ["stimuli.seed", "stimuli.train.seed", "analysis.seed"]


def test_keys_a_pattern_allows_are_not_unexpected() -> None:
    """Mutant: ``patternProperties`` ignored (the shipped schema has none: a schema that adds
    one would have its keys called unexpected, and a file's key blamed on --config)."""
    schema = {
        "type": "object",
        "properties": {"a": {}},
        "patternProperties": {"^x_": {}},
        "additionalProperties": False,
    }
    (err,) = jsonschema.Draft202012Validator(schema).iter_errors({"a": 1, "x_1": 2, "b": 3})
    assert _unexpected_keys(err) == ["b"]


def test_the_forms_of_an_any_of_key_are_listed_once_each() -> None:
    """Mutant: ``anyOf`` not read (the shipped schema uses oneOf only), and a message two
    alternatives share given twice."""
    schema = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": -5}]}
    (err,) = jsonschema.Draft202012Validator(schema).iter_errors("a")
    assert _forms(err) == "'a' is not of type 'integer'"


# --------------------------------------------------------------------------- the strict loader
def _load(tmp_path: Path, text: str) -> dict:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config_file(path)


def test_a_base_60_float_is_refused_naming_it(tmp_path: Path) -> None:
    """Mutant: only integers checked: ``1:30.5`` is the float 90.5 in YAML 1.1."""
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "x: 1\ny: 1:30.5\n")
    assert str(err.value) == (
        f"{tmp_path / 'c.yaml'}: key 'y' at line 2: YAML 1.1 reads 1:30.5 as 90.5 (base 60); "
        "write the number without a leading zero or colon, or in quotes for text"
    )


def test_an_octal_number_after_a_harmless_one_in_a_list_is_refused(tmp_path: Path) -> None:
    """Mutant: the list's check ends at the first item whose octal and decimal agree (007)."""
    with pytest.raises(ConfigError, match=r"key 'x' at line 1: YAML 1\.1 reads 010 as 8 \(octal\)"):
        _load(tmp_path, "x: [007, 010]\n")


def test_a_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    """Mutant: either line number counted from 0."""
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "a: 1\nb:\n  c: 1\n  c: 2\n")
    assert str(err.value) == (
        f"{tmp_path / 'c.yaml'}: duplicate key 'c' at line 4 (first defined at line 3); each "
        "key, model keys included, may appear only once"
    )


def test_an_empty_config_file_is_an_empty_config(tmp_path: Path) -> None:
    """Mutant: an empty file (or one of comments only) read as None, not {}."""
    assert _load(tmp_path, "") == {}
    assert _load(tmp_path, "# settings to come\n") == {}


def test_a_file_yaml_cannot_read_is_named_on_one_line(tmp_path: Path) -> None:
    """Mutant: PyYAML's indented lines kept as they are in the one-line message."""
    path = tmp_path / "tabs.json"
    path.write_text('{\n\t"a": 1\n}\n')
    with pytest.raises(ConfigError) as err:
        load_config_file(path)
    assert str(err.value) == (
        f"{path}: not a YAML file this workflow can read (while scanning for the next token; "
        f"found character '\\t' that cannot start any token; in \"{path}\", line 2, column 1)"
    )


# ----------------------------------------------------- found by the audit: hints that misled
def test_an_unknown_name_inside_a_section_on_the_command_line_is_not_sent_to_a_yaml_file() -> None:
    """``--config 'analysis={knn_kk: 3}'`` was told that --config names top-level keys and a
    nested setting goes in a YAML file, which refuses the typo too; a top-level key written
    inside a section is named as one, a key of another section by where it is."""
    assert _line(_analysis(knn_kk="3"), {"analysis": {"knn_kk": "3"}}) == (
        f"{IN_CLI}'analysis': Additional properties are not allowed ('knn_kk' was unexpected)"
    )
    assert _line(_analysis(dataset="demo2"), {"analysis": {"dataset": "demo2"}}).endswith(
        "('dataset' was unexpected) (dataset is a top-level key: --config dataset=...)"
    )
    given = {"analysis": {"gpa": {"seed": "3"}}}
    assert _line(lambda c: c["analysis"]["gpa"].update(seed="3"), given).endswith(
        "('seed' was unexpected) (this name is a key at analysis.seed, stimuli.seed, "
        "stimuli.train.seed)"
    )
    assert _line(lambda c: c.update(n_boot="10"), {"n_boot": "10"}).endswith(
        "(--config names top-level keys: a nested setting goes in a YAML file given with "
        "--configfile; this name is a key at analysis.n_boot)"
    )


def test_a_command_line_value_a_yaml_file_refuses_too_or_reads_as_text_says_so() -> None:
    """``.nan`` was sent to a YAML file, where check_config refuses it (not finite); ``1e-10``
    was told to be written 1.0e-10, which --config again gives as text."""
    given = {"analysis": {"gpa": {"tol": ".nan"}}}
    assert _line(_tol(".nan"), given).endswith(
        "(--config gives every value inside analysis={...} as text; in a YAML file it would be "
        "refused too: nan is not a finite number)"
    )
    given = {"analysis": {"gpa": {"tol": "1e-10"}}}
    assert _line(_tol("1e-10"), given).endswith(
        "(--config gives every value inside analysis={...} as text: put the setting in a YAML "
        "file and give it with --configfile; there, YAML 1.1 reads 1e-10 as text: write the "
        "number with a decimal point and a signed exponent, e.g. 1.0e-10, or in full)"
    )
