"""Rule extract: features of every layer of one model, written to HDF5.

Compute nodes are often offline: weights come from the project's hub cache, filled by the
prefetch rules on the submit host, and the hub libraries are told not to try the network.
"""

import os
from pathlib import Path

import _bootstrap  # noqa: F401

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
# Before any hub library is imported: offline, against the project-local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_CACHE", str(Path(snakemake.params.cache_dir).resolve()))

from xmodal.extract import extract_features  # noqa: E402
from xmodal.logs import log_to  # noqa: E402

log_to(snakemake.log[0])

# params.entry holds only what determines the features (it is the rerun trigger); labels and
# sizes come along for the provenance attributes.
model = snakemake.wildcards.model
entry = {**snakemake.config["models"][model], **snakemake.params.entry}
if "build" in entry:  # demo: the tiny model built by rule demo_model
    entry["id"] = snakemake.input.model
extract_features(
    model,
    entry,
    snakemake.input.manifest,
    snakemake.output.features,
    cache_dir=snakemake.params.cache_dir,
    dtype=snakemake.params.dtype,
    batch_size=snakemake.params.batch_size,
    num_workers=int(snakemake.params.num_workers),
    allow_pickle=bool(snakemake.params.allow_pickle),
)
