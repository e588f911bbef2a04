"""The memory plan, applied to a plain GPT from outside (torchtitan's apply_* style).

Activation checkpointing of every block (``activation_checkpointing``):

- ``none`` keeps every activation autograd wants.
- ``block`` keeps only each block's input and recomputes the whole block, attention included, in
  backward (torch.utils.checkpoint).
- ``selective`` keeps each block's input *and its attention output* (with the softmax LSE) and
  recomputes only the token-wise work (norms, projections, MLP) in backward: the attention forward,
  the one O(N^2) part, never runs twice. With our kernels the backward starts from the kept output;
  other attention backends recompute their forward in backward, as ``block`` does.
- ``offload`` is ``selective`` with the kept tensors parked in pinned CPU memory until backward
  brings them back tile by tile: the GPU holds one block's working set at a time. At 1M tokens a
  GPT-2 124M layer parks 3 GiB of fp32 input and 1.5 GiB of bf16 attention output.

Sequence tiling: norms, projections and MLP in tiles of ``seq_chunk`` tokens (Block.project_tile /
finish_tile) and the cross-entropy in tiles of ``loss_chunk`` tokens (model/loss.py), so no
full-length intermediate wider than d_model (and no N x vocab logits) exists at once.
"""
import functools

import torch
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "block", "selective", "offload")


def _tilewise(fn, tiles, T):
    """Runs fn(t) for each tile t (a slice of dim 1) and writes its output(s) into full-length tensors
    allocated at the first tile: never a list of tiles and their concatenation at once."""
    outs = None
    for t in tiles:
        res = fn(t)
        res = res if isinstance(res, tuple) else (res,)
        if outs is None:
            outs = tuple(r.new_empty((r.shape[0], T, *r.shape[2:])) for r in res)
        for o, r in zip(outs, res):
            o[:, t] = r
    return outs if len(outs) > 1 else outs[0]


class _KeptAttentionBlock(torch.autograd.Function):
    """One block that saves only its input x and its attention output (y, lse), on the GPU or in
    pinned CPU memory. Backward, tile by tile: the block's second half (output projection + MLP) is
    recomputed and backpropagated to get dy and part of dx, and q, k, v recomputed without a graph
    from the same input tile; attention's backward runs from the kept y; the first half (norm + qkv
    projection) is recomputed and backpropagated for the rest of dx. A parked input crosses PCIe
    twice in backward, one tile at a time; all offload copies run on a side stream.
    Parameter gradients accumulate into .grad during that inner backward (as reentrant checkpointing
    does); the parameters are inputs only so that the output requires grad even if x does not."""

    @staticmethod
    def forward(ctx, x, block, rope, cu_seqlens, offload, *params):
        tiles = block.tiles(x.shape[1])
        rope = tuple(rope or ())
        ctx.block, ctx.rope, ctx.cu_seqlens, ctx.tiles, ctx.device = block, rope, cu_seqlens, tiles, x.device
        ctx.amp = (torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type))
        with torch.no_grad():
            q, k, v = _tilewise(lambda t: block.project_tile(x[:, t], *(r[:, t] for r in rope)), tiles, x.shape[1])
            y, lse = block.attn.attend_keep(q, k, v, cu_seqlens)
            del q, k, v
            # the dropout masks of the second half are replayed in backward from this state
            ctx.rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else torch.get_rng_state()
            out = _tilewise(lambda t: block.finish_tile(x[:, t], y[:, t]), tiles, x.shape[1])
        kept = (x, y) if lse is None else (x, y, lse)
        if offload:
            kept = tuple(_to_pinned(t) for t in kept)
        ctx.kept = kept if offload else None
        if not offload:
            ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        block, rope, cu_seqlens, tiles, device = ctx.block, ctx.rope, ctx.cu_seqlens, ctx.tiles, ctx.device
        kept = ctx.kept if ctx.kept is not None else ctx.saved_tensors
        if ctx.kept is not None and device.type == "cuda":
            torch.cuda.current_stream(device).wait_stream(_copy_stream(device))   # the parked copies are done
        x_kept, y = kept[0], kept[1].to(device, non_blocking=True)
        lse = kept[2].to(device, non_blocking=True) if len(kept) > 2 else None
        ctx.kept = None

        def run(fn, *args, grad=True):   # recompute under the forward's autocast
            with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=ctx.amp[1], enabled=ctx.amp[0]):
                return fn(*args)

        # 1. second half: dy, and dx through the residual and MLP paths (same dropout masks); with each
        # input tile on the GPU anyway, also q, k, v for attention's backward (no graph)
        dy, dx, qkv = torch.empty_like(y), None, None
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if device.type == "cuda":
                torch.cuda.set_rng_state(ctx.rng, device)
            else:
                torch.set_rng_state(ctx.rng)
            # the input, one tile at a time: a parked x never comes back whole
            for t, x_t in zip(tiles, _fetch_tiles(x_kept, tiles, device)):
                x_t, y_t = x_t.detach().requires_grad_(), y[:, t].detach().requires_grad_()
                torch.autograd.backward(run(block.finish_tile, x_t, y_t), grad_out[:, t])
                dy[:, t] = y_t.grad
                if dx is None:
                    dx = x_t.grad.new_empty(grad_out.shape)
                dx[:, t] = x_t.grad
                qkv_t = run(block.project_tile, x_t.detach(), *(r[:, t] for r in rope), grad=False)
                if qkv is None:
                    qkv = tuple(a.new_empty((a.shape[0], grad_out.shape[1], *a.shape[2:])) for a in qkv_t)
                for full, part in zip(qkv, qkv_t):
                    full[:, t] = part
        # 2. attention, from the kept output
        q, k, v = qkv
        del qkv, qkv_t
        dq, dk, dv = block.attn.attend_backward(dy, q, k, v, y, lse, cu_seqlens)
        del q, k, v, y, dy, lse
        # 3. first half: the rest of dx
        for t, x_t in zip(tiles, _fetch_tiles(x_kept, tiles, device)):
            x_t = x_t.detach().requires_grad_()
            torch.autograd.backward(run(block.project_tile, x_t, *(r[:, t] for r in rope)),
                                    (dq[:, t], dk[:, t], dv[:, t]))
            dx[:, t] += x_t.grad
        return (dx, None, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 5)


