"""Helpers for tests that run the workflow: copy the project as a user clones it, run Snakemake."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SNAKEMAKE = str(BIN / "snakemake")


def copy_project(dest: Path) -> Path:
    """Copy the project as a user has it (tracked and untracked-but-not-ignored files): no
    results, no downloaded or generated resources."""
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def run_snakemake(
    cwd: Path, *args: str, check: bool = True, timeout: float = 1500, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``snakemake ARGS`` in ``cwd`` with a clean environment (plus ``env``); fail loudly
    with its output."""
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(cwd), "PYTHONUNBUFFERED": "1"} | (env or {})
    proc = subprocess.run(
        [SNAKEMAKE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout[-5000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def job_counts(output: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table (rule name, count) from a dry run's output."""
    counts: dict[str, int] = {}
    lines = output.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith("Job stats")), None)
    if start is None:
        return counts
    for line in lines[start + 1 :]:
        m = re.match(r"^(\S+)\s+(\d+)\s*$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
        elif line.strip().startswith("total"):
            break
    return counts
