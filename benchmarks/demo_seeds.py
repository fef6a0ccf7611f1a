"""The embedded demo over several training seeds: time per stage and the scientific targets.

For each seed s of ``--seeds``, a fresh copy of the project (as a user clones it) runs
`snakemake --profile profiles/demo` with every model's ``build.seed`` and the training scenes'
seed shifted by the **offset 100·s** (``--seeds 0 1 2``: offsets 0, 100, 200; the evaluation
stimuli stay the same), in three timed phases:

- training: evaluation stimuli, training scenes, tokenizer and every ``demo_model`` job;
- extraction: every ``extract`` job;
- analysis: GPA, sets, alignment, aggregates and figures (everything else).

The untrained config (config/demo_untrained.yaml) runs once, for the trained-vs-untrained
comparison of full-set CKNNA. Prints one table row per run, per run what carries the
dispersion's correlation with the planted nuisance (per vision model, `nuisance_by_model`), and
the spread over seeds; the machine's load (`os.getloadavg`) is printed with every row, since
other work on the same cores slows every phase.

With ``--mixed``, each trained run's full-set CKNNA is also computed with its vision models
against the untrained run's language models and the other way round (best LLM layer, as the
layer search chooses it): which side of a pair the training helps or hurts.

    python benchmarks/demo_seeds.py --seeds 0 1 2 [--cores 2] [--keep DIR] [--mixed]
        [--stimuli-beta A B]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from _project import copy_project  # noqa: E402

from xmodal.demo.targets import demo_targets  # noqa: E402

SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")


def _run(cwd: Path, configfile: str, cores: int, *targets: str) -> float:
    args = [SNAKEMAKE, "--profile", "profiles/demo", "--configfile", configfile]
    args += ["--cores", str(cores), *targets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"snakemake failed in {cwd}:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


def run_demo(workdir: Path, cfg: dict, configfile: str, cores: int) -> dict[str, float]:
    """Run one demo in ``workdir``; return wall seconds per phase."""
    dataset, models = cfg["dataset"], list(cfg["models"])
    built = [f"resources/demo/models/{m}" for m in models]
    manifest = f"resources/stimuli/{dataset}/stimuli.tsv"
    features = [f"results/features/{dataset}/{m}.h5" for m in models]
    times = {"training": _run(workdir, configfile, cores, manifest, *built)}
    times["extraction"] = _run(workdir, configfile, cores, *features)
    times["analysis"] = _run(workdir, configfile, cores)
    times["total"] = sum(times.values())
    return times


#: the packages whose versions change what the demo trains to (docs/method.md, "Same seeds,
#: another machine")
PACKAGES = ("torch", "timm", "transformers", "tokenizers", "numpy", "pillow")


def host_line() -> str:
    """The CPU model (with its widest vector instructions), the CPU count and the versions of
    :data:`PACKAGES`: the demo's numbers depend on them, so its benchmarks print this first."""
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):  # Linux: the model and its vector instructions
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in info if x.startswith("model name")), cpu)
        flags = set(next((x.split(":", 1)[1].split() for x in info if x.startswith("flags")), []))
    widest = next((f for f in ("avx512f", "avx2", "avx", "neon", "asimd") if f in flags), None)
    if widest:
        cpu += f" ({widest})"
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    python = platform.python_version()
    return f"host: {cpu}, {os.cpu_count()} CPUs; python {python}; " + ", ".join(found)


def shifted_config(cfg: dict, offset: int) -> dict:
    """``cfg`` with every model's build seed and the training scenes' seed shifted."""
    cfg = json.loads(json.dumps(cfg))
    for entry in cfg["models"].values():
        entry["build"]["seed"] = int(entry["build"].get("seed", 0)) + offset
    train = cfg["stimuli"].setdefault("train", {})
    train["seed"] = int(train.get("seed", 0)) + offset
    return cfg


def _by_family(full):
    """Full-set CKNNA indexed by model names without their config prefix (tiny-, untrained-)."""
    return full.rename(index=lambda key: key.split("-", 1)[1]).sort_index()


def cknna_with_llms(prepared: dict, llm_root: Path, llm_cfg: dict, k: int) -> pd.Series:
    """Full-set CKNNA of prepared vision layers (``{key: (layer, x)}``) with every language
    model of the run at ``llm_root``, at the LLM layer the layer search chooses."""
    from xmodal.alignment import layer_search_table
    from xmodal.pipeline import layer_threshold, open_features, prepared_layer

    folder = llm_root / "results" / "features" / llm_cfg["dataset"]
    values = {}
    for llm, m in llm_cfg["models"].items():
        if m["modality"] != "language":
            continue
        with open_features(folder / f"{llm}.h5", None, model=llm, modality="language") as f:
            t = layer_threshold(f)
            layers = ((i, name, prepared_layer(f, i, t)) for i, name in enumerate(f.layer_names))
            table = layer_search_table(prepared, llm, layers, k=k)
        for row in table[table["chosen"]].itertuples():
            values[(row.vision.split("-", 1)[1], llm.split("-", 1)[1])] = row.value
    return pd.Series(values).rename_axis(["vision", "llm"]).sort_index()