_COPY_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _copy_stream(device: torch.device) -> "torch.cuda.Stream":
    """One side stream per GPU for the offload copies, so they run beside the compute stream's kernels."""
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _to_pinned(t):
    """A copy of t in pinned host memory, made on the side stream (overlapping the next block's work)."""
    cpu = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    if not t.is_cuda:
        return cpu.copy_(t)
    stream = _copy_stream(t.device)
    stream.wait_stream(torch.cuda.current_stream(t.device))   # t has been computed
    with torch.cuda.stream(stream):
        cpu.copy_(t, non_blocking=True)
    t.record_stream(stream)   # t's memory is not reused before the copy has read it
    return cpu


def _fetch_tiles(src, tiles, device):
    """Yields src[:, t] on `device` for each tile; from pinned host memory the next tile is already
    copying on the side stream while the caller computes on this one."""
    if device.type != "cuda" or src.device == device:
        for t in tiles:
            yield src[:, t]
        return
    stream, compute = _copy_stream(device), torch.cuda.current_stream(device)

    def start(t):
        with torch.cuda.stream(stream):
            return src[:, t].to(device, non_blocking=True)
    following = start(tiles[0])
    for i in range(len(tiles)):
        tile = following
        compute.wait_stream(stream)      # this tile has arrived
        tile.record_stream(compute)      # allocated on the side stream, used on the compute stream
        if i + 1 < len(tiles):
            following = start(tiles[i + 1])
        yield tile


def warm_host_memory(model, batch_size: int, seq_len: int, dtype: torch.dtype) -> None:
    """Allocates and frees, once, the pinned host buffers `offload` parks a step's tensors in (each
    block's input in fp32, its attention output in `dtype`, the LSE), so that PyTorch's caching host
    allocator hands them out again and a first step costs what later ones do. For benchmarks that time
    a single step; training simply pays the allocation in its first step. Needs CUDA."""
    c = model.config
    shapes = (((batch_size, seq_len, c.d_model), torch.float32),
              ((batch_size, seq_len, c.n_head * c.head_dim), dtype),
              ((batch_size, c.n_head, seq_len), torch.float32))
    buffers = [torch.empty(shape, dtype=dt, pin_memory=True) for _ in model.blocks for shape, dt in shapes]
    del buffers


def _checkpointed(forward, mode, block, x, rope=None, cu_seqlens=None, cache=None):
    if cache is not None or not torch.is_grad_enabled():   # generation / evaluation: nothing to save
        return forward(x, rope, cu_seqlens, cache)
    if mode == "block":
        return checkpoint(forward, x, rope, cu_seqlens, use_reentrant=False)
    return _KeptAttentionBlock.apply(x, block, rope, cu_seqlens, mode == "offload", *block.parameters())


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
            block.forward = functools.partial(_checkpointed, forward, activation_checkpointing, block)
    model.loss_chunk = loss_chunk
    return model
