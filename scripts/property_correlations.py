"""Rule property_correlations: Spearman correlation of each property with vision dispersion."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_property_correlations  # noqa: E402

run_property_correlations(
    snakemake.input.properties,
    snakemake.input.dispersion,
    n_boot=int(snakemake.params.n_boot),
    seed=int(snakemake.params.seed),
    out_table=snakemake.output[0],
)
