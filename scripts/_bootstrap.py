"""Put the workflow's own library (src/xmodal) first on sys.path for the step scripts.

Snakemake adds this directory to the path of every script it runs; importing this module
makes the library importable whether or not it is installed in the job's environment
(conda environments from envs/ hold its dependencies only).
"""

import sys
from pathlib import Path

_SRC = str(Path(__file__).resolve().parents[1] / "src")
# First, even when already on the path: Snakemake's script preamble appends this folder after
# the interpreter's own entries, where an editable install of another checkout would win.
while _SRC in sys.path:
    sys.path.remove(_SRC)
sys.path.insert(0, _SRC)

import xmodal  # noqa: E402  (light: imports no numerical library)

xmodal.configure_cpu_threads()  # before numpy/torch load their thread pools
