"""Needle-in-a-Haystack prompts for base (non-chat) models, and a greedy scorer.

A prompt is ``[special prefix] haystack[:k] needle haystack[k:] question`` with exactly ``length``
tokens. The haystack is the given documents (joined by a blank line, repeated if too short) trimmed
to fit; the needle sentence goes at ``depth`` percent of the haystack (0 = start, 100 = end) by one
of three placement rules (:data:`PLACEMENTS`):

- ``gkamradt`` (the default): the rule of gkamradt's LLMTest_NeedleInAHaystack
  (``insert_needle``), which most published NIAH grids use: ``int(n · depth / 100)`` tokens into
  the ``n`` haystack tokens, then back to just after the previous ``.`` token (0 if there is none);
  depth 100 appends the needle at the end.
- ``boundary``: ``round(depth / 100 · n)`` tokens in, then back to the nearest preceding sentence
  end (``.``, ``!``, ``?`` followed by whitespace) or line end, so it never splits a word.
- ``word``: ``round(depth / 100 · n)`` tokens in, then to the nearest word start (a token that
  starts with whitespace, or a line start): within half a word of the requested depth even
  where sentences are long in tokens (a byte-level model's sentence is ~100 tokens, so at a
  few hundred tokens the sentence rules put depths 25, 50 and 75 % on one position).

The sentence rules move the needle back from the requested depth, the word rule to the
nearest word; ``actual_depth`` records where it landed. The answer is a random number drawn from
``seed``; :func:`cell_seed` derives one seed per (length, depth) so every model and method sees
the same prompt in the same grid cell.

    >>> from ropelens.tokenizer import build_byte_tokenizer
    >>> tok = build_byte_tokenizer()
    >>> p = build_prompt(tok, ["First line.\\nSecond line. Third."], 96, 50, seed=7)
    >>> len(p.input_ids), tok.decode(p.input_ids[slice(*p.needle_span)]) == p.needle_text
    (96, True)

:func:`run` generates greedily after the prompt and :func:`score` grades the continuation: ``exact``
(the first number in the continuation is the answer) and a graded recall ``score`` in [0, 1].
The toy zoo trains on these prompts (``ropelens.toydata``), so the template here is the task it
learns.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ropelens.errors import DataError

DOC_SEPARATOR = "\n\n"
PLACEMENTS = ("gkamradt", "boundary", "word")
DEFAULT_PLACEMENT = "gkamradt"
SENTENCE_END = (".", "!", "?")
_SPACE_MARKS = ("Ġ", "▁", "Ċ", "ĉ")  # byte-level / sentencepiece spellings of leading whitespace


@dataclass(frozen=True)
class Template:
    """Needle sentence and question for base models; ``{answer}`` is the random number.

    The prompt ends with ``question``; the expected continuation is ``answer_prefix + answer``
    (a leading space, so subword tokenizers see a normal word boundary).
    """

    needle: str = "The magic number is {answer}."
    question: str = "\nWhat is the magic number? The magic number is"
    answer_prefix: str = " "
    digits: int = 5
    # the chat format (instruct models): the user turn ends with chat_question after the
    # haystack; the assistant turn opens with chat_answer_start, so the expected continuation is
    # answer_prefix + answer in both formats
    chat_question: str = "\nWhat is the magic number?"
    chat_answer_start: str = "The magic number is"


DEFAULT_TEMPLATE = Template()


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle prompt.

    ``input_ids`` has exactly ``length`` tokens; ``needle_span`` is the token span [start, end) of
    the inserted needle text (with its separating whitespace); ``target_ids`` are the tokens of the
    expected continuation (``answer_prefix + answer``); ``depth`` is the requested depth and
    ``actual_depth`` where the needle landed, both in percent of the haystack tokens;
    ``placement`` the rule that placed it (:data:`PLACEMENTS`).
    """

    input_ids: list[int]
    needle_span: tuple[int, int]
    answer: str
    target_ids: list[int]
    needle_text: str
    length: int
    depth: float
    actual_depth: float
    seed: int
    placement: str = DEFAULT_PLACEMENT


@dataclass(frozen=True)
class Score:
    exact: bool
    score: float
    predicted: str


def cell_seed(length: int, depth: float, seed: int = 0) -> int:
    """A stable 32-bit seed for one grid cell (independent of model and method)."""
    key = f"ropelens-needle|{seed}|{int(length)}|{float(depth):g}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")


def make_answer(rng: random.Random, digits: int = 5) -> str:
    """A random ``digits``-digit number without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def special_prefix(tokenizer) -> list[int]:
    """The tokens the tokenizer puts before text by default (``<s>``; none for the byte one)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i])
    return []


