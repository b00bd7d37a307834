# ropelens: RoPE context-extension methods, seen through attention (after Zhong et al. 2024).
# This file is the table of contents; each stage lives in rules/, every rule calls the ropelens CLI.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/toy.smk"
include: "rules/data.smk"
include: "rules/ppl.smk"
include: "rules/report.smk"


rule all:
    input:
        report_outputs(),
    default_target: True
