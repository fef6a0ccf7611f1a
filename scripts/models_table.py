"""Rule models_table: model labels, families and plotting order for the figures."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import write_models_table  # noqa: E402

write_models_table(snakemake.params.models, snakemake.output[0])
