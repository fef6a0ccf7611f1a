# Single-stimulus intra-modal dispersion and cross-modal convergence.
# Reproduces and extends Hosseini, Cheung, Fedorenko & Williams (see README.md).
#
#   snakemake --cores N --resources gpu=1    the paper setup (config.yaml), on one machine
#   snakemake --profile slurm                the same on a SLURM cluster (docs/cluster.md)
#   snakemake --profile profiles/demo        the embedded demo (config/demo.yaml)
from snakemake.utils import min_version

# 9.17: default_resources as a mapping (workflow/rules/common.smk), priorities by a function
min_version("9.17")


# config.yaml is the default; a --configfile given on the command line replaces it
# (Snakemake would otherwise deep-merge the two model registries).
if not workflow.config_settings.configfiles:

    configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/stimuli.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/extract.smk"
include: "workflow/rules/dispersion.smk"
include: "workflow/rules/alignment.smk"
include: "workflow/rules/diagnostics.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/extensions.smk"


# once every rule is defined: it reads the outputs of the rules a switch turns off
warn_of_leftover_results()
# once every rule is defined: it reads their script and conda directives
check_python_path_without_hooks()


rule all:
    default_target: True
    input:
        get_final_output(),
        missing_analysis_outputs,
