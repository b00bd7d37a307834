"""Load a model with a RoPE method applied, and build tiny local models.

A model is a plain Hugging Face checkpoint: a local directory or a hub id. The method is applied to
the config before the weights load, so the model's native RoPE code runs. ``HF_HUB_OFFLINE=1`` is
honoured (transformers reads it; we also pass ``local_files_only``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ropelens import methods
from ropelens.architectures import UNSTUDIED
from ropelens.atomic import atomic_path
from ropelens.errors import RopelensError


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def pick_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise RopelensError("runtime.device: cuda requested but no CUDA device is visible")
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def pick_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _source_args(source: dict) -> tuple[str, dict]:
    name = source.get("path") or source["hub"]
    kwargs = {"local_files_only": offline() or "path" in source}
    if source.get("revision"):
        kwargs["revision"] = source["revision"]
    return name, kwargs


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: str
    dtype: object
    rope_parameters: dict
    rope: dict  # see rope_record: layer types rewritten, per-layer-type parameters


def load_config(spec: dict):
    """The model config with the cell's method applied (no weights loaded)."""
    return configured(spec)[0]


def configured(spec: dict):
    """(config with the cell's method applied, :class:`ropelens.methods.Applied` or None)."""
    from transformers import AutoConfig

    name, kwargs = _source_args(spec["source"])
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:  # not there / not a model transformers knows
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RopelensError(f"cannot load model config '{name}': {first}") from None
    why = UNSTUDIED.get(getattr(config, "model_type", None))
    if why:  # refused at plan time where the config was at hand (ropelens.architectures)
        raise RopelensError(f"model '{name}' ({type(config).__name__}) cannot be studied: {why}")
    if not spec.get("apply", True):
        return config, None
    applied = methods.apply_method(
        config,
        spec["registry"],
        spec["params"],
        spec["pretrained_length"],
        layer_types=spec.get("layer_types"),
        where=f"methods.{spec['method']}",
        model=f"model '{spec['model']}' ({type(config).__name__})",
        length=spec.get("length"),
    )
    return config, applied


def at_length(spec: dict, length: int) -> dict:
    """The cell spec of a cell of ``length`` tokens: with ``length`` where the method depends on
    it (``factor: auto``), else ``spec`` itself (one spec, one loaded model, for every length)."""
    if methods.uses_length(spec.get("params")) and spec.get("apply", True):
        return {**spec, "length": int(length)}
    return spec


def rope_record(config, applied=None) -> dict:
    """What a cell records about its RoPE: the rope parameters of the layer types the method
    rewrote (the first, when several), those layer types, every layer type's parameters, and the
    scale factor the method used (None: no method applied, or one without a factor)."""
    layers = methods.rope_layers(config)
    types = list(applied.layer_types) if applied else sorted(layers)
    first = types[0] if types else methods.FLAT
    return {
        "rope_parameters": dict(layers.get(first) or {}),
        "layer_types": types,
        "expressed_as": applied.expressed_as if applied else None,
        "factor": applied.factor if applied else None,
        "positions": vars(applied.positions) if applied and applied.positions else None,
        "by_layer_type": {k: dict(v) for k, v in layers.items()},
    }


# Models a warm runner loaded before forking this process for a cell (ropelens.runner), by spec.
PRELOADED: dict[str, Loaded] = {}


def spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def load(spec: dict, attn_implementation: str | None = None, device: str | None = None) -> Loaded:
    """Load tokenizer + model for a cell spec (see ``ropelens.grid.cell_spec``); by default
    with the model's own attention (transformers' choice: SDPA where the model supports it, else
    eager, e.g. Gemma2's soft-capped logits). In a warm runner's cell, the model it loaded for
    this spec, untouched (``PRELOADED``)."""
    if attn_implementation is None and device is None and spec_key(spec) in PRELOADED:
        return PRELOADED[spec_key(spec)]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    runtime = spec.get("runtime", {})
    device = pick_device(device or runtime.get("device", "auto"))
    dtype = pick_dtype(runtime.get("dtype", "auto"), device)
    config, applied = configured(spec)
    name, kwargs = _source_args(spec["source"])
    tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
    moved = applied is not None and applied.positions is not None
    if moved:  # an attention-side method: every cell through ropelens' attention
        from ropelens import attention

        attn_implementation = attention.ATTN_IMPLEMENTATION
    model = AutoModelForCausalLM.from_pretrained(
        name, config=config, dtype=dtype, attn_implementation=attn_implementation, **kwargs
    )
    model.to(device).eval()
    if moved:
        _install_positions(model, applied.positions)
    record = rope_record(config, applied)
    return Loaded(model, tokenizer, device, dtype, record["rope_parameters"], record)


def _install_positions(model, pm) -> None:
    """An attention-side method on a loaded model: each attention module gets the position map
    and its layer's inverse frequencies (per layer type where RoPE is per layer type)."""
    from ropelens import positions

    config = model.config
    types = getattr(config, "layer_types", None)
    nested = methods.is_nested(config)
    inv = {}
    for mod in positions.attention_modules(model):
        layer_type = types[mod.layer_idx] if nested else methods.FLAT
        inv[mod.layer_idx] = methods.inv_freq(model, layer_type)[0]
    positions.install(model, pm, inv)


def make_tiny(
    out_dir: str | Path,
    pretrained_length: int,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    rope_theta: float = 10000.0,
    seed: int = 0,
):
    """Write a randomly initialised LLaMA + byte tokenizer as a normal HF directory."""
    from ropelens.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_llama(
        tok,
        pretrained_length,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        rope_theta=rope_theta,
        seed=seed,
    )
    with atomic_path(out_dir, folder=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out_dir)


def tiny_llama(
    tok,
    pretrained_length: int,
    hidden_size: int,
    layers: int,
    heads: int,
    kv_heads: int | None = None,
    intermediate_size: int | None = None,
    rope_theta: float = 10000.0,
    tie_embeddings: bool = False,
    init_std: float = 0.02,
    seed: int = 0,
):
    """A freshly initialised LLaMA with plain RoPE over the byte tokenizer ``tok``, seeded: the one
    LLaMA config of ``make-tiny`` and the toy zoo (:mod:`ropelens.toytrain`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=pretrained_length,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=bool(tie_embeddings),
        initializer_range=float(init_std),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
