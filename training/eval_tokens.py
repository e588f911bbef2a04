"""Evaluation on identical tokens: every model of an experiment scores exactly the same target tokens,
whatever its context length.

Why: the val loader draws windows of the model's own length at offsets from a range that depends on
that length, so two models trained at 1K and 16K were scored on different text, and their perplexities
did not compare. Here the text is fixed first and only then cut for each model:

1. Pieces (cut_pieces, select_pieces). Each val document is cut into consecutive pieces of at most
   length + 1 tokens (length: the experiment's longest context); a piece starts on the last token of
   the one before, so every token of a document except its first is a target in exactly one piece.
   A piece is scored as a document of its own: a target's position p (1..length) is the number of
   piece tokens before it, the most context any model can use for it. Pieces are taken round-robin
   over the documents (every document's first piece, then every second piece, ...) until the target
   budget, so a budget spreads over many documents instead of the first long one.
2. Windows (windows). A model of context L reads each piece in windows of at most L tokens starting
   at 0, s, 2s, ... (stride 1 <= s <= L); each window scores the targets after the previous window's
   last one. The scored positions of a piece of n tokens are then 1, 2, ..., n - 1 for every L and s:
   the same set by construction, for any contexts (not only powers of two). A target at p <= L is
   scored with all p tokens before it; after the first window, with at least L - s + 1 (s = L:
   non-overlapping windows, each token read once; s = L/2: twice the forward passes, every target
   keeps at least half the context).
3. Scores (score, TokenScores). A model callable runs over the windows in batches; each scored
   target's loss lands at a fixed index (piece, position), so every model's result lists the same
   (document, position, target id) triples in the same order. summary() gives the mean loss and the
   loss by log-spaced position bin (position_bins), and a digest of the scored triples that two
   results share exactly when they scored the same tokens.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data.tasks import IGNORE_INDEX, ModelFn


def cut_pieces(doc_starts: np.ndarray, num_tokens: int, length: int) -> np.ndarray:
    """The pieces of every document of a packed split: (P, 4) int64 rows (doc, k, start, stop).

    doc_starts: (D,) offsets of the documents in the split's token stream of num_tokens tokens (a
    PackedTokens' doc_starts and len). Piece k of document doc spans stream tokens [start, stop):
    start = doc start + k * length, stop - start <= length + 1, so consecutive pieces share one token.
    Rows are ordered by (doc, k); a document of one token (nothing to predict) has none.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    ends = np.append(doc_starts[1:], num_tokens)
    rows = [(doc, k, start, min(start + length + 1, end))
            for doc, (first, end) in enumerate(zip(doc_starts.tolist(), ends.tolist()))
            for k, start in enumerate(range(first, end - 1, length))]
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def select_pieces(pieces: np.ndarray, max_targets: int | None) -> np.ndarray:
    """The pieces scored under a budget of max_targets targets (None: all), taken round-robin over the
    documents (by (k, doc)); the last one taken is cut short to end the budget exactly. Returned in
    (doc, k) order."""
    order = np.lexsort((pieces[:, 0], pieces[:, 1]))
    chosen = pieces[order].copy()
    if max_targets is not None and max_targets < 1:
        raise ValueError(f"max_targets must be >= 1 or None, got {max_targets}")
    if max_targets is not None and len(chosen):
        targets = np.cumsum(chosen[:, 3] - chosen[:, 2] - 1)
        keep = min(int(np.searchsorted(targets, max_targets)) + 1, len(chosen))   # up to the one reaching it
        chosen = chosen[:keep]
        if targets[keep - 1] > max_targets:
            chosen[-1, 3] -= targets[keep - 1] - max_targets
    return chosen[np.lexsort((chosen[:, 1], chosen[:, 0]))]


def windows(n: int, context: int, stride: int) -> np.ndarray:
    """The windows a model of `context` tokens reads over a piece of n tokens: (W, 3) int64 rows
    (start, end, first). A window's input is piece tokens [start, end - 1), its targets [start + 1, end);
    it scores the targets at positions [first, end). The scored ranges tile [1, n) (see the module
    docstring); a piece of fewer than 2 tokens has no window."""
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be in 1..context ({context}), got {stride}")
    rows, start, first = [], 0, 1
    while first < n:
        end = min(start + context + 1, n)
        rows.append((start, end, first))
        start, first = start + stride, end
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def position_bins(length: int) -> list[int]:
    """Edges 1, 2, 4, ... up to `length`, then length + 1: bin i holds positions [edges[i], edges[i+1]),
    so with length 16384 the last bin, 8K-16K, holds 8192..16384."""
    edges = [1]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    return edges + [length + 1]


