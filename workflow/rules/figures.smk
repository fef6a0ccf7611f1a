# One rule per figure (xmodal.figures.FIGURES), each drawn from the aggregate tables only,
# so that figures re-render in seconds; each carries its caption into the report.

for _name in FIGURES:

    rule:
        name:
            f"figure_{_name}"
        input:
            unpack(partial(figure_inputs, name=_name)),
        output:
            png=report(
                f"{FIG}/{_name}.png",
                caption=f"../report/{_name}.rst",
                category="Figures",
            ),
            pdf=f"{FIG}/{_name}.pdf",
        log:
            f"logs/figures/{{dataset}}/{_name}.log",
        localrule: True
        conda:
            "../../envs/analysis.yaml"
        params:
            name=_name,
        script:
            "../../scripts/figure.py"
