"""A byte-level tokenizer saved as a standard Hugging Face tokenizer directory.

Every UTF-8 byte is one token (ids 0..255 in GPT-2's byte-to-unicode order), followed by the special
tokens. No merges: the token count of a text is its UTF-8 byte count, which makes lengths easy to
reason about in the toy zoo. ``AutoTokenizer.from_pretrained(dir)`` loads it.

Special ids come only from ``add_special_tokens`` or from ids a caller inserts itself (the zoo's
packer appends ``eos_token_id``): a literal ``<s>``, ``</s>``, ``<unk>`` or ``<pad>`` in raw text
(source files and docs mention them) encodes as its bytes, like any other text
(``split_special_tokens=True``, saved in ``tokenizer_config.json``).
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<s>", "</s>", "<unk>", "<pad>")


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_order)


def _byte_order(ch: str) -> int:
    # GPT-2 byte-to-unicode: printable bytes map to themselves, the rest to 256 + i
    code = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def build_byte_tokenizer():
    """Return a ``PreTrainedTokenizerFast`` over raw bytes (vocab 256 + 4 specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=False,
        add_eos_token=False,
        split_special_tokens=True,
    )


def save_byte_tokenizer(out_dir: str | Path):
    tok = build_byte_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
