"""Rule joint_aggregate: gather the per-LLM 2 x 2 tables into joint.tsv and joint_cells.tsv."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import concatenate_tables  # noqa: E402

for kind in ("conditions", "cells"):
    concatenate_tables(snakemake.input[kind], snakemake.output[kind])
