"""Rule layer_search: every vision model against every layer of one LLM (full set), and with
the held-out layer choice the layer chosen on half A of each split."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_layer_search  # noqa: E402

heldout = dict(snakemake.params.heldout)
run_layer_search(
    snakemake.input.vision,
    snakemake.input.llm,
    snakemake.params.vision,
    snakemake.wildcards.llm,
    vision_layer=int(snakemake.params.vision_layer),
    k=int(snakemake.params.k),
    metric_names=list(snakemake.params.metrics),
    out_table=snakemake.output.layers,
    out_diagnostics=snakemake.output.diagnostics,
    out_heldout=snakemake.output.get("heldout_layers"),
    n_splits=int(heldout.get("n_splits", 0)),
    seed=int(heldout.get("seed", 0)),
)
