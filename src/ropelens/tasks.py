"""Synthetic long-context tasks beyond one needle: prompts, planted spans and scoring.

Four tasks (:data:`TASKS`), each built on the needle machinery (:mod:`ropelens.needle`: haystack
documents in order, the plain/chat frame, gkamradt placement) into a prompt of exactly ``length``
tokens, with every planted sentence recorded as a token span [start, end):

- ``passkey`` (Mohtashami & Jaggi 2023): a 5-digit pass key in the repeated filler "The grass is
  green. …" (``haystack: filler``; a corpus name works too) at the cell's depth. Span: ``needle``.
- ``multi_key``: the needle "The magic number of <key> is <value>." at the cell's depth among
  ``distractors`` needles with other keys and values, placed at evenly spread depths
  100 · (j + ½) / distractors; the question asks for the true key. Spans: ``needle`` and
  ``distractor``.
- ``multi_value``: ``values`` sentences "One magic number of <key> is <value>." under one key, the
  first at the cell's depth d and value j at d + (100 − d) · j / values; score = the fraction of
  the values the continuation contains (RULER's ``string_match_all``). Spans: ``value``.
- ``variable_tracking``: a chain "VAR <A> = 12345." "VAR <B> = <A>." … of ``hops`` assignments,
  spread as the values are; the question asks for the value of the last variable. Span ``hop`` j
  is assignment j (hop 0 holds the number).

Keys are words of :data:`KEYS`, variables random capital-letter names, numbers ``digits`` long
without a leading zero; all are drawn from one seed per (task, length, depth) (:func:`cell_seed`),
so every model and method sees the same prompt in the same grid cell.

    >>> from ropelens.tokenizer import build_byte_tokenizer
    >>> tok = build_byte_tokenizer()
    >>> p = build(tok, "multi_key", ["Filler text. More filler."], 200, 50, seed=1)
    >>> len(p.input_ids), [s.kind for s in p.spans]
    (200, ['needle', 'distractor', 'distractor', 'distractor'])
    >>> all(tok.decode(p.input_ids[s.start:s.end]) == s.text for s in p.spans)
    True
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ropelens import needle
from ropelens.errors import DataError

TASKS = ("passkey", "multi_key", "multi_value", "variable_tracking")
FILLER = "filler"  # haystack name of the passkey filler (no corpus)
FILLER_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_WORDS = (
    "apple river tiger cloud stone maple eagle ocean piano lemon tulip comet violet falcon garnet "
    "harbor island jungle kettle lantern meadow nickel orchid pepper quartz rocket saddle timber "
    "walnut zephyr"
)
KEYS = tuple(_WORDS.split())  # multi_key / multi_value keys
DEFAULTS = {"distractors": 3, "values": 4, "hops": 4}  # numbers of planted sentences per task


@dataclass(frozen=True)
class TaskTemplate:
    """Sentences and question of one task. ``item`` is a planted sentence (``{key}``, ``{value}``;
    variable tracking: the first assignment), ``chain`` a later assignment (``{key}`` = ``{value}``
    the previous variable). The prompt ends with ``question`` (plain) or ``chat_question`` +
    the assistant turn opened with ``chat_answer_start`` (chat); the expected continuation is
    ``answer_prefix`` + the answer in both."""

    item: str
    question: str
    chat_question: str
    chat_answer_start: str
    chain: str = ""
    answer_prefix: str = " "
    digits: int = 5


TEMPLATES = {
    "passkey": TaskTemplate(
        item="The pass key is {value}. Remember it. {value} is the pass key.",
        question="\nWhat is the pass key? The pass key is",
        chat_question="\nWhat is the pass key?",
        chat_answer_start="The pass key is",
    ),
    "multi_key": TaskTemplate(
        item="The magic number of {key} is {value}.",
        question="\nWhat is the magic number of {key}? The magic number of {key} is",
        chat_question="\nWhat is the magic number of {key}?",
        chat_answer_start="The magic number of {key} is",
    ),
    "multi_value": TaskTemplate(
        item="One magic number of {key} is {value}.",
        question="\nWhat are all the magic numbers of {key}? The magic numbers of {key} are",
        chat_question="\nWhat are all the magic numbers of {key}?",
        chat_answer_start="The magic numbers of {key} are",
    ),
    "variable_tracking": TaskTemplate(
        item="VAR {key} = {value}.",
        chain="VAR {key} = {value}.",
        question="\nWhat is the value of VAR {key}? The value of VAR {key} is",
        chat_question="\nWhat is the value of VAR {key}?",
        chat_answer_start="The value of VAR {key} is",
    ),
}


@dataclass(frozen=True)
class Span:
    """A planted sentence: ``kind`` (needle, distractor, value, hop), its index among that kind,
    the token range [start, end) in the prompt and its text (with the separating whitespace)."""

    kind: str
    index: int
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class TaskPrompt:
    """One task prompt of exactly ``length`` tokens. ``answers``: the values a right continuation
    contains (one, except multi_value); ``distractor_answers``: the distractors' values;
    ``target_ids``: the tokens of the expected continuation (``answer_prefix`` + the answers
    joined by ``", "``); ``actual_depth``: where the first span landed (percent of the
    haystack)."""

    task: str
    input_ids: list[int]
    spans: list[Span]
    answers: list[str]
    target_ids: list[int]
    length: int
    depth: float
    actual_depth: float
    seed: int
    distractor_answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TaskScore:
    passed: bool
    score: float
    predicted: str  # the numbers read from the continuation, comma-separated
    predicted_distractor: bool  # the first number is a distractor's value (multi_key)


def cell_seed(task: str, length: int, depth: float, seed: int = 0) -> int:
    """A stable 32-bit seed for one task cell (independent of model and method)."""
    key = f"ropelens-task|{task}|{seed}|{int(length)}|{float(depth):g}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def template(task: str, overrides: dict | None = None) -> TaskTemplate:
    """The task's template with the config's ``template`` overrides."""
    if task not in TASKS:
        raise DataError(f"tasks: unknown task {task!r}; use one of {', '.join(TASKS)}")
    return replace(TEMPLATES[task], **(overrides or {}))


def cell_options(settings: dict) -> tuple[dict, dict]:
    """(counts, template overrides) of a task cell's settings (``tasks.<task>`` with the shared
    keys, as :func:`ropelens.grid.task_settings` gives them): what :func:`build` and
    :func:`min_length` take besides the seed."""
    counts = {k: settings[k] for k in DEFAULTS if k in settings}
    overrides = dict(settings.get("template") or {})
    if "digits" in settings:
        overrides["digits"] = settings["digits"]
    return counts, overrides


def _numbers(rng: random.Random, n: int, digits: int) -> list[str]:
    """``n`` distinct ``digits``-digit numbers without a leading zero."""
    out: list[str] = []
    while len(out) < n:
        x = needle.make_answer(rng, digits)
        if x not in out:
            out.append(x)
    return out


def _variables(rng: random.Random, n: int) -> list[str]:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out: list[str] = []
    while len(out) < n:
        name = "".join(rng.choice(letters) for _ in range(5))
        if name not in out:
            out.append(name)
    return out


def plan(task: str, rng: random.Random, depth: float, tpl: TaskTemplate, counts: dict):
    """(planted items as (kind, index, depth, sentence), answers, distractor answers, key)."""
    n = {**DEFAULTS, **counts}
    spread = lambda j, m: depth + (100 - depth) * j / m  # noqa: E731
    if task == "passkey":
        (value,) = _numbers(rng, 1, tpl.digits)
        return [("needle", 0, depth, tpl.item.format(value=value))], [value], [], ""
    if task == "multi_key":
        keys = rng.sample(KEYS, n["distractors"] + 1)
        values = _numbers(rng, n["distractors"] + 1, tpl.digits)
        items = [("needle", 0, depth, tpl.item.format(key=keys[0], value=values[0]))]
        for j in range(n["distractors"]):
            d = 100 * (j + 0.5) / n["distractors"]
            items.append(
                ("distractor", j, d, tpl.item.format(key=keys[j + 1], value=values[j + 1]))
            )
        return items, values[:1], values[1:], keys[0]
    if task == "multi_value":
        key = rng.choice(KEYS)
        values = _numbers(rng, n["values"], tpl.digits)
        items = [
            ("value", j, spread(j, n["values"]), tpl.item.format(key=key, value=v))
            for j, v in enumerate(values)
        ]
        return items, values, [], key
    names = _variables(rng, n["hops"])
    (value,) = _numbers(rng, 1, tpl.digits)
    items = [("hop", 0, spread(0, n["hops"]), tpl.item.format(key=names[0], value=value))]
    for j in range(1, n["hops"]):
        text = tpl.chain.format(key=names[j], value=names[j - 1])
        items.append(("hop", j, spread(j, n["hops"]), text))
    return items, [value], [], names[-1]


def _frame(tokenizer, tpl: TaskTemplate, key: str, fmt: str):
    """Token ids before and after the haystack, the question filled in with ``key``."""
    filled = needle.Template(
        question=tpl.question.format(key=key),
        chat_question=tpl.chat_question.format(key=key),
        chat_answer_start=tpl.chat_answer_start.format(key=key),
    )
    return needle.frame(tokenizer, filled, fmt)


def haystack_docs(haystack: str | Sequence[str] | None) -> list[str]:
    """The documents to fill with: the passkey filler for ``None`` or ``"filler"``."""
    if haystack is None or haystack == FILLER:
        return [FILLER_TEXT + " "]
    return [haystack] if isinstance(haystack, str) else list(haystack)


def build(
    tokenizer,
    task: str,
    haystack: str | Sequence[str] | None,
    length: int,
    depth: float,
    seed: int,
    fmt: str = "plain",
    counts: dict | None = None,
    overrides: dict | None = None,
) -> TaskPrompt:
    """Build a ``task`` prompt of exactly ``length`` tokens (see the module docstring).

    ``haystack``: documents (or ``"filler"``/None: the passkey filler); ``counts``: numbers of
    distractors / values / hops; ``overrides``: template fields. Raises
    :class:`~ropelens.errors.DataError` if ``length`` cannot hold the planted sentences and the
    question.
    """
    if not 0 <= depth <= 100:
        raise DataError(f"tasks: depth {depth} is out of range; use 0..100 (percent)")
    tpl = template(task, overrides)
    items, answers, distractors, key = plan(task, random.Random(seed), depth, tpl, counts or {})
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, question = _frame(tokenizer, tpl, key, fmt)
    reserve = _reserve(tokenizer, items)
    budget = length - len(prefix) - len(question) - reserve
    if budget < 0:
        raise DataError(
            f"tasks: {task}: length {length} is too short for the planted sentences and the "
            f"question; use a length of at least {length - budget} tokens"
        )
    hay = needle._haystack_ids(tokenizer, haystack_docs(haystack), budget + reserve)
    ids, spans, n_hay, first = _assemble(
        tokenizer, hay, items, length - len(prefix) - len(question)
    )
    ids = prefix + ids + question
    spans = [replace(s, start=s.start + len(prefix), end=s.end + len(prefix)) for s in spans]
    target = tpl.answer_prefix + ", ".join(answers)
    return TaskPrompt(
        task=task,
        input_ids=ids,
        spans=spans,
        answers=answers,
        target_ids=enc(target),
        length=length,
        depth=float(depth),
        actual_depth=100.0 * first / n_hay if n_hay else 100.0,
        seed=int(seed),
        distractor_answers=distractors,
    )


def _reserve(tokenizer, items) -> int:
    """Tokens the planted sentences take (each with its separating whitespace)."""
    return sum(
        len(tokenizer(" " + t + "\n", add_special_tokens=False)["input_ids"]) for *_, t in items
    )


def min_length(
    tokenizer, task: str, seed: int, fmt: str = "plain", counts=None, overrides=None
) -> int:
    """The shortest ``length`` :func:`build` accepts for ``seed``: the frame, the question and
    the planted sentences, without haystack (the depth does not change it)."""
    tpl = template(task, overrides)
    items, _, _, key = plan(task, random.Random(seed), 0.0, tpl, counts or {})
    prefix, question = _frame(tokenizer, tpl, key, fmt)
    return len(prefix) + len(question) + _reserve(tokenizer, items)


def _assemble(tokenizer, hay, items, room: int):
    """Haystack with the items inserted at their depths (gkamradt points), ``room`` tokens in all:
    (ids, spans relative to the start, haystack tokens used, insertion point of the first item)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    periods = needle.period_ids(tokenizer)
    texts = [" " + text for *_, text in items]
    n_hay = room - sum(len(enc(t)) for t in texts)
    points = [
        None if d >= 100 else needle.gkamradt_point(hay[:n_hay], d, periods) for _, _, d, _ in items
    ]
    texts = [text + "\n" if k == 0 else " " + text for k, (*_, text) in zip(points, items)]
    n_hay = room - sum(len(enc(t)) for t in texts)
    points = [n_hay if k is None else min(k, n_hay) for k in points]  # depth 100: at the end
    order = sorted(range(len(items)), key=lambda i: (points[i], i))
    ids: list[int] = []
    spans: list[Span] = [None] * len(items)  # type: ignore[list-item]
    at = 0
    for i in order:
        ids += hay[at : points[i]]
        at = points[i]
        piece = enc(texts[i])
        kind, index, _, _ = items[i]
        spans[i] = Span(kind, index, len(ids), len(ids) + len(piece), texts[i])
        ids += piece
    ids += hay[at:n_hay]
    return ids, spans, n_hay, points[0]


_NUMBER = re.compile(r"\d+")


def score(prompt: TaskPrompt, generated: str) -> TaskScore:
    """Grade a continuation.

    multi_value: ``score`` = the fraction of the values among the numbers of the continuation,
    ``passed`` when all are there. The other tasks: ``passed`` when the first number is the
    answer, ``score`` = :func:`ropelens.needle.score`'s characters right in place.
    ``predicted_distractor``: the first number is a distractor's value.
    """
    found = _NUMBER.findall(generated)
    first = found[0] if found else ""
    distractor = first in prompt.distractor_answers
    if prompt.task == "multi_value":
        hit = sum(a in found for a in prompt.answers) / len(prompt.answers)
        return TaskScore(hit == 1.0, hit, ",".join(found), distractor)
    s = needle.score(generated, prompt.answers[0])
    return TaskScore(s.exact, s.score, ",".join(found[:1]), distractor)
