# Models from GGUF files (src/ropelens/gguf.py): converted once into a standard Hugging Face
# directory (float32 weights, tokenizer with its chat template, ropelens_gguf.json provenance)
# that every cell of the model loads.


rule convert_gguf:
    input:
        gguf=lambda wc: gguf_file(wc.model),
    output:
        directory("resources/gguf/{model}"),
    log:
        "logs/models/gguf/{model}.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        source=lambda wc: q(config["models"][wc.model]["gguf"]),
    shell:
        "python -m ropelens convert-gguf --source {params.source:q} --out {output} 2> {log}"
