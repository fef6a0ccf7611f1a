"""Rule stimuli_report: every image decoded once, and the duplicate stimuli with their ids."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import run_stimuli_report  # noqa: E402

run_stimuli_report(
    snakemake.input.manifest,
    out_images=snakemake.output.images,
    out_duplicates=snakemake.output.duplicates,
    workers=int(snakemake.threads),
)
