# Corpora are materialised once, then tokenised once per model's tokenizer.


rule corpus:
    output:
        "results/data/corpora/{corpus}.parquet",
    log:
        "logs/data/corpus/{corpus}.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        spec=lambda wc: q(config["corpora"][wc.corpus]),
    shell:
        "python -m ropelens corpus --spec {params.spec:q} --out {output} 2> {log}"


rule tokenize:
    input:
        corpus="results/data/corpora/{corpus}.parquet",
        model=model_inputs,
    output:
        "results/data/tokens/{corpus}/model={model}.parquet",
    log:
        "logs/data/tokens/{corpus}/{model}.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        source=lambda wc: q(tokenizer_source(wc.model)),
    shell:
        "python -m ropelens tokenize --corpus {input.corpus} --source {params.source:q} --out {output} 2> {log}"
