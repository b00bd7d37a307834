"""The warm runner (ropelens.runner, ropelens.runner_client): cells computed in forks of one
process equal the cold one-process cells; a failing or killed cell fails only itself; the memory
budget evicts; nothing is left running after Snakemake succeeds, fails or is killed.

The equality cells run in an order that exposes stale per-process state: every method's longer
cell first, then a shorter one through the same runner and model (dynamic NTK keeps the frequencies
of the longest sequence it saw above the pretrained length; test_stale_state_is_real shows that a
plain reused model gets the shorter cell wrong). The model is peaked (q/k weights x archs.PEAK) so
that attention is far from uniform.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ropelens import config as rlconfig
from ropelens import grid as rlgrid
from ropelens import runner_client

from . import archs
from .conftest import REPO, token_table
from .test_incremental import LOCAL, MICRO, cells, write_config

METHODS = {
    "rope": {},
    "pi": {"factor": 4},
    "ntk": {"factor": 4},
    "yarn": {"factor": 4},
    "dynamic-ntk": {"factor": 4},
    "llama3": {"factor": 4},
}
LONG, SHORT = 512, 256  # both above the model's pretrained 128: dynamic NTK scales at each
TASK = "multi_key"  # the task cells compared: the needle's decoding plus distractor spans


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A peaked tiny LLaMA, tokens, a haystack and the settings of the micro config."""
    root = tmp_path_factory.mktemp("runner")
    model = archs.write("llama-gqa", root / "model")
    pretrained = json.loads((model / "config.json").read_text())["max_position_embeddings"]
    import random

    rng = random.Random(0)
    docs = [[rng.randrange(3, 250) for _ in range(LONG + 40)] for _ in range(3)]
    pq.write_table(token_table(docs), root / "tokens.parquet")
    long_docs = [[rng.randrange(3, 250) for _ in range(4096)] for _ in range(2)]
    pq.write_table(token_table(long_docs), root / "long.parquet")
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "river",
        "stone",
        "cloud",
        "paper",
        "lamp",
        "window",
        "garden",
        "music",
    ]
    text = ". ".join(" ".join(rng.choice(words) for _ in range(9)) for _ in range(400)) + "."
    pq.write_table(pa.table({"doc_id": ["h0"], "text": [text]}), root / "haystack.parquet")
    cfg = rlconfig.validate({**MICRO, "tasks": {"lengths": [SHORT], TASK: {"distractors": 2}}})
    settings = {
        "ppl": cfg["ppl"],
        "attention": rlconfig.cell_settings(cfg, "attention"),
        "needle": rlconfig.cell_settings(cfg, "needle"),
        "task": rlgrid.task_settings(cfg, TASK),
    }
    return {"root": root, "model": model, "pretrained": pretrained, "settings": settings}


def spec(inputs, method: str) -> dict:
    return {
        "model": "peaked",
        "method": method,
        "source": {"path": str(inputs["model"])},
        "pretrained_length": inputs["pretrained"],
        "registry": method,
        "params": METHODS.get(method, {}),
        "runtime": {"device": "cpu", "dtype": "float32"},
    }


def argv(inputs, kind: str, method: str, length: int, out, tokens="tokens.parquet", threads=1):
    root = inputs["root"]
    args = [kind, "--spec", json.dumps(spec(inputs, method))]
    args += ["--settings", json.dumps(inputs["settings"][kind]), "--length", str(length)]
    if kind in ("needle", "task"):
        args += ["--haystack", str(root / "haystack.parquet"), "--depth", "50"]
        args += ["--task", TASK] if kind == "task" else []
    else:
        args += ["--tokens", str(root / tokens)]
    return [*args, "--threads", str(threads), "--out", str(out)]


def short_socket() -> str:
    return f"{tempfile.mkdtemp(prefix='rl-', dir='/tmp')}/r.sock"  # under AF_UNIX's 108 chars


def cell_env(path: str | None, memory_mb: float = 4000) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROPELENS_RUNNER")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    if path:
        env.update(ROPELENS_RUNNER=path, ROPELENS_RUNNER_OWNER=str(os.getpid()))
        env.update(ROPELENS_RUNNER_MEMORY_MB=str(memory_mb), ROPELENS_RUNNER_IDLE_SECONDS="120")
    return env