class _Pieces:
    """Per-token facts the boundary search needs, cached per token id."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.cache: dict[int, tuple[bool, bool, bool]] = {}

    def __call__(self, token_id: int) -> tuple[bool, bool, bool]:
        """(ends a sentence, ends a line, starts with whitespace)."""
        hit = self.cache.get(token_id)
        if hit is None:
            text = self.tok.decode([token_id])
            raw = self.tok.convert_ids_to_tokens(token_id) or ""
            hit = (
                text.rstrip(" \t").endswith(SENTENCE_END) and not text.endswith("\n"),
                text.endswith("\n"),
                text[:1].isspace() or raw.startswith(_SPACE_MARKS),
            )
            self.cache[token_id] = hit
        return hit


def _haystack_ids(tokenizer, haystack: Sequence[str], n_tokens: int) -> list[int]:
    """At least ``n_tokens`` haystack tokens: the documents in order, repeated as needed."""
    docs = [d for d in haystack if d and d.strip()]
    if not docs:
        raise DataError("needle: the haystack has no text; give at least one non-empty document")
    encoded = []
    ids: list[int] = []
    i = 0
    while len(ids) < n_tokens:
        if i < len(docs):
            text = docs[i] + DOC_SEPARATOR
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        chunk = encoded[i % len(docs)]
        if not chunk:
            raise DataError("needle: the haystack tokenises to nothing")
        ids.extend(chunk)
        i += 1
    return ids


def _boundary(hay: list[int], target: int, pieces: _Pieces) -> int:
    """The largest sentence/line boundary <= ``target`` (0 is always one)."""
    for i in range(min(target, len(hay)), 0, -1):
        sentence, line, _ = pieces(hay[i - 1])
        if line or (sentence and (i == len(hay) or pieces(hay[i])[2])):
            return i
    return 0


def _word_start(hay: list[int], target: int, pieces: _Pieces) -> int:
    """The word start nearest ``target`` (the earlier on a tie): a token starting with whitespace,
    or one after a line end; 0 is always one."""
    target = min(target, len(hay) - 1)

    def starts(i: int) -> bool:
        return i == 0 or pieces(hay[i])[2] or pieces(hay[i - 1])[1]

    for step in range(target + 1):
        for i in (target - step, target + step):
            if 0 <= i < len(hay) and starts(i):
                return i
    return 0


def period_ids(tokenizer) -> set[int]:
    """The token ids of a ``.``: alone (gkamradt's ``encode('.')``) and after a word (``"a."``),
    which differ for sentencepiece tokenizers (``▁.`` vs ``.``)."""
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return set(enc(".")) | set(enc("a.")[-1:])


def gkamradt_point(hay: Sequence[int], depth: float, periods: set[int]) -> int:
    """gkamradt's insertion point in ``hay`` for ``depth`` < 100 (``insert_needle``):
    ``int(n * (depth / 100))``, then back while the token before it is not a period."""
    k = int(len(hay) * (depth / 100))
    while k > 0 and hay[k - 1] not in periods:
        k -= 1
    return k


def _place(tokenizer, hay, depth, budget, reserve, needle, placement):
    """(insertion point, needle text) under ``placement``; ``hay`` has >= budget + reserve tokens.

    gkamradt: the haystack is the one left after the needle (``budget + reserve`` minus its own
    tokens), as their tester trims the context by the needle length before inserting.
    """
    if depth >= 100:
        return None, " " + needle  # at the very end, after the haystack is trimmed
    if placement == "gkamradt":
        n = budget + reserve - len(tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
        k = gkamradt_point(hay[:n], depth, period_ids(tokenizer))
        return k, (needle + "\n" if k == 0 else " " + needle)
    pieces = _Pieces(tokenizer)
    find = _word_start if placement == "word" else _boundary
    k = find(hay[:budget], round(depth / 100 * budget), pieces)
    at_line_start = k == 0 or pieces(hay[k - 1])[1]
    return k, (needle + "\n" if at_line_start else " " + needle)


FORMATS = ("auto", "chat", "plain")
_SLOT = "\x00ropelens-haystack\x00"


def resolve_format(tokenizer, fmt: str = "auto") -> str:
    """``chat`` or ``plain``: ``auto`` is chat when the tokenizer has a chat template."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        return "chat" if has_chat else "plain"
    if fmt == "chat" and not has_chat:
        raise DataError(
            "needle.format: 'chat' but the model's tokenizer has no chat template; "
            "use format: plain (or auto)"
        )
    if fmt not in FORMATS:
        raise DataError(f"needle.format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def frame(tokenizer, template: Template = DEFAULT_TEMPLATE, fmt: str = "plain"):
    """Token ids before the haystack and after it (the question) in prompt format ``fmt``.

    ``plain``: the tokenizer's special prefix, then the haystack, then ``template.question``.
    ``chat``: the chat template around one user turn (haystack + ``chat_question``), with the
    generation prompt and ``chat_answer_start`` opening the assistant's turn.
    """
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if fmt == "plain":
        return special_prefix(tokenizer), enc(template.question)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(_SLOT)
    return enc(before), enc(template.chat_question + after + template.chat_answer_start)


def min_length(tokenizer, template: Template = DEFAULT_TEMPLATE, fmt: str = "plain") -> int:
    """The shortest ``length`` :func:`build_prompt` accepts (needle, question, no haystack)."""
    answer = "9" * template.digits
    needle = template.needle.format(answer=answer)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, question = frame(tokenizer, template, fmt)
    return len(prefix) + len(question) + len(enc(" " + needle + "\n"))


def build_prompt(
    tokenizer,
    haystack: str | Sequence[str],
    length: int,
    depth: float,
    seed: int,
    template: Template = DEFAULT_TEMPLATE,
    fmt: str = "plain",
    placement: str = DEFAULT_PLACEMENT,
) -> NeedlePrompt:
    """Build a needle prompt of exactly ``length`` tokens (see the module docstring).

    ``haystack`` is a text or a sequence of documents (used in order, joined by a blank line and
    repeated if needed); ``depth`` is in percent (0 = start, 100 = right before the question);
    ``seed`` draws the answer; ``fmt`` is the prompt format (:func:`frame`: ``plain`` or
    ``chat``; the needle span is exact token positions in either); ``placement`` is one of
    :data:`PLACEMENTS`. Raises :class:`~ropelens.errors.DataError` if ``length`` cannot hold the
    needle and the question.
    """
    if not 0 <= depth <= 100:
        raise DataError(f"needle: depth {depth} is out of range; use 0..100 (percent)")
    if placement not in PLACEMENTS:
        raise DataError(f"needle: placement {placement!r} is unknown; use one of {PLACEMENTS}")
    if isinstance(haystack, str):
        haystack = [haystack]
    rng = random.Random(seed)
    answer = make_answer(rng, template.digits)
    needle = template.needle.format(answer=answer)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prefix, question = frame(tokenizer, template, fmt)
    reserve = len(enc(" " + needle + "\n"))
    budget = length - len(prefix) - len(question) - reserve
    if budget < 0:
        shortest = min_length(tokenizer, template, fmt)
        raise DataError(
            f"needle: length {length} is too short for the needle and question; "
            f"use a length of at least {shortest} tokens"
        )
    hay = _haystack_ids(tokenizer, haystack, budget + reserve)
    k, text = _place(tokenizer, hay, depth, budget, reserve, needle, placement)
    needle_ids = enc(text)
    n_hay = length - len(prefix) - len(question) - len(needle_ids)
    if k is None:
        k = n_hay
    k = min(k, n_hay)
    ids = prefix + hay[:k] + needle_ids + hay[k:n_hay] + question
    start = len(prefix) + k
    return NeedlePrompt(
        input_ids=ids,
        needle_span=(start, start + len(needle_ids)),
        answer=answer,
        target_ids=enc(template.answer_prefix + answer),
        needle_text=text,
        length=length,
        depth=float(depth),
        actual_depth=100.0 * k / n_hay if n_hay else 100.0,
        seed=int(seed),
        placement=placement,
    )


_NUMBER = re.compile(r"\d+")


def score(generated: str, answer: str) -> Score:
    """Grade a continuation against the answer.

    ``predicted`` is the first run of digits in ``generated`` ('' if none). ``exact``: it equals the
    answer. ``score``: characters right in their position over the longer of the two (1.0 = exact,
    0.0 = nothing right; extra or missing digits cost).
    """
    m = _NUMBER.search(generated)
    predicted = m.group(0) if m else ""
    longest = max(len(predicted), len(answer)) or 1
    right = sum(a == b for a, b in zip(predicted, answer))
    return Score(exact=predicted == answer, score=right / longest, predicted=predicted)


def greedy(model, input_ids: Sequence[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """Greedy continuation of ``input_ids`` (no sampling, KV cache), stopping at EOS.

    Only the last position's logits are computed, so a long prompt never materialises
    ``length × vocab`` logits.
    """
    import torch

    device = next(model.parameters()).device
    x = torch.as_tensor([list(input_ids)], dtype=torch.long, device=device)
    out: list[int] = []
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            res = model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            if eos_token_id is not None and nxt == eos_token_id:
                break
            out.append(nxt)
            x = torch.tensor([[nxt]], device=device)
    return out


def run(model, tokenizer, prompt: NeedlePrompt, max_new_tokens: int | None = None) -> dict:
    """Generate greedily after ``prompt`` and grade it: generated text, exact, score, predicted."""
    n = max_new_tokens or len(prompt.target_ids) + 4
    new = greedy(model, prompt.input_ids, n, tokenizer.eos_token_id)
    text = tokenizer.decode(new)
    s = score(text, prompt.answer)
    return {"generated": text, "exact": s.exact, "score": s.score, "predicted": s.predicted}
