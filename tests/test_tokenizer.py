"""The byte tokenizer (ropelens.tokenizer): one token per UTF-8 byte, specials only by id."""

from __future__ import annotations

import pytest

from ropelens.tokenizer import SPECIALS, build_byte_tokenizer, save_byte_tokenizer

TEXT = "x = '<s>' + y  # </s> ends, <unk>/<pad> too; naïve</s>"


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


def test_literal_special_strings_encode_as_their_bytes(tok):
    # ids 0..255 are the bytes themselves (GPT-2's byte order sorted by byte value)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ids == list(TEXT.encode("utf-8"))
    special = {tok.convert_tokens_to_ids(t) for t in SPECIALS}
    assert special == {256, 257, 258, 259}
    assert tok.decode(ids) == TEXT
    assert tok(TEXT)["input_ids"] == ids  # the byte tokenizer adds no specials by default


def test_special_ids_come_only_from_ids(tok):
    eos = tok.eos_token_id
    assert tok.convert_ids_to_tokens(eos) == "</s>"
    ids = tok("a", add_special_tokens=False)["input_ids"] + [eos]
    assert tok.decode(ids) == "a</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "a"


def test_saved_tokenizer_keeps_the_rule(tmp_path):
    from transformers import AutoTokenizer

    save_byte_tokenizer(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert loaded(TEXT, add_special_tokens=False)["input_ids"] == list(TEXT.encode("utf-8"))
    assert loaded.eos_token_id == 257
