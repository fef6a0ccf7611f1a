"""Rule aggregate: gather the per-pair tables into layers.tsv, grid.tsv, contrasts.tsv."""

import _bootstrap  # noqa: F401
from snakemake.script import snakemake

from xmodal.logs import log_to

log_to(snakemake.log[0])

from xmodal.pipeline import concatenate_tables  # noqa: E402

for kind in ("layers", "conditions", "contrasts"):
    out = snakemake.output.grid if kind == "conditions" else snakemake.output[kind]
    concatenate_tables(snakemake.input[kind], out)
