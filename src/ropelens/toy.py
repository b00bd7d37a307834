"""The embedded toy model zoo: small LLaMA models the workflow trains itself, offline, on CPU.

Two roles, each configured by a ``train:`` block in the workflow config (keys: :data:`SETTINGS`):

- **pretrain** (``models.<name>.train``): a byte-level LLaMA with plain RoPE, trained from scratch
  at the model's ``pretrained_length`` L0, written to ``resources/zoo/<name>/base``;
- **continual** (``methods.<label>.checkpoints.<name>.train``): the base loaded with the method's
  RoPE applied exactly as evaluation applies it (:func:`ropelens.models.load_config` on the cell
  spec), trained further at the method's ``cpt_length``, written to
  ``resources/zoo/<name>/cpt/<label>``. The saved config carries the method's
  ``rope_parameters``, so ``AutoModelForCausalLM`` alone loads the trained model (and the config
  entry says ``apply: false``: NTK-aware scaling re-applied on top would scale theta twice).

The training mix (:class:`Batches`):

- LM rows: documents of an LM corpus (e.g. the standard-library sources) in a seeded order, each
  ``<s> document </s>``, packed into windows of the training length;
- needle rows (``needle_fraction`` of each batch): Needle-in-a-Haystack tasks built by
  :func:`ropelens.needle.build_prompt` (a random line of the haystack corpus on, random length and
  depth), each followed by its answer (sometimes asked again), with ``answer_weight`` × the
  cross-entropy of the answer tokens added to the LM loss.

Position ids restart after every ``</s>``, so transformers masks packed segments from each other
and every document and task starts at position 0, as in evaluation. Two choices make retrieval
learnable in a few CPU minutes: ``init_std`` ≈ 0.1 (LLaMA's 0.02 leaves a tiny model on the
plateau before induction heads form for thousands of steps) and the needle tasks in every batch.

Everything is seeded: on CPU with the same thread count, the same settings give the same weights.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from ropelens.errors import ConfigError, DataError

# --- settings ------------------------------------------------------------------------------------

# name -> (kind, default, minimum, roles); default None: optional; REQUIRED: must be given
REQUIRED = object()
_BOTH = ("pretrain", "continual")
SETTINGS = {
    # architecture (pretraining only; continual runs keep the base's)
    "hidden_size": ("int", 128, 8, ("pretrain",)),
    "layers": ("int", 4, 1, ("pretrain",)),
    "heads": ("int", 4, 1, ("pretrain",)),
    "kv_heads": ("int", None, 1, ("pretrain",)),
    "intermediate_size": ("int", None, 8, ("pretrain",)),
    "rope_theta": ("number", 10000.0, 0, ("pretrain",)),
    "tie_embeddings": ("bool", False, None, ("pretrain",)),
    "init_std": ("number", 0.02, 0, ("pretrain",)),
    # data
    "corpus": ("corpus", REQUIRED, None, _BOTH),
    "haystack": ("corpus", None, None, _BOTH),
    "needle_fraction": ("fraction", 0.0, 0, _BOTH),
    "answer_weight": ("number", 1.0, 0, _BOTH),
    # optimisation
    "steps": ("int", REQUIRED, 1, _BOTH),
    "batch_size": ("int", 8, 1, _BOTH),
    "lr": ("number", 1e-3, 0, _BOTH),
    "min_lr_ratio": ("fraction", 0.1, 0, _BOTH),
    "warmup": ("int", None, 0, _BOTH),
    "weight_decay": ("number", 0.1, 0, _BOTH),
    "grad_clip": ("number", 1.0, 0, _BOTH),
    "seed": ("int", 0, None, _BOTH),
    "threads": ("int", 1, 1, _BOTH),
}
POSITIVE = ("rope_theta", "lr", "init_std")  # strictly greater than their minimum
EXAMPLES = {"corpus": "corpus: stdlib-train", "steps": "steps: 300"}


def defaults(settings: dict, role: str) -> dict:
    """``settings`` with every default of ``role`` filled in (warmup: 5 % of steps)."""
    out = {}
    for key, (_, default, _, roles) in SETTINGS.items():
        if role in roles and default is not REQUIRED:
            out[key] = default
    out.update(settings)
    if out.get("warmup") is None:
        out["warmup"] = max(1, out["steps"] // 20)
    return out


def _kind_ok(kind: str, value) -> bool:
    if kind == "bool" or isinstance(value, bool):
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    if kind in ("number", "fraction"):
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str)


def _needle_min_tokens() -> int:
    """Byte tokens a needle prompt needs with the default template (the zoo's byte tokenizer)."""
    from ropelens.needle import DEFAULT_TEMPLATE as t

    text = " " + t.needle.format(answer="9" * t.digits) + "\n" + t.question
    return len(text.encode()) + len((t.answer_prefix + "9" * t.digits).encode()) + 8


def _find_continual(cfg: dict, where: str) -> tuple[str, str]:
    for label, entry in cfg["methods"].items():
        for model in entry.get("checkpoints") or {}:
            if where == f"methods.{label}.checkpoints.{model}.train":
                return label, model
    raise ConfigError(f"{where}: not a checkpoint entry of methods")


def idempotent(name: str, params: dict, where: str = "method") -> bool:
    """True if applying method ``name`` to a model that already has it changes nothing.

    A continually-pretrained checkpoint is saved with the method's RoPE; evaluation re-applies the
    method on top, reading theta from the saved config. PI, YaRN, dynamic NTK and Llama 3 keep
    theta and are idempotent; NTK-aware scales theta and is not.
    """
    from ropelens import methods

    base = methods.BaseRope(theta=10000.0, head_dim=64, pretrained_length=4096)
    once = methods.resolve(name, params, base, where=where)
    theta = once.rope_parameters.get("rope_theta", base.theta)
    again = methods.resolve(
        name, params, methods.BaseRope(theta, base.head_dim, base.pretrained_length), where=where
    )
    return once == again


def validate(settings: dict, where: str, role: str, corpora: dict | None = None) -> dict:
    """Check keys, types and ranges of a ``train:`` block; returns it with defaults filled in.

    ``corpora`` (the config's corpora) also checks corpus names. Raises
    :class:`~ropelens.errors.ConfigError` with one line naming the key and the fix.
    """
    if not isinstance(settings, dict):
        raise ConfigError(f"{where}: must be a mapping of training settings")
    for key in settings:
        if key not in SETTINGS:
            allowed = ", ".join(k for k, v in SETTINGS.items() if role in v[3])
            raise ConfigError(f"{where}.{key}: unknown setting; allowed: {allowed}")
        if role not in SETTINGS[key][3]:
            raise ConfigError(
                f"{where}.{key}: only for pretraining; a continual run keeps the base model's "
                "architecture — remove it"
            )
    for key, (kind, default, minimum, roles) in SETTINGS.items():
        if role not in roles:
            continue
        if key not in settings:
            if default is REQUIRED:
                example = EXAMPLES.get(key, f"{key}: ...")
                raise ConfigError(f"{where}.{key}: required; add it (e.g. {example})")
            continue
        value = settings[key]
        if value is None and default is None:
            continue
        if not _kind_ok(kind, value):
            want = {"int": "an integer", "number": "a number", "fraction": "a number in 0..1"}
            raise ConfigError(
                f"{where}.{key}: {value!r} is not {want.get(kind, 'a corpus name')}; fix its value"
            )
        if kind == "corpus" and corpora is not None and value not in corpora:
            raise ConfigError(
                f"{where}.{key}: '{value}' is not in corpora; add it under corpora "
                f"(e.g. {value}: {{builtin: stdlib, split: train}}) or use one of "
                f"{', '.join(corpora)}"
            )
        if kind == "fraction" and not 0 <= value <= 1:
            raise ConfigError(f"{where}.{key}: {value!r} is out of range; use a value in 0..1")
        if minimum is not None and kind != "fraction":
            strict = key in POSITIVE
            if value < minimum or (strict and value <= minimum):
                bound = f"> {minimum}" if strict else f">= {minimum}"
                raise ConfigError(f"{where}.{key}: {value!r} is out of range; use a value {bound}")
    s = defaults(settings, role)
    if s["needle_fraction"] > 0 and not s.get("haystack"):
        raise ConfigError(
            f"{where}.haystack: needle_fraction > 0 needs a haystack corpus; "
            "add one (e.g. haystack: pydoc-train) or set needle_fraction: 0"
        )
    if role == "pretrain":
        heads = s["heads"]
        kv = s.get("kv_heads") or heads
        if s["hidden_size"] % heads or (s["hidden_size"] // heads) % 2:
            raise ConfigError(
                f"{where}.heads: hidden_size ({s['hidden_size']}) / heads ({heads}) must be an "
                "even integer (the RoPE head dimension); change one of them"
            )
        if heads % kv:
            raise ConfigError(f"{where}.kv_heads: {kv} must divide heads ({heads})")
    return s


def check_settings(settings: dict, where: str, cfg: dict, role: str) -> None:
    """DAG-time check of a ``train:`` block (role: 'pretrain' or 'continual').

    ``where`` is the block's config key (``models.<name>.train`` or
    ``methods.<label>.checkpoints.<name>.train``). Raises :class:`~ropelens.errors.ConfigError`
    with one line naming the key and the fix.
    """
    s = validate(settings, where, role, cfg["corpora"])
    length = None
    if role == "pretrain":
        for name, model in cfg["models"].items():
            if where == f"models.{name}.train":
                length = model["pretrained_length"]
    else:
        label, model = _find_continual(cfg, where)
        entry = cfg["methods"][label]
        length = entry.get("cpt_length")
        if length is None:
            raise ConfigError(
                f"methods.{label}.cpt_length: required with a trained checkpoint; "
                "set the continual-pretraining length (e.g. cpt_length: 1024)"
            )
        _check_apply(cfg, label, entry)
    if length is not None and s["needle_fraction"] > 0 and length < _needle_min_tokens():
        raise ConfigError(
            f"{where}.needle_fraction: training length {length} is too short for needle prompts "
            f"(>= {_needle_min_tokens()} tokens); set needle_fraction: 0 or train longer"
        )


def _check_apply(cfg: dict, label: str, entry: dict) -> None:
    """A trained checkpoint saves the method's RoPE; re-applying it must change nothing."""
    from ropelens.grid import method_params

    name = entry.get("method", label)
    params = method_params(entry)
    if entry.get("apply", True) and not idempotent(name, params, f"methods.{label}"):
        raise ConfigError(
            f"methods.{label}.apply: a continually-pretrained '{name}' checkpoint already carries "
            f"its scaled RoPE and applying '{name}' again at evaluation would scale it twice; "
            "set apply: false"
        )


# --- data ----------------------------------------------------------------------------------------


def read_texts(path: str | Path) -> tuple[list[str], dict]:
    """Texts of a materialised corpus Parquet and its provenance."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable corpus Parquet ({e})") from None
    meta = table.schema.metadata or {}
    prov = json.loads(meta.get(b"ropelens.provenance", b"{}"))
    texts = [t for t in table.column("text").to_pylist() if t]
    if not texts:
        raise DataError(f"{path}: the corpus has no documents")
    return texts, prov


class Packer:
    """Documents in a seeded random order, joined by EOS, cut into consecutive windows.

    A new permutation starts each epoch; documents are tokenised only when needed.
    """

    def __init__(self, texts: list[str], tokenizer, seed: int):
        import numpy as np

        self.texts = texts
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id
        self.rng = np.random.default_rng(seed)
        self.order: list[int] = []
        self.buf: list[int] = []
        self.pos = 0
        self.tokens_read = 0

    def take(self, n: int) -> list[int]:
        while len(self.buf) - self.pos < n:
            if not self.order:
                self.order = self.rng.permutation(len(self.texts)).tolist()[::-1]
            text = self.texts[self.order.pop()]
            ids = self.tok(text)["input_ids"]  # special tokens as in evaluation (none for bytes)
            self.buf = self.buf[self.pos :] + list(ids) + [self.eos]
            self.pos = 0
            self.tokens_read += len(ids) + 1
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out


class Batches:
    """Training batches: packed LM windows plus needle prompts (answer mask for the extra loss)."""

    def __init__(self, tokenizer, length: int, settings: dict, corpus: list[str], haystack=None):
        from ropelens import needle

        self.tok = tokenizer
        self.length = length
        self.batch = settings["batch_size"]
        self.fraction = settings["needle_fraction"]
        seed = settings["seed"]
        self.packer = Packer(corpus, tokenizer, seed)
        self.rng = random.Random(seed + 1)
        self.haystack = haystack or []
        self.tasks = 0
        if self.haystack:
            self.min_prompt = needle.min_length(tokenizer)
            self.tail = tokenizer(".\n", add_special_tokens=False)["input_ids"]
            question = needle.DEFAULT_TEMPLATE.question.lstrip("\n")
            self.question = tokenizer(question, add_special_tokens=False)["input_ids"]
            if self.min_prompt + 8 > length:
                raise DataError(
                    f"training length {length} is too short for needle prompts "
                    f"(>= {self.min_prompt + 8} tokens); set needle_fraction: 0 or train longer"
                )

    def _haystack(self) -> list[str]:
        """Haystack documents from a random line of a random document on (no memorised starts)."""
        docs, rng = self.haystack, self.rng
        j = rng.randrange(len(docs))
        text = docs[j]
        cut = rng.randrange(max(1, len(text) // 2))
        start = text.find("\n", cut) + 1
        return [text[start:]] + docs[j + 1 :] + docs[:j]

    def _needle_length(self, room: int) -> int:
        """Prompt length of the next packed needle task: half short, half up to ``room``."""
        lo = self.min_prompt + 8
        hi = min(room, lo + 48) if self.rng.random() < 0.5 else room
        return self.rng.randint(lo, max(lo, hi))

    def needle_row(self) -> tuple[list[int], list[int]]:
        """Needle tasks (prompt + answer + EOS) packed into one window, the rest LM text.

        Each task's needle is the most recent one when its question comes, as in evaluation.
        """
        from ropelens import needle

        rng, eos = self.rng, self.tok.eos_token_id
        ids: list[int] = []
        mask: list[int] = []
        while self.length - len(ids) >= self.min_prompt + 8:
            n = self._needle_length(self.length - len(ids) - 1)
            depth = min(100.0, max(0.0, rng.uniform(-10.0, 110.0)))
            prompt = needle.build_prompt(self.tok, self._haystack(), n, depth, rng.getrandbits(32))
            ids += prompt.input_ids + prompt.target_ids + self.tail
            mask += [0] * n + [1] * len(prompt.target_ids) + [0] * len(self.tail)
            while rng.random() < 0.5:  # ask again: short-range copies speed up learning to copy
                ids += self.question + prompt.target_ids + self.tail
                mask += [0] * len(self.question) + [1] * len(prompt.target_ids)
                mask += [0] * len(self.tail)
            ids.append(eos)
            mask.append(0)
            self.tasks += 1
        ids, mask = ids[: self.length], mask[: self.length]
        if len(ids) < self.length:
            ids += self.packer.take(self.length - len(ids))
            mask += [0] * (self.length - len(mask))
        return ids, mask

    def __call__(self):
        """(input ids, answer mask, position ids), each ``batch_size × length``."""
        import torch

        rows, masks = [], []
        expected = self.fraction * self.batch  # needle rows: the whole part, the rest by chance
        n_needle = int(expected) + (self.rng.random() < expected - int(expected))
        for i in range(self.batch):
            if i < n_needle:
                ids, mask = self.needle_row()
            else:
                ids, mask = self.packer.take(self.length), [0] * self.length
            rows.append(ids)
            masks.append(mask)
        x = torch.tensor(rows, dtype=torch.long)
        positions = segment_positions(x, self.tok.eos_token_id)
        return x, torch.tensor(masks, dtype=torch.bool), positions


def segment_positions(x, eos: int):
    """Position ids that restart after every EOS, so packed segments are independent.

    transformers turns restarting position ids into a block-diagonal causal mask (packed sequences),
    so each document and each needle task sees only itself, from position 0 — as in evaluation.
    """
    import torch

    t = torch.arange(x.shape[1], device=x.device).expand_as(x)
    after_eos = torch.zeros_like(x, dtype=torch.bool)
    after_eos[:, 1:] = x[:, :-1] == eos
    start = torch.where(after_eos, t, torch.zeros_like(t))
    return t - torch.cummax(start, dim=1).values


# --- training ------------------------------------------------------------------------------------


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


def train(model, tokenizer, settings: dict, length: int, corpus_path, haystack_path, progress=None):
    """Train ``model`` in place on the mix described by ``settings``; returns a summary dict."""
    import torch
    import torch.nn.functional as F

    corpus, corpus_prov = read_texts(corpus_path)
    haystack, haystack_prov = (None, None)
    if settings["needle_fraction"] > 0:
        if not haystack_path:
            raise DataError("needle_fraction > 0 needs a haystack corpus (--haystack)")
        haystack, haystack_prov = read_texts(haystack_path)
    _seed_all(settings["seed"])
    batches = Batches(tokenizer, length, settings, corpus, haystack)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": settings["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=settings["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    model.train()
    device = next(model.parameters()).device
    curve, t0 = [], time.perf_counter()
    steps = range(settings["steps"])
    bar = progress(steps) if progress else steps
    every = max(1, settings["steps"] // 50)
    lm_acc = ans_acc = 0.0
    n_acc = 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, settings)
        x, mask, positions = (t.to(device) for t in batches())
        logits = model(input_ids=x, position_ids=positions, use_cache=False).logits[:, :-1]
        target = x[:, 1:]
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
        )
        lm = nll.mean()
        answer = mask[:, 1:].reshape(-1)
        ans = nll[answer].mean() if bool(answer.any()) else lm.new_zeros(())
        loss = lm + settings["answer_weight"] * ans
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if settings["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings["grad_clip"])
        opt.step()
        lm_acc += float(lm.detach())
        ans_acc += float(ans.detach())
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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ropelens.tokenizer import build_byte_tokenizer

    tok = build_byte_tokenizer()
    hidden = settings["hidden_size"]
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=settings.get("intermediate_size") or 4 * hidden,
        num_hidden_layers=settings["layers"],
        num_attention_heads=settings["heads"],
        num_key_value_heads=settings.get("kv_heads") or settings["heads"],
        max_position_embeddings=pretrained_length,
        rope_parameters={"rope_type": "default", "rope_theta": float(settings["rope_theta"])},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=bool(settings.get("tie_embeddings", False)),
        initializer_range=float(settings.get("init_std", 0.02)),
    )
    torch.manual_seed(settings["seed"])
    model = LlamaForCausalLM(config)
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
    settings = defaults(settings, "pretrain")
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
    settings = defaults(settings, "continual")
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


# --- command line --------------------------------------------------------------------------------


def _progress(desc: str):
    from ropelens.cli import _progress

    return _progress(desc, mininterval=5.0, ascii=True)  # long runs: fewer, plain-ASCII updates


def _with_threads(settings: dict, threads: int | None) -> dict:
    return {**settings, "threads": threads} if threads else settings


def cmd_pretrain(args) -> int:
    validate(args.settings, "--settings", "pretrain")
    args.settings = _with_threads(args.settings, args.threads)
    s = pretrain(
        args.settings,
        args.length,
        args.corpus,
        args.haystack,
        args.out,
        device=args.device,
        progress=_progress(f"pretrain L={args.length}"),
    )
    print(
        f"wrote {args.out}: {s['parameters']} parameters, {s['steps']} steps in "
        f"{s['seconds']:.1f} s, final LM loss {s['final']['lm_loss']:.4f}, "
        f"answer loss {s['final']['answer_loss']:.4f}",
        file=sys.stderr,
    )
    return 0


def cmd_continual(args) -> int:
    validate(args.settings, "--settings", "continual")
    args.settings = _with_threads(args.settings, args.threads)
    s = continual(
        args.spec,
        args.settings,
        args.length,
        args.corpus,
        args.haystack,
        args.out,
        device=args.device,
        progress=_progress(f"continual {args.spec.get('method')} L={args.length}"),
    )
    print(
        f"wrote {args.out}: {s['steps']} steps at {args.length} in {s['seconds']:.1f} s, "
        f"final LM loss {s['final']['lm_loss']:.4f}, answer loss {s['final']['answer_loss']:.4f}",
        file=sys.stderr,
    )
    return 0


def _add_run_args(s) -> None:
    """Arguments both training commands take, after their own."""
    from ropelens.cli import _json

    s.add_argument("--settings", type=_json, required=True, help="JSON train block from config")
    s.add_argument("--corpus", required=True, help="LM corpus Parquet from `ropelens corpus`")
    s.add_argument("--haystack", help="haystack corpus Parquet (needed when needle_fraction > 0)")
    s.add_argument("--out", required=True, help="output model directory")
    s.add_argument("--device", default="cpu", help="cpu (default, deterministic), cuda or auto")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: settings' threads)")


def add_commands(sub) -> None:
    """Register the toy-zoo subcommands on the ``ropelens`` parser."""
    from ropelens.cli import _json

    s = sub.add_parser("pretrain", help="pretrain a toy LLaMA (plain RoPE) from scratch")
    s.add_argument("--length", type=int, required=True, help="pretraining length L0 in tokens")
    _add_run_args(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("continual", help="continually pretrain a base model with a RoPE method")
    s.add_argument("--spec", type=_json, required=True, help="JSON cell spec; source = the base")
    s.add_argument("--length", type=int, required=True, help="continual-pretraining length")
    _add_run_args(s)
    s.set_defaults(func=cmd_continual)
