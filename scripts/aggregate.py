"""Rule aggregate: gather the per-LLM tables into layers.tsv, grid.tsv, contrasts.tsv and the
controls' tables (drop.tsv, heldout_layers.tsv, heldout.tsv, self_selection.tsv) when the
config asks for them."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import concatenate_tables  # noqa: E402

for kind in snakemake.input.keys():
    out = snakemake.output.grid if kind == "conditions" else snakemake.output[kind]
    concatenate_tables(snakemake.input[kind], out)
