"""The public attention functions (flash-attn 2's signatures) and the autograd op behind them.

Dispatch: CUDA tensors -> Triton kernels compiled; CPU tensors with ``TRITON_INTERPRET=1`` -> the same
Triton kernels in Triton's interpreter (how CI tests them); CPU otherwise -> the blockwise PyTorch
implementation in ``kernels/reference.py`` (same algorithm, O(N) memory), so training works anywhere.
"""

import torch

from .launch import INTERPRET, attn_bwd, attn_fwd
from .mask import normalize_window
from .reference import blockwise_attention
from .validate import (check_alibi, check_block_table, check_cu_seqlens, check_dropout, check_options, check_qkv,
                       check_softcap, unpack)


# The launches are registered as two operators so torch.compile sees opaque ops with known output shapes
# instead of tracing into the kernels (Inductor would otherwise re-trace the Triton source and fail). They
# are plain torch.library definitions with autograd in a torch.autograd.Function around them, not
# torch.library.custom_op: on the H200 host that wrapper cost about 0.4 ms of CPU time per forward+backward
# (1.47 vs 1.04 ms, docs/bench/h200-host-overhead-2026-11-29j.txt), which a compiled GPT-2 step, whose
# GPU time is close to its CPU time, pays twelve times.
torch.library.define(
    "longctx::flash_attn_fwd",
    "(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
    "SymInt max_seqlen_k, float scale, int left, int right, float softcap=0.0, Tensor? alibi_slopes=None) "
    "-> (Tensor, Tensor)")
torch.library.define(
    "longctx::flash_attn_bwd",
    "(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
    "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float scale, int left, int right, "
    "bool deterministic, float softcap=0.0, Tensor? alibi_slopes=None) -> (Tensor, Tensor, Tensor)")


@torch.library.impl("longctx::flash_attn_fwd", "CompositeExplicitAutograd")
def _flash_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                    softcap=0.0, alibi_slopes=None):
    return attn_fwd(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softcap, alibi_slopes)


@torch.library.register_fake("longctx::flash_attn_fwd")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right, softcap=0.0,
      alibi_slopes=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if cu_seqlens_q is None:   # lse (B, H, Nq); varlen: (H, total_q)
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.impl("longctx::flash_attn_bwd", "CompositeExplicitAutograd")
def _flash_bwd_impl(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                    left, right, deterministic, softcap=0.0, alibi_slopes=None):
    return attn_bwd(dout, dlse, q, k, v, out, lse, scale, left, right, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k, deterministic, softcap, alibi_slopes)


@torch.library.register_fake("longctx::flash_attn_bwd")
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
      deterministic, softcap=0.0, alibi_slopes=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


_flash_fwd_op = torch.ops.longctx.flash_attn_fwd.default
_flash_bwd_op = torch.ops.longctx.flash_attn_bwd.default


