"""The memory plan, applied to a plain GPT from outside (torchtitan's apply_* style).

- Activation checkpointing of every block: ``none`` keeps all activations; ``block`` keeps only each
  block's input and recomputes the block in backward; ``offload`` does the same but parks the kept
  inputs in pinned CPU memory until backward needs them (at 1M tokens a GPT-2 residual stream is
  3 GiB per layer in fp32).
- Sequence tiling: norms, projections and MLP in tiles of ``seq_chunk`` tokens (Block._tiled_forward)
  and the cross-entropy in tiles of ``loss_chunk`` tokens (model/loss.py), so no full-length
  intermediate wider than d_model (and no N x vocab logits) exists at once.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "block", "offload")


class _OffloadedBlock(torch.autograd.Function):
    """Runs a block without saving anything but its input, which goes to pinned CPU memory; backward
    brings it back, recomputes the block with grad enabled and backpropagates through it."""

    @staticmethod
    def forward(ctx, x, run, *extra):
        ctx.run, ctx.extra, ctx.device = run, extra, x.device
        ctx.x_cpu = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=x.is_cuda)
        ctx.x_cpu.copy_(x, non_blocking=True)
        ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
        with torch.no_grad():
            return run(x, *extra)

    @staticmethod
    def backward(ctx, grad_out):
        x = ctx.x_cpu.to(ctx.device, non_blocking=True).requires_grad_()
        # same dropout masks as the forward pass
        with torch.random.fork_rng(devices=[ctx.device] if x.is_cuda else []):
            if x.is_cuda:
                torch.cuda.set_rng_state(ctx.rng, ctx.device)
            else:
                torch.set_rng_state(ctx.rng)
            with torch.enable_grad():
                out = ctx.run(x, *ctx.extra)
        torch.autograd.backward(out, grad_out)
        return (x.grad, None) + (None,) * len(ctx.extra)


def _checkpointed(forward, offload, x, rope=None, cu_seqlens=None, cache=None):
    if cache is not None or not torch.is_grad_enabled():   # generation / evaluation: nothing to save
        return forward(x, rope, cu_seqlens, cache)
    if offload:
        # autocast state is captured by the closure's caller: recompute under the same autocast
        amp = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type)

        def run(x, rope, cu_seqlens):
            with torch.autocast(x.device.type, dtype=dtype, enabled=amp):
                return forward(x, rope, cu_seqlens)
        return _OffloadedBlock.apply(x, run, rope, cu_seqlens)
    return checkpoint(forward, x, rope, cu_seqlens, use_reentrant=False)


def apply_memory_plan(model, activation_checkpointing: str = "none", seq_chunk: int = 0, loss_chunk: int = 0):
    """Configure ``model`` (a model.GPT) in place; returns it. Parameters and math are unchanged."""
    if activation_checkpointing not in CHECKPOINT_MODES:
        raise ValueError(f"activation_checkpointing must be one of {CHECKPOINT_MODES}, got {activation_checkpointing!r}")
    for name, value in (("seq_chunk", seq_chunk), ("loss_chunk", loss_chunk)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (0 = no tiling), got {value!r}")
    for block in model.blocks:
        block.seq_chunk = seq_chunk
        forward = type(block).forward.__get__(block)   # the class's forward, even if wrapped before
        if activation_checkpointing == "none":
            block.__dict__.pop("forward", None)
        else:
            block.forward = functools.partial(_checkpointed, forward, activation_checkpointing == "offload")
    model.loss_chunk = loss_chunk
    return model
