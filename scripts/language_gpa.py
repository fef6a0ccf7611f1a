"""Rule language_gpa: GPA across the language models, one layer each (language-side dispersion)."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_language_gpa  # noqa: E402

layer = snakemake.params.layer
run_language_gpa(
    snakemake.input.features,
    snakemake.params.llms,
    layer=layer if layer == "chosen" else float(layer),
    tol=float(snakemake.params.tol),
    max_iter=int(snakemake.params.max_iter),
    out_residuals=snakemake.output.residuals,
    out_dispersion=snakemake.output.dispersion,
    out_layers=snakemake.output.layers,
    out_summary=snakemake.output.summary,
    layer_tables=list(snakemake.input.layers),
)
