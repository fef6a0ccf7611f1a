"""Rule import_features: a feature file the user supplies, checked and copied into results/."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_import_features  # noqa: E402

run_import_features(
    snakemake.input.manifest,
    snakemake.input.features,
    snakemake.output.features,
    snakemake.wildcards.model,
    snakemake.params.modality,
    drop_duplicates=bool(snakemake.params.drop_duplicates),
)
