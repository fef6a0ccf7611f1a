"""Rule extract: features of every layer of one model, written to HDF5.

Compute nodes are often offline: weights come from the project's hub cache, filled by the
prefetch rules on the submit host, and the hub libraries are told not to try the network.
Speed settings (batch size, decoding workers) and pickle permission are read here from the
model registry, not tracked as params, so changing them never re-extracts (docs/cluster.md).
"""

import os
from pathlib import Path

import _bootstrap  # noqa: F401

from xmodal.config import hub_cache_dir  # noqa: E402

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
# Before any hub library is imported: offline, against the project-local cache (read from the
# config, not a param: moving the cache re-extracts nothing)
CACHE_DIR = hub_cache_dir(snakemake.config)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_CACHE", str(Path(CACHE_DIR).resolve()))

from xmodal.logs import log_to  # noqa: E402

log_to(snakemake.log[0])

from xmodal.extract import extract_features  # noqa: E402
from xmodal.io import fail_attempt  # noqa: E402
from xmodal.prefetch import check_prefetched  # noqa: E402
from xmodal.registry import Registry  # noqa: E402


def extract() -> None:
    entry = Registry.from_config(snakemake.config)[snakemake.wildcards.model]
    if entry.source == "hub":  # the weights are where the record says, or it says what to do
        check_prefetched(snakemake.input.model, CACHE_DIR)
    extract_features(
        entry.key,
        {
            **snakemake.params.features,
            "label": entry.label,
            "family": entry.family,
            "size_b": entry.size_b,
        },
        snakemake.input.manifest,
        snakemake.output.features,
        cache_dir=CACHE_DIR,
        dtype=entry.site.dtype,
        batch_size=entry.batch_size,
        num_workers=entry.site.num_workers,
        allow_pickle=entry.allow_pickle,
        max_tokens=entry.max_tokens,
        drop_duplicates=bool(snakemake.params.drop_duplicates),
        vision_layer=int(snakemake.config["analysis"]["vision_layer"]),
    )


try:
    extract()
except BaseException as err:  # what a retry of this job reads first (scripts/_bootstrap.py)
    fail_attempt(snakemake.output.features, err)
    raise
