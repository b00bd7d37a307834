# Needle in a Haystack: one cell per (model, method, length, depth), with the attention entropy of
# the answering queries.


rule needle:
    input:
        haystack=cell_data("needle"),
        model=model_inputs,
    output:
        "results/needle/model={model}/method={method}/length={length}/depth={depth}.parquet",
    log:
        "logs/needle/model={model}/method={method}/length={length}/depth={depth}.log",
    group:  # short cells are bundled into one cluster job (rules/resources.smk)
        cell_group
    conda:
        "../envs/ropelens.yaml"
    threads: config["runtime"]["threads"]
    resources:  # cluster resources by cell length (rules/resources.smk)
        **CELL_RESOURCES,
    params:
        spec=cell_spec,
        data=data_spec("needle"),
        settings=q(rlgrid.cell_settings(config, "needle")),
    shell:
        "python -m ropelens needle --spec {params.spec:q} --settings {params.settings:q}"
        " --haystack {input.haystack} --length {wildcards.length} --depth {wildcards.depth}"
        " --threads {threads} --out {output} 2> {log}"
