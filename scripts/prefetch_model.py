"""Rule prefetch_model: download one model's weights into the hub cache."""

import json
import logging
import sys

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.io import atomic_path  # noqa: E402
from xmodal.prefetch import PrefetchError, prefetch_model  # noqa: E402

entry = snakemake.params.entry
try:
    record = prefetch_model(
        entry["id"],
        entry["modality"],
        entry.get("revision"),
        snakemake.params.cache_dir,
        allow_pickle=bool(snakemake.params.allow_pickle),
    )
except PrefetchError as err:  # no network, pickle-only repo: say what to do, no traceback
    logging.getLogger("prefetch").error("%s", err)
    sys.exit(1)
with atomic_path(snakemake.output.record) as tmp:
    tmp.write_text(json.dumps(record, indent=2) + "\n")
