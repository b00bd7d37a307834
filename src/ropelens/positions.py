"""Attention-side RoPE methods: the relative position at which a query meets a key, changed
inside ropelens' own attention (``ropelens.attention``); the model's RoPE frequencies are kept.

- ReRoPE (Su 2023, "Rectified Rotary Position Embeddings"): below a window w the true distance
  d = i - j; from w on, d' = w (clipped), or d' = w + (d - w) / k (leaky, k > 1).
- Self-Extend (Jin et al. 2024, arXiv 2401.01325): below the neighbour window w the true distance;
  from w on, the grouped distance floor(i / G) - floor(j / G) + w - floor(w / G).
- STRING (An et al. 2024, arXiv 2410.18745, "shifted RoPE"): below the offset S the true distance;
  from S on, d - S + W (the well-trained small distances, from the local window W on, overwrite
  the rarely trained large ones). Here ``window`` is S, ``local`` W. As the reference
  implementation's decoding path (string_for_llama.py, github.com/justHungryMan/STRING) the two sets
  split at d = S exactly; its prefill path counts the key at d = S in both (flash-attention's
  window [i - S, i] is inclusive), which is not the paper's position matrix and is not copied.
  Nor is its extra logit temperature (cos / sin scaled by 1 + 0.1 ln 2 on every q and k).

Each far distance is that of a pair of positions (i', j'): ReRoPE i' = w, j' = 0 (leaky:
i' = i / k + w (1 - 1 / k), j' = j / k); Self-Extend i' = floor(i / G) + w - floor(w / G),
j' = floor(j / G); STRING i' = i - S + W, j' = j. RoPE rotations compose (R(a) R(b) =
R(a + b)), so a query or key the model already rotated to position p is at p' after a further
rotation by p' - p with the layer's own inverse frequencies. The attention then takes each
(query, key) logit from the model's own q / k (d < w) or from the further-rotated ones (d >= w),
per chunk, as the papers' implementations do.

The further rotation is the rotate-half layout over the first rotary dimensions of each head (the
layout of LLaMA and most decoders); :func:`layout_problem` checks, from the config alone, that the
model's own ``apply_rotary_pos_emb`` is exactly that, and names why not (interleaved pairs,
multi-head latent attention, layers without RoPE, frequencies that change with the length).

torch is imported by the functions that compute (issue 27): the plan checks a method's parameters
by building a :class:`PositionMap`, and plan time imports no torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ATTR = "_ropelens_positions"  # on each attention module: (PositionMap, inverse frequencies)


@dataclass(frozen=True)
class PositionMap:
    """An attention-side method: ``kind`` rerope, self-extend or string, the window below which
    distances are the model's own (STRING: its offset S), Self-Extend's group size, ReRoPE's
    leak k (None: clipped) and STRING's local window W (where its shifted distances start)."""

    kind: str
    window: int
    group: int = 1
    leak: float | None = None
    local: int = 0

    def far_query(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions i' of queries at absolute positions ``pos`` in the far logits (float64)."""
        import torch

        pos = pos.double()
        w = float(self.window)
        if self.kind == "rerope":
            if self.leak is None:
                return torch.full_like(pos, w)
            return pos / self.leak + w * (1 - 1 / self.leak)
        if self.kind == "string":
            return pos - (w - self.local)
        return torch.floor(pos / self.group) + (w - math.floor(w / self.group))

    def far_key(self, pos: torch.Tensor) -> torch.Tensor:
        """Positions j' of keys at absolute positions ``pos`` in the far logits (float64)."""
        import torch

        pos = pos.double()
        if self.kind == "rerope":
            return torch.zeros_like(pos) if self.leak is None else pos / self.leak
        if self.kind == "string":
            return pos
        return torch.floor(pos / self.group)

    def distance(self, d: torch.Tensor) -> torch.Tensor:
        """The relative position a query sees a key at, for true distances ``d`` = i - j >= 0
        where only the distance matters (ReRoPE, STRING); Self-Extend's depends on i and j."""
        import torch

        d = d.double()
        if self.kind == "self-extend":
            raise ValueError("Self-Extend's grouped distance depends on both positions")
        far = torch.full_like(d, float(self.window))
        if self.kind == "string":
            far = d - (self.window - self.local)
        elif self.leak is not None:
            far = self.window + (d - self.window) / self.leak
        return torch.where(d < self.window, d, far)


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """``x`` (..., L, D) rotated by ``delta`` (L,) positions with ``inv_freq``: rotate-half over
    the first 2 * len(inv_freq) dimensions, the rest passed through. Angles in float64."""
    import torch

    r = 2 * inv_freq.shape[-1]
    angle = delta.detach().cpu().double()[:, None] * inv_freq.detach().cpu().double()[None]
    cos = torch.cat([angle.cos(), angle.cos()], -1).to(x.device, x.dtype)  # (MPS has no fp64)
    sin = torch.cat([angle.sin(), angle.sin()], -1).to(x.device, x.dtype)
    rot = x[..., :r]
    half = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], -1)
    return torch.cat([rot * cos + half * sin, x[..., r:]], -1)


