# Synthetic long-context tasks (config `tasks:`): one cell per (task, model, method, length,
# depth), with the attention entropy and the mass on every planted span; none without `tasks:`.


rule task:
    input:
        haystack=task_haystack,
        model=model_inputs,
    output:
        "results/tasks/task={task}/model={model}/method={method}/length={length}/depth={depth}.parquet",
    log:
        "logs/tasks/task={task}/model={model}/method={method}/length={length}/depth={depth}.log",
    group:  # short cells are bundled into one cluster job (rules/resources.smk)
        cell_group
    conda:
        "../envs/ropelens.yaml"
    threads: config["runtime"]["threads"]
    resources:  # cluster resources by cell length (rules/resources.smk)
        **CELL_RESOURCES,
    params:
        spec=cell_spec,
        data=task_data_spec,
        settings=signed(lambda wc: q(rlgrid.task_settings(config, wc.task))),
        haystack=signed(
            lambda wc, input: f"--haystack {input.haystack}" if input.haystack else ""
        ),
    shell:
        "python -m ropelens task --task {wildcards.task} --spec {params.spec:q}"
        " --settings {params.settings:q} {params.haystack} --length {wildcards.length}"
        " --depth {wildcards.depth} --threads {threads} --out {output} 2> {log}"


rule task_report:
    input:
        task_cells(),
    output:
        table="results/tables/tasks.parquet",
        csv="results/tables/tasks.csv",
        md=report(
            "results/tables/tasks.md",
            caption="../report/tasks_table.rst",
            category="Synthetic tasks",
        ),
        tables=expand(
            "results/tables/tasks_{name}.{ext}",
            name=["entropy", "distractors", "hops"],
            ext=["parquet", "csv", "md"],
        ),
        html=report(
            task_charts("html"),
            caption="../report/tasks.rst",
            category="Synthetic tasks",
        ),
        png=report(
            task_charts("png"),
            caption="../report/tasks.rst",
            category="Synthetic tasks",
        ),
    log:
        "logs/report/tasks.log",
    conda:
        "../envs/ropelens.yaml"
    params:
        models=MODELS,
        tasks=TASK_NAMES,
    shell:
        "python -m ropelens aggregate-tasks {input} --prefix results/tables/tasks"
        " --models {params.models} --tasks {params.tasks} --html {output.html}"
        " --png {output.png} 2> {log}"
