"""The embedded toy model zoo's training: small LLaMA models the workflow trains itself, offline,
on CPU (``python -m ropelens pretrain`` / ``continual``, rules/toy.smk).

Two roles, each configured by a ``train:`` block in the workflow config (schemas
``definitions.train_pretrain`` / ``train_continual`` in config.schema.yaml, checked and filled by
:func:`ropelens.config.check_train`):

- **pretrain** (``models.<name>.train``): a byte-level LLaMA with plain RoPE
  (:func:`ropelens.models.tiny_llama`), trained from scratch at the model's ``pretrained_length``
  L0, written to ``resources/zoo/<name>/base``;
- **continual** (``methods.<label>.checkpoints.<name>.train``): the base loaded with the method's
  RoPE applied exactly as evaluation applies it (:func:`ropelens.models.load_config` on the cell
  spec), trained further at the method's ``cpt_length``, written to
  ``resources/zoo/<name>/cpt/<label>``. The saved config carries the method's
  ``rope_parameters``, so ``AutoModelForCausalLM`` alone loads the trained model (and the config
  entry says ``apply: false``: NTK-aware scaling re-applied on top would scale theta twice).

The data (LM rows, needle rows, restarting positions) is :mod:`ropelens.toydata`; here are the
schedule, the loop and the saving. Two choices make retrieval learnable in a few CPU minutes:
``init_std`` ≈ 0.1 (LLaMA's 0.02 leaves a tiny model on the plateau before induction heads form
for thousands of steps) and the needle tasks in every batch.

Everything is seeded: on CPU with the same thread count, the same settings give the same weights.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from ropelens.config import train_defaults
from ropelens.errors import DataError
from ropelens.toydata import Batches, read_texts


def lr_at(step: int, settings: dict) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` × lr at the last step."""
    lr, steps, warmup = settings["lr"], settings["steps"], settings["warmup"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    floor = settings["min_lr_ratio"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _optimizer(model, settings: dict):
    """AdamW; weight decay on the matrices only."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )


def _losses(model, x, mask, positions):
    """(LM loss, answer loss) of one batch: mean next-token cross-entropy over all tokens and
    over the answer tokens (zero without any)."""
    import torch.nn.functional as F

    logits = model(input_ids=x, position_ids=positions, use_cache=False).logits[:, :-1]
    target = x[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    lm = nll.mean()
    answer = mask[:, 1:].reshape(-1)
    ans = nll[answer].mean() if bool(answer.any()) else lm.new_zeros(())
    return lm, ans


FIRST_LOSSES = 8  # per-step losses kept exactly: retraining's first steps reproduce them


def _loop(model, batches: Batches, settings: dict, progress=None, stop_after=None):
    """The optimisation: ``steps`` steps of the schedule (the first ``stop_after`` only, where
    given: the same schedule, cut short); returns the loss curve (about 50 points, each the mean
    over the steps since the last) and the first steps' LM losses."""
    import torch

    opt = _optimizer(model, settings)
    model.train()
    device = next(model.parameters()).device
    curve = []
    steps = range(min(settings["steps"], stop_after or settings["steps"]))
    bar = progress(steps) if progress else steps
    every = max(1, settings["steps"] // 50)
    lm_acc = ans_acc = 0.0
    n_acc = 0
    first = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        lm, ans = _losses(model, *(t.to(device) for t in batches()))
        loss = lm + settings["answer_weight"] * ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        lm_acc += float(lm.detach())
        ans_acc += float(ans.detach())
        if step < FIRST_LOSSES:
            first.append(float(lm.detach()))
        n_acc += 1
        if (step + 1) % every == 0 or step + 1 == settings["steps"]:
            point = {"step": step + 1, "lm_loss": lm_acc / n_acc, "answer_loss": ans_acc / n_acc}
            curve.append(point)
            lm_acc = ans_acc = 0.0
            n_acc = 0
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(
                    lm=f"{point['lm_loss']:.3f}", ans=f"{point['answer_loss']:.3f}", refresh=False
                )
    model.eval()
    return curve, first


def train(
    model, tokenizer, settings: dict, length: int, corpus_path, haystack_path, progress=None,
    stop_after: int | None = None,
):  # fmt: skip
    """Train ``model`` in place on the mix described by ``settings``; returns a summary dict.
    ``stop_after``: the first steps only (a check that retraining reproduces a run)."""
    corpus, corpus_prov = read_texts(corpus_path)
    haystack, haystack_prov = (None, None)
    if settings["needle_fraction"] > 0:
        if not haystack_path:
            raise DataError("needle_fraction > 0 needs a haystack corpus (--haystack)")
        haystack, haystack_prov = read_texts(haystack_path)
    _seed_all(settings["seed"])
    batches = Batches(tokenizer, length, settings, corpus, haystack)
    t0 = time.perf_counter()
    curve, first = _loop(model, batches, settings, progress, stop_after)
    seconds = time.perf_counter() - t0
    return {
        "length": length,
        "steps": settings["steps"],
        "tokens": settings["steps"] * settings["batch_size"] * length,
        "lm_tokens_read": batches.packer.tokens_read,
        "needle_tasks": batches.tasks,
        "seconds": round(seconds, 3),
        "final": curve[-1] if curve else None,
        "curve": curve,
        "first_losses": first,
        "corpus": corpus_prov,
        "haystack": haystack_prov,
    }


def _write_model(model, tokenizer, out, summary: dict) -> Path:
    """Save model + tokenizer + training summary to ``out`` atomically (:mod:`ropelens.atomic`)."""
    import torch
    import transformers

    from ropelens import __version__
    from ropelens.atomic import atomic_path

    with atomic_path(out, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        summary = {
            **summary,
            "versions": {
                "ropelens": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": sys.version.split()[0],
            },
        }
        (tmp / "ropelens_train.json").write_text(json.dumps(summary, indent=1) + "\n")
    return Path(out)


def _setup(settings: dict, device: str):
    import torch

    from ropelens.models import pick_device

    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    return pick_device(device)


def build_base(settings: dict, pretrained_length: int):
    """A freshly initialised LLaMA (plain RoPE) + the byte tokenizer, seeded by ``settings``."""
    from ropelens.models import tiny_llama
    from ropelens.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_llama(
        tok,
        pretrained_length,
        hidden_size=settings["hidden_size"],
        layers=settings["layers"],
        heads=settings["heads"],
        kv_heads=settings.get("kv_heads"),
        intermediate_size=settings.get("intermediate_size"),
        rope_theta=settings["rope_theta"],
        tie_embeddings=settings.get("tie_embeddings", False),
        init_std=settings.get("init_std", 0.02),
        seed=settings["seed"],
    )
    model.set_attn_implementation("sdpa")
    return model, tok


def pretrain(
    settings: dict,
    pretrained_length: int,
    corpus_path,
    haystack_path,
    out,
    device: str = "cpu",
    progress=None,
) -> dict:
    """Pretrain a toy base model with plain RoPE at ``pretrained_length``; write it to ``out``."""
    settings = train_defaults(settings, "pretrain")
    device = _setup(settings, device)
    model, tok = build_base(settings, pretrained_length)
    model.to(device)
    summary = train(model, tok, settings, pretrained_length, corpus_path, haystack_path, progress)
    summary.update(role="pretrain", settings=settings, device=device)
    summary["parameters"] = sum(p.numel() for p in model.parameters())
    _write_model(model.cpu(), tok, out, summary)
    return summary


def load_for_continual(spec: dict, device: str = "cpu"):
    """The base model of ``spec`` with the method applied exactly as evaluation applies it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ropelens import models

    spec = {**spec, "apply": True}
    config = models.load_config(spec)
    name, kwargs = models._source_args(spec["source"])
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        name, config=config, dtype=torch.float32, attn_implementation="sdpa", **kwargs
    )
    return model.to(device), tok


def continual(
    spec: dict,
    settings: dict,
    length: int,
    corpus_path,
    haystack_path,
    out,
    device: str = "cpu",
    progress=None,
) -> dict:
    """Continually pretrain ``spec``'s base with its method at ``length``; write it to ``out``.

    ``spec`` is a cell spec (:func:`ropelens.grid.cell_spec`) whose ``source`` is the base model.
    The saved config carries the method's ``rope_parameters``.
    """
    settings = train_defaults(settings, "continual")
    device = _setup(settings, device)
    _seed_all(settings["seed"])
    model, tok = load_for_continual(spec, device)
    summary = train(model, tok, settings, length, corpus_path, haystack_path, progress)
    summary.update(
        role="continual",
        settings=settings,
        device=device,
        method=spec["method"],
        registry=spec["registry"],
        params=spec["params"],
        base=spec["source"],
        rope_parameters=dict(model.config.rope_parameters),
    )
    _write_model(model.cpu(), tok, out, summary)
    return summary
