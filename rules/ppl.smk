# Perplexity: one cell per (model, method, length).


rule ppl:
    input:
        tokens=lambda wc: f"results/data/tokens/{config['ppl']['corpus']}/model={wc.model}.parquet",
        model=model_inputs,
    output:
        "results/ppl/model={model}/method={method}/length={length}.parquet",
    log:
        "logs/ppl/model={model}/method={method}/length={length}.log",
    conda:
        "../envs/ropelens.yaml"
    threads: config["runtime"]["threads"]
    params:
        spec=cell_spec,
        settings=q(config["ppl"]),
    shell:
        "python -m ropelens ppl --spec {params.spec:q} --settings {params.settings:q} --tokens {input.tokens}"
        " --length {wildcards.length} --threads {threads} --out {output} 2> {log}"
