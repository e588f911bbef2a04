"""Evaluation during training: validation loss and perplexity, passkey retrieval accuracy."""
import math

import torch

from data.tasks import passkey_scores

from .device import to_device


@torch.no_grad()
def val_loss(model, loader, n_batches: int, device: torch.device, autocast, local_batch=None,
             sum_over_ranks=None) -> dict:
    """Mean cross-entropy over the target tokens of n_batches batches, and its perplexity.

    loader must be a fresh deterministic val loader, so every evaluation scores the same tokens.
    Batch losses are weighted by their target count: rows with ignored targets count less.
    autocast: a zero-argument callable returning the forward's autocast context.
    In a job of several processes each rank scores its part of every batch, as in training:
    local_batch(batch) -> that part (training/distributed.py: Parallel.local_batch), and sum_over_ranks
    (a float64 tensor, summed in place) adds up the ranks' loss sums and target counts, so the mean is
    over every target of the batches, weighted the same way.
    """
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for _ in range(n_batches):
        batch = next(loader)
        batch = to_device(local_batch(batch) if local_batch else batch, device)
        with autocast():
            _, loss = model(**batch)
        n = int((batch["targets"] != -100).sum())
        if n:   # a rank's part may hold no target (a context-parallel chunk): its mean is 0/0
            total_loss += loss.item() * n
        total_tokens += n
    model.train()
    if sum_over_ranks is not None:
        total_loss, total_tokens = sum_over_ranks(torch.tensor([total_loss, total_tokens], dtype=torch.float64,
                                                               device=device)).tolist()
    loss = total_loss / total_tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss)}


@torch.no_grad()
def passkey(model, tokenizer, context_len: int, depths: list[float], n_trials: int, seed: int,
            device: torch.device, autocast) -> dict:
    """Passkey retrieval at context_len: key accuracy averaged over depths and each depth's, and the
    answer-token accuracy averaged over depths."""
    def model_fn(input_ids):
        with autocast():
            return model(input_ids.to(device))[0]

    model.eval()
    by_depth = passkey_scores(model_fn, tokenizer, context_len, depths, n_trials, seed)
    model.train()
    return {"passkey_acc": sum(key for key, _ in by_depth.values()) / len(by_depth),
            "passkey_token_acc": sum(tok for _, tok in by_depth.values()) / len(by_depth),
            **{f"passkey_acc@{depth:g}": key for depth, (key, _) in by_depth.items()}}
