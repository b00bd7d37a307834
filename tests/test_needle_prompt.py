"""Needle prompt construction and scoring (ropelens.needle), on the byte tokenizer."""

import pytest
import torch

from ropelens import needle
from ropelens.errors import DataError
from ropelens.tokenizer import build_byte_tokenizer

HAYSTACK = [
    "Coroutines are functions. They can be suspended! Are they threads? No.\n"
    "A second line without an end\nA third line. " * 4,
    "Another document.\nIt has lines. And sentences.\n" * 6,
]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def decode(tok, ids):
    return tok.decode(ids)


@pytest.mark.parametrize("length", [96, 128, 200, 256, 1000])
@pytest.mark.parametrize("depth", [0, 10, 25, 50, 75, 99, 100])
def test_exact_length_span_and_answer(tok, length, depth):
    p = needle.build_prompt(tok, HAYSTACK, length, depth, seed=needle.cell_seed(length, depth))
    assert len(p.input_ids) == length == p.length
    start, end = p.needle_span
    assert decode(tok, p.input_ids[start:end]) == p.needle_text
    assert needle.DEFAULT_TEMPLATE.needle.format(answer=p.answer) in p.needle_text
    assert len(p.answer) == 5 and p.answer.isdigit() and p.answer[0] != "0"
    assert decode(tok, p.target_ids) == " " + p.answer
    text = decode(tok, p.input_ids)
    assert text.endswith(needle.DEFAULT_TEMPLATE.question)
    assert text.count("magic number is") == 2  # the needle and the question, nothing else
    assert 0.0 <= p.actual_depth <= 100.0


def test_depth_0_is_the_start_and_100_the_end(tok):
    first = needle.build_prompt(tok, HAYSTACK, 200, 0, seed=1)
    assert first.needle_span[0] == 0 and first.actual_depth == 0.0
    last = needle.build_prompt(tok, HAYSTACK, 200, 100, seed=1)
    question = tok(needle.DEFAULT_TEMPLATE.question, add_special_tokens=False)["input_ids"]
    assert last.needle_span[1] == 200 - len(question)  # right before the question
    assert last.actual_depth == 100.0


@pytest.mark.parametrize("depth", [5, 20, 40, 60, 80, 95])
def test_needle_sits_on_a_sentence_or_line_boundary(tok, depth):
    p = needle.build_prompt(tok, HAYSTACK, 400, depth, seed=3, placement="boundary")
    assert p.placement == "boundary"
    start, _ = p.needle_span
    before = decode(tok, p.input_ids[:start])
    assert before == "" or before.endswith("\n") or before.rstrip(" ").endswith((".", "!", "?"))
    # the nearest boundary at or before the requested depth: never after it
    assert p.actual_depth <= depth + 1e-9
    # the haystack around the needle is the documents in order, trimmed at the end, nothing lost
    question = len(tok(needle.DEFAULT_TEMPLATE.question, add_special_tokens=False)["input_ids"])
    hay = before + decode(tok, p.input_ids[p.needle_span[1] : 400 - question])
    assert ("".join(d + "\n\n" for d in HAYSTACK) * 4).startswith(hay)


