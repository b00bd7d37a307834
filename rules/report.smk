# Aggregates read only cells and write tables (Parquet, CSV, Markdown) and charts (HTML, PNG).


rule ppl_table:
    input:
        ppl_cells(),
    output:
        table="results/tables/ppl.parquet",
        csv="results/tables/ppl.csv",
        md="results/tables/ppl.md",
        html=report(
            "results/figures/ppl.html",
            caption="../report/ppl.rst",
            category="Perplexity",
        ),
        png=report(
            "results/figures/ppl.png",
            caption="../report/ppl.rst",
            category="Perplexity",
        ),
    log:
        "logs/report/ppl.log",
    conda:
        "../envs/ropelens.yaml"
    shell:
        "python -m ropelens aggregate-ppl {input} --prefix results/tables/ppl"
        " --html {output.html} --png {output.png} 2> {log}"
