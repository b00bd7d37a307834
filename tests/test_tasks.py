"""Task prompts and scoring (ropelens.tasks) on the byte tokenizer: exact length, spans that decode
to the planted text, determinism, an oracle that reads the prompt text scores 100 %, wrong answers
score as they should."""

import re

import pytest

from ropelens import tasks
from ropelens.errors import DataError
from ropelens.tokenizer import build_byte_tokenizer

HAYSTACK = [
    "Coroutines are functions. They can be suspended! Are they threads? No.\n"
    "A second line without an end\nA third line. " * 4,
    "Another document.\nIt has lines. And sentences.\n" * 6,
]
LENGTHS = [300, 333, 600]
DEPTHS = [0, 30, 50, 100]


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def build(tok, task, length=400, depth=50, seed=5, **kw):
    hay = kw.pop("haystack", "filler" if task == "passkey" else HAYSTACK)
    return tasks.build(tok, task, hay, length, depth, seed, **kw)


def oracle(tok, prompt) -> str:
    """A reader of the prompt's text alone (not of the recorded spans): what a model that
    understood the task would answer."""
    text = tok.decode(prompt.input_ids)
    body, question = text.rsplit("\nWhat ", 1)
    if prompt.task == "passkey":
        return " " + re.search(r"The pass key is (\d+)\.", body)[1]
    key = re.search(r"(?:of|VAR) (\w+)\?", question)[1]
    if prompt.task == "multi_key":
        return " " + re.search(rf"The magic number of {key} is (\d+)\.", body)[1]
    if prompt.task == "multi_value":
        return " " + ", ".join(re.findall(rf"One magic number of {key} is (\d+)\.", body))
    assign = dict(re.findall(r"VAR (\w+) = (\w+)\.", body))
    while key in assign:
        key = assign[key]
    return " " + key


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("depth", DEPTHS)
def test_prompt_length_spans_and_oracle(tok, task, length, depth):
    p = build(tok, task, length, depth)
    assert len(p.input_ids) == length == p.length
    for s in p.spans:
        assert tok.decode(p.input_ids[s.start : s.end]) == s.text
    starts = [s.start for s in p.spans]
    ends = [s.end for s in sorted(p.spans, key=lambda s: s.start)]
    assert all(e <= s for e, s in zip(ends, sorted(starts)[1:]))  # spans never overlap
    assert p.spans[0].kind in ("needle", "value", "hop") and p.spans[0].index == 0
    answer = oracle(tok, p)
    graded = tasks.score(p, answer)
    assert (graded.passed, graded.score, graded.predicted_distractor) == (True, 1.0, False)
    assert tok.decode(p.target_ids) == answer
    assert 0 <= p.actual_depth <= 100 and p.depth == depth


def test_counts_and_kinds(tok):
    kinds = lambda p: [(s.kind, s.index) for s in p.spans]  # noqa: E731
    assert kinds(build(tok, "passkey")) == [("needle", 0)]
    p = build(tok, "multi_key", counts={"distractors": 5})
    assert kinds(p) == [("needle", 0)] + [("distractor", j) for j in range(5)]
    assert len(set(p.distractor_answers + p.answers)) == 6
    keys = [re.search(r"of (\w+) is", s.text)[1] for s in p.spans]
    assert len(set(keys)) == 6  # every distractor has its own key
    p = build(tok, "multi_value", counts={"values": 3})
    assert kinds(p) == [("value", j) for j in range(3)] and len(p.answers) == 3
    p = build(tok, "variable_tracking", counts={"hops": 6})
    assert kinds(p) == [("hop", j) for j in range(6)]
    # the chain is in order: hop j assigns the variable hop j + 1 reads
    names = [re.match(r"\s*VAR (\w+) = (\w+)\.", s.text).groups() for s in p.spans]
    assert names[0][1] == p.answers[0]
    assert all(names[j][0] == names[j + 1][1] for j in range(5))
    assert [s.start for s in p.spans] == sorted(s.start for s in p.spans)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_min_length_is_the_shortest_accepted(tok, task):
    counts = {"distractors": 2, "values": 3, "hops": 3}
    for seed in range(4):
        n = tasks.min_length(tok, task, seed, counts=counts)
        assert len(tasks.build(tok, task, HAYSTACK, n, 50, seed, counts=counts).input_ids) == n
        with pytest.raises(DataError, match=f"at least {n} tokens"):
            tasks.build(tok, task, HAYSTACK, n - 1, 50, seed, counts=counts)


def test_passkey_uses_the_filler(tok):
    p = build(tok, "passkey", 300, 40)
    text = tok.decode(p.input_ids)
    assert text.startswith(tasks.FILLER_TEXT[:40])
    assert text.count("pass key") == 4  # two in the needle, two in the question
    assert text.endswith("What is the pass key? The pass key is")


def test_generation_is_deterministic_and_seeded(tok):
    for task in tasks.TASKS:
        a, b = build(tok, task, seed=11), build(tok, task, seed=11)
        assert a == b
        assert build(tok, task, seed=12).answers != a.answers
    seeds = {tasks.cell_seed(t, 256, 50) for t in tasks.TASKS}
    assert len(seeds) == 4 and tasks.cell_seed("passkey", 256, 50) == tasks.cell_seed(
        "passkey", 256, 50.0
    )
    assert tasks.cell_seed("passkey", 256, 50) != tasks.cell_seed("passkey", 256, 50, seed=1)


