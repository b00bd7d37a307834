"""The toy zoo's training data (:mod:`ropelens.toytrain` trains on it).

The training mix (:class:`Batches`):

- LM rows: documents of an LM corpus (e.g. the standard-library sources) in a seeded order, each
  ``<s> document </s>``, packed into windows of the training length (:class:`Packer`);
- task rows (``needle_fraction`` of each batch): retrieval tasks packed one after another, each
  drawn by the weights of ``task_mix`` — ``needle`` (:func:`ropelens.needle.build_prompt`; its
  answer sometimes asked again) or a task of :mod:`ropelens.tasks` (passkey in its filler,
  multi-key, multi-value, variable tracking; numbers of planted sentences drawn from
  :data:`TRAIN_COUNTS`) — on a random line of the haystack corpus on, at a random length and
  depth, each followed by its answer; the answer mask marks the tokens whose cross-entropy
  ``answer_weight`` adds to the LM loss. The prompts are those evaluation builds, with seeds of
  the training's own.

Position ids restart after every ``</s>`` (:func:`segment_positions`), so transformers masks
packed segments from each other and every document and task starts at position 0, as in
evaluation. Everything is seeded by the settings' ``seed``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ropelens.errors import DataError

NEEDLE = "needle"
# per task prompt, each count uniform in [low, high]: distractors, values, hops
TRAIN_COUNTS = {"distractors": (1, 3), "values": (2, 4), "hops": (2, 4)}
FEWEST = {k: lo for k, (lo, _) in TRAIN_COUNTS.items()}  # the shortest prompts of each task


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
        mix = {k: float(w) for k, w in settings.get("task_mix", {NEEDLE: 1}).items() if w > 0}
        self.mix_names, self.mix_weights = list(mix), list(mix.values())
        self.mix_from = settings.get("task_mix_from", 0)  # needle only for the first batches
        self.placement = settings.get("placement", "gkamradt")  # of the needle prompts
        self.batches = 0
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
            for task in self.mix_names:
                if task != NEEDLE and self._task_min(task, 0, FEWEST) + 8 > length:
                    raise DataError(
                        f"task_mix.{task}: training length {length} is too short for its prompts; "
                        "remove it from task_mix or train longer"
                    )

    def _haystack(self) -> list[str]:
        """Haystack documents from a random line of a random document on (no memorised starts)."""
        docs, rng = self.haystack, self.rng
        j = rng.randrange(len(docs))
        text = docs[j]
        cut = rng.randrange(max(1, len(text) // 2))
        start = text.find("\n", cut) + 1
        return [text[start:]] + docs[j + 1 :] + docs[:j]

    def _prompt_length(self, lo: int, room: int) -> int:
        """Length of the next packed prompt, at least ``lo``: half short, half up to ``room``."""
        hi = min(room, lo + 48) if self.rng.random() < 0.5 else room
        return self.rng.randint(lo, max(lo, hi))

    def _task_min(self, task: str, seed: int, counts: dict) -> int:
        from ropelens import tasks

        return tasks.min_length(self.tok, task, seed, counts=counts)

    def _next_task(self) -> str:
        """The task of the next prompt: the needle until ``task_mix_from``, then drawn by the
        mix's weights (no draw for a mix of one)."""
        if self.batches <= self.mix_from:
            return NEEDLE
        if len(self.mix_names) == 1:
            return self.mix_names[0]
        return self.rng.choices(self.mix_names, self.mix_weights)[0]

    def _depth(self) -> float:
        """Uniform over -10..110 %, clipped: the ends (0 and 100 %) a twelfth each."""
        return min(100.0, max(0.0, self.rng.uniform(-10.0, 110.0)))

    def _needle_piece(self, room: int):
        """(ids, mask) of one needle task (answer maybe asked again), or None if it cannot fit."""
        from ropelens import needle

        rng = self.rng
        if room < self.min_prompt + 8:
            return None
        n = self._prompt_length(self.min_prompt + 8, room - 1)
        depth = self._depth()
        prompt = needle.build_prompt(
            self.tok, self._haystack(), n, depth, rng.getrandbits(32), placement=self.placement
        )
        ids = prompt.input_ids + prompt.target_ids + self.tail
        mask = [0] * n + [1] * len(prompt.target_ids) + [0] * len(self.tail)
        while rng.random() < 0.5:  # ask again: short-range copies speed up learning to copy
            ids += self.question + prompt.target_ids + self.tail
            mask += [0] * len(self.question) + [1] * len(prompt.target_ids) + [0] * len(self.tail)
        return ids, mask

    def _task_piece(self, task: str, room: int):
        """(ids, mask) of one prompt of a :mod:`ropelens.tasks` task, or None if it cannot fit."""
        from ropelens import tasks

        rng = self.rng
        counts = {k: rng.randint(lo, hi) for k, (lo, hi) in TRAIN_COUNTS.items()}
        seed = rng.getrandbits(32)
        lo = self._task_min(task, seed, counts) + 8
        if room - 1 < lo:
            return None
        n, depth = self._prompt_length(lo, room - 1), self._depth()
        hay = tasks.haystack_docs(None) if task == "passkey" else self._haystack()
        prompt = tasks.build(self.tok, task, hay, n, depth, seed, counts=counts)
        ids = prompt.input_ids + prompt.target_ids + self.tail
        return ids, [0] * n + [1] * len(prompt.target_ids) + [0] * len(self.tail)

    def needle_row(self) -> tuple[list[int], list[int]]:
        """Tasks (prompt + answer + EOS) packed into one window, the rest LM text.

        Each task's planted sentences are the most recent ones when its question comes, as in
        evaluation. The task of each prompt is drawn by ``task_mix`` (no draw for one task).
        """
        eos = self.tok.eos_token_id
        ids: list[int] = []
        mask: list[int] = []
        while True:
            task = self._next_task()
            room = self.length - len(ids)
            piece = self._needle_piece(room) if task == NEEDLE else self._task_piece(task, room)
            if piece is None:
                break
            ids += piece[0] + [eos]
            mask += piece[1] + [0]
            self.tasks += 1
        ids, mask = ids[: self.length], mask[: self.length]
        if len(ids) < self.length:
            ids += self.packer.take(self.length - len(ids))
            mask += [0] * (self.length - len(mask))
        return ids, mask

    def __call__(self):
        """(input ids, answer mask, position ids), each ``batch_size × length``."""
        import torch

        self.batches += 1
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
