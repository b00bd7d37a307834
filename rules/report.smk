# Aggregates read only cells and write tables (Parquet, CSV, Markdown) and charts (HTML, PNG).


rule ppl_table:
    input:
        ppl_cells(),
    output:
        table="results/tables/ppl.parquet",
        csv="results/tables/ppl.csv",
        md=report(
            "results/tables/ppl.md",
            caption="../report/ppl_table.rst",
            category="Perplexity",
        ),
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
    params:
        models=MODELS,
    shell:
        "python -m ropelens aggregate-ppl {input} --prefix results/tables/ppl"
        " --models {params.models} --html {output.html} --png {output.png} 2> {log}"


rule attention_report:
    input:
        attention_cells(),
    output:
        table="results/tables/attention_js.parquet",
        csv="results/tables/attention_js.csv",
        md=report(
            "results/tables/attention_js.md",
            caption="../report/attention_js.rst",
            category="Attention",
        ),
        layers="results/tables/attention_js_layers.parquet",
        html=report(
            expand("results/figures/attention_{model}.html", model=MODELS),
            caption="../report/attention.rst",
            category="Attention",
        ),
        png=report(
            expand("results/figures/attention_{model}.png", model=MODELS),
            caption="../report/attention.rst",
            category="Attention",
        ),
        distance_html=report(
            expand("results/figures/attention_distance_{model}.html", model=MODELS),
            caption="../report/attention_distance.rst",
            category="Attention",
        ),
        distance_png=report(
            expand("results/figures/attention_distance_{model}.png", model=MODELS),
            caption="../report/attention_distance.rst",
            category="Attention",
        ),
        js_html=report(
            expand("results/figures/attention_js_{model}.html", model=MODELS),
            caption="../report/attention_js.rst",
            category="Attention",
        ),
        js_png=report(
            expand("results/figures/attention_js_{model}.png", model=MODELS),
            caption="../report/attention_js.rst",
            category="Attention",
        ),
    log:
        "logs/report/attention.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        reference=q(config["attention"]["reference"]),
        models=MODELS,
        plot_lengths=q(config["attention"].get("plot_lengths")),
    shell:
        "python -m ropelens aggregate-attention {input} --prefix results/tables/attention_js"
        " --reference {params.reference:q} --models {params.models} --html {output.html}"
        " --png {output.png} --distance-html {output.distance_html}"
        " --distance-png {output.distance_png} --js-html {output.js_html}"
        " --js-png {output.js_png} --plot-lengths {params.plot_lengths:q} 2> {log}"


rule sinks_report:
    input:
        attention_cells(),
    output:
        table="results/tables/sinks.parquet",
        csv="results/tables/sinks.csv",
        md=report(
            "results/tables/sinks.md",
            caption="../report/sinks.rst",
            category="Attention",
        ),
        layers="results/tables/sinks_layers.parquet",
        html=report(
            expand("results/figures/sinks_{model}.html", model=MODELS),
            caption="../report/sinks.rst",
            category="Attention",
        ),
        png=report(
            expand("results/figures/sinks_{model}.png", model=MODELS),
            caption="../report/sinks.rst",
            category="Attention",
        ),
    log:
        "logs/report/sinks.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        models=MODELS,
    shell:
        "python -m ropelens aggregate-sinks {input} --prefix results/tables/sinks"
        " --models {params.models} --html {output.html} --png {output.png} 2> {log}"


# One self-contained page: every table and chart (interactive, PNG fallback) and provenance.
# Its inputs are report_outputs() but itself, so a new aggregate listed there joins the page.
rule html_report:
    input:
        lambda wc: [f for f in report_outputs() if f not in rules.html_report.output],
    output:
        report(
            "results/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
    log:
        "logs/report/html.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        captions=str(Path(workflow.basedir) / "report"),
        config=q({k: v for k, v in config.items() if k != "resources"}),
        lock=str(Path(workflow.basedir) / "requirements" / "lock.txt"),
    shell:
        "python -m ropelens report {input} --out {output} --captions {params.captions:q}"
        " --config-json {params.config:q} --results results --models resources"
        " --lock {params.lock:q} 2> {log}"


rule needle_report:
    input:
        needle_cells(),
    output:
        table="results/tables/needle.parquet",
        csv="results/tables/needle.csv",
        md=report(
            "results/tables/needle.md",
            caption="../report/needle_table.rst",
            category="Needle in a Haystack",
        ),
        cpt="results/tables/needle_cpt.parquet",
        cpt_csv="results/tables/needle_cpt.csv",
        cpt_md=report(
            "results/tables/needle_cpt.md",
            caption="../report/needle_cpt.rst",
            category="Needle in a Haystack",
        ),
        html=report(
            expand("results/figures/needle_{model}.html", model=MODELS),
            caption="../report/needle.rst",
            category="Needle in a Haystack",
        ),
        png=report(
            expand("results/figures/needle_{model}.png", model=MODELS),
            caption="../report/needle.rst",
            category="Needle in a Haystack",
        ),
        strata="results/tables/needle_entropy_strata.parquet",
        strata_csv="results/tables/needle_entropy_strata.csv",
        strata_md=report(
            "results/tables/needle_entropy_strata.md",
            caption="../report/needle_table.rst",
            category="Needle in a Haystack",
        ),
        strata_html=report(
            expand("results/figures/needle_entropy_strata_{model}.html", model=MODELS),
            caption="../report/needle_table.rst",
            category="Needle in a Haystack",
        ),
        strata_png=report(
            expand("results/figures/needle_entropy_strata_{model}.png", model=MODELS),
            caption="../report/needle_table.rst",
            category="Needle in a Haystack",
        ),
    log:
        "logs/report/needle.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        models=MODELS,
    shell:
        "python -m ropelens aggregate-needle {input} --prefix results/tables/needle"
        " --models {params.models} --html {output.html} --png {output.png}"
        " --strata-html {output.strata_html} --strata-png {output.strata_png} 2> {log}"
