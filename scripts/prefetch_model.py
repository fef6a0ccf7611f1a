"""Rule prefetch_model: download one model's weights into the hub cache."""

import json

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.config import hub_cache_dir  # noqa: E402
from xmodal.io import atomic_path  # noqa: E402
from xmodal.prefetch import prefetch_model  # noqa: E402
from xmodal.registry import Registry  # noqa: E402

# no network or a pickle-only repo end in one logged line saying what to do (xmodal.logs)
entry = Registry.from_config(snakemake.config)[snakemake.wildcards.model]
record = prefetch_model(
    entry.id,
    entry.modality,
    entry.revision,
    hub_cache_dir(snakemake.config),
    allow_pickle=entry.allow_pickle,
)
with atomic_path(snakemake.output.record) as tmp:
    tmp.write_text(json.dumps(record, indent=2) + "\n")
