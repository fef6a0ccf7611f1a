# One rule per figure (xmodal.figures.FIGURES), each drawn from the aggregate tables only,
# so that figures re-render in seconds; each carries its caption into the report.
# A figure of alignment values (per_metric) is drawn once per metric of analysis.metrics:
# {name}.png for CKNNA, {name}.{metric}.png for the others (the metric_tag wildcard, empty for
# CKNNA); the other figures are drawn once ({name}.png).

for _name, _spec in FIGURES.items():

    rule:
        name:
            f"figure_{_name}"
        input:
            unpack(partial(figure_inputs, name=_name)),
        output:
            png=report(
                f"{FIG}/{_name}{{metric_tag}}.png",
                caption=f"../report/{_name}.rst",
                category="Figures",
                subcategory=lambda wildcards, name=_name: report_subcategory(
                    name, wildcards.metric_tag
                ),
            ),
            pdf=f"{FIG}/{_name}{{metric_tag}}.pdf",
        log:
            f"logs/figures/{{dataset}}/{_name}{{metric_tag}}.log",
        wildcard_constraints:
            metric_tag=metric_tag_pattern(
                METRICS if _spec.per_metric else [DEFAULT_METRIC]
            ),
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        params:
            code=ANALYSIS_CODE,
            name=_name,
            metric=lambda wildcards: metric_from_tag(wildcards.metric_tag),
            metric_label=lambda wildcards: metric_label(
                metric_from_tag(wildcards.metric_tag)
            ),
            per_metric=_spec.per_metric,
        script:
            "../../scripts/figure.py"
