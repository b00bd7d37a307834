"""The table of tiny random architectures for the conformance matrix (tests/test_conformance.py).

One entry per decoder architecture in the installed transformers whose attention uses RoPE, built
purely from its config class (no download): hidden 64, 2-4 layers (enough for every layer type the
architecture has), vocabulary 300 (above the byte tokenizer's 260), sliding window 16 where the
architecture has one. GPT-2 is the one entry without RoPE (``has_rope=False``): it must be refused.

Adding an architecture is one ``Arch(...)`` line in ARCHS. ``build(name)`` returns the model with
attention made peaked (q/k projections scaled, so that attention is far from uniform and an error
cannot hide in near-uniform probabilities); ``write(name, dir)`` saves it with the byte tokenizer
as a local Hugging Face directory that ropelens cells load by path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

VOCAB = 300
WINDOW = 16
PEAK = 8.0  # q/k projection weights are scaled by this much (logits x 64)
NORM_PEAK = 2.0  # q/k norm weights (after the norm logits are already O(1)): logits x 4
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=259,
)
GQA = dict(num_key_value_heads=2)
SLIDE2 = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
MLA = dict(  # DeepSeek multi-head latent attention: rope part 8, nope part 8, value head 24
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=24,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    moe_intermediate_size=32,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
)


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: a config class, its kwargs (over BASE) and what it exercises."""

    name: str
    config: str  # class name in transformers
    kwargs: dict = field(default_factory=dict)
    has_rope: bool = True
    sliding: bool = False  # some layers attend within a sliding window
    softcap: bool = False  # attention logit soft-capping
    partial_rotary: bool = False  # rotary dimension < head dimension
    layer_type_rope: bool = False  # RoPE parameters per layer type
    mla: bool = False  # multi-head latent attention (value head dim != key head dim)
    rotary_dim: int = 0  # dimensions of a head that rotate, where fewer than the head (0: all)
    base: bool = True  # kwargs go over BASE (False: the config's own names, e.g. GPT-2)

    def config_kwargs(self) -> dict:
        return {**BASE, **self.kwargs} if self.base else dict(self.kwargs)

    def make_config(self):
        import transformers

        return getattr(transformers, self.config)(**self.config_kwargs())


