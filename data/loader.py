"""BatchLoader: random windows of a packed token stream, with document-aware targets and positions."""

from __future__ import annotations

import numpy as np
import torch

from data.packing import PackedTokens
from data.tasks import PasskeyTask

IGNORE_INDEX = -100
# How long a passkey batch's prompts are: "full", one prompt of the row's length per row; "mixed",
# prompts of log-uniform lengths up to the row's packed into each row as separate documents.
PASSKEY_LENGTHS = ("full", "mixed")


class BatchLoader:
    """Infinite iterator of training batches from one PackedTokens split.

    Sampling: batch `step` takes `batch_size` windows of seq_len + 1 tokens at offsets drawn uniformly
    (with replacement, no epochs) from a generator seeded by (seed, step). A batch is thus a pure
    function of (seed, step): the state is the step counter, and a resumed loader yields exactly the
    batches an uninterrupted one would.

    Each batch is a dict:
        input_ids     (B, T) int64  window[:-1]
        targets       (B, T) int64  window[1:]; with doc_masking, -100 where the next token starts a new
                                    document: predicting EOT at a document's end is kept, predicting the
                                    next document's first token from that EOT is not
        position_ids  (B, T) int64  0 at each row start and (with doc_masking) at each document start
        cu_seqlens    (n + 1,) int32 segment boundaries over the flattened B*T tokens: every row start,
                                    plus every document start inside a row when doc_masking; segment i
                                    is [cu_seqlens[i], cu_seqlens[i+1]) and its position_ids are 0, 1, ...
    Without doc_masking, rows are single segments (position_ids = 0..T-1) and no target is ignored.
    With `bucket_boundaries`, cu_seqlens is padded with copies of B*T (empty segments at the end, which
    the attention kernels and the sdpa/naive document mask skip) to the next power-of-two length, so batches
    take a few shapes instead of one per segment count: a model compiled with CUDA graphs records a graph per
    input shape.

    Spans: with `sample_span` N, the batch's offsets are drawn for B*T / N spans of N tokens instead of B rows,
    and each span gives N / T consecutive rows: the same text a batch at context N would hold, cut into rows
    of T (as many places in the corpus per step as that batch has). N = T (or None) is the plain sampling,
    batch for batch.

    Passkey mix-in: with `passkey` given, each batch is independently, with probability `passkey_mix`,
    a batch of passkey-retrieval samples of length T + 1 (random key and depth per row) instead of
    corpus windows: single-segment rows whose targets are -100 except on the answer tokens, so the loss
    rewards retrieval only, not memorising the repetitive filler. Whole batches, not rows: the loss is
    a mean over a batch's targets, and a passkey row has only its ~3 answer targets against a corpus
    row's T, so a passkey row mixed into a corpus batch would carry ~3 / T of a corpus row's weight
    (at T = 1K and half the rows, 0.3% of the loss; 0.02% at 16K). Per batch, `passkey_mix` is the
    fraction of optimizer steps, hence of the training loss, spent on retrieval at every T.
    `passkey_lengths="mixed"` packs prompts of log-uniform lengths (from the shortest a prompt can be
    up to T + 1) into each row, one document each (needs doc_masking): at a fixed token budget a
    model trained at a long T otherwise sees few prompts (2 per 32K-token step at 16K against 32 at
    1K), and none short enough to learn the task from first.

    Per step the cost is B memmap slices plus vectorised numpy over B*T: no Python loop over tokens
    (a passkey batch: B prompts concatenated from ids the task encoded once).
    """

    def __init__(self, packed: PackedTokens, batch_size: int, seq_len: int, seed: int, doc_masking: bool = True,
                 passkey: PasskeyTask | None = None, passkey_mix: float = 0.0, passkey_lengths: str = "full",
                 bucket_boundaries: bool = False, sample_span: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 1 or len(packed) < seq_len + 1:
            raise ValueError(f"seq_len={seq_len}: need 1 <= seq_len < {len(packed)}, the tokens in this split "
                             "(more documents: raise data.max_docs or data.val_fraction)")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0.0 <= passkey_mix <= 1.0 or (passkey_mix > 0 and passkey is None):
            raise ValueError(f"passkey_mix={passkey_mix}: must be in [0, 1], and > 0 only with a passkey task")
        if passkey_mix > 0 and seq_len + 1 < passkey.min_length:
            raise ValueError(f"seq_len={seq_len}: a passkey sample needs at least {passkey.min_length - 1}")
        if passkey_lengths not in PASSKEY_LENGTHS or (passkey_lengths == "mixed" and not doc_masking):
            raise ValueError(f"passkey_lengths={passkey_lengths!r}: must be one of {PASSKEY_LENGTHS}; "
                             "mixed needs doc_masking")
        if sample_span is not None and (sample_span < seq_len or sample_span % seq_len
                                        or (batch_size * seq_len) % sample_span or len(packed) < sample_span + 1):
            raise ValueError(f"sample_span={sample_span}: must be a multiple of seq_len={seq_len} that divides "
                             f"batch_size x seq_len = {batch_size * seq_len} and is shorter than the split")
        self.packed = packed
        self.sample_span = sample_span or seq_len
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.doc_masking = doc_masking
        self.passkey = passkey
        self.passkey_mix = passkey_mix
        self.passkey_lengths = passkey_lengths
        self.bucket_boundaries = bucket_boundaries
        self.step = 0

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])
        self.seed = int(state["seed"])

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        """The batch at `step` (what the step-th next() returns), without moving the iterator."""
        batch = self._batch(step)
        if self.bucket_boundaries:
            batch["cu_seqlens"] = pad_boundaries(batch["cu_seqlens"])
        return batch

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        B, T = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, step])
        if self.passkey_mix > 0 and rng.random() < self.passkey_mix:
            return self._passkey_batch(rng)
        span = self.sample_span   # T unless spans are asked for: then B offsets exactly as without them
        offsets = rng.integers(0, len(self.packed) - span, size=B * T // span)
        offsets = (offsets[:, None] + np.arange(0, span, T)).reshape(-1)   # (B,): span // T rows from each
        window = np.stack([self.packed.tokens[o:o + T + 1] for o in offsets]).astype(np.int64)  # (B, T+1)
        input_ids, targets = window[:, :-1], window[:, 1:].copy()  # the two overlap in `window`

        starts = np.zeros((B, T), dtype=bool)  # starts[b, t]: token t of row b begins a segment
        starts[:, 0] = True
        if self.doc_masking:
            # Document index of every window token; a change between t and t+1 is a document boundary.
            doc = np.searchsorted(self.packed.doc_starts, offsets[:, None] + np.arange(T + 1), side="right")
            boundary = doc[:, 1:] != doc[:, :-1]  # (B, T): target t is the next document's first token
            targets[boundary] = IGNORE_INDEX
            starts[:, 1:] |= boundary[:, :-1]

        t = np.arange(T)
        position_ids = t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)
        cu_seqlens = np.append(np.flatnonzero(starts), B * T).astype(np.int32)
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(input_ids)),
            "targets": torch.from_numpy(np.ascontiguousarray(targets)),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
        }

    def _passkey_batch(self, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Rows of passkey samples (random key and depth each): a sample of L + 1 tokens fills L
        positions, its input the first L tokens, targets -100 except the answer tokens (target t is
        token t + 1), one segment. "full": one sample of T + 1 per row; "mixed": samples of log-uniform
        length packed until the row is full."""
        B, T = self.batch_size, self.seq_len
        input_ids = np.empty((B, T), dtype=np.int64)
        targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        position_ids = np.empty((B, T), dtype=np.int64)
        starts = []
        for b in range(B):
            for start, span in self._passkey_spans(rng):
                sample = self.passkey.sample(span + 1, depth=rng.random(), rng=rng)
                input_ids[b, start:start + span] = sample.input_ids[:-1]
                targets[b, start + sample.answer_positions - 1] = sample.input_ids[sample.answer_positions]
                position_ids[b, start:start + span] = np.arange(span)
                starts.append(b * T + start)
        return {
            "input_ids": torch.from_numpy(input_ids),
            "targets": torch.from_numpy(targets),
            "position_ids": torch.from_numpy(position_ids),
            "cu_seqlens": torch.from_numpy(np.array(starts + [B * T], dtype=np.int32)),
        }

    def _passkey_spans(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """(start, positions) of each sample in a row: the whole row, or log-uniform spans in
        [min_length - 1, T] (a remainder too short for a sample joins the last span)."""
        T = self.seq_len
        if self.passkey_lengths == "full":
            return [(0, T)]
        shortest = self.passkey.min_length - 1
        spans, used = [], 0
        while used < T:
            left = T - used
            span = min(left, max(shortest, int(np.exp(rng.uniform(np.log(shortest), np.log(T + 1))))))
            if left - span < shortest:   # what would remain cannot hold a sample
                span = left
            spans.append((used, span))
            used += span
        return spans


def pad_boundaries(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (n + 1,) padded with copies of its last entry to the next power-of-two length (>= 2): the
    same segments followed by empty ones."""
    n = cu_seqlens.numel()
    size = 1 << max(1, (n - 1).bit_length())
    return torch.cat([cu_seqlens, cu_seqlens[-1:].expand(size - n)]) if size > n else cu_seqlens


def take_rows(batch: dict[str, torch.Tensor], start: int, stop: int, pad: bool = False) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of a loader batch as a batch of their own: how a data-parallel rank takes its share of
    the global batch (training/distributed.py). The (B, T) tensors are sliced; cu_seqlens is rebuilt over the
    (stop - start) * T tokens from the segment starts, position_ids == 0, which is how the loader defines them
    (row starts, document starts with doc_masking, passkey sample starts), and padded like the loader's own when
    pad (its bucket_boundaries), so the rows take as few shapes as the whole batch does."""
    rows = {name: t[start:stop] for name, t in batch.items() if name != "cu_seqlens"}
    position_ids = rows["position_ids"].flatten()
    starts = torch.nonzero(position_ids == 0).flatten()
    cu_seqlens = torch.cat([starts, starts.new_tensor([position_ids.numel()])]).to(torch.int32)
    rows["cu_seqlens"] = pad_boundaries(cu_seqlens) if pad else cu_seqlens
    return rows
