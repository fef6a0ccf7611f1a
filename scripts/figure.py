"""Rules figure_*: draw one figure (for one alignment metric) from the aggregate tables."""

import _bootstrap  # noqa: F401

from xmodal.logs import log_to

snakemake = globals()["snakemake"]  # injected by the preamble Snakemake prepends
log_to(snakemake.log[0])  # first, so that even an import error reaches the job's log

from xmodal.figures import make_figure  # noqa: E402

make_figure(
    snakemake.params.name,
    {key: snakemake.input[key] for key in snakemake.input.keys()},
    snakemake.output.png,
    snakemake.output.pdf,
    metric=snakemake.params.metric if snakemake.params.per_metric else None,
)