@dataclass
class TokenScores:
    """One model's scored targets, in (doc, k, position) order: the same order for every model of the
    same pieces. All arrays (N,): doc (val document index), doc_position (the target's offset in its
    document), position (in its piece, 1..length: the context available), target (token id), loss
    (nats)."""
    doc: np.ndarray
    doc_position: np.ndarray
    position: np.ndarray
    target: np.ndarray
    loss: np.ndarray

    def digest(self) -> str:
        """16 hex digits identifying the scored (document, position, target id) triples."""
        digest = hashlib.sha256()
        for array in (self.doc, self.doc_position, self.target):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]

    def summary(self, edges: list[int]) -> dict:
        """tokens, mean loss, loss and token count per position bin (edges: position_bins; a bin no target
        reaches: loss None), digest."""
        bins = np.searchsorted(edges, self.position, side="right") - 1
        if self.position.size and not (0 <= bins.min() and bins.max() < len(edges) - 1):
            raise ValueError(f"edges {edges[0]}..{edges[-1]} do not cover positions "
                             f"{self.position.min()}..{self.position.max()}")
        counts = np.bincount(bins, minlength=len(edges) - 1)
        sums = np.bincount(bins, weights=self.loss, minlength=len(edges) - 1)
        return {"tokens": int(self.loss.size), "loss": float(self.loss.mean()),
                "loss_by_bin": [float(s / c) if c else None for s, c in zip(sums, counts)],
                "tokens_by_bin": counts.tolist(), "digest": self.digest()}


@torch.no_grad()
def score(model_fn: ModelFn, tokens: np.ndarray, doc_starts: np.ndarray, pieces: np.ndarray, context: int,
          stride: int, batch_rows: int) -> TokenScores:
    """Every target of `pieces` scored by a model of `context` tokens read in windows (see windows()).

    model_fn: (B, T) int64 input ids (CPU) -> (B, T, V) logits (any float dtype or device); each row is
    one window, its positions 0..T-1 from the window's start, right-padded to the batch's longest
    window (padding comes after every scored position, so a causal model's scores do not see it).
    tokens: the split's token stream; doc_starts: its documents' offsets; pieces: select_pieces' rows.
    batch_rows: windows per call. Raises RuntimeError if the windows did not score every target once.
    """
    counts = pieces[:, 3] - pieces[:, 2] - 1
    offsets = np.concatenate([[0], np.cumsum(counts)])                  # piece i's targets: offsets[i]:offsets[i+1]
    loss = np.full(offsets[-1], np.nan)
    target = np.full(offsets[-1], -1, dtype=np.int64)
    written = np.zeros(offsets[-1], dtype=np.int64)
    jobs = [(i, *w) for i, (_, _, start, stop) in enumerate(pieces.tolist())
            for w in windows(stop - start, context, stride).tolist()]  # (piece, start, end, first)
    for b in range(0, len(jobs), batch_rows):
        batch = jobs[b:b + batch_rows]
        T = max(end - 1 - start for _, start, end, _ in batch)
        input_ids = torch.zeros(len(batch), T, dtype=torch.int64)
        targets = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.int64)
        for row, (i, start, end, first) in enumerate(batch):
            window = torch.from_numpy(tokens[pieces[i, 2] + start:pieces[i, 2] + end].astype(np.int64))
            input_ids[row, :end - 1 - start] = window[:-1]
            targets[row, first - start - 1:end - 1 - start] = window[first - start:]   # the scored targets only
        logits = model_fn(input_ids)
        row_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.to(logits.device).flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="none").view(len(batch), T).cpu().double()
        for row, (i, start, end, first) in enumerate(batch):
            span = slice(offsets[i] + first - 1, offsets[i] + end - 1)   # target at position p: offsets[i] + p - 1
            cols = slice(first - start - 1, end - 1 - start)
            loss[span], target[span] = row_loss[row, cols].numpy(), targets[row, cols].numpy()
            written[span] += 1
    if not (written == 1).all():
        raise RuntimeError(f"windows scored {int((written == 0).sum())} targets never and "
                           f"{int((written > 1).sum())} more than once")
    piece = np.repeat(np.arange(len(pieces)), counts)
    position = np.arange(offsets[-1]) - offsets[piece] + 1
    doc = pieces[piece, 0]
    return TokenScores(doc=doc, doc_position=pieces[piece, 2] - doc_starts[doc] + position, position=position,
                       target=target, loss=loss)