@dataclass
class FarLogits:
    """The far query / key set of one attention call and which (query, key) pairs use it."""

    query: torch.Tensor  # (B, H, Lq, D) further-rotated queries, as the call's q (scaled or not)
    key: torch.Tensor  # (B, Hkv, Lk, D) further-rotated keys
    qpos: torch.Tensor  # (Lq,) absolute query positions
    kpos: torch.Tensor  # (Lk,) absolute key positions
    window: int

    def merge(self, s: torch.Tensor, c0: int, c1: int, kend: int, heads: int) -> None:
        """Replace, in place, the logits ``s`` (B, Hkv, g * n, kend) of queries [c0, c1) by the
        far ones where the distance is at least the window (only keys that far are computed)."""
        import torch

        n = c1 - c0
        far_end = int(self.qpos[c1 - 1]) - self.window + 1 - int(self.kpos[0])
        far_end = min(max(far_end, 0), kend)
        if far_end == 0:
            return
        B, Hkv, D = self.key.shape[0], self.key.shape[1], self.query.shape[-1]
        qf = self.query[:, :, c0:c1].reshape(B, Hkv, (heads // Hkv) * n, D)
        sf = torch.matmul(qf, self.key[:, :, :far_end].transpose(-1, -2)).view(B, heads, n, -1)
        near = (self.qpos[c0:c1, None] - self.kpos[None, :far_end]) < self.window
        s4 = s.view(B, heads, n, kend)[..., :far_end]
        s4.copy_(torch.where(near, s4, sf))


def far_logits(module, query, key, koff: int) -> FarLogits | None:
    """The far set of a call of ``module`` (None when the module has no position map): query
    i (slot Lk - Lq + i) at absolute position koff + Lk - Lq + i, key slot j at koff + j."""
    import torch

    installed = getattr(module, ATTR, None)
    if installed is None:
        return None
    pm, inv_freq = installed
    Lq, Lk = query.shape[2], key.shape[2]
    kpos = torch.arange(Lk, device=query.device) + koff
    qpos = kpos[Lk - Lq :]
    q = rotate(query, pm.far_query(qpos) - qpos.double(), inv_freq)
    k = rotate(key, pm.far_key(kpos) - kpos.double(), inv_freq)
    return FarLogits(q, k, qpos, kpos, pm.window)


def window_of(module) -> int | None:
    """The window below which ``module``'s distances are its own (None: no position map)."""
    installed = getattr(module, ATTR, None)
    return None if installed is None else installed[0].window


# --- installing a position map on a loaded model, and what a model must be for it -----------------


def attention_modules(model):
    """The attention modules of a transformers model (those with layer_idx and is_causal)."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]


def install(model, pm: PositionMap, inv_freqs: dict) -> None:
    """Give each attention module of ``model`` the position map and its layer's inverse
    frequencies (``inv_freqs``: layer index -> tensor, per layer type where RoPE is)."""
    for mod in attention_modules(model):
        setattr(mod, ATTR, (pm, inv_freqs[mod.layer_idx].detach().double().cpu()))


def layout_problem(model_config, rotary, layer_types, rope_kinds: dict, head: int) -> str:
    """Why an attention-side method cannot move this model's positions ('' when it can).

    ``rotary``: its rotary module (built from the config); ``layer_types``: the RoPE layer types
    when per-layer-type (else None); ``rope_kinds``: rope type per layer type; ``head``: the head
    dimension. Its ``apply_rotary_pos_emb`` must be rotate-half over the first rotary dimensions
    (checked on a probe against :func:`rotate`), called on every layer, its RoPE static."""
    import sys

    name = type(model_config).__name__
    if getattr(model_config, "qk_rope_head_dim", None):
        return f"{name} has multi-head latent attention (its rotary part is the end of each head)"
    flags = getattr(model_config, "no_rope_layers", None)  # 1: with RoPE (SmolLM3, Llama 4)
    if flags is not None and not all(flags) or getattr(model_config, "use_rope", True) is False:
        return f"{name} has layers without RoPE (no_rope_layers)"
    moving = sorted({k for k in rope_kinds.values() if k in ("dynamic", "longrope")})
    if moving:
        return f"its RoPE ({moving[0]}) changes with the sequence length"
    attention = _attention_class(model_config)
    modeling = sys.modules[attention.__module__] if attention else None
    apply = getattr(modeling, "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        return f"{name}'s attention does not rotate through apply_rotary_pos_emb"
    if _conditional_rope(attention):
        return (
            f"{name} applies RoPE under a condition in its attention's forward (RoPE on some of "
            "its layers only, or not with ALiBi)"
        )
    for layer_type in layer_types or [None]:
        if not _probe(rotary, apply, head, layer_type):
            return (
                f"{name} rotates its heads in another layout than rotate-half over the first "
                "rotary dimensions (e.g. interleaved pairs)"
            )
    return ""


def _conditional_rope(attention) -> bool:
    """Whether the attention's forward calls apply_rotary_pos_emb under a condition (EXAONE 4's
    global layers and Cohere 2's full layers go without RoPE), read from its source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(attention.forward)))
    except (OSError, TypeError, SyntaxError):
        return True  # cannot tell: refused rather than guessed

    def guarded(node, under: bool) -> bool:
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "apply_rotary_pos_emb":
            return under
        cond = under or isinstance(node, (ast.If, ast.IfExp, ast.For, ast.While, ast.Try))
        return any(guarded(child, cond) for child in ast.iter_child_nodes(node))

    return guarded(tree, False)


def _attention_class(model_config):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    mods = attention_modules(skeleton)
    return type(mods[0]) if mods else None


def _probe(rotary, apply, head: int, layer_type) -> bool:
    """Whether the model's own rotation at positions p equals :func:`rotate` by p (times its
    attention scaling) on a random head."""
    import torch

    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([[0, 3, 17, 100]])
    x = torch.randn(1, 1, 4, head, generator=g, dtype=torch.float64)
    kwargs = {"layer_type": layer_type} if layer_type else {}
    if layer_type:
        inv, scale = (
            getattr(rotary, f"{layer_type}_inv_freq"),
            getattr(rotary, f"{layer_type}_attention_scaling"),
        )
    else:
        inv, scale = rotary.inv_freq, rotary.attention_scaling
    r = 2 * inv.shape[-1]
    # the whole head (partial rotary inside apply_rotary_pos_emb), or its rotary part (StableLM,
    # Phi: the attention splits off the first rotary dimensions itself)
    for part in (x, x[..., :r]):
        with torch.no_grad():
            cos, sin = rotary(part.float(), pos, **kwargs)
            try:
                q, _ = apply(part.float(), part.float(), cos, sin)
            except (TypeError, RuntimeError, ValueError):
                continue
        ours = rotate(part, pos[0].double(), inv) * scale
        if q.shape == ours.shape and torch.allclose(q.double(), ours, atol=1e-4, rtol=1e-4):
            return True
    return False
