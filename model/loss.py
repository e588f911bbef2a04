"""Cross-entropy over the vocabulary in tiles of tokens, never materializing (N, vocab) logits.

At a 1M-token context GPT-2's logits alone are 1M x 50K x 4 B = 200 GB. ``chunked_cross_entropy``
computes, tile by tile in the forward pass, the loss and its gradients with respect to the hidden
states and the output matrix (softmax - one_hot is known as soon as the tile's logits are), keeps
only those (N x d_model and vocab x d_model), and scales them by the incoming gradient in backward.
"""
import torch
import torch.nn.functional as F


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, need_grad):
        # hidden (N, d) and weight (V, d) in the matmul dtype; targets (N,) int64, -100 = ignore
        n_valid = (targets != -100).sum().clamp(min=1)
        acc = torch.promote_types(hidden.dtype, torch.float32)        # fp32, or fp64 for fp64 input
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            logits = (h @ weight.t()).to(acc)                           # (chunk, V)
            loss += F.cross_entropy(logits, t, ignore_index=-100, reduction="sum")
            if not need_grad:   # evaluation: the gradients would be wasted work
                continue
            # d(sum of losses) / d logits = softmax - one_hot, zero on ignored rows
            g = torch.softmax(logits, dim=-1)
            valid = t != -100
            g[valid, t[valid]] -= 1.0
            g[~valid] = 0.0
            g = g.to(hidden.dtype)
            grad_hidden[s:s + chunk] = g @ weight
            grad_weight += (g.t() @ h).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight, n_valid)
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy(hidden, weight, targets, chunk: int):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (ignore_index -100).

    hidden (..., d_model); weight (vocab, d_model); targets (...) int64. Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32, as F.linear + F.cross_entropy would.
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    h = hidden.reshape(-1, hidden.shape[-1])
    # the casts are autograd ops: gradients come back in the parameters' own dtypes
    with torch.autocast(device, enabled=False):
        need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
        return _ChunkedCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets.reshape(-1), chunk, need_grad)
