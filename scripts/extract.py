"""Rule extract: features of every layer of one model, written to HDF5."""

import _bootstrap  # noqa: F401

from xmodal.extract import extract_features
from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])

entry = dict(snakemake.params.entry)
if "build" in entry:  # demo: the tiny model built by rule demo_model
    entry["id"] = snakemake.input.model
extract_features(
    snakemake.wildcards.model,
    entry,
    snakemake.input.manifest,
    snakemake.output.features,
    cache_dir=snakemake.params.cache_dir,
    dtype=snakemake.params.dtype,
    batch_size=snakemake.params.batch_size,
    num_workers=int(snakemake.params.num_workers),
    allow_pickle=bool(snakemake.params.allow_pickle),
)
