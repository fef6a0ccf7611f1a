"""Dry runs of the paper config on common GPU sizes: every extraction job is sized by the rule
of docs/cluster.md from the model's size and the site settings (extraction.gpu_mem_gb,
extraction.num_workers), and a model no node can hold fails at start-up naming the settings."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path

import h5py
import pytest
import yaml
from _project import copy_project
from _project import run_snakemake as snakemake

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAPER = yaml.safe_load((ROOT / "config.yaml").read_text())


@pytest.fixture(scope="module")
def paper_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("paper") / "project")


def _write_manifest(wd: Path, n: int) -> Path:
    manifest = wd / "resources/stimuli/wit1024/stimuli.tsv"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"s{i}\timages/{i}.png\tcaption {i}\n" for i in range(n))
    manifest.write_text("stimulus_id\timage\tcaption\n" + rows)
    return manifest


def _job_resources(output: str) -> dict[str, dict[str, str]]:
    """{rule (rule:model for a job with a model wildcard): {resource: value}} of a dry run's
    job listing; a value Snakemake cannot size yet reads <TBD>."""
    res: dict[str, dict[str, str]] = {}
    rule = None
    for line in output.splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif rule and "wildcards:" in line and "model=" in line:
            rule += ":" + line.split("model=")[1].split(",")[0].strip()
        elif rule and "resources:" in line:
            res[rule] = dict(re.findall(r"(\w+)=([^,\s]+)", line))
            rule = None
    return res


def extraction_jobs(wd: Path, extraction: dict, n_stimuli: int = 0) -> dict[str, dict[str, int]]:
    """{model: {gpu, mem_mb, cpus_per_task, runtime}} of a forced dry run of every extraction,
    with a manifest of ``n_stimuli`` rows on disk (none for 0)."""
    cfg = copy.deepcopy(PAPER)
    cfg["extraction"].update(extraction)
    name = "config/site_" + "_".join(f"{k}{v}" for k, v in extraction.items()) + ".yaml"
    (wd / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    targets = [f"results/features/wit1024/{k}.h5" for k in PAPER["models"]]
    manifest = _write_manifest(wd, n_stimuli) if n_stimuli else None
    try:
        proc = snakemake(
            wd, "-n", "--forceall", "--cores", "4", "--configfile", name, "--", *targets
        )
    finally:
        if manifest is not None:
            manifest.unlink()
            # the stamps written from it would give later calls its number of stimuli
            shutil.rmtree(wd / "results/stimuli", ignore_errors=True)
    jobs: dict[str, dict[str, int]] = {}
    model = None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("rule "):
            model = None if not line.startswith("rule extract:") else ""
        elif model == "" and "wildcards:" in line:
            model = line.split("model=")[1].split(",")[0].strip()
        elif model and "resources:" in line:
            res = dict(re.findall(r"(\w+)=(\d+)(?:,|$)", line))
            jobs[model] = {k: int(res[k]) for k in ("gpu", "mem_mb", "cpus_per_task", "runtime")}
            # a job's GPUs on one node: sbatch --gpus=4 alone may spread them over nodes
            assert res.get("nodes") == "1", (model, line)
            model = None
    return jobs


def expected(
    modality: str, size_b: float, gpu_mem_gb: float, workers: int, n: int = 0
) -> dict[str, int]:
    """docs/cluster.md's sizing rule, written out independently of xmodal.resources."""
    w = (4 if modality == "vision" else 2) * size_b  # weights, GB: float32 ViTs, bf16 LLMs
    # forward passes: 2 operations per parameter and token, 1370 tokens an image (518 px at
    # patch 14) at 5 TFLOP/s (float32), 128 a caption at 50 TFLOP/s (bf16)
    tokens, rate = (1370, 5e12) if modality == "vision" else (128, 50e12)
    forward_s = n * tokens * 2 * size_b * 1e9 / rate
    gpu = max(1, math.ceil((w + max(2, 0.05 * w)) / (0.9 * gpu_mem_gb)))
    if modality == "vision":  # + the decoded batches: 4 per worker and 2 in flight, 64 images
        waiting = (4 * workers + 2) * 64 * 3 * 518 * 518 * 4 / 1e9  # of 518 px in float32
        mem_gb, cpus = 8 + 8 * size_b + 0.5 * workers + waiting, workers + 1
    else:
        mem_gb, cpus = 8 + w, min(max(1, workers), 4)
    return {
        "gpu": gpu,
        "mem_mb": 1024 * math.ceil(mem_gb),
        "cpus_per_task": cpus,
        "runtime": 30 + math.ceil(w / 2) + math.ceil(forward_s / 60),
    }


