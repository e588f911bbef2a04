"""Synthetic long-context tasks (protocols in EVALS.md): passkey retrieval and multi-query associative
recall (MQAR). Both are scored teacher-forced: one forward pass, argmax at the answer positions.

`model_fn` everywhere: input_ids LongTensor (B, T) on CPU -> logits (B, T, V) (any device, any float
dtype); it moves the input to its own device. Scorers run it under torch.no_grad().
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

ModelFn = Callable[[torch.Tensor], torch.Tensor]
IGNORE_INDEX = -100

# --- passkey retrieval (Mohtashami & Jaggi, 2023) ---------------------------------------------------

PASSKEY_INTRO = ("A pass key is hidden somewhere in the long text below. "
                 "Find it and remember it, because you will be asked for it at the end.")
# Neutral filler, repeated in random order to reach the target length. Every piece that follows
# another starts with a space: with a byte-level BPE, pieces encoded one by one then concatenated give
# the same ids as encoding the whole prompt, so prompts are built from ids cached once per task.
PASSKEY_FILLER = [
    " The river runs slowly past the old mill.",
    " Rain fell on the hills for most of the afternoon.",
    " A small boat drifted near the quiet harbour.",
    " The library opens early on weekdays.",
    " Children played in the park until the lights came on.",
    " The train left the station on time.",
    " Leaves turned yellow as the days grew shorter.",
    " A cat slept in the warm window of the bakery.",
    " The road climbs through the forest to the ridge.",
    " Bread and cheese were served on the long table.",
    " The clock in the square struck noon.",
    " Clouds gathered over the valley by evening.",
    " The farmer checked the fence along the north field.",
    " Snow covered the mountain pass in winter.",
    " The market was busy with people buying fruit.",
    " Birds sang in the hedges along the lane.",
]
# The needle "The pass key is K. Remember it. K is the pass key." around its two keys.
PASSKEY_NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")
PASSKEY_QUESTION = " What is the pass key? The pass key is"
MAX_KEY = 50_000


@dataclass
class PasskeySample:
    """input_ids (L,) int64: prompt + answer; answer_positions (k,) int64: indices of the answer tokens
    (the last k); key: the pass key; needle_start: index of the needle sentence's first token."""
    input_ids: np.ndarray
    answer_positions: np.ndarray
    key: int
    needle_start: int


