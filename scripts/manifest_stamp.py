"""Rule manifest_stamp: what one modality's extractions read from the stimulus manifest."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.stimuli import write_manifest_stamp  # noqa: E402

write_manifest_stamp(
    snakemake.input.manifest,
    snakemake.output.stamp,
    snakemake.wildcards.modality,
    drop_duplicates=bool(snakemake.params.drop_duplicates),
)
