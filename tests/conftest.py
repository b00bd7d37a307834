import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def snakemake_bin() -> str:
    exe = Path(sys.executable).with_name("snakemake")
    return str(exe) if exe.exists() else shutil.which("snakemake")


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (small and fast on a shared machine; the worker-thread
    path is tested explicitly); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def snakemake():
    """Run snakemake on the repo's Snakefile in a given working directory."""

    def run(workdir, *args, check=True, timeout=900):
        cmd = [snakemake_bin(), "-s", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"snakemake failed ({proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaMA (GQA) + byte tokenizer, written once per session."""
    from ropelens.models import make_tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    make_tiny(out, pretrained_length=64, hidden_size=32, layers=2, heads=4, kv_heads=2, seed=0)
    return out


def model_files(folder) -> str:
    """A folder that passes the plan-time model checks (config, tokenizer, an empty safetensors
    file) without being loadable weights: for tests of the config alone."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    return str(folder)


def tiny_spec(model_dir, method: str = "rope", params: dict | None = None) -> dict:
    """Cell spec of the session's tiny model (``tiny_model_dir``) with ``method`` applied."""
    return {
        "model": "tiny",
        "method": method,
        "source": {"path": str(model_dir)},
        "pretrained_length": 64,
        "registry": method,
        "params": params or {},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }


def token_table(docs):
    """A tokenised-corpus table (as `ropelens tokenize` writes) of lists of token ids."""
    import pyarrow as pa

    return pa.table(
        {
            "doc_id": [f"d{i}" for i in range(len(docs))],
            "n_tokens": [len(d) for d in docs],
            "input_ids": pa.array(docs, pa.list_(pa.int32())),
        }
    )


def job_counts(proc) -> dict:
    """Parse the 'Job stats' table of a snakemake (dry-)run: {rule: count}."""
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    block = text.split("Job stats:")[1]
    counts = {}
    for line in block.splitlines()[3:]:
        m = re.match(r"^(\S+)\s+(\d+)$", line.strip())
        if not m:
            break
        counts[m.group(1)] = int(m.group(2))
    counts.pop("total", None)
    return counts
