import json
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ropelens import config as rlconfig  # noqa: E402
from ropelens.errors import ConfigError  # noqa: E402

# --- configuration: one line naming the key and the fix, before any job starts ------------------
try:
    config = rlconfig.prepare(config)
except ConfigError as e:
    sys.exit(f"ropelens: config error: {e}")
validate(config, str(rlconfig.SCHEMA_PATH))

# --- jobs call the ropelens CLI as `python -m ropelens` from this checkout (src/) ---------------
# Jobs inherit the environment (cluster nodes re-read this file). Without conda, the interpreter
# running Snakemake goes first on PATH, so an unactivated venv works too.
rlconfig.export_job_environment(
    Path(workflow.basedir) / "src",
    (
        None
        if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
        else sys.executable
    ),
)
RL = "python -m ropelens"
ENV = "../envs/ropelens.yaml"

PAIRS = rlconfig.model_method_pairs(config)
MODELS = list(config["models"])
LENGTHS = config["lengths"]


def q(obj):
    """A JSON parameter (pass it to the shell with {params.x:q})."""
    return json.dumps(obj, sort_keys=True)


def cell_spec(wildcards):
    return q(rlconfig.cell_spec(config, wildcards.model, wildcards.method))


def model_inputs(wildcards):
    """Model directories the workflow builds itself and that this cell loads."""
    if "method" in wildcards.keys():
        return rlconfig.built_inputs(config, wildcards.model, wildcards.method)
    base = rlconfig.model_dir(config, wildcards.model)
    return [base] if base else []


def gguf_file(model):
    """The GGUF file a model converts from (rules/models.smk; checked at plan time)."""
    from ropelens import gguf

    return str(gguf.locate(config["models"][model]["gguf"], f"models.{model}.gguf"))


def tokenizer_source(model):
    m = config["models"][model]
    built = rlconfig.model_dir(config, model)
    if built:
        return {"path": built}
    return {k: m[k] for k in ("path", "hub", "revision") if k in m}


def ppl_cells():
    return [
        f"results/ppl/model={m}/method={meth}/length={length}.parquet"
        for m, meth in PAIRS
        for length in LENGTHS
    ]


def attention_cells():
    return [
        f"results/attention/model={m}/method={meth}/length={length}.parquet"
        for m, meth, length in rlconfig.attention_cells(config)
    ]


def needle_cells():
    return [
        f"results/needle/model={m}/method={meth}/length={length}/depth={depth}.parquet"
        for m, meth, length, depth in rlconfig.needle_cells(config)
    ]


def report_outputs():
    return [
        *rules.ppl_table.output,
        *rules.attention_report.output,
        *rules.sinks_report.output,
        *rules.needle_report.output,
        *rules.html_report.output,
    ]


# --- the toy zoo (rules/toy.smk): what a train block reads --------------------------------------


def corpus_file(name):
    """The materialised corpus `name` (rule corpus's output)."""
    return rules.corpus.output[0].format(corpus=name)


def train_inputs(settings):
    """Corpus Parquet files a train block reads (LM corpus, haystack corpus)."""
    out = {"corpus": corpus_file(settings["corpus"])}
    if settings.get("haystack"):
        out["haystack"] = corpus_file(settings["haystack"])
    return out


def pretrain_settings(wildcards):
    return config["models"][wildcards.model]["train"]


def cpt_settings(wildcards):
    return config["methods"][wildcards.method]["checkpoints"][wildcards.model]["train"]


def continual_inputs(wildcards):
    inputs = train_inputs(cpt_settings(wildcards))
    base = rlconfig.model_dir(config, wildcards.model)
    if base:
        inputs["base"] = base
    return inputs


def continual_spec(wildcards):
    """The cell spec of (model, method) with the base model as source: the run loads the base
    with the method applied exactly as evaluation does."""
    spec = rlconfig.cell_spec(config, wildcards.model, wildcards.method)
    return q({**spec, "source": tokenizer_source(wildcards.model)})


def haystack_arg(wildcards, input):
    return f"--haystack {input.haystack}" if "haystack" in input.keys() else ""
