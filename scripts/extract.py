"""Rule extract: features of every layer of one model, written to HDF5."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from xmodal.extract import extract_features  # noqa: E402

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
