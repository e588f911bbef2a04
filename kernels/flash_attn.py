"""The public attention functions (flash-attn 2 compatible) and the autograd Function behind them.

Dispatch: CUDA tensors -> Triton kernels compiled; CPU tensors with ``TRITON_INTERPRET=1`` -> the same
Triton kernels in Triton's interpreter (how CI tests them); CPU otherwise -> the blockwise PyTorch
implementation in ``kernels/reference.py`` (same algorithm, O(N) memory), so training works anywhere.
"""
import torch

from .launch import INTERPRET, attn_bwd, attn_fwd
from .mask import normalize_window
from .reference import blockwise_attention
from .validate import check_cu_seqlens, check_options, check_qkv


class FlashAttnFunc(torch.autograd.Function):
    """Forward saves (q, k, v, out, lse) only; backward recomputes P tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right):
        out, lse = attn_fwd(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, left, right)
        # Unused outputs arrive as None instead of zero tensors: no dLSE work unless asked for.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, scale, left, right = ctx.args
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attn_bwd(dout, dlse, q, k, v, out, lse, scale, left, right,
                              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return dq, dk, dv, None, None, None, None, None, None, None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False):
    """Exact attention without materializing the N x N scores; differentiable in q, k and v.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
    nheads % nheads_k == 0 (GQA/MQA). fp16, bf16 or fp32; headdim a multiple of 8 up to 256.
    softmax_scale defaults to headdim ** -0.5. ``causal`` aligns the mask bottom-right when
    seqlen_q != seqlen_k. ``window_size=(left, right)``: query i sees keys within [i - left, i + right]
    of its diagonal, -1 meaning unbounded. Returns out (batch, seqlen_q, nheads, headdim) in q's dtype;
    with ``return_lse=True`` returns (out, lse), lse (batch, nheads, seqlen_q) float32 natural log,
    -inf (and out 0) for rows that see no key. The LSE is differentiable too.
    """
    check_qkv(q, k, v, varlen=False)
    scale = check_options(q.shape[-1], softmax_scale, window_size)
    left, right = normalize_window(causal, window_size)
    if _use_triton(q):
        out, lse = FlashAttnFunc.apply(q, k, v, None, None, None, None, scale, left, right)
    else:
        out, lse = blockwise_attention(q, k, v, scale, left, right)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False):
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
        out, lse = FlashAttnFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       scale, left, right)
    else:
        out, lse = blockwise_attention(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k)
    return (out, lse) if return_lse else out
