"""Every rule's conda environment holds what its code imports, at versions pyproject.toml allows.

The imports are derived, not listed by hand: from each rule's `script:`, through every xmodal
module it reaches (imports inside functions count: they run when the function is called), to
the third-party packages at the end of the chain.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "workflow" / "rules"

#: import name -> conda-forge package name, where they differ
CONDA_NAME = {"torch": "pytorch", "PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}
#: pip (pyproject) name -> conda name, where they differ
PIP_TO_CONDA = {"torch": "pytorch"}
NOT_PACKAGES = {"_bootstrap", "xmodal", "__future__"}


def _rule_envs() -> dict[str, tuple[Path, Path]]:
    """rule name -> (conda env file, script) for every rule that has both."""
    out = {}
    for smk in RULES.glob("*.smk"):
        text = smk.read_text()
        for block in re.split(r"\n(?=\s*rule\b)", text):
            head = re.match(r"\s*rule\s*(\w*)\s*:", block)
            conda = re.search(r"conda:\s*\n\s*\"([^\"]+)\"", block)
            script = re.search(r"script:\s*\n\s*\"([^\"]+)\"", block)
            if head and conda and script:
                name = head.group(1) or f"{smk.stem}:anonymous"
                out[name] = (
                    (smk.parent / conda.group(1)).resolve(),
                    (smk.parent / script.group(1)).resolve(),
                )
    return out


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    base = ROOT / "src" / Path(*parts)
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


#: modules whose imports are being collected: an import cycle (xmodal.io re-exports from
#: xmodal.attempts, which imports xmodal.io inside a function) ends there
_ACTIVE: set[Path] = set()


@cache
def _imports(path: Path, package: str) -> frozenset[str]:
    """Third-party top-level packages imported (anywhere) by ``path`` and the xmodal modules it reaches."""
    _ACTIVE.add(path)
    try:
        return _collect_imports(path, package)
    finally:
        _ACTIVE.discard(path)


def _collect_imports(path: Path, package: str) -> frozenset[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import inside xmodal
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            top = name.split(".")[0]
            if top == "xmodal" or top == "_bootstrap":
                target = "xmodal" if top == "_bootstrap" else name
                f = _module_file(target)
                if f is not None and f not in _ACTIVE:
                    pkg = target if f.name == "__init__.py" else target.rsplit(".", 1)[0]
                    found |= _imports(f, pkg)
            elif top not in sys.stdlib_module_names and top not in NOT_PACKAGES:
                found.add(top)
    return frozenset(found)


def _env_packages(env: Path) -> dict[str, str]:
    """conda package name -> version spec ('' if none) of an environment file."""
    deps = yaml.safe_load(env.read_text())["dependencies"]
    out = {}
    for d in deps:
        if isinstance(d, str):
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", d)
            out[m.group(1).lower()] = m.group(2).strip()
    return out


ENVS = _rule_envs()


def test_rules_with_scripts_all_have_environments() -> None:
    assert {"extract", "gpa", "layer_search", "conditions", "summary", "prefetch_model"} <= set(
        ENVS
    )


@pytest.mark.parametrize("rule", sorted(ENVS))
def test_rule_environment_holds_every_imported_package(rule: str) -> None:
    env, script = ENVS[rule]
    needed = {CONDA_NAME.get(p, p).lower() for p in _imports(script, "xmodal")}
    have = set(_env_packages(env))
    missing = sorted(needed - have)
    assert not missing, f"{env.name} (rule {rule}, {script.name}) lacks {missing}"


def test_environment_versions_agree_with_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lower = {}
    for dep in project["dependencies"]:
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        if m:
            lower[PIP_TO_CONDA.get(m.group(1), m.group(1)).lower().replace("_", "-")] = m.group(2)
    for env in sorted({e for e, _ in ENVS.values()}):
        for name, spec in _env_packages(env).items():
            key = name.replace("_", "-")
            if key in lower:
                assert spec == f">={lower[key]}", (env.name, name, spec, lower[key])


def test_snakefile_min_version_is_the_workflow_extras_snakemake_floor() -> None:
    """The Snakefile's min_version is the floor pip installs to (the `workflow` extra): one
    number, the version the workflow was checked to run on (9.17: 9.16 refuses a priority
    given by a function, 9.0 has no mapping of default resources; audit of 2026-12-06)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for dep in project["optional-dependencies"]["workflow"]:
        m = re.match(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][^,;\s]*)", dep)
        if m:
            floors[m.group(1)] = m.group(2)
    snakefile = (ROOT / "Snakefile").read_text()
    (minimum,) = re.findall(r'^min_version\("([^"]+)"\)', snakefile, flags=re.M)
    assert floors["snakemake"] == minimum, (floors, minimum)
    assert tuple(map(int, minimum.split("."))) >= (9, 17), minimum