ARCHS: list[Arch] = [
    Arch("llama", "LlamaConfig"),
    Arch("llama-gqa", "LlamaConfig", GQA),
    Arch("mistral", "MistralConfig", {**GQA, "sliding_window": WINDOW}, sliding=True),
    Arch(
        "qwen2",
        "Qwen2Config",
        {**GQA, "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        sliding=True,
    ),
    Arch("qwen3", "Qwen3Config", {**GQA, "head_dim": 16}),
    Arch(
        "gemma2",
        "Gemma2Config",
        {
            **GQA,
            **SLIDE2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
        },
        sliding=True,
        softcap=True,
    ),
    Arch(
        "gemma3",
        "Gemma3TextConfig",
        {**GQA, **SLIDE2, "head_dim": 16, "query_pre_attn_scalar": 16},
        sliding=True,
        layer_type_rope=True,
    ),
    Arch(
        "phi3",
        "Phi3Config",
        {**GQA, "partial_rotary_factor": 0.5},
        partial_rotary=True,
        rotary_dim=8,
    ),
    Arch("gpt-neox", "GPTNeoXConfig", {"rotary_pct": 0.25}, partial_rotary=True, rotary_dim=4),
    Arch("stablelm", "StableLmConfig", partial_rotary=True, rotary_dim=4),
    Arch("phi", "PhiConfig", partial_rotary=True, rotary_dim=8),
    Arch("glm", "GlmConfig", {**GQA, "head_dim": 16}, partial_rotary=True, rotary_dim=8),
    Arch("glm4", "Glm4Config", {**GQA, "head_dim": 16}, partial_rotary=True, rotary_dim=8),
    Arch("olmo2", "Olmo2Config"),
    Arch("cohere", "CohereConfig", GQA),
    Arch(
        "granite",
        "GraniteConfig",
        {**GQA, "attention_multiplier": 0.2, "logits_scaling": 2.0, "residual_multiplier": 0.5},
    ),
    Arch("deepseek-v2", "DeepseekV2Config", MLA, mla=True, rotary_dim=8),
    Arch("deepseek-v3", "DeepseekV3Config", MLA, mla=True, rotary_dim=8),
    # beyond the issue's list: more of the installed transformers' RoPE decoders
    Arch("mixtral", "MixtralConfig", {**GQA, "num_local_experts": 2, "num_experts_per_tok": 1}),
    Arch("starcoder2", "Starcoder2Config", {**GQA, "sliding_window": WINDOW}, sliding=True),
    Arch("gemma", "GemmaConfig", {**GQA, "head_dim": 16}),
    Arch("olmo", "OlmoConfig", {"clip_qkv": 8.0}),
    Arch("olmo3", "Olmo3Config", {**GQA, **SLIDE2}, sliding=True, layer_type_rope=True),
    Arch("cohere2", "Cohere2Config", {**GQA, **SLIDE2}, sliding=True),  # RoPE on sliding only
    Arch("smollm3", "SmolLM3Config", {**GQA, "no_rope_layers": [1, 0]}),  # layer 1 without RoPE
    Arch("exaone4", "Exaone4Config", {**GQA, **SLIDE2, "head_dim": 16}, sliding=True),
    Arch(
        "qwen3-moe",
        "Qwen3MoeConfig",
        {
            **GQA,
            "head_dim": 16,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
        },
    ),
    Arch(
        "vaultgemma",
        "VaultGemmaConfig",
        {
            **GQA,
            **SLIDE2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
        },
        sliding=True,
        softcap=True,
    ),
    Arch("helium", "HeliumConfig", {**GQA, "head_dim": 16}),
    Arch(
        "llama4",  # chunked attention on layer 0 (a chunk-sized cache), no RoPE on layer 1
        "Llama4TextConfig",
        {
            **GQA,
            "head_dim": 16,
            "attention_chunk_size": WINDOW,
            "use_qk_norm": False,
            "num_local_experts": 2,
            "intermediate_size_mlp": 128,
            "no_rope_layers": [1, 0],
        },
    ),
    Arch(
        "cwm",
        "CwmConfig",
        {**GQA, **SLIDE2, "head_dim": 16, "rope_parameters": {"rope_theta": 1e4}},
        sliding=True,
    ),
    Arch("olmoe", "OlmoeConfig", {"num_experts": 4, "num_experts_per_tok": 2}),
    Arch("ernie4.5", "Ernie4_5Config", {**GQA, "head_dim": 16}),
    # transformers 5.25 moved Falcon onto the attention interface (5.24 was refused at run time)
    Arch("falcon", "FalconConfig", {"multi_query": True, "parallel_attn": True}),  # Falcon-7B
    Arch(  # Falcon-40B / 180B: grouped KV heads, two layer norms
        "falcon-40b",
        "FalconConfig",
        {"new_decoder_architecture": True, "num_kv_heads": 2},
    ),
    Arch("persimmon", "PersimmonConfig", partial_rotary=True, rotary_dim=8),
    Arch("nemotron", "NemotronConfig", GQA, partial_rotary=True, rotary_dim=8),
    Arch("phimoe", "PhimoeConfig", {**GQA, "num_local_experts": 2, "num_experts_per_tok": 1}),
    Arch(
        "glm4-moe",
        "Glm4MoeConfig",
        {
            **GQA,
            "head_dim": 16,
            "n_routed_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "first_k_dense_replace": 1,
            "n_group": 1,
            "topk_group": 1,
        },
        partial_rotary=True,
        rotary_dim=8,
    ),  # fmt: skip
    Arch(
        "minicpm3",
        "MiniCPM3Config",
        {
            "q_lora_rank": 32,
            "kv_lora_rank": 16,
            "qk_rope_head_dim": 8,
            "qk_nope_head_dim": 8,
            "v_head_dim": 24,
        },
        mla=True,
        rotary_dim=8,
    ),  # fmt: skip
    Arch(
        "modernbert-decoder",
        "ModernBertDecoderConfig",
        {
            "num_key_value_heads": None,
            "local_attention": 2 * WINDOW,
            "global_attn_every_n_layers": 2,
            "initializer_range": 0.1,
        },  # its 0.02 leaves logits of 0.2, too flat to compare
        sliding=True,
        layer_type_rope=True,
    ),
    # hybrids: attention layers with RoPE beside recurrent (Mamba, linear attention, conv) ones
    Arch(
        "falcon-h1",
        "FalconH1Config",
        {
            **GQA,
            "head_dim": 16,
            "mamba_n_heads": 4,
            "mamba_d_head": 16,
            "mamba_d_ssm": 64,
            "mamba_d_state": 16,
            "mamba_chunk_size": 16,
        },
    ),  # fmt: skip
    Arch(
        "qwen3-next",
        "Qwen3NextConfig",
        {
            **GQA,
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 32,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
        },
        partial_rotary=True,
        rotary_dim=4,
    ),  # fmt: skip
    Arch("lfm2", "Lfm2Config", {**GQA, "layer_types": ["conv", "full_attention"]}),
    Arch(
        "gpt2",
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=256,
            eos_token_id=257,
            pad_token_id=259,
            tie_word_embeddings=False,
        ),
        has_rope=False,
        base=False,
    ),
]
#: architectures refused at plan time as a whole (ropelens.architectures.UNSTUDIED), with the
#: model_type the refusal keys on; not rows of the matrix
REFUSED_ARCHS: list[Arch] = [
    Arch(
        "gpt-oss",
        "GptOssConfig",
        {**GQA, "head_dim": 16, "num_local_experts": 2, "num_experts_per_tok": 1, **SLIDE2},
    ),
    Arch("diffllama", "DiffLlamaConfig"),
    Arch(
        "minimax",
        "MiniMaxConfig",
        {
            **GQA,
            "head_dim": 16,
            "layer_types": ["linear_attention", "full_attention"],
            "num_local_experts": 2,
            "num_experts_per_tok": 1,
        },
    ),  # fmt: skip
]
BY_NAME = {a.name: a for a in ARCHS + REFUSED_ARCHS}
ROPE_ARCHS = [a for a in ARCHS if a.has_rope]

