"""Conformance matrix: every architecture of tests/archs.py, checked against an independent
reference (eager attention, a plain transformers load). Adding an architecture is one line there."""

from __future__ import annotations

import pytest
import torch

from tests import archs

NAMES = [a.name for a in archs.ARCHS]


@pytest.mark.parametrize("name", NAMES)
def test_arch_builds_peaked_and_round_trips(name, tmp_path):
    """Every entry builds from its config class, runs a forward, has peaked attention on every
    layer (mean max probability at least twice its unpeaked value and 2.5x uniform), and loads back
    from the directory ``archs.write`` saves with the same logits."""
    from transformers import AutoModelForCausalLM

    model = archs.build(name)
    flat = archs.max_attention(archs.build(name, peaked=False))
    peaked = archs.max_attention(model)
    uniform = float(torch.mean(1.0 / torch.arange(1, 49)))
    assert len(peaked) == model.config.num_hidden_layers
    for p, f in zip(peaked, flat, strict=True):
        assert p > 2.0 * uniform and p > 1.5 * f, (peaked, flat, uniform)
    out = archs.write(name, tmp_path / name)
    again = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.arange(40)[None] % 256
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert (out / "tokenizer.json").exists()


def test_table_covers_what_the_issue_names():
    need = {"llama", "llama-gqa", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"}
    need |= {"gpt-neox", "stablelm", "phi", "glm", "glm4", "olmo2", "cohere", "granite"}
    need |= {"deepseek-v2", "deepseek-v3", "gpt2"}
    assert need <= set(NAMES)
    assert [a.name for a in archs.ARCHS if not a.has_rope] == ["gpt2"]
    for a in archs.ARCHS:
        cfg = a.make_config()
        if a.sliding:
            assert cfg.sliding_window == archs.WINDOW
        types = getattr(cfg, "layer_types", None)
        if a.sliding and types is not None:
            assert {"sliding_attention", "full_attention"} <= set(types), a.name