@pytest.mark.parametrize("gpu_mem_gb", [24, 40, 48, 80, 141])
def test_extraction_jobs_follow_the_site_gpu_size(paper_project: Path, gpu_mem_gb: int) -> None:
    """Without a manifest (a dry run before the stimuli are fetched) the runtime counts no
    forward pass; with one of 100,000 stimuli (at 141 GB) it does, per model."""
    workers = 2 if gpu_mem_gb == 40 else 8
    n = 100_000 if gpu_mem_gb == 141 else 0
    jobs = extraction_jobs(paper_project, {"gpu_mem_gb": gpu_mem_gb, "num_workers": workers}, n)
    assert set(jobs) == set(PAPER["models"])
    for key, m in PAPER["models"].items():
        want = expected(m["modality"], m["size_b"], gpu_mem_gb, workers, n)
        assert jobs[key] == want, (key, gpu_mem_gb, jobs[key], want)
    if n:  # before: 30 + 1 min per 2 GB, 96 min for LLaMA-65B whatever the number of stimuli
        assert jobs["llama-65b"]["runtime"] > 10 * 60 and jobs["dinov2-g"]["runtime"] > 8 * 60
    if gpu_mem_gb == 40:  # the A100-40GB case of the issue
        assert jobs["llama-65b"]["gpu"] == 4 and jobs["llama-30b"]["gpu"] == 2
        assert all(jobs[k]["cpus_per_task"] == 3 for k in ("mae-h", "dinov2-g"))


