"""Pure-PyTorch attention: the test oracle and the CPU training path.

- ``attention_ref``: standard attention that materializes the N x N scores. In float64 it is the
  oracle every kernel test compares against; in bf16/fp16 it is "standard attention in the same
  precision" whose error sets the tolerance (as flash-attn's tests do). The ``naive`` baseline.
- ``BlockwiseAttention``: the same algorithm as the Triton kernels written with torch ops (online
  softmax over key blocks forward, recomputation backward from the saved LSE), so training on a
  machine without a GPU keeps O(N) attention memory. ``flash_attn_func`` runs it on CPU when the
  Triton interpreter is off.

Shapes follow the public API: batch layout q (B, Nq, H, D), k/v (B, Nk, Hk, D); GQA groups are
handled by viewing q as (B, Nq, Hk, G, D) rather than repeating k/v.

Score modifications, in flash-attn's order: scaled scores s = q.k * scale, then softcap > 0:
s = softcap * tanh(s / softcap), then ALiBi: s -= slope[b, h] * |i + Nk - Nq - j| (positions within the
sequence, the causal diagonal's bottom-right alignment; flash-attn's CUDA kernel adds slope * j instead
when the mask is plain causal, which differs by a per-row constant: same output and gradients, an LSE
larger by slope * (i + Nk - Nq)), then the mask.
"""
import torch

from .mask import normalize_window, visible


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _slopes(alibi_slopes, B, H, Hk, dtype, doc=None):
    """ALiBi slopes ((H,) or (B, H); for varlen the document's row) as (B, Hk, G, 1, 1) to broadcast against
    the grouped scores, or None."""
    if alibi_slopes is None:
        return None
    s = alibi_slopes if doc is None or alibi_slopes.dim() == 1 else alibi_slopes[doc:doc + 1]
    return s.to(dtype).expand(B, H).reshape(B, Hk, H // Hk, 1, 1)


def _score_mod(s, rows, cols, Nq, Nk, softcap, slopes):
    """Scaled scores (..., rows, cols) -> (softcapped, ALiBi-biased scores, d softcap / d s or None): the module
    docstring's order, before the mask."""
    dtanh = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
        dtanh = 1 - t * t
    if slopes is not None:
        s = s - slopes * (rows[:, None] + (Nk - Nq) - cols[None, :]).abs().to(s.dtype)
    return s, dtanh


def _attention_dense(q, k, v, scale, left, right, softcap=0.0, slopes=None):
    """Standard attention for one batch layout: (B, Nq, H, D) -> out (B, Nq, H, D), lse (B, H, Nq).

    Matrix products run in the input dtype, the softmax in fp32 (fp64 for fp64 input), as a
    user's plain PyTorch attention would. slopes: ``_slopes``'s (B, Hk, G, 1, 1) or None.
    """
    B, Nq, H, D = q.shape
    Nk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    qg = q.view(B, Nq, Hk, G, D)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k).to(_compute_dtype(q.dtype)) * scale
    rows = torch.arange(Nq, device=q.device)
    cols = torch.arange(Nk, device=q.device)
    s, _ = _score_mod(s, rows, cols, Nq, Nk, softcap, slopes)
    vis = visible(rows, cols, Nq, Nk, left, right)                       # (Nq, Nk)
    has_key = vis.any(-1)                                                # (Nq,)
    # Rows without any visible key: softmax over zeros then multiply by 0, so the gradient stays
    # finite (a softmax over all -inf would put NaN into backward through torch.where).
    s = s.masked_fill(~vis, float("-inf")).masked_fill(~has_key[:, None], 0.0)
    lse = torch.logsumexp(s, dim=-1).masked_fill(~has_key, float("-inf"))
    p = torch.softmax(s, dim=-1) * has_key[:, None]
    out = torch.einsum("bhgqk,bkhd->bqhgd", p.to(v.dtype), v).reshape(B, Nq, H, D)
    return out.to(q.dtype), lse.reshape(B, H, Nq).float()


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                  cu_seqlens_q=None, cu_seqlens_k=None, softcap=0.0, alibi_slopes=None):
    """Standard attention (materializes N x N). Returns ``(out, lse)``.

    Batch layout: q (B, Nq, H, D), k/v (B, Nk, Hk, D) -> out (B, Nq, H, D), lse (B, H, Nq).
    Varlen layout (``cu_seqlens_*`` int32 (n+1,)): q (total_q, H, D) -> out (total_q, H, D),
    lse (H, total_q). Autograd flows through it, so it also gives reference gradients.
    softcap / alibi_slopes ((H,) or (batch, H)): the module docstring's score modifications.
    """
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    left, right = normalize_window(causal, window_size)
    cdt = _compute_dtype(q.dtype)
    if cu_seqlens_q is None:
        slopes = _slopes(alibi_slopes, q.shape[0], q.shape[2], k.shape[2], cdt)
        return _attention_dense(q, k, v, scale, left, right, softcap, slopes)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        o, l = _attention_dense(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                                v[None, ck[i]:ck[i + 1]], scale, left, right, softcap,
                                _slopes(alibi_slopes, 1, q.shape[1], k.shape[1], cdt, doc=i))
        outs.append(o[0])
        lses.append(l[0])
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    if outs:
        out[cq[0]:cq[-1]] = torch.cat(outs)
        lse[:, cq[0]:cq[-1]] = torch.cat(lses, dim=-1)
    return out, lse


