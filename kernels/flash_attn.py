"""The public attention functions (flash-attn 2 compatible) and the autograd op behind them.

Dispatch: CUDA tensors -> Triton kernels compiled; CPU tensors with ``TRITON_INTERPRET=1`` -> the same
Triton kernels in Triton's interpreter (how CI tests them); CPU otherwise -> the blockwise PyTorch
implementation in ``kernels/reference.py`` (same algorithm, O(N) memory), so training works anywhere.
"""

import torch

from .launch import INTERPRET, attn_bwd, attn_fwd
from .mask import normalize_window
from .reference import blockwise_attention
from .validate import check_cu_seqlens, check_options, check_qkv


# The launches are registered as two operators so torch.compile sees opaque ops with known output shapes
# instead of tracing into the kernels (Inductor would otherwise re-trace the Triton source and fail). They
# are plain torch.library definitions with autograd in a torch.autograd.Function around them, not
# torch.library.custom_op: on the H200 host that wrapper cost about 0.4 ms of CPU time per forward+backward
# (1.47 vs 1.04 ms, docs/bench/h200-host-overhead-2026-11-29j.txt), which a compiled GPT-2 step, whose
# GPU time is close to its CPU time, pays twelve times.
torch.library.define(
    "longctx::flash_attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
    "SymInt max_seqlen_k, float scale, int left, int right) -> (Tensor, Tensor)")
torch.library.define(
    "longctx::flash_attn_bwd",
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
    "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, int left, int right, "
    "bool deterministic) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("longctx::flash_attn_fwd", "CompositeExplicitAutograd")
def _flash_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right):
    return attn_fwd(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)


@torch.library.register_fake("longctx::flash_attn_fwd")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is None:   # lse (B, H, Nq); varlen: (H, total_q)
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.impl("longctx::flash_attn_bwd", "CompositeExplicitAutograd")
def _flash_bwd_impl(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    left, right, deterministic):
    return attn_bwd(dout, dlse, q, k, v, out, lse, scale, left, right, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, deterministic)


@torch.library.register_fake("longctx::flash_attn_bwd")
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
      deterministic):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_flash_fwd_op = torch.ops.longctx.flash_attn_fwd.default
_flash_bwd_op = torch.ops.longctx.flash_attn_bwd.default


class _FlashAttn(torch.autograd.Function):
    """(out, lse) = attention; saves (q, k, v, out, lse) only: the backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                deterministic):
        out, lse = _flash_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, left, right, deterministic)
        # an unused output's gradient arrives as None, not as zeros allocated and filled on every call
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 11
        if dout is None:   # only the LSE was used
            dout = torch.zeros_like(out)
        dq, dk, dv = _flash_bwd_op(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False,
                    deterministic=True):
    """Exact attention without materializing the N x N scores; differentiable in q, k and v.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
    nheads % nheads_k == 0 (GQA/MQA). fp16, bf16 or fp32; headdim a multiple of 8 up to 256.
    softmax_scale defaults to headdim ** -0.5. ``causal`` aligns the mask bottom-right when
    seqlen_q != seqlen_k. ``window_size=(left, right)``: query i sees keys within [i - left, i + right]
    of its diagonal, -1 meaning unbounded. Returns out (batch, seqlen_q, nheads, headdim) in q's dtype;
    with ``return_lse=True`` returns (out, lse), lse (batch, nheads, seqlen_q) float32 natural log,
    -inf (and out 0) for rows that see no key. The LSE is differentiable too.
    ``deterministic=False`` lets the backward sum dQ in fp32 inside the dK/dV pass (five matrix products
    per tile instead of seven; bit-for-bit results may vary between runs) where that is faster: on
    Hopper, in the Gluon kernel at head dims 64 and 128 (kernels/launch.py says where); elsewhere the
    deterministic backward runs anyway. flash-attn's default is False, ours True. The CPU reference
    path ignores it.
    """
    check_qkv(q, k, v, varlen=False)
    scale = check_options(q.shape[-1], softmax_scale, window_size)
    left, right = normalize_window(causal, window_size)
    if _use_triton(q):
        out, lse = _FlashAttn.apply(q, k, v, None, None, q.shape[1], k.shape[1], scale, left, right, deterministic)
    else:
        out, lse = blockwise_attention(q, k, v, scale, left, right)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False,
                           deterministic=True):
    """Attention over packed variable-length sequences; documents never attend across boundaries.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q / cu_seqlens_k:
    int32 (batch + 1,) cumulative lengths starting at 0 (empty documents allowed); max_seqlen_*: the
    longest document. Other arguments as in ``flash_attn_func``. Returns out (total_q, nheads,
    headdim) [, lse (nheads, total_q)]; rows after cu_seqlens_q[-1] get 0 / -inf.
    """
    check_qkv(q, k, v, varlen=True)
    scale = check_options(q.shape[-1], softmax_scale, window_size)
    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    left, right = normalize_window(causal, window_size)
    if _use_triton(q):
        out, lse = _FlashAttn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    scale, left, right, deterministic)
    else:
        out, lse = blockwise_attention(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k)
    return (out, lse) if return_lse else out


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, window_size=(-1, -1),
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        deterministic=True):
    """Gradients (dq, dk, dv) of ``flash_attn_func`` / ``flash_attn_varlen_func`` (same arguments) from
    the ``out`` and ``lse`` a forward call returned, without running the forward again.

    For callers that keep the attention output across the backward pass and drop everything else
    (selective activation checkpointing, training/memory.py). Triton path only: CUDA tensors, or CPU
    under TRITON_INTERPRET=1.
    """
    varlen = cu_seqlens_q is not None
    check_qkv(q, k, v, varlen=varlen)
    scale = check_options(q.shape[-1], softmax_scale, window_size)
    if varlen:
        check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    if not _use_triton(q):
        raise ValueError("flash_attn_backward runs the Triton kernels: it needs CUDA tensors, or CPU tensors "
                         "with TRITON_INTERPRET=1")
    for name, t, like in (("dout", dout, q), ("out", out, q)):
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{name} must have q's shape {tuple(like.shape)} and dtype {like.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    left, right = normalize_window(causal, window_size)
    return _flash_bwd_op(dout, None, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, left, right, deterministic)
