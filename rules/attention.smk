# Attention statistics: one cell per (model, method, length), streamed at any length.


rule attention:
    input:
        tokens=cell_data("attention"),
        model=model_inputs,
    output:
        "results/attention/model={model}/method={method}/length={length}.parquet",
    log:
        "logs/attention/model={model}/method={method}/length={length}.log",
    group:  # short cells are bundled into one cluster job (rules/resources.smk)
        cell_group
    conda:
        "../envs/ropelens.yaml"
    threads: config["runtime"]["threads"]
    resources:  # cluster resources by cell length (rules/resources.smk)
        **CELL_RESOURCES,
    params:
        spec=cell_spec,
        data=data_spec("attention"),
        settings=q(rlgrid.cell_settings(config, "attention")),
    shell:
        "python -m ropelens attention --spec {params.spec:q} --settings {params.settings:q}"
        " --tokens {input.tokens} --length {wildcards.length} --threads {threads}"
        " --out {output} 2> {log}"