def _gkamradt_reference(tok, haystack, length, depth, seed):
    """The prompt as gkamradt's ``insert_needle`` builds it, written after their loop: the context
    trimmed by the needle, ``int(len * (depth / 100))``, back while the last token is not a period
    token, depth 100 appended (ropelens' own prefix, separator and question around it)."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer = needle.make_answer(__import__("random").Random(seed))
    sentence = needle.DEFAULT_TEMPLATE.needle.format(answer=answer)
    question = enc(needle.DEFAULT_TEMPLATE.question)
    context = enc("".join(d + "\n\n" for d in haystack) * 8)
    context = context[: length - len(question) - len(enc(" " + sentence))]
    if depth == 100:
        return context + enc(" " + sentence) + question
    insertion_point = int(len(context) * (depth / 100))
    before = context[:insertion_point]
    period_tokens = enc(".")
    while before and before[-1] not in period_tokens:
        insertion_point -= 1
        before = context[:insertion_point]
    text = " " + sentence if before else sentence + "\n"
    if not before:  # ropelens' line-start separator: trim the context to the needle it uses
        context = context[: length - len(question) - len(enc(text))]
    return before + enc(text) + context[insertion_point:] + question


@pytest.mark.parametrize("length", [120, 400, 1000])
@pytest.mark.parametrize("depth", [0, 10, 25, 33.3, 50, 75, 99, 100])
def test_gkamradt_placement_equals_their_insertion(tok, length, depth):
    p = needle.build_prompt(tok, HAYSTACK, length, depth, seed=8, placement="gkamradt")
    assert p.placement == "gkamradt" and p.depth == depth
    assert p.input_ids == _gkamradt_reference(tok, HAYSTACK, length, depth, seed=8)
    start, end = p.needle_span
    assert tok.decode(p.input_ids[start:end]) == p.needle_text
    assert depth == 100 or start == 0 or tok.decode(p.input_ids[start - 1 : start]) == "."
    assert p.actual_depth <= depth + 1e-9


def test_placements_differ_where_the_rules_do(tok):
    # no '.' in the first lines: gkamradt goes back to the start, boundary stops at a line end
    hay = ["Line one\nLine two! Line three?\n" * 3 + "End. " + "word " * 40]
    g = needle.build_prompt(tok, hay, 200, 30, seed=1, placement="gkamradt")
    b = needle.build_prompt(tok, hay, 200, 30, seed=1, placement="boundary")
    assert g.needle_span[0] == 0 and g.actual_depth == 0.0
    assert b.needle_span[0] > 0 and tok.decode(b.input_ids[: b.needle_span[0]]).endswith("\n")
    assert g.answer == b.answer  # same seed, same answer: only the position differs
    # a '.' inside a word is a period token for gkamradt (their rule), never a boundary
    dotted = ["os.path.join(a, b) and os.path.split(c) return paths " * 6]
    g = needle.build_prompt(tok, dotted, 200, 50, seed=1, placement="gkamradt")
    b = needle.build_prompt(tok, dotted, 200, 50, seed=1, placement="boundary")
    after = tok.decode(g.input_ids[g.needle_span[1] : g.needle_span[1] + 4])
    assert after in ("path", "join", "spli")
    assert b.needle_span[0] == 0


def test_unknown_placement_is_one_line(tok):
    with pytest.raises(DataError, match="placement 'middle' is unknown"):
        needle.build_prompt(tok, HAYSTACK, 200, 50, seed=0, placement="middle")


@pytest.mark.parametrize("placement", needle.PLACEMENTS)
def test_depths_are_ordered(tok, placement):
    spans = [
        needle.build_prompt(tok, HAYSTACK, 600, d, seed=5, placement=placement).needle_span[0]
        for d in range(0, 101, 10)
    ]
    assert spans == sorted(spans) and spans[0] == 0


def test_deterministic_per_seed_and_cell(tok):
    a = needle.build_prompt(tok, HAYSTACK, 300, 50, seed=11)
    b = needle.build_prompt(tok, HAYSTACK, 300, 50, seed=11)
    c = needle.build_prompt(tok, HAYSTACK, 300, 50, seed=12)
    assert a == b and a.answer != c.answer
    assert needle.cell_seed(256, 50) == needle.cell_seed(256, 50.0)
    seeds = {needle.cell_seed(n, d) for n in (128, 256, 512) for d in (0, 25, 50, 75, 100)}
    assert len(seeds) == 15
    assert needle.cell_seed(256, 50, seed=1) != needle.cell_seed(256, 50, seed=0)


def test_short_haystack_is_repeated(tok):
    p = needle.build_prompt(tok, ["Tiny. "], 500, 50, seed=0)
    assert len(p.input_ids) == 500
    assert decode(tok, p.input_ids).count("Tiny.") > 50


def test_errors_are_one_line(tok):
    shortest = needle.min_length(tok)
    needle.build_prompt(tok, HAYSTACK, shortest, 50, seed=0)
    with pytest.raises(DataError, match=f"at least {shortest} tokens"):
        needle.build_prompt(tok, HAYSTACK, shortest - 1, 50, seed=0)
    with pytest.raises(DataError, match="depth"):
        needle.build_prompt(tok, HAYSTACK, 200, 101, seed=0)
    with pytest.raises(DataError, match="haystack"):
        needle.build_prompt(tok, ["", "  "], 200, 50, seed=0)


def test_custom_template(tok):
    t = needle.Template(needle="The pass key is {answer}.", question="\nThe pass key is", digits=7)
    p = needle.build_prompt(tok, HAYSTACK, 160, 50, seed=2, template=t)
    assert len(p.answer) == 7 and "The pass key is " + p.answer in decode(tok, p.input_ids)


def test_special_prefix_of_a_tokenizer_with_bos(tok):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    inner = tok.backend_tokenizer
    inner.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    bos_tok = PreTrainedTokenizerFast(tokenizer_object=inner, bos_token="<s>", eos_token="</s>")
    assert needle.special_prefix(bos_tok) == [tok.bos_token_id]
    p = needle.build_prompt(bos_tok, HAYSTACK, 150, 0, seed=4)
    assert len(p.input_ids) == 150 and p.input_ids[0] == tok.bos_token_id
    assert p.needle_span[0] == 1
    assert needle.special_prefix(build_byte_tokenizer()) == []


@pytest.mark.parametrize(
    "generated, exact, score",
    [
        (" 12345.", True, 1.0),
        ("12345", True, 1.0),
        (" 12345 and more 999", True, 1.0),
        (" 12355", False, 0.8),
        (" 1234", False, 0.8),
        (" 123456", False, 5 / 6),
        (" none", False, 0.0),
        ("", False, 0.0),
        (" 54321", False, 0.2),
    ],
)
def test_score(generated, exact, score):
    s = needle.score(generated, "12345")
    assert s.exact is exact and s.score == pytest.approx(score)


def test_greedy_and_run_match_generate(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = needle.build_prompt(tok, HAYSTACK, 100, 50, seed=9)
    ours = needle.greedy(model, p.input_ids, 6)
    ref = model.generate(
        torch.tensor([p.input_ids]), max_new_tokens=6, do_sample=False, eos_token_id=None
    )[0, 100:].tolist()
    assert ours == ref
    out = needle.run(model, tok, p, max_new_tokens=6)
    assert out["generated"] == tok.decode(ref)
    assert set(out) == {"generated", "exact", "score", "predicted"}


@pytest.mark.parametrize("depth", [5, 20, 40, 60, 80, 95])
def test_word_placement_sits_on_a_word_start_close_to_the_depth(tok, depth):
    """``word``: never inside a word, within half a word of the requested depth."""
    p = needle.build_prompt(tok, HAYSTACK, 400, depth, seed=3, placement="word")
    start, end = p.needle_span
    before, after = decode(tok, p.input_ids[:start]), decode(tok, p.input_ids[end:])
    assert before == "" or before.endswith("\n") or after[:1].isspace()
    longest_word = max(len(w) for doc in HAYSTACK for w in doc.split())
    n_hay = 400 - (end - start) - len(tok(needle.DEFAULT_TEMPLATE.question)["input_ids"])
    assert abs(depth - p.actual_depth) / 100 * n_hay <= longest_word / 2 + 1


def test_word_placement_keeps_depths_apart_where_sentences_are_long(tok):
    """At L0 = 256 on long sentences the sentence rules collapse 25/50/75 onto one position; the
    word rule keeps five distinct prompts, each within a few points of its depth."""
    long = ["one two three four five six seven eight nine ten eleven twelve thirteen " * 6 + "end."]
    for rule, distinct in (("gkamradt", False), ("word", True)):
        spans = {needle.build_prompt(tok, long, 256, d, seed=1, placement=rule).needle_span[0]
                 for d in (0, 25, 50, 75, 100)}  # fmt: skip
        assert (len(spans) == 5) is distinct, (rule, spans)
    for d in (25, 50, 75):
        p = needle.build_prompt(tok, long, 256, d, seed=1, placement="word")
        assert abs(d - p.actual_depth) < 4


def test_depth_note_names_collapsed_and_far_depths():
    """The needle table and heatmap say in one line where requested depths are one position and
    which cells landed far from their row (retrieval.depth_note)."""
    import pandas as pd

    from ropelens import retrieval

    cells = pd.DataFrame(
        dict(length=[256] * 4 + [1024] * 2, depth=[0, 25, 50, 75, 0, 50])
        | dict(actual_depth=[0.0, 23.0, 23.0, 23.0, 0.0, 49.7])
    )
    note = retrieval.depth_note(cells)
    assert "at 256 tokens depths 25, 50, 75 % are one position (23.0 %)" in note
    assert "2 cell(s) placed more than 5 points" in note and "\n" not in note
    assert retrieval.depth_note(cells[cells.length == 1024]) == ""