class BlockwiseAttention(torch.autograd.Function):
    """FlashAttention's algorithm in torch ops, batch layout; O(N * block) memory forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, scale, left, right, block, softcap=0.0, slopes=None):
        # slopes: _slopes's (B, Hk, G, 1, 1) in the compute dtype, or None
        B, Nq, H, D = q.shape
        Nk, Hk = k.shape[1], k.shape[2]
        G = H // Hk
        cdt = _compute_dtype(q.dtype)
        qg = q.view(B, Nq, Hk, G, D).to(cdt)
        m = torch.full((B, Hk, G, Nq), float("-inf"), dtype=cdt, device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(B, Hk, G, Nq, D, dtype=cdt, device=q.device)
        rows = torch.arange(Nq, device=q.device)
        for n0 in range(0, Nk, block):
            cols = torch.arange(n0, min(n0 + block, Nk), device=q.device)
            vis = visible(rows, cols, Nq, Nk, left, right)
            if not vis.any():
                continue
            kb, vb = k[:, n0:n0 + block].to(cdt), v[:, n0:n0 + block].to(cdt)
            s = torch.einsum("bqhgd,bkhd->bhgqk", qg, kb) * scale
            s, _ = _score_mod(s, rows, cols, Nq, Nk, softcap, slopes)
            s = s.masked_fill(~vis, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)   # rows with no key yet
            p = torch.exp(s - m_use[..., None])
            alpha = torch.exp(m - m_use)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("bhgqk,bkhd->bhgqd", p, vb)
            m = m_new
        seen = l > 0
        out = acc / torch.where(seen, l, 1.0)[..., None]
        lse = torch.where(seen, m + torch.log(torch.where(seen, l, 1.0)), float("-inf"))
        out = out.permute(0, 3, 1, 2, 4).reshape(B, Nq, H, D).to(q.dtype)
        lse = lse.reshape(B, H, Nq).float()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, left, right, block, softcap, slopes)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, left, right, block, softcap, slopes = ctx.args
        B, Nq, H, D = q.shape
        Nk, Hk = k.shape[1], k.shape[2]
        G = H // Hk
        cdt = _compute_dtype(q.dtype)
        qg = q.view(B, Nq, Hk, G, D).to(cdt)
        dog = dout.reshape(B, Nq, Hk, G, D).to(cdt)
        delta = (dout.to(cdt) * out.to(cdt)).sum(-1).permute(0, 2, 1).reshape(B, Hk, G, Nq)
        if dlse is not None:
            delta = delta - dlse.reshape(B, Hk, G, Nq).to(cdt)
        lse_g = lse.reshape(B, Hk, G, Nq).to(cdt)
        lse_g = lse_g.masked_fill(lse_g == float("-inf"), float("inf"))   # P = 0 on keyless rows
        dq = torch.zeros(B, Nq, Hk, G, D, dtype=cdt, device=q.device)
        dk = torch.zeros(B, Nk, Hk, D, dtype=cdt, device=q.device)
        dv = torch.zeros_like(dk)
        rows = torch.arange(Nq, device=q.device)
        for n0 in range(0, Nk, block):
            cols = torch.arange(n0, min(n0 + block, Nk), device=q.device)
            vis = visible(rows, cols, Nq, Nk, left, right)
            if not vis.any():
                continue
            kb, vb = k[:, n0:n0 + block].to(cdt), v[:, n0:n0 + block].to(cdt)
            s = torch.einsum("bqhgd,bkhd->bhgqk", qg, kb) * scale
            s, dtanh = _score_mod(s, rows, cols, Nq, Nk, softcap, slopes)
            p = torch.exp(s - lse_g[..., None]).masked_fill(~vis, 0.0)
            dv[:, n0:n0 + block] = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
            dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, vb)
            ds = p * (dp - delta[..., None])
            if dtanh is not None:
                ds = ds * dtanh
            dq += torch.einsum("bhgqk,bkhd->bqhgd", ds, kb) * scale
            dk[:, n0:n0 + block] = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
        return (dq.reshape(B, Nq, H, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
                None, None, None, None, None, None)


def blockwise_attention(q, k, v, scale, left, right, cu_seqlens_q=None, cu_seqlens_k=None, block=256,
                        softcap=0.0, alibi_slopes=None):
    """Differentiable blockwise attention, batch or varlen layout; returns ``(out, lse)`` like the kernels.
    softcap / alibi_slopes: as in ``attention_ref``."""
    cdt = _compute_dtype(q.dtype)
    if cu_seqlens_q is None:
        return BlockwiseAttention.apply(q, k, v, scale, left, right, block, softcap,
                                        _slopes(alibi_slopes, q.shape[0], q.shape[2], k.shape[2], cdt))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for i in range(len(cq) - 1):
        o, l = BlockwiseAttention.apply(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                                        v[None, ck[i]:ck[i + 1]], scale, left, right, block, softcap,
                                        _slopes(alibi_slopes, 1, q.shape[1], k.shape[1], cdt, doc=i))
        outs.append(o[0])
        lses.append(l[0])
    # rows outside every document (cu_seqlens_q[-1] < total_q) are never attended: zeros / -inf
    tail = q.shape[0] - cq[-1]
    outs.append(q.new_zeros(tail, *q.shape[1:]))
    lses.append(torch.full((q.shape[1], tail), float("-inf"), device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=-1)


def blockwise_attention_backward(dout, q, k, v, out, lse, scale, left, right, cu_seqlens_q=None, cu_seqlens_k=None,
                                 block=256, softcap=0.0, alibi_slopes=None):
    """Gradients (dq, dk, dv) of ``blockwise_attention`` from the ``(out, lse)`` a forward call returned, without
    running the forward again: the CPU counterpart of ``flash_attn_backward``, float64 allowed. Layouts as in
    ``blockwise_attention``; ``out``/``lse`` may come from elsewhere (a context-parallel ring passes the global
    ones), and P is then recomputed against that LSE."""
    from types import SimpleNamespace

    cdt = _compute_dtype(q.dtype)

    def one(do, q, k, v, o, l, doc=None):
        # BlockwiseAttention.backward reads only the saved tensors and args of its ctx: hand it what its
        # forward would have saved, so the backward math stays in one place
        slopes = _slopes(alibi_slopes, q.shape[0], q.shape[2], k.shape[2], cdt, doc)
        ctx = SimpleNamespace(saved_tensors=(q, k, v, o, l), args=(scale, left, right, block, softcap, slopes))
        return BlockwiseAttention.backward(ctx, do, None)[:3]

    if cu_seqlens_q is None:
        return one(dout, q, k, v, out, lse)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        sq, sk = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        grads = one(dout[None, sq], q[None, sq], k[None, sk], v[None, sk], out[None, sq], lse[None, :, sq], doc=i)
        dq[sq], dk[sk], dv[sk] = (g[0] for g in grads)
    return dq, dk, dv