def run(args, env, cwd, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ropelens", *args]
    kwargs = {"capture_output": True, "text": True, "timeout": 600, **kwargs}
    return subprocess.run(cmd, env=env, cwd=cwd, **kwargs)


def events(cwd: Path, name: str | None = None) -> list[dict]:
    lines = [
        json.loads(line)
        for log in sorted((Path(cwd) / "logs/runner").glob("*.log"))
        for line in log.read_text().splitlines()
        if line.startswith("{")
    ]
    return [e for e in lines if name is None or e["event"] == name]


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a container's init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if running(p)]


def refused(path: str, timeout: float = 10.0) -> bool:
    """The socket at ``path`` refuses connections: a SIGKILLed runner's listener stays open until
    its last thread exits, after /proc shows its main thread a zombie."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock = runner_client._connect(path)
        if sock is None:
            return True
        sock.close()
        time.sleep(0.05)
    return False


def runner_pids(workdir: Path) -> set[int]:
    """The runners and cells of a runner log (a line of a client has no runner)."""
    runners = {e["runner"] for e in events(workdir) if "runner" in e}
    return runners | {e["pid"] for e in events(workdir, "cell")}


def stop_all(cwd: Path, path: str) -> None:
    runner_client.stop(path)
    assert wait_gone(runner_pids(cwd)) == []


# --- equality ------------------------------------------------------------------------------------


def test_warm_cells_equal_cold_ones(inputs, tmp_path):
    path = short_socket()
    warm, cold = tmp_path / "warm", tmp_path / "cold"
    warm.mkdir()
    cold.mkdir()
    order = [("ppl", m, n) for m in METHODS for n in (LONG, SHORT)]
    order += [(k, "dynamic-ntk", n) for k in ("attention", "needle", "task") for n in (LONG, SHORT)]
    try:
        for kind, method, length in order:
            out = warm / f"{kind}-{method}-{length}.parquet"
            proc = run(argv(inputs, kind, method, length, out), cell_env(path), tmp_path)
            assert proc.returncode == 0, proc.stderr[-2000:]
        served = events(tmp_path, "done")
        assert [e["exit"] for e in served] == [0] * len(order)  # every cell went warm
        loads = [(e["model"], e["method"]) for e in events(tmp_path, "load")]
        assert sorted(loads) == sorted(("peaked", m) for m in METHODS)  # one load per method
    finally:
        stop_all(tmp_path, path)
    # the cold one-process path: the shorter cells (after a longer one when warm) and dynamic
    # NTK's longer one
    compare = [c for c in order if c[2] == SHORT] + [("ppl", "dynamic-ntk", LONG)]

    def one(cell):
        out = cold / "{}-{}-{}.parquet".format(*cell)
        return run(argv(inputs, *cell, out), cell_env(None), tmp_path)

    with ThreadPoolExecutor(2) as pool:
        for proc in pool.map(one, compare):
            assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "logs/runner").exists() or len(events(tmp_path, "start")) == 1
    for cell in compare:
        name = "{}-{}-{}.parquet".format(*cell)
        a, b = pq.read_table(warm / name), pq.read_table(cold / name)
        assert a.num_rows > 0 and a.equals(b), name


def test_stale_state_is_real(inputs, one_thread):
    """The order above matters: one model reused in one process gets dynamic NTK's shorter cell
    wrong (the frequencies of the longer one stay), so a runner that did not isolate cells would
    fail the equality test."""
    from ropelens import models, ppl

    tokens = pq.read_table(inputs["root"] / "tokens.parquet")
    settings = inputs["settings"]["ppl"]
    reused = models.load(spec(inputs, "dynamic-ntk")).model
    ppl.evaluate(reused, tokens, LONG, settings)
    stale = ppl.evaluate(reused, tokens, SHORT, settings)
    fresh = ppl.evaluate(models.load(spec(inputs, "dynamic-ntk")).model, tokens, SHORT, settings)
    assert stale["nll_sum"] != fresh["nll_sum"]


# --- isolation -----------------------------------------------------------------------------------


def _cell_pid(cwd: Path, out: Path, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e["pid"] for e in events(cwd, "cell") if e.get("out") == str(out)]
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"no runner cell for {out}")


def test_failing_and_killed_cells_fail_only_themselves(inputs, tmp_path):
    path = short_socket()
    env = cell_env(path)
    ok = run(argv(inputs, "ppl", "rope", SHORT, tmp_path / "a.parquet"), env, tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    try:
        # bad input: the same one line and status as the cold command
        (tmp_path / "bad.parquet").write_text("not parquet")
        bad = argv(inputs, "ppl", "rope", SHORT, tmp_path / "b.parquet", tokens="bad.parquet")
        warm_bad, cold_bad = run(bad, env, tmp_path), run(bad, cell_env(None), tmp_path)
        assert warm_bad.returncode == cold_bad.returncode == 2
        assert warm_bad.stderr == cold_bad.stderr
        assert warm_bad.stderr.startswith("ropelens: error: --tokens: ")
        # a cell killed (SIGKILL, as the OOM killer does): its client ends the same way
        out = tmp_path / "killed.parquet"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ropelens"]
            + argv(inputs, "attention", "rope", 4096, out, tokens="long.parquet"),
            env=env,
            cwd=tmp_path,
            stderr=subprocess.PIPE,
        )
        child = _cell_pid(tmp_path, out)
        os.kill(child, signal.SIGSTOP)
        os.kill(child, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL, proc.stderr.read()  # sh: 137
        assert not out.exists()
        # a client killed (Snakemake cancelling a job): the runner kills its cell
        out = tmp_path / "orphan.parquet"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ropelens"]
            + argv(inputs, "attention", "rope", 4096, out, tokens="long.parquet"),
            env=env,
            cwd=tmp_path,
        )
        child = _cell_pid(tmp_path, out)
        proc.kill()
        proc.wait()
        assert wait_gone([child]) == [] and not out.exists()
        # the runner survived all of it and serves the next cell
        again = run(argv(inputs, "ppl", "rope", SHORT, tmp_path / "c.parquet"), env, tmp_path)
        assert again.returncode == 0, again.stderr[-2000:]
        assert len(events(tmp_path, "start")) == 1 and len(events(tmp_path, "load")) == 1
        assert pq.read_table(tmp_path / "c.parquet").equals(pq.read_table(tmp_path / "a.parquet"))
    finally:
        stop_all(tmp_path, path)


def test_a_killed_runner_is_replaced_and_other_environments_run_cold(inputs, tmp_path):
    path = short_socket()
    env = cell_env(path)
    first = run(argv(inputs, "ppl", "pi", SHORT, tmp_path / "a.parquet"), env, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    try:
        (server,) = {e["runner"] for e in events(tmp_path, "start")}
        os.kill(server, signal.SIGKILL)
        assert wait_gone([server]) == [] and os.path.exists(path)  # a dead runner's socket
        assert refused(path)  # ... once its last thread is gone (the leader's zombie comes first)
        second = run(argv(inputs, "ppl", "pi", SHORT, tmp_path / "b.parquet"), env, tmp_path)
        assert second.returncode == 0, second.stderr[-2000:]
        assert len(events(tmp_path, "start")) == 2
        other = dict(env, HF_HOME=str(tmp_path / "hf"))  # read at import: not this runner's
        third = run(argv(inputs, "ppl", "pi", SHORT, tmp_path / "c.parquet"), other, tmp_path)
        assert third.returncode == 0, third.stderr[-2000:]
        assert [e["reason"] for e in events(tmp_path, "cold")] == [
            "another environment (read at import time: HF_HOME)"
        ]
        for name in ("b", "c"):
            assert pq.read_table(tmp_path / f"{name}.parquet").equals(
                pq.read_table(tmp_path / "a.parquet")
            )
    finally:
        stop_all(tmp_path, path)


@pytest.mark.parametrize("budget_mb,loads", [(4000, ["rope", "pi"]), (0, ["rope", "pi", "rope"])])
def test_memory_budget_evicts(inputs, tmp_path, budget_mb, loads):
    path = short_socket()
    env = cell_env(path, memory_mb=budget_mb)
    try:
        for i, method in enumerate(["rope", "pi", "rope"]):
            proc = run(argv(inputs, "ppl", method, SHORT, tmp_path / f"{i}.parquet"), env, tmp_path)
            assert proc.returncode == 0, proc.stderr[-2000:]
        assert [e["method"] for e in events(tmp_path, "load")] == loads
        assert len(events(tmp_path, "evict")) == (len(loads) - 1 if budget_mb == 0 else 0)
    finally:
        stop_all(tmp_path, path)


def test_forked_child_with_threads_does_not_hang(inputs):
    """libgomp cannot fork a process that ran a parallel region; the runner's parent never does
    (one thread), so its children can use several."""
    script = f"""
import os, sys, torch
from ropelens import models, runner
runner._prepare()
loaded = models.load({spec(inputs, "rope")!r})
assert torch.get_num_threads() == 1
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(2)
        x = torch.randn(768, 768)
        y = (x @ x).sum() + torch.ones(2**22).sum()
        ids = torch.arange(200).unsqueeze(0) % 250
        loaded.model(ids)
        os._exit(0 if torch.get_num_threads() == 2 and bool(torch.isfinite(y)) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
print("ok")
"""
    env = cell_env(None)
    env["OMP_NUM_THREADS"] = "2"  # the parent's default would be 2: set_num_threads(1) wins
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cell_command_and_export(monkeypatch):
    from ropelens import cli

    assert runner_client.CELL_COMMANDS == cli.CELL_COMMANDS
    assert runner_client.cell_command(["--debug", "ppl", "--spec", "{}"]) == "ppl"
    assert runner_client.cell_command(["aggregate-ppl", "x"]) is None
    assert runner_client.cell_command(["runner", "serve"]) is None
    monkeypatch.setenv("ROPELENS_RUNNER", "/tmp/inherited.sock")
    runner_client.export_for_workflow({"warm": False})
    assert "ROPELENS_RUNNER" not in os.environ
    runner_client.export_for_workflow({"warm": True, "warm_memory_mb": 10})
    path = os.environ["ROPELENS_RUNNER"]
    assert path.endswith(f"-{os.getpid()}.sock") and len(path) <= 100
    assert os.environ["ROPELENS_RUNNER_OWNER"] == str(os.getpid())
    assert os.environ["ROPELENS_RUNNER_MEMORY_MB"] == "10"


def test_no_runner_means_cold(inputs, tmp_path):
    """A socket that cannot be made (a file where its folder should be): the cell runs cold and
    says why, in its log and the runner log."""
    (tmp_path / "f").write_text("")
    env = cell_env(str(tmp_path / "f/r.sock"))
    proc = run(argv(inputs, "ppl", "rope", SHORT, tmp_path / "a.parquet"), env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_table(tmp_path / "a.parquet").num_rows > 0
    why = f"{tmp_path / 'f'} is not a folder; running this cell cold"
    assert f"ropelens: warm runner: {why}" in proc.stderr.splitlines()
    assert [(e["event"], e["reason"]) for e in events(tmp_path)] == [("cold", why)]  # no runner


# --- through Snakemake: one runner per process, nothing left behind -----------------------------


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, snakemake):
    workdir = tmp_path_factory.mktemp("warm")
    args = write_config(workdir, MICRO)
    snakemake(workdir, *args, *LOCAL)
    return workdir, args


@pytest.mark.workflow
def test_snakemake_run_loads_each_model_once_and_leaves_nothing(micro_run):
    workdir, _ = micro_run
    assert len(cells(workdir)) == 8
    logs = list((workdir / "logs/runner").glob("*.log"))
    assert len(logs) == 1  # one Snakemake process, one runner
    loads = [(e["model"], e["method"]) for e in events(workdir, "load")]
    assert sorted(loads) == [("micro", "pi"), ("micro", "rope")]
    served = events(workdir, "done")
    assert len(served) == 8 and all(e["exit"] == 0 for e in served)
    assert wait_gone(runner_pids(workdir)) == []
    assert events(workdir, "exit")[-1]["reason"] == "stopped"  # onsuccess
    (start,) = events(workdir, "start")
    assert not Path(f"{start['socket']}.lock").exists()  # removed when Snakemake exits


@pytest.mark.workflow
def test_snakemake_failure_and_kill_leave_nothing(micro_run, snakemake, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(micro_run[0], workdir, symlinks=True)
    shutil.rmtree(workdir / "logs/runner")
    args = write_config(workdir, MICRO)
    ppl = [c for c in cells(workdir) if c.startswith("results/ppl/")]
    for c in ppl:
        (workdir / c).unlink()
    tokens = next((workdir / "results/data/tokens").rglob("*.parquet"))
    good = tokens.read_bytes()
    tokens.write_bytes(b"not parquet")  # every ppl cell fails: --tokens is not Parquet
    proc = snakemake(workdir, *args, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "is not a Parquet file" in proc.stderr
    assert wait_gone(runner_pids(workdir)) == []
    assert events(workdir, "exit")[-1]["reason"] == "stopped"  # onerror
    # SIGKILL of the whole run while a cell runs: the runner and its cells end too
    tokens.write_bytes(good)
    shutil.rmtree(workdir / "logs/runner")
    exe = Path(sys.executable).with_name("snakemake")
    cmd = [str(exe), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    run_ = subprocess.Popen(
        [*cmd, "--cores", "1", "--rerun-incomplete"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not events(workdir, "cell"):
            time.sleep(0.02)
        assert events(workdir, "cell"), "no cell reached the runner"
    finally:
        os.killpg(run_.pid, signal.SIGKILL)
        run_.wait(timeout=30)
    assert wait_gone(runner_pids(workdir)) == []
    assert events(workdir, "exit")[-1]["reason"] == "owner gone"
    assert not re.search(r"\.tmp$", " ".join(map(str, (workdir / "results").rglob("*"))))
