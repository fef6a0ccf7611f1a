"""Rule language_correlation: language vs vision dispersion, with bootstrap intervals."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_language_correlation  # noqa: E402

run_language_correlation(
    snakemake.input.vision,
    snakemake.input.language,
    n_boot=int(snakemake.params.n_boot),
    seed=int(snakemake.params.seed),
    out_table=snakemake.output[0],
)
