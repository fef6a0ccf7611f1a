"""Rule models_table: model labels, families and plotting order for the figures."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from xmodal.pipeline import write_models_table  # noqa: E402

write_models_table(snakemake.params.models, snakemake.output[0])
