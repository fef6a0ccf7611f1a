"""Rule provenance: the stimuli and each model's feature file the run's numbers come from."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.pipeline import write_provenance  # noqa: E402

write_provenance(
    snakemake.input.manifest,
    snakemake.params.stimuli_source,
    list(snakemake.input.features),
    snakemake.output[0],
    labels=dict(snakemake.params.labels),
)