# q/k projections by module name (scaled to make attention peaked); MLA's q_b_proj, kv_b_proj and
# kv_a_proj_with_mqa (its rotary key part is not normalised); q/k norms where the projection's scale
# is normalised away (Qwen3, OLMo2, Gemma3)
_QK = ("q_proj", "k_proj", "q_b_proj", "kv_b_proj", "kv_a_proj_with_mqa", "query_key_value")
_QK += ("qkv_proj", "Wqkv", "c_attn", "q_norm", "k_norm", "q_layernorm", "k_layernorm")


def build(name: str, seed: int = 0, peaked: bool = True, attn_implementation: str = "eager"):
    """The tiny random model of ``name`` (eval mode, fp32); q/k weights x PEAK when ``peaked``."""
    import torch
    from transformers import AutoModelForCausalLM

    config = BY_NAME[name].make_config()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    if peaked:
        _peak(model)
    return model.eval()


def _peak(model) -> None:
    import torch

    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            if mod_name.rsplit(".", 1)[-1] not in _QK or getattr(mod, "weight", None) is None:
                continue
            kind = type(mod).__name__
            if "Norm" not in kind:
                mod.weight.mul_(PEAK)
            elif "Gemma" in kind or not mod.weight.any():  # zero-centred: scale by (1 + weight)
                mod.weight.add_(1).mul_(NORM_PEAK).sub_(1)  # Gemma norms scale by (1 + weight)
            else:
                mod.weight.mul_(NORM_PEAK)


def write(name: str, out_dir: str | Path, seed: int = 0, peaked: bool = True) -> Path:
    """Save ``build(name, seed, peaked)`` + the byte tokenizer as a local HF directory."""
    from ropelens.tokenizer import build_byte_tokenizer

    out = Path(out_dir)
    model = build(name, seed, peaked)
    model.save_pretrained(out)
    build_byte_tokenizer().save_pretrained(out)
    return out


def attention_layers(model) -> list[int]:
    """Layer indices of the model's attention modules, in forward order (all layers, except in
    hybrids, whose recurrent or convolution layers have no attention)."""
    from ropelens.positions import attention_modules

    return [m.layer_idx for m in attention_modules(model)]


def max_attention(model, length: int = 48, seed: int = 0) -> list[float]:
    """Mean over queries of the max attention probability, per layer (eager attentions)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, length), generator=g)
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    return [float(a[0].amax(-1).mean()) for a in out.attentions]
