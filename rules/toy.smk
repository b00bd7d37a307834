# Models the workflow builds itself. A tiny random-init LLaMA (smoke runs and tests).


rule tiny_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/models/{model}.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        spec=lambda wc: q(config["models"][wc.model]["tiny"]),
        pretrained_length=lambda wc: config["models"][wc.model]["pretrained_length"],
    shell:
        "python -m ropelens make-tiny --out {output} --pretrained-length {params.pretrained_length}"
        " --spec {params.spec:q} 2> {log}"
