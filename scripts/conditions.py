"""Rule conditions: every stimulus set, for every vision model against one LLM, at the chosen
LLM layers; the drop sets against their size-matched random sets, the held-out halves and the
sets chosen without each vision model when the config asks for them."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_conditions  # noqa: E402
from xmodal.selection import config_draws  # noqa: E402

run_conditions(
    snakemake.input.vision,
    snakemake.input.llm,
    snakemake.input.layers,
    snakemake.input.sets,
    snakemake.params.vision,
    snakemake.wildcards.llm,
    vision_layer=int(snakemake.params.vision_layer),
    k=int(snakemake.params.k),
    metric_names=list(snakemake.params.metrics),
    n_boot=int(snakemake.params.n_boot),
    seed=int(snakemake.params.seed),
    out_conditions=snakemake.output.conditions,
    out_contrasts=snakemake.output.contrasts,
    out_drop=snakemake.output.get("drop"),
    heldout_layers_path=snakemake.input.get("heldout_layers"),
    heldout_sets_path=snakemake.input.get("heldout_sets"),
    out_heldout=snakemake.output.get("heldout"),
    vision_bootstrap_path=snakemake.input.vision_bootstrap,
    loo_stimuli_path=snakemake.input.get("loo_stimuli"),
    out_self_selection=snakemake.output.get("self_selection"),
    # the draws the config asks for: a sets table with other numbers of draws is refused
    draws=config_draws(snakemake.config),
)