class _FlashAttn(torch.autograd.Function):
    """(out, lse) = attention; saves (q, k, v, out, lse) only: the backward recomputes P tile by tile.
    mods: () or (softcap, alibi_slopes), the ops' optional arguments (none passed on the default path)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                deterministic, mods):
        out, lse = _flash_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
                                 *mods)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.args = (max_seqlen_q, max_seqlen_k, scale, left, right, deterministic, *mods)
        # an unused output's gradient arrives as None, not as zeros allocated and filled on every call
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 12
        if dout is None:   # only the LSE was used
            dout = torch.zeros_like(out)
        dq, dk, dv = _flash_bwd_op(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.args)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or (t.device.type == "cpu" and INTERPRET)


def _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_size, softcap,
             alibi_slopes):
    """The checks a forward and a backward call share -> (scale, softcap, max_seqlen_q, max_seqlen_k, uniform), the
    max_seqlens the launch uses (validate.check_cu_seqlens: the longest document; the batch's lengths otherwise) and,
    for varlen documents that all have the same lengths, those lengths (the call is a batch: _as_batch)."""
    varlen = cu_seqlens_q is not None
    check_qkv(q, k, v, varlen=varlen)
    scale = check_options(q.shape[-1], softmax_scale, window_size)
    softcap = check_softcap(softcap)
    uniform = None
    if varlen:
        max_seqlen_q, max_seqlen_k, uniform = check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                               max_seqlen_k)
    else:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    if alibi_slopes is not None:
        check_alibi(alibi_slopes, q, cu_seqlens_q.numel() - 1 if varlen else q.shape[0], q.shape[-2])
    return scale, softcap, max_seqlen_q, max_seqlen_k, uniform


def _as_batch(uniform, *packed):
    """Varlen (total, heads, dim) tensors whose documents all have the lengths uniform = (L_q, L_k) as batch views
    (total / L, L, heads, dim), q-like tensors by L_q and k-like by L_k (the order q-like first is the caller's): the
    same attention, and the batch launch takes the fastest kernels (the Gluon ones refuse varlen, kernels/policy.py),
    with no copy."""
    n = packed[0].shape[0] // uniform[0]
    return [t.view(n, t.shape[0] // n, *t.shape[1:]) for t in packed]


def _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
               window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse):
    """flash_attn_func (cu_seqlens_q None) and flash_attn_varlen_func: checks, then the kernels or the CPU path."""
    check_dropout(dropout_p)
    scale, softcap, max_seqlen_q, max_seqlen_k, uniform = _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                   max_seqlen_k, softmax_scale, window_size, softcap,
                                                                   alibi_slopes)
    left, right = normalize_window(causal, window_size)
    if _use_triton(q):
        mods = () if softcap == 0.0 and alibi_slopes is None else (softcap, alibi_slopes)
        if uniform is not None:   # documents of one length: the batch launch, out and lse back in varlen layout
            qb, kb, vb = _as_batch(uniform, q, k, v)
            out, lse = _FlashAttn.apply(qb, kb, vb, None, None, *uniform, scale, left, right, deterministic, mods)
            out, lse = out.view(q.shape), lse.transpose(0, 1).reshape(q.shape[1], q.shape[0])  # (n,H,L) -> (H, n*L)
        else:
            out, lse = _FlashAttn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left,
                                        right, deterministic, mods)
    else:
        out, lse = blockwise_attention(q, k, v, scale, left, right, cu_seqlens_q, cu_seqlens_k, softcap=softcap,
                                       alibi_slopes=alibi_slopes)
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, return_lse=False):
    """Exact attention without materializing the N x N scores; differentiable in q, k and v. flash-attn 2's
    signature: arguments, order and defaults.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim) with
    nheads % nheads_k == 0 (GQA/MQA). fp16, bf16 or fp32; headdim a multiple of 8 up to 256.
    dropout_p: must be 0.0 (no attention dropout; anything else raises ValueError). softmax_scale defaults
    to headdim ** -0.5. ``causal`` aligns the mask bottom-right when seqlen_q != seqlen_k.
    ``window_size=(left, right)``: query i sees keys within [i + seqlen_k - seqlen_q - left,
    i + seqlen_k - seqlen_q + right], -1 meaning unbounded. softcap > 0: scores = softcap * tanh(scores /
    softcap) after scaling (Gemma 2). alibi_slopes: fp32 (nheads,) or (batch, nheads); adds
    -slope * |i + seqlen_k - seqlen_q - j| to the scores after the softcap, before the mask (no gradient).
    softcap and ALiBi run the portable Triton kernels (kernels/flash_fwd.py, flash_bwd.py) on every GPU.

    Returns out (batch, seqlen_q, nheads, headdim) in q's dtype. return_attn_probs=True: (out, lse, None),
    lse (batch, nheads, seqlen_q) float32 natural log, -inf (and out 0) for rows that see no key; the
    third element, flash-attn's S_dmask, is always None (the probabilities are never materialized;
    flash-attn itself returns an empty tensor without dropout). ``return_lse=True`` (keyword only, ours):
    (out, lse). The LSE is differentiable too. With ALiBi under a plain causal mask flash-attn's CUDA
    kernel returns an LSE larger by slope * (i + seqlen_k - seqlen_q) (kernels/reference.py); out and
    gradients agree.

    ``deterministic=False`` (the default, as flash-attn's) lets the backward sum dQ in fp32 inside the
    dK/dV pass (five matrix products per tile instead of seven; bit-for-bit results may vary between runs)
    where that is faster: on Hopper, in the Gluon kernel at head dims 64 and 128 (kernels/launch.py says
    where); elsewhere the deterministic backward runs anyway. deterministic=True always runs it. The CPU
    reference path ignores it.
    """
    return _attention(q, k, v, None, None, None, None, dropout_p, softmax_scale, causal, window_size, softcap,
                      alibi_slopes, deterministic, return_attn_probs, return_lse)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, return_lse=False):
    """Attention over packed variable-length sequences; documents never attend across boundaries.

    q: (total_q, nheads, headdim); k, v: (total_k, nheads_k, headdim); cu_seqlens_q / cu_seqlens_k:
    int32 (batch + 1,) cumulative lengths starting at 0 (empty documents allowed); max_seqlen_*: the
    longest document. Masks and ALiBi use each document's own lengths and positions; alibi_slopes
    (batch, nheads) has one row per document. block_table (paged KV) is not supported: None only.
    Other arguments as in ``flash_attn_func``. Returns out (total_q, nheads, headdim) [, lse (nheads,
    total_q)[, None]]; rows after cu_seqlens_q[-1] get 0 / -inf.
    """
    check_block_table(block_table)
    return _attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, return_lse)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                              return_lse=False):
    """``flash_attn_func`` on qkv (batch, seqlen, 3, nheads, headdim): q, k, v are its views (no copy; the
    kernels take strided rows). The gradient is qkv's, (dq, dk, dv) stacked."""
    q, k, v = unpack("qkv", qkv, 3, varlen=False)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                             return_lse=False):
    """``flash_attn_func`` with kv (batch, seqlen_k, 2, nheads_k, headdim) holding k and v."""
    k, v = unpack("kv", kv, 2, varlen=False)
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs, return_lse=return_lse)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, *, return_lse=False):
    """``flash_attn_varlen_func`` on qkv (total, 3, nheads, headdim), one cu_seqlens / max_seqlen for both."""
    q, k, v = unpack("qkv", qkv, 3, varlen=True)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                                  return_lse=return_lse)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                                    return_lse=False):
    """``flash_attn_varlen_func`` with kv (total_k, 2, nheads_k, headdim) holding k and v."""
    k, v = unpack("kv", kv, 2, varlen=True)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, return_lse=return_lse)


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, window_size=(-1, -1),
                        cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        deterministic=False, softcap=0.0, alibi_slopes=None):
    """Gradients (dq, dk, dv) of ``flash_attn_func`` / ``flash_attn_varlen_func`` (same arguments) from
    the ``out`` and ``lse`` a forward call returned, without running the forward again.

    For callers that keep the attention output across the backward pass and drop everything else
    (selective activation checkpointing, training/memory.py). Triton path only: CUDA tensors, or CPU
    under TRITON_INTERPRET=1.
    """
    scale, softcap, max_seqlen_q, max_seqlen_k, uniform = _checked(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                                   max_seqlen_k, softmax_scale, window_size, softcap,
                                                                   alibi_slopes)
    if not _use_triton(q):
        raise ValueError("flash_attn_backward runs the Triton kernels: it needs CUDA tensors, or CPU tensors "
                         "with TRITON_INTERPRET=1")
    for name, t, like in (("dout", dout, q), ("out", out, q)):
        if t.shape != like.shape or t.dtype != like.dtype:
            raise ValueError(f"{name} must have q's shape {tuple(like.shape)} and dtype {like.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    lse_shape = (q.shape[1], q.shape[0]) if cu_seqlens_q is not None else (q.shape[0], q.shape[2], q.shape[1])
    if lse.shape != lse_shape:
        layout = "(nheads, total_q)" if cu_seqlens_q is not None else "(batch, nheads, seqlen_q)"
        raise ValueError(f"lse must have shape {layout} = {lse_shape}, as the forward returned it, "
                         f"got {tuple(lse.shape)}")
    left, right = normalize_window(causal, window_size)
    mods = () if softcap == 0.0 and alibi_slopes is None else (softcap, alibi_slopes)
    if uniform is not None:   # as the forward ran it (_attention): the batch launch, the gradients in varlen layout
        qb, kb, vb, dob, ob = _as_batch(uniform, q, k, v, dout, out)
        lse_b = lse.view(q.shape[1], qb.shape[0], uniform[0]).transpose(0, 1).contiguous()   # (H, n*L) -> (n, H, L)
        grads = _flash_bwd_op(dob, None, qb, kb, vb, ob, lse_b, None, None, *uniform, scale, left, right,
                              deterministic, *mods)
        return tuple(g.view(t.shape) for g, t in zip(grads, (q, k, v)))
    return _flash_bwd_op(dout, None, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         scale, left, right, deterministic, *mods)