def test_depth_places_the_first_span(tok):
    first = build(tok, "passkey", 400, 0)
    assert first.spans[0].start == 0 and first.actual_depth == 0
    last = build(tok, "passkey", 400, 100)
    question = tok("\nWhat is the pass key? The pass key is", add_special_tokens=False)
    assert last.spans[0].end == 400 - len(question["input_ids"]) and last.actual_depth == 100
    mid = build(tok, "passkey", 400, 50, haystack=HAYSTACK)
    assert 0 < mid.actual_depth <= 50
    # multi_value / variable tracking: the rest spread from the depth to the end, in order
    p = build(tok, "variable_tracking", 800, 50)
    assert p.spans[0].start > 250 and p.spans[-1].start > p.spans[0].start


def test_wrong_answers(tok):
    p = build(tok, "multi_key")
    right = p.answers[0]
    wrong = ("1" if right[0] != "1" else "2") + right[1:]
    graded = tasks.score(p, " " + wrong)
    assert not graded.passed and graded.score == pytest.approx(0.8)
    assert not graded.predicted_distractor
    graded = tasks.score(p, " " + p.distractor_answers[1] + ".")
    assert not graded.passed and graded.predicted_distractor
    assert graded.predicted == p.distractor_answers[1]
    assert tasks.score(p, " no idea").score == 0.0
    mv = build(tok, "multi_value", counts={"values": 4})
    half = " " + ", ".join(mv.answers[:2]) + ", 11111"
    graded = tasks.score(mv, half)
    assert (graded.passed, graded.score) == (False, 0.5)
    shuffled = " " + ", ".join(reversed(mv.answers))
    assert tasks.score(mv, shuffled).passed  # order does not matter (RULER)
    vt = build(tok, "variable_tracking")
    names = re.findall(r"VAR (\w+) =", tok.decode(vt.input_ids))
    graded = tasks.score(vt, f" {names[0]}.")  # a variable, not its value
    assert (graded.passed, graded.score, graded.predicted) == (False, 0.0, "")


def test_chat_format_spans_exact():
    tok = build_byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    for task in tasks.TASKS:
        p = build(tok, task, 400, 50, fmt="chat")
        assert len(p.input_ids) == 400
        assert tok.decode(p.input_ids).startswith("<|user|>")
        assert all(tok.decode(p.input_ids[s.start : s.end]) == s.text for s in p.spans)


def test_template_overrides_and_errors(tok):
    p = build(tok, "passkey", overrides={"item": "Key: {value}.", "digits": 7})
    assert p.spans[0].text.strip() == f"Key: {p.answers[0]}." and len(p.answers[0]) == 7
    with pytest.raises(DataError, match="too short.*at least"):
        build(tok, "multi_key", 40, 50)
    with pytest.raises(DataError, match="unknown task"):
        build(tok, "sorting")
    with pytest.raises(DataError, match="depth"):
        build(tok, "passkey", depth=120)


# --- the `tasks:` config block -----------------------------------------------------------------

BASE = {
    "models": {"m": {"tiny": {"hidden_size": 16}, "pretrained_length": 64}},
    "methods": {"rope": {}, "pi": {"factor": 4}},
    "lengths": [256, 512],
    "depths": [0, 50],
    "corpora": {"c": {"builtin": "stdlib"}, "p": {"builtin": "pydoc"}},
    "ppl": {"corpus": "c"},
}


def prepared(tasks_block):
    from ropelens import config as rlconfig

    return rlconfig.prepare({**BASE, "tasks": tasks_block})


def test_task_grid_and_settings():
    from ropelens import config as rlconfig

    assert rlconfig.task_cells(rlconfig.prepare(BASE)) == []  # no tasks: no cells
    cfg = prepared({"passkey": {}, "multi_key": {"distractors": 2, "depths": [25]}})
    cells = rlconfig.task_cells(cfg)
    assert len(cells) == 2 * 2 * 2 + 1 * 2 * 2  # passkey: 2 depths; multi_key: its own one
    assert ("multi_key", "m", "pi", 512, "25") in cells
    assert rlconfig.task_entry(cfg, "passkey")["haystack"] == "filler"
    assert rlconfig.task_entry(cfg, "multi_key")["haystack"] == "p"  # needle.haystack
    s = rlconfig.task_settings(cfg, "multi_key")
    assert s == {"seed": 0, "format": "auto", "memory_budget_mb": 256, "distractors": 2}


@pytest.mark.parametrize(
    "block,expect",
    [
        ({}, "tasks: no task enabled; add one of"),
        ({"passkey": {"hops": 3}}, "tasks.passkey.hops: passkey has no hops; it belongs to"),
        ({"multi_key": {"haystack": "nope"}}, "tasks.multi_key.haystack: 'nope' is not in corpora"),
        ({"haystack": "nope", "multi_value": {}}, "tasks.haystack: 'nope' is not in corpora"),
        ({"lengths": [300], "passkey": {}}, "tasks.lengths: 300 is not in lengths"),
        ({"sorting": {}}, "tasks: Additional properties are not allowed"),
        (
            {"passkey": {"template": {"item": "no"}}},
            "tasks.passkey.template.item: 'no' must contain {value}",
        ),
        (
            {"multi_key": {"template": {"question": "What is {kee}?"}}},
            "tasks.multi_key.template.question: cannot be filled (KeyError",
        ),
        ({"multi_value": {"values": 0}}, "tasks.multi_value.values: 0 is out of range"),
        ({"passkey": {"depths": [10, 10.0]}}, "tasks.passkey.depths: a depth is listed twice"),
    ],
)
def test_bad_task_config_is_one_line(block, expect):
    from ropelens.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        prepared(block)
    assert expect in str(info.value) and "\n" not in str(info.value)