def test_model_no_node_can_hold_fails_at_start_up(paper_project: Path) -> None:
    cfg = copy.deepcopy(PAPER)
    cfg["extraction"].update(gpu_mem_gb=24, gpus_per_node=4)
    (paper_project / "config/small_node.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(
        paper_project, "-n", "--cores", "1", "--configfile", "config/small_node.yaml", check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "models.llama-30b" in out or "models.llama-65b" in out, out
    assert "extraction.gpu_mem_gb" in out and "extraction.gpus_per_node" in out, out
    assert "Traceback" not in out, out


def test_the_same_model_under_two_keys_fails_at_start_up(paper_project: Path) -> None:
    """It would count twice in GPA and leave-one-model-out (a warning before, exit code 0)."""
    cfg = copy.deepcopy(PAPER)
    cfg["models"]["mae-again"] = dict(cfg["models"]["mae-h"], label="MAE again")
    (paper_project / "config/twice.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(
        paper_project, "-n", "--cores", "1", "--configfile", "config/twice.yaml", check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "models 'mae-h' and 'mae-again' are the same model" in out, out
    assert "count twice in their modality's GPA" in out and "config key 'models'" in out, out


def test_set_sizes_that_do_not_fit_the_stimuli_fail_at_start_up(paper_project: Path) -> None:
    """With a manifest on disk, set sizes are checked against its rows before any job: before,
    stimulus_sets refused them after every extraction (the GPU jobs). 1024 stimuli, the
    held-out layer on, set_size 30 and knn_k 10: sets of 15 inside half B, fewer than 2k."""
    manifest = _write_manifest(paper_project, 1024)
    cfg = copy.deepcopy(PAPER)
    cfg["analysis"]["set_size"] = 30
    (paper_project / "config/small_sets.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    try:
        proc = snakemake(
            paper_project, "-n", "--cores", "1", "--configfile", "config/small_sets.yaml",
            check=False,
        )  # fmt: skip
    finally:
        manifest.unlink()
        shutil.rmtree(paper_project / "results/stimuli", ignore_errors=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out, out
    assert "for 1024 stimuli: analysis.heldout_layer: the sets inside half B" in out, out
    assert "would hold 15" in out and "2 × analysis.knn_k) = 20" in out, out


def test_threaded_rules_ask_for_their_threads_as_cpus(paper_project: Path) -> None:
    """The rules that decode images on 2 threads ask SLURM for 2 CPUs (before: the profile's
    default of 1 CPU, so their second thread shared the first one's core); so do the GPA and
    leave-one-model-out fits, from their rules' ``threads`` (before: a profile setting that
    their scripts never saw); the language GPA asks for its one thread's CPU."""
    targets = ["results/stimuli/wit1024/images.tsv", "results/properties/wit1024/images.tsv"]
    targets += ["results/dispersion/wit1024/gpa.json", "results/dispersion/wit1024/loo.tsv"]
    targets += ["results/language/wit1024/dispersion.tsv"]
    targets += ["results/alignment/wit1024/layers/bloomz-560m.tsv"]
    threads = ["--set-threads", "layer_search=3"]  # before: 3 threads on the profile's 1 CPU
    proc = snakemake(paper_project, "-n", "--forceall", "--cores", "4", *threads, "--", *targets)
    cpus, rule = {}, None
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("rule "):
            rule = line.split()[1].rstrip(":")
        elif rule and "resources:" in line:
            cpus[rule] = dict(re.findall(r"(\w+)=(\d+)(?:,|$)", line)).get("cpus_per_task")
            rule = None
    assert cpus["stimuli_report"] == cpus["image_properties"] == "2", cpus
    assert cpus["gpa"] == cpus["leave_one_model_out"] == "2", cpus
    assert cpus["layer_search"] == "3", cpus
    assert cpus["language_gpa"] == "1", cpus  # its one thread, from its rule now


def test_the_users_set_resources_reach_the_jobs(paper_project: Path) -> None:
    """A `set-resources` block in the user's profile (the GPU model the SLURM profile tells
    them to set there, more memory for GPA) reaches the jobs; the rules' own analysis
    resources stay where it says nothing. Before, the workflow profile's `set-resources`
    replaced the user's whole block, silently."""
    prof = paper_project / "myprofile"
    prof.mkdir(exist_ok=True)
    settings = {"extract": {"gpu_model": "a100", "runtime": 999}, "gpa": {"mem_mb": 64000}}
    (prof / "config.yaml").write_text(yaml.safe_dump({"set-resources": settings}))
    targets = ["results/features/wit1024/llama-65b.h5", "results/dispersion/wit1024/gpa.json"]
    targets += ["results/dispersion/wit1024/sets.tsv"]
    proc = snakemake(
        paper_project, "--profile", "myprofile", "-n", "--forceall", "--cores", "4", "--", *targets
    )
    res = _job_resources(proc.stdout + proc.stderr)
    res["extract"] = res["extract:llama-65b"]
    assert res["extract"]["gpu_model"] == "a100" and res["extract"]["runtime"] == "999", res
    assert res["extract"]["gpu"] == "2", res  # the registry's sizing, where the profile is silent
    assert res["gpa"]["mem_mb"] == "64000" and res["gpa"]["runtime"] == "60", res
    assert res["stimulus_sets"]["mem_mb"] == "2000", res


def _resources_for_shapes(project, shapes, targets, *args):
    """The resources a forced dry run of ``targets`` gives each rule, with feature files of
    these shapes (model key: (layers, stimuli, width); the shape alone, a small file)."""
    feats = project / "results/features/wit1024"
    feats.mkdir(parents=True, exist_ok=True)
    for key, shape in shapes.items():
        with h5py.File(feats / f"{key}.h5", "w") as f:
            f.create_dataset("features", shape=shape, dtype="f4", chunks=(1, 64, 64))
    try:
        proc = snakemake(project, "-n", "--forceall", "--cores", "4", *args, "--", *targets)
    finally:
        shutil.rmtree(feats)
    return _job_resources(proc.stdout + proc.stderr)


def test_gpa_jobs_ask_for_the_memory_their_feature_files_need(paper_project):
    """A GPA's peak grows with the stimuli and the models' widths (xmodal.gpa.gpa_memory_mb):
    the language GPA over 12 LLMs at 5,000 stimuli needs about 46 GiB, and asked for 8, 16 and
    24 GB, every try killed. Its request now comes from the feature files' shapes; before they
    exist, a dry run shows <TBD> (Snakemake sizes the job once they are made)."""
    from xmodal.gpa import gpa_memory_mb

    llms = [k for k, m in PAPER["models"].items() if m["modality"] == "language"]
    targets = ["results/language/wit1024/gpa.json", "results/dispersion/wit1024/gpa.json"]
    res = _resources_for_shapes(paper_project, {k: (3, 5000, 4096) for k in llms}, targets)
    want = gpa_memory_mb(5000, [4096] * len(llms))
    assert want > 3 * 8000 and res["language_gpa"]["mem_mb"] == str(want), res
    assert res["gpa"]["mem_mb"] == "<TBD>", res  # the vision features are not made yet


def test_leave_one_model_out_asks_for_its_concurrent_fits(paper_project):
    """Leave-one-model-out runs one fit per thread at once and keeps all M fits: its peak was
    1.43× the GPA's estimate at the paper's widths (audit), and from about 30,000 stimuli over
    the 8 GB the vision GPA asks for."""
    from xmodal.gpa import gpa_memory_mb

    vision = [k for k, m in PAPER["models"].items() if m["modality"] == "vision"]
    widths = [1280, 1536, 1280, 1280][: len(vision)]
    shapes = {key: (1, 40000, w) for key, w in zip(vision, widths, strict=True)}
    targets = ["results/dispersion/wit1024/loo.tsv", "results/dispersion/wit1024/gpa.json"]
    res = _resources_for_shapes(paper_project, shapes, targets)
    assert gpa_memory_mb(40000, widths) < 8000 < gpa_memory_mb(40000, widths, 2)
    assert res["gpa"]["mem_mb"] == "8000", res
    assert res["leave_one_model_out"]["mem_mb"] == str(gpa_memory_mb(40000, widths, 2)), res
    # more threads than models: one fit per model at once, no more (xmodal.parallel.n_workers)
    more = ("--set-threads", "leave_one_model_out=16")
    res = _resources_for_shapes(paper_project, shapes, targets[:1], *more)
    want = gpa_memory_mb(40000, widths, len(widths))
    assert res["leave_one_model_out"]["mem_mb"] == str(want), res


def test_leave_one_model_out_asks_for_the_time_its_shuffles_need(paper_project):
    """Each held-out model is also scored against its rows shuffled analysis.n_random times
    (100 in config.yaml), a Procrustes step each that grows as m·k²: at the paper's size
    about 2 minutes, at 20,000 stimuli more than the GPA kind's 60 (xmodal.resources.
    loo_minutes); the paper's size keeps 60."""
    from xmodal.resources import LOO_SHUFFLE_SECONDS, PAIR_MARGIN

    vision = [k for k, m in PAPER["models"].items() if m["modality"] == "vision"]
    widths = [1280, 1536, 1280, 1280][: len(vision)]
    targets = ["results/dispersion/wit1024/loo.tsv"]
    for m, want_more in ((1024, False), (20000, True)):
        shapes = {key: (1, m, w) for key, w in zip(vision, widths, strict=True)}
        res = _resources_for_shapes(paper_project, shapes, targets)
        k = min(max(widths), m - 1)
        # written out from docs/method.md's cost: 100 shuffles × 4 models on 2 threads
        seconds = 100 * 4 * LOO_SHUFFLE_SECONDS * (m * k * k + k**3) * PAIR_MARGIN / 2
        want = max(60, math.ceil(seconds / 60))
        assert res["leave_one_model_out"]["runtime"] == str(want), (m, res)
        assert (want > 60) == want_more, want


def test_alignment_jobs_ask_for_the_time_their_stimuli_need(paper_project):
    """A layer search of LLaMA-65B's 81 layers took about 85 minutes at 9,000 stimuli and asked
    for 30 (audit): its runtime now comes from the LLM feature file's shape
    (xmodal.resources.pair_minutes)."""
    from xmodal.metrics import DENSE_MAX_M
    from xmodal.resources import pair_minutes

    feats = paper_project / "results/features/wit1024"
    feats.mkdir(parents=True, exist_ok=True)
    with h5py.File(feats / "llama-65b.h5", "w") as f:  # the shape alone: a small file
        f.create_dataset("features", shape=(81, 9000, 8192), dtype="f4", chunks=(1, 64, 64))
    target = "results/alignment/wit1024/layers/llama-65b.tsv"
    try:
        proc = snakemake(paper_project, "-n", "--forceall", "--cores", "4", "--", target)
    finally:
        shutil.rmtree(feats)
    res = _job_resources(proc.stdout + proc.stderr)
    want = pair_minutes("layer_search", 9000, 8192, 81, blocked=9000 > DENSE_MAX_M)
    assert want > 6 * 60 and res["layer_search"]["runtime"] == str(want), res


def test_a_damaged_feature_file_does_not_stop_the_planning(paper_project):
    """The resource callables read a feature file's shape while Snakemake plans the jobs; a
    truncated file stopped every run there with an h5py error naming no file (review). Now the
    job keeps its base request and its own reader names the file; a missing file is <TBD>."""
    from xmodal.features import FeatureFileError, feature_shape

    feats = paper_project / "results/features/wit1024"
    feats.mkdir(parents=True, exist_ok=True)
    (feats / "llama-65b.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)  # truncated
    target = "results/alignment/wit1024/layers/llama-65b.tsv"
    try:
        with pytest.raises(FeatureFileError, match=r"llama-65b\.h5: cannot read its shape"):
            feature_shape(feats / "llama-65b.h5")
        proc = snakemake(paper_project, "-n", "--forceall", "--cores", "4", "--", target)
    finally:
        shutil.rmtree(feats)
    res = _job_resources(proc.stdout + proc.stderr)
    assert res["layer_search"]["runtime"] == "30", res
    with pytest.raises(FileNotFoundError):
        feature_shape(feats / "llama-65b.h5")
