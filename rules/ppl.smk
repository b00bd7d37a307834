# Perplexity: one cell per (model, method, length).


rule ppl:
    input:
        tokens=cell_data("ppl"),
        model=model_inputs,
    output:
        "results/ppl/model={model}/method={method}/length={length}.parquet",
    log:
        "logs/ppl/model={model}/method={method}/length={length}.log",
    group:  # short cells are bundled into one cluster job (rules/resources.smk)
        cell_group
    conda:
        "../envs/ropelens.yaml"
    threads: config["runtime"]["threads"]
    resources:  # cluster resources by cell length (rules/resources.smk)
        **CELL_RESOURCES,
    params:
        spec=cell_spec,
        data=data_spec("ppl"),
        settings=q(config["ppl"]),
    shell:
        "python -m ropelens ppl --spec {params.spec:q} --settings {params.settings:q} --tokens {input.tokens}"
        " --length {wildcards.length} --threads {threads} --out {output} 2> {log}"
