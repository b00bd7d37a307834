# ropelens: RoPE context-extension methods, seen through attention (after Zhong et al. 2024).
# This file is the table of contents; each stage lives in rules/, every rule calls the ropelens CLI.

from snakemake.utils import min_version

min_version("9.0")


# The config: exactly the `--configfile` files (plus `--config` overrides); config.yaml, the
# offline default, only when none is given (rules/common.smk loads and validates it).
include: "rules/common.smk"
include: "rules/resources.smk"


wildcard_constraints:
    model=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    method=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    corpus=r"[A-Za-z0-9][A-Za-z0-9_.+-]*",
    length=r"\d+",
    depth=r"\d+(\.\d+)?",
    task=r"[a-z_]+",


include: "rules/toy.smk"
include: "rules/models.smk"
include: "rules/data.smk"
include: "rules/ppl.smk"
include: "rules/attention.smk"
include: "rules/needle.smk"
include: "rules/tasks.smk"
include: "rules/report.smk"


# Cells are targets too: a deleted cell is recomputed (and the aggregates that read it).
rule all:
    default_target: True
    input:
        ppl_cells(),
        attention_cells(),
        needle_cells(),
        task_cells(),
        report_outputs(),
