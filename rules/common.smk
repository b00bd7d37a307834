import json
import os
import sys
from functools import cache
from pathlib import Path

from snakemake.common import get_function_params, overwrite_function_params
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import update_config, validate

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from ropelens import config as rlconfig  # noqa: E402
from ropelens import grid as rlgrid  # noqa: E402
from ropelens import preflight  # noqa: E402
from ropelens import runner_client  # noqa: E402
from ropelens import zoo as rlzoo  # noqa: E402
from ropelens.errors import ConfigError  # noqa: E402

# --- configuration: one line naming the key and the fix, before any job starts ------------------
# `--configfile` replaces the default grid (Snakemake would merge it into config.yaml's); without
# one, config.yaml of the working directory (else the shipped one) is read, `--config` on top.
try:
    if not workflow.overwrite_configfiles:
        DEFAULT_CONFIG = rlconfig.default_config_path(Path("."), Path(workflow.basedir))
        default = rlconfig.load_yaml(DEFAULT_CONFIG)
        update_config(default, config)  # --config key=value overrides win
        config = default
        workflow.configfiles.append(str(DEFAULT_CONFIG))
    update_config(config, rlconfig.typed_overrides(workflow.config_settings.config))
    config = rlconfig.prepare(config)
except ConfigError as e:
    sys.exit(f"ropelens: config error: {e}")
validate(config, str(rlconfig.SCHEMA_PATH))
# a cell file that lost its end (same mtime) is not "up to date": name it before planning
if workflow.is_main_process:
    in_the_way = preflight.files_in_the_way()
    if in_the_way:
        sys.exit(f"ropelens: error: {in_the_way}")
    damaged = preflight.damaged_cells("results")
    if damaged:
        sys.exit(
            f"ropelens: error: {len(damaged)} damaged cell file(s) (first: {damaged[0]}); "
            "run `ropelens verify results --delete`, then rerun to recompute exactly those"
        )


onstart:
    # a real run (not -n): the folders its jobs write can be written (a read-only results
    # folder is one line here, not an OSError of the first job) ...
    problem = preflight.unwritable(run_outputs(workflow.dag))
    if problem:
        sys.exit(f"ropelens: error: {problem}")
    # ... and what it downloads must be in the cache when the hub is offline
    problems = preflight.offline_problems(config, needed_from_hub(workflow.dag))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        sys.exit(f"ropelens: config error: {problems[0]}{more}")


onsuccess:
    runner_client.stop()


onerror:
    # each failed job's one-line reason (the last line of its log) on Snakemake's stderr too
    for line in failed_job_lines(workflow):
        print(line, file=sys.stderr)
    runner_client.stop()


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


# The warm runner (runtime.warm, src/ropelens/runner.py): this process's cells share one runner
# that imports torch once and keeps their models; each cell runs in a fork of it. A Slurm job's
# batch Snakemake starts its own at once (the cells of a bundle run as job steps, each its own
# Snakemake, and share it). The runner ends with this process (and at onsuccess/onerror).
def target_rules():
    """The rules of a cluster job's ``--target-jobs`` (read from its command line when the DAG
    settings are not there yet)."""
    specs = getattr(workflow.dag_settings, "target_jobs", None)
    if specs:
        return {t.rulename for t in specs}
    rules, taking = set(), False
    for arg in sys.argv:
        if arg.startswith("--"):
            taking = arg == "--target-jobs"
        elif taking:
            rules.add(arg.split(":")[0])
    return rules


runner_client.export_for_workflow(
    config["runtime"],
    start=bool(os.environ.get("SLURM_JOB_ID"))
    and workflow.remote_exec
    and bool(target_rules() & set(runner_client.CELL_COMMANDS)),
)

PAIRS = rlgrid.model_method_pairs(config)
MODELS = list(config["models"])
LENGTHS = config["lengths"]


def q(obj):
    """A JSON parameter (pass it to the shell with {params.x:q})."""
    return json.dumps(obj, sort_keys=True)


def signed(func):
    """``func`` with its parameters read once (Snakemake reads the signature of an input,
    param, resource or group function, with inspect.signature, twice per job)."""
    overwrite_function_params(func, get_function_params(func))
    return func


@signed
def cell_spec(wildcards):
    return _cell_spec(wildcards.model, wildcards.method)


@cache
def _cell_spec(model, method):
    return q(rlgrid.cell_spec(config, model, method))


@signed
def model_inputs(wildcards):
    """Model directories the workflow builds itself and that this cell loads."""
    if "method" in wildcards.keys():
        return rlgrid.built_inputs(config, wildcards.model, wildcards.method)
    base = rlgrid.model_dir(config, wildcards.model)
    return [base] if base else []


def gguf_file(model):
    """The GGUF file a model converts from (rules/models.smk; checked at plan time)."""
    from ropelens import gguf

    return str(gguf.locate(config["models"][model]["gguf"], f"models.{model}.gguf"))


def tokenizer_source(model):
    m = config["models"][model]
    built = rlgrid.model_dir(config, model)
    if built:
        return {"path": built}
    return {k: m[k] for k in ("path", "hub", "revision") if k in m}


# --- a cell's data input (rules ppl, attention, needle) --------------------------------------------
# Corpora and token files are regenerated identically from the config, so their mtime never makes
# a finished cell stale (ancient), and a finished cell does not wait for data that was removed
# (rm -r results/data; before_update: no producer): adding one length then runs only its cells.
# What the data is made of is a cell param instead (data_spec): changing a corpus reruns its cells.


