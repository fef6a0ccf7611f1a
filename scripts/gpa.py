"""Rule gpa: Generalized Procrustes Analysis across the vision models."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_gpa  # noqa: E402

run_gpa(
    snakemake.input.features,
    snakemake.params.models,
    vision_layer=int(snakemake.params.vision_layer),
    tol=float(snakemake.params.tol),
    max_iter=int(snakemake.params.max_iter),
    out_residuals=snakemake.output.residuals,
    out_dispersion=snakemake.output.dispersion,
    out_summary=snakemake.output.summary,
)