class PasskeyTask:
    """Builds passkey prompts of an exact token length from ids encoded once per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.intro = self._encode(PASSKEY_INTRO)
        self.filler = [self._encode(s) for s in PASSKEY_FILLER]
        self.needle = [self._encode(s) for s in PASSKEY_NEEDLE]
        self.question = self._encode(PASSKEY_QUESTION)

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    @property
    def min_length(self) -> int:
        """Shortest prompt length that fits any key, bounding a key's " K" by its bytes (byte-level BPE)."""
        fixed = len(self.intro) + sum(map(len, self.needle)) + len(self.question)
        return fixed + 3 * len(f" {MAX_KEY}".encode())

    def sample(self, length: int, depth: float, rng: np.random.Generator, key: int | None = None) -> PasskeySample:
        """A prompt of exactly `length` tokens, ending with the answer " K".

        Layout: intro, filler, needle, filler, question, answer. The needle goes at the filler
        sentence boundary nearest to `depth` (0 = right after the intro, 1 = right before the
        question) of the filler; the filler is cut to the exact token budget, so its last sentence
        may be partial. The key, if not given, is uniform in [1, 50000].
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        key = int(rng.integers(1, MAX_KEY + 1)) if key is None else key
        answer = self._encode(f" {key}")
        needle = np.concatenate([self.needle[0], answer, self.needle[1], answer, self.needle[2]])
        budget = length - len(self.intro) - len(needle) - len(self.question) - len(answer)
        if budget < 0:
            raise ValueError(f"length={length} is too short for a passkey prompt (needs {length - budget})")

        sentences, total = [], 0
        while total < budget:
            sentences.append(self.filler[rng.integers(len(self.filler))])
            total += len(sentences[-1])
        filler = np.concatenate(sentences or [np.zeros(0, np.int64)])[:budget]
        bounds = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
        bounds = bounds[bounds <= budget]
        cut = int(bounds[np.argmin(np.abs(bounds - depth * budget))])

        input_ids = np.concatenate([self.intro, filler[:cut], needle, filler[cut:], self.question, answer])
        return PasskeySample(input_ids=input_ids, answer_positions=np.arange(length - len(answer), length),
                             key=key, needle_start=len(self.intro) + cut)


@torch.no_grad()
def passkey_scores(model_fn: ModelFn, tokenizer: Tokenizer, context_len: int, depths: Sequence[float],
                   n_trials: int, seed: int) -> dict[float, tuple[float, float]]:
    """Teacher-forced passkey scores at one context length: {depth: (key accuracy, token accuracy)} over
    n_trials prompts of `context_len` tokens. Key accuracy: the fraction of prompts whose answer tokens
    are all the argmax of the logits one position before; token accuracy: the fraction of answer tokens
    that are (the partial progress the all-or-nothing score hides)."""
    task = PasskeyTask(tokenizer)
    rng = np.random.default_rng(seed)
    scores = {}
    for depth in depths:
        keys = tokens = n_tokens = 0
        for _ in range(n_trials):
            sample = task.sample(context_len, depth, rng)
            logits = model_fn(torch.from_numpy(sample.input_ids)[None])
            predicted = logits[0, torch.from_numpy(sample.answer_positions - 1)].argmax(-1).cpu()
            hits = predicted == torch.from_numpy(sample.input_ids[sample.answer_positions])
            keys += bool(hits.all())
            tokens += int(hits.sum())
            n_tokens += hits.numel()
        scores[depth] = (keys / n_trials, tokens / max(n_tokens, 1))
    return scores


# --- multi-query associative recall (Zoology, Arora et al. 2023) ------------------------------------

def mqar_batch(batch_size: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int,
               power_a: float = 0.01) -> dict[str, torch.Tensor]:
    """A batch of MQAR sequences over token ids [0, vocab_size) (choose vocab_size <= the model's).

    Each row: `num_pairs` key-value pairs (keys distinct from [1, V/2), values distinct from
    [V/2, V)), then every key queried once at an even offset of the remaining positions, the gap to the
    context drawn with p(i) proportional to a * i^(a-1) (a = power_a); other positions are random
    filler tokens. targets[b, t] is the queried key's value where input_ids[b, t] is a query, else -100
    (the model predicts the value as the token after the query).
    Returns {"input_ids": (B, T) int64, "targets": (B, T) int64}.
    """
    half = vocab_size // 2
    context = 2 * num_pairs
    slots = (seq_len - context) // 2  # query slots: even offsets after the context
    if num_pairs < 1 or num_pairs > half - 1:
        raise ValueError(f"num_pairs={num_pairs}: need 1 <= num_pairs < vocab_size // 2 = {half}")
    if slots < num_pairs:
        raise ValueError(f"seq_len={seq_len}: too short for {num_pairs} pairs and their queries "
                         f"(needs >= {4 * num_pairs})")
    rng = np.random.default_rng(seed)
    gap_p = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
    gap_p /= gap_p.sum()
    input_ids = rng.integers(0, vocab_size, size=(batch_size, seq_len))
    targets = np.full((batch_size, seq_len), IGNORE_INDEX, dtype=np.int64)
    for b in range(batch_size):
        keys = rng.choice(np.arange(1, half), num_pairs, replace=False)
        values = rng.choice(np.arange(half, vocab_size), num_pairs, replace=False)
        input_ids[b, 0:context:2] = keys
        input_ids[b, 1:context:2] = values
        queries = context + 2 * rng.choice(slots, num_pairs, replace=False, p=gap_p)
        input_ids[b, queries] = keys
        targets[b, queries] = values
    return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets)}


def mqar_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of labelled positions (targets != -100) where argmax(logits) is the target.
    logits (B, T, V) float, targets (B, T) int64."""
    labelled = targets != IGNORE_INDEX
    return (logits.argmax(-1)[labelled] == targets[labelled].to(logits.device)).float().mean().item()