def _full_cknna(vision_root: Path, vision_cfg: dict, llm_root: Path, llm_cfg: dict) -> pd.Series:
    """Full-set CKNNA at the chosen LLM layer, vision models of one run against LLMs of another."""
    from xmodal.pipeline import read_prepared_vision

    a = vision_cfg["analysis"]
    folder = vision_root / "results" / "features" / vision_cfg["dataset"]
    vision = [k for k, m in vision_cfg["models"].items() if m["modality"] == "vision"]
    paths = [folder / f"{k}.h5" for k in vision]
    _, prepared = read_prepared_vision(paths, vision, a["vision_layer"])
    return cknna_with_llms(prepared, llm_root, llm_cfg, a["knn_k"])


def mixed_table(trained: Path, t_cfg: dict, untrained: Path, u_cfg: dict) -> pd.DataFrame:
    """Full-set CKNNA per pair for every mix of trained and untrained vision and LLMs."""
    runs = {"trained": (trained, t_cfg), "untrained": (untrained, u_cfg)}
    cols = {
        f"vision {v} / LLM {lang}": _full_cknna(*runs[v], *runs[lang])
        for v in runs
        for lang in runs
    }
    return pd.DataFrame(cols)


def measure(workdir: Path, cfg: dict, configfile: str) -> dict[str, float]:
    vision = [k for k, m in cfg["models"].items() if m["modality"] == "vision"]
    targets = demo_targets(workdir, cfg["dataset"], vision)
    return targets, targets.summary()


class _NuisanceDesign(argparse.Action):
    """Stores the two numbers as :func:`xmodal.config.nuisance_design` checks them."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from xmodal.config import nuisance_design

        try:
            setattr(namespace, self.dest, nuisance_design(values))
        except ValueError as err:
            parser.error(f"{option_string}: {err}")


def add_stimuli_beta(parser: argparse.ArgumentParser) -> None:
    """The option ``--stimuli-beta A B``: the stimuli's ν ~ Beta(A, B) instead of the world's
    design (config ``stimuli.nuisance_beta``; the training scenes keep the world's), checked
    as the config's value is."""
    parser.add_argument(
        "--stimuli-beta",
        type=float,
        nargs=2,
        action=_NuisanceDesign,
        metavar=("A", "B"),
        help="the stimuli's ν ~ Beta(A, B) (config stimuli.nuisance_beta; training unchanged)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seed offsets 100·s"
    )
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the project copies in this folder")
    parser.add_argument("--no-untrained", action="store_true")
    parser.add_argument(
        "--mixed", action="store_true", help="full-set CKNNA of trained × untrained mixes"
    )
    add_stimuli_beta(parser)
    args = parser.parse_args()
    print(host_line(), flush=True)

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="demo_seeds_"))
    trained_cfg = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())
    rows, fulls, runs_done = [], {}, {}
    runs = [("trained", s) for s in args.seeds]
    if not args.no_untrained:
        runs.append(("untrained", 0))
    for kind, seed in runs:
        wd = copy_project(base / f"{kind}-{seed}")
        if kind == "trained":
            cfg = shifted_config(trained_cfg, 100 * seed)
            configfile = f"config/demo_seed{seed}.yaml"
        else:
            configfile = "config/demo_untrained.yaml"
            cfg = yaml.safe_load((wd / configfile).read_text())
        if args.stimuli_beta:
            cfg["stimuli"]["nuisance_beta"] = list(args.stimuli_beta)
            configfile = configfile.replace(".yaml", "_design.yaml")
        (wd / configfile).write_text(yaml.safe_dump(cfg, sort_keys=False))
        times = run_demo(wd, cfg, configfile, args.cores)
        targets, summary = measure(wd, cfg, configfile)
        fulls[(kind, seed)] = targets.full
        runs_done[(kind, seed)] = (wd, cfg)
        row = {"run": kind, "seed_offset": 100 * seed, **times, **summary}
        row["load1"] = round(os.getloadavg()[0], 2)
        rows.append(row)
        print(
            "\t".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )
        print(targets.by_model.round(3).to_string(index=False))
        sys.stdout.flush()
    if ("untrained", 0) in fulls:
        untrained = _by_family(fulls[("untrained", 0)])
        for (kind, seed), full in fulls.items():
            if kind == "trained":
                diff = _by_family(full) - untrained
                print(
                    f"seed offset {100 * seed}: full-set CKNNA trained − untrained > 0 in "
                    f"{int((diff > 0).sum())} of {len(diff)} pairs (min {diff.min():.3f})"
                )
    if args.mixed and ("untrained", 0) in runs_done:
        for (kind, seed), (wd, cfg) in runs_done.items():
            if kind == "trained":
                print(f"seed offset {100 * seed}: full-set CKNNA, trained and untrained mixed")
                mixed = mixed_table(wd, cfg, *runs_done[("untrained", 0)])
                print(mixed.round(4).to_string())
    table = pd.DataFrame([r for r in rows if r["run"] == "trained"])
    if len(table) > 1:
        print("spread over seeds (min / mean / max):")
        print(table.drop(columns=["run"]).agg(["min", "mean", "max"]).T.to_string())
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
