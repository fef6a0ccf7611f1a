"""Rule prefetch_model: download one model's weights into the hub cache."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

import json  # noqa: E402

from xmodal.io import atomic_path  # noqa: E402
from xmodal.prefetch import prefetch_model  # noqa: E402

entry = snakemake.params.entry
record = prefetch_model(
    entry["id"],
    entry["modality"],
    entry.get("revision"),
    snakemake.params.cache_dir,
    allow_pickle=bool(snakemake.params.allow_pickle),
)
with atomic_path(snakemake.output.record) as tmp:
    tmp.write_text(json.dumps(record, indent=2) + "\n")