def cell_data(kind):
    """Input function: the corpus (needle) or token file (ppl, attention) of a cell of ``kind``."""

    @signed
    def data(wildcards):
        wc = dict(wildcards.items())
        cell = f"results/{kind}/{CELL_PATHS[kind].format(**wc)}"
        if kind == "needle":
            path = corpus_file(config["needle"]["haystack"])
        else:
            path = f"results/data/tokens/{config[kind]['corpus']}/model={wc['model']}.parquet"
        if Path(cell).exists() and not Path(path).exists():
            return ancient(before_update(path))
        return ancient(path)

    return data


CELL_PATHS = {
    "ppl": "model={model}/method={method}/length={length}.parquet",
    "attention": "model={model}/method={method}/length={length}.parquet",
    "needle": "model={model}/method={method}/length={length}/depth={depth}.parquet",
}


def data_spec(kind):
    """The definition of a cell's corpus (a param: a changed corpus reruns the cells reading it)."""
    corpus = (
        config["needle"]["haystack"] if kind == "needle" else config[kind]["corpus"]
    )
    return q(config["corpora"][corpus])


def ppl_cells():
    return [
        f"results/ppl/model={m}/method={meth}/length={length}.parquet"
        for m, meth in PAIRS
        for length in LENGTHS
    ]


def attention_cells():
    return [
        f"results/attention/model={m}/method={meth}/length={length}.parquet"
        for m, meth, length in rlgrid.attention_cells(config)
    ]


def needle_cells():
    return [
        f"results/needle/model={m}/method={meth}/length={length}/depth={depth}.parquet"
        for m, meth, length, depth in rlgrid.needle_cells(config)
    ]


def report_outputs():
    tasks = [*rules.task_report.output] if TASK_NAMES else []
    return [
        *rules.ppl_table.output,
        *rules.attention_report.output,
        *rules.sinks_report.output,
        *rules.needle_report.output,
        *tasks,
        *rules.html_report.output,
    ]


# --- synthetic tasks (rules/tasks.smk) -------------------------------------------------------------
TASK_NAMES = rlgrid.enabled_tasks(config)


def task_cells():
    return [
        f"results/tasks/task={t}/model={m}/method={x}/length={n}/depth={d}.parquet"
        for t, m, x, n, d in rlgrid.task_cells(config)
    ]


def task_charts(ext):
    """One heatmap per model x task (models outer: the order aggregate-tasks pairs them)."""
    return [f"results/figures/tasks_{t}_{m}.{ext}" for m in MODELS for t in TASK_NAMES]


@signed
def task_haystack(wildcards):
    """The task's corpus file ([] for the passkey filler), as cell_data does for needle cells."""
    from ropelens.tasks import FILLER

    name = rlgrid.task_entry(config, wildcards.task)["haystack"]
    if name == FILLER:
        return []
    wc = dict(wildcards.items())
    cell = f"results/tasks/task={wc['task']}/{CELL_PATHS['needle'].format(**wc)}"
    path = corpus_file(name)
    if Path(cell).exists() and not Path(path).exists():
        return ancient(before_update(path))
    return ancient(path)


@signed
def task_data_spec(wildcards):
    """The definition of the task's haystack (a param: a changed corpus reruns its cells)."""
    name = rlgrid.task_entry(config, wildcards.task)["haystack"]
    return q(config["corpora"].get(name, name))


# --- the toy zoo (rules/toy.smk): what a train block reads --------------------------------------


@cache
def zoo_dirs():
    """The model directories the config's train blocks train (rule zoo, `make zoo`)."""
    return [trained for trained, _ in rlzoo.trained_dirs(config)]


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
    base = rlgrid.model_dir(config, wildcards.model)
    if base:
        inputs["base"] = base
    return inputs


def continual_spec(wildcards):
    """The cell spec of (model, method) with the base model as source: the run loads the base
    with the method applied exactly as evaluation does."""
    spec = rlgrid.cell_spec(config, wildcards.model, wildcards.method)
    return q({**spec, "source": tokenizer_source(wildcards.model)})


def haystack_arg(wildcards, input):
    return f"--haystack {input.haystack}" if "haystack" in input.keys() else ""


# --- what a run needs from the hub, and why its jobs failed ---------------------------------------


def needed_from_hub(dag):
    """Hub models and datasets behind the jobs this run will execute."""
    pairs, models, corpora = set(), set(), set()
    for job in dag.needrun_jobs():
        wc = dict(job.wildcards)
        if "model" in wc and "method" in wc:
            pairs.add((wc["model"], wc["method"]))
        elif "model" in wc:
            models.add(wc["model"])
        if "corpus" in wc:
            corpora.add(wc["corpus"])
    models |= {m for m, _ in pairs}
    return preflight.hub_needs(config, sorted(pairs), sorted(models), sorted(corpora))


def run_outputs(dag):
    """The files the jobs of this run will write: their outputs and logs."""
    return [str(f) for job in dag.needrun_jobs() for f in [*job.output, *job.log]]


def failed_job_lines(workflow):
    """``ropelens: <rule> <wildcards>: <last line of its log>`` for every failed job."""
    scheduler = getattr(workflow, "scheduler", None)
    jobs = [
        j for g in getattr(scheduler, "failed", ()) for j in getattr(g, "jobs", [g])
    ]
    for job in jobs:
        for log in job.log:
            text = Path(log).read_text(errors="replace") if Path(log).is_file() else ""
            lines = [ln for ln in text.splitlines() if ln.strip()]
            if lines:
                cell = ", ".join(f"{k}={v}" for k, v in job.wildcards.items())
                yield f"ropelens: {job.rule.name} {cell}: {lines[-1].strip()} (log: {log})"
