"""Perplexity of one (model, method, length) cell.

Protocols:

- ``truncate``: the first ``length`` tokens of each document that has at least ``length`` tokens
  (YaRN's Proof-pile evaluation). Documents are taken longest first, so the same documents serve
  every length they are long enough for.
- ``sliding``: windows of ``length`` tokens moved by ``stride``; each window scores only the tokens
  no earlier window scored, with up to ``length - stride`` tokens of context. Each document
  contributes at most ``max_tokens`` tokens (default 4 × length).

Loss is computed from the decoder's hidden states in chunks through the LM head, so the full
``length × vocab`` logits are never held at once.
"""

from __future__ import annotations

import math

import numpy as np

from ropelens.errors import DataError

LOGIT_CHUNK = 2048


def select_documents(n_tokens: list[int], length: int, max_documents: int) -> list[int]:
    """Indices of the longest documents with at least ``length`` tokens, longest first."""
    order = sorted(range(len(n_tokens)), key=lambda i: (-n_tokens[i], i))
    return [i for i in order if n_tokens[i] >= length][:max_documents]


def windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over ``n`` tokens as (begin, end, first_scored) with end - begin <= length.

    With ``stride < length`` every token position 1..n-1 is scored exactly once (position 0 has
    no context). With ``stride >= length`` the windows are disjoint chunks and each chunk's first
    token goes unscored.
    """
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + length, n)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
        prev_end = end
        if end >= n:
            return out
        begin += stride


def token_nll(model, input_ids, score_from: int):
    """Per-token NLL (nats) of ``input_ids[score_from:]`` given everything before, shape (T,)."""
    import torch

    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    with torch.no_grad():
        hidden = decoder(input_ids=input_ids[None]).last_hidden_state[0]
        nll = []
        # hidden[t] predicts token t+1
        for start in range(score_from - 1, input_ids.shape[0] - 1, LOGIT_CHUNK):
            stop = min(start + LOGIT_CHUNK, input_ids.shape[0] - 1)
            logits = head(hidden[start:stop]).float()
            target = input_ids[start + 1 : stop + 1]
            nll.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
    return torch.cat(nll).double().cpu().numpy()


def _bins(positions: np.ndarray, length: int, n_bins: int) -> np.ndarray:
    return np.minimum(positions * n_bins // length, n_bins - 1)


def document_rows(
    model, ids, length: int, protocol: str, stride: int, max_tokens: int, n_bins: int
):
    """(tokens, nll_sum, bin_tokens, bin_nll) for one document's token ids."""
    import torch

    device = next(model.parameters()).device
    ids = torch.tensor(np.asarray(ids), dtype=torch.long, device=device)
    bin_tokens = np.zeros(n_bins, np.int64)
    bin_nll = np.zeros(n_bins, np.float64)
    if protocol == "truncate":
        spans = [(0, length, 1)]
    else:
        spans = windows(min(len(ids), max_tokens), length, stride)
    for begin, end, first in spans:
        nll = token_nll(model, ids[begin:end], first - begin)
        pos = np.arange(first - begin, end - begin)
        b = _bins(pos, length, n_bins)
        np.add.at(bin_tokens, b, 1)
        np.add.at(bin_nll, b, nll)
    return int(bin_tokens.sum()), float(bin_nll.sum()), bin_tokens, bin_nll


def evaluate(model, token_table, length: int, settings: dict, progress=None) -> dict:
    """Rows of a PPL cell (without the grid columns) for a tokenised corpus table."""
    protocol = settings["protocol"]
    n_tokens = token_table.column("n_tokens").to_pylist()
    min_needed = length if protocol == "truncate" else 2
    chosen = select_documents(n_tokens, min_needed, settings["max_documents"])
    if not chosen:
        raise DataError(
            f"no document has {min_needed} tokens (longest: {max(n_tokens, default=0)}); "
            f"remove length {length} or use a corpus with longer documents"
        )
    stride = settings.get("stride") or max(1, length // 2)
    max_tokens = settings.get("max_tokens") or 4 * length
    n_bins = settings["position_bins"]
    rows = {k: [] for k in ("doc_id", "tokens", "nll_sum", "ppl", "bin_tokens", "bin_loss")}
    doc_ids = token_table.column("doc_id")
    input_ids = token_table.column("input_ids")
    for i in progress(chosen) if progress else chosen:
        ids = input_ids[i].values.to_numpy()
        if protocol == "truncate":
            ids = ids[:length]
        tokens, nll_sum, bt, bn = document_rows(
            model, ids, length, protocol, stride, max_tokens, n_bins
        )
        rows["doc_id"].append(doc_ids[i].as_py())
        rows["tokens"].append(tokens)
        rows["nll_sum"].append(nll_sum)
        rows["ppl"].append(math.exp(nll_sum / tokens))
        rows["bin_tokens"].append(bt.tolist())
        rows["bin_loss"].append([float(s / c) if c else math.nan for s, c in zip(bn, bt)])
    return rows
