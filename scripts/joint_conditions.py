"""Rule joint_conditions: every vision model against one LLM on the 2 x 2 sets, at the chosen
LLM layers, and each set against the size-matched random draws."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_joint_conditions  # noqa: E402
from xmodal.selection import config_draws  # noqa: E402

run_joint_conditions(
    snakemake.input.vision,
    snakemake.input.llm,
    snakemake.input.layers,
    snakemake.input.sets,
    snakemake.params.vision,
    snakemake.wildcards.llm,
    vision_layer=int(snakemake.params.vision_layer),
    k=int(snakemake.params.k),
    seed=int(snakemake.params.seed),
    out_conditions=snakemake.output.conditions,
    out_cells=snakemake.output.cells,
    # the draws the config asks for: a sets table with other numbers of draws is refused
    draws=config_draws(snakemake.config),
)
