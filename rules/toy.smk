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


# The toy model zoo (src/ropelens/toytrain.py): a small LLaMA pretrained with plain RoPE at its
# pretrained_length L0 (rule pretrain), then continually pretrained with a method at the method's
# cpt_length (rule continual). What and how long to train: the config's `train:` blocks.


rule pretrain:
    input:
        unpack(lambda wc: train_inputs(pretrain_settings(wc))),
    output:
        directory("resources/zoo/{model}/base"),
    log:
        "logs/zoo/{model}/base.log",
    conda:
        "../envs/ropelens.yaml"
    threads: lambda wc: pretrain_settings(wc).get("threads", 1)
    params:
        settings=lambda wc: q(pretrain_settings(wc)),
        length=lambda wc: config["models"][wc.model]["pretrained_length"],
        haystack=haystack_arg,
        device=config["runtime"]["device"],
    shell:
        "python -m ropelens pretrain --settings {params.settings:q} --length {params.length}"
        " --corpus {input.corpus} {params.haystack} --device {params.device}"
        " --threads {threads} --out {output} 2> {log}"


rule continual:
    input:
        unpack(continual_inputs),
    output:
        directory("resources/zoo/{model}/cpt/{method}"),
    log:
        "logs/zoo/{model}/cpt/{method}.log",
    conda:
        "../envs/ropelens.yaml"
    threads: lambda wc: cpt_settings(wc).get("threads", 1)
    params:
        spec=continual_spec,
        settings=lambda wc: q(cpt_settings(wc)),
        length=lambda wc: config["methods"][wc.method]["cpt_length"],
        haystack=haystack_arg,
        device=config["runtime"]["device"],
    shell:
        "python -m ropelens continual --spec {params.spec:q} --settings {params.settings:q}"
        " --length {params.length} --corpus {input.corpus} {params.haystack}"
        " --device {params.device} --threads {threads} --out {output} 2> {log}"


# Every model the config trains (`make zoo` with configs/zoo.yaml, then `ropelens ship-zoo`).
rule zoo:
    input:
        zoo_dirs(),
