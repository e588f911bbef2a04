"""Rotary embeddings on the fused QKV projection: one Triton kernel for the forward and the backward.

``rope_qkv(qkv, cos, sin, n_head, n_kv_head)`` splits the projection's output (B, T, (H + 2 Hk) * D) into
q (B, T, H, D), k and v (B, T, Hk, D), rotating q and k (rotate-half layout, as ``model/rope.py``'s
``apply_rope``, the reference) in one pass over memory. Its backward writes the projection's gradient in
one pass too. Left to torch.compile, the backward's rotation and the concatenation of the three gradients
became one kernel whose index arithmetic, not memory, set its speed: 146 us per GPT-2 layer at 8K tokens
on an H200, for 75 MB moved (docs/perf-notes.md, session 14).

Math in fp32 (the tables are fp32), results in the input's dtype, as the reference.
"""
import torch
import triton
import triton.language as tl

from .flash_fwd import _cast
from .launch import INTERPRET, _contig_last, _precision


@triton.jit
def _rope_qkv_kernel(packed, s_pb, s_pt, q, s_qb, s_qt, s_qh, k, s_kb, s_kt, s_kh, v, s_vb, s_vt, s_vh,
                     cos, sin, s_cb, s_ct, T,
                     H: tl.constexpr, HK: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_T tokens of one head of one row. Forward reads the packed projection and writes
    the head's q/k/v tensor; backward (BACKWARD) reads the gradient of q/k/v and writes the packed one.
    q and k heads are rotated (by the transpose of the rotation in the backward); v heads are copied.
    PRECISION: launch._precision's, for _cast (rounding to nearest under the interpreter too)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // (H + 2 * HK)).to(tl.int64)
    h = pid_bh % (H + 2 * HK)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (t < T) & (j < HALF)
    p = packed + b * s_pb + t * s_pt + h * (2 * HALF) + j
    if h < H:
        s = q + b * s_qb + t * s_qt + h * s_qh + j
    elif h < H + HK:
        s = k + b * s_kb + t * s_kt + (h - H) * s_kh + j
    else:
        s = v + b * s_vb + t * s_vt + (h - H - HK) * s_vh + j
    if BACKWARD:
        src = s
        dst = p
    else:
        src = p
        dst = s
    x1 = tl.load(src, mask=mask).to(tl.float32)           # channels [0, D/2) of the head
    x2 = tl.load(src + HALF, mask=mask).to(tl.float32)    # channels [D/2, D)
    if h < H + HK:
        c = b * s_cb + t * s_ct + j
        c1 = tl.load(cos + c, mask=mask).to(tl.float32)
        c2 = tl.load(cos + c + HALF, mask=mask).to(tl.float32)
        s1 = tl.load(sin + c, mask=mask).to(tl.float32)
        s2 = tl.load(sin + c + HALF, mask=mask).to(tl.float32)
        # forward: y = x * cos + (-x2, x1) * sin; backward: its transpose applied to the gradient
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
    else:
        y1 = x1
        y2 = x2
    tl.store(dst, _cast(y1, dst.dtype.element_ty, PRECISION), mask=mask)
    tl.store(dst + HALF, _cast(y2, dst.dtype.element_ty, PRECISION), mask=mask)


BLOCK_T = 64   # tokens per program: 64 x D/2 elements per half-tile, 4 warps


def _launch(packed, q, k, v, cos, sin, n_head, n_kv_head, backward):
    B, T, width = packed.shape
    half = width // (n_head + 2 * n_kv_head) // 2
    cos_b = cos.stride(0) if cos.shape[0] > 1 else 0   # one table row set for every batch row
    grid = (triton.cdiv(T, BLOCK_T), B * (n_head + 2 * n_kv_head))
    _rope_qkv_kernel[grid](
        packed, packed.stride(0), packed.stride(1),
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2),
        v, v.stride(0), v.stride(1), v.stride(2), cos, sin, cos_b, cos.stride(1), T,
        H=n_head, HK=n_kv_head, HALF=half, BLOCK_T=BLOCK_T, BLOCK_HALF=triton.next_power_of_2(half),
        BACKWARD=backward, PRECISION=_precision(packed.dtype), num_warps=4)


torch.library.define("longctx::rope_qkv_fwd",
                     "(Tensor qkv, Tensor cos, Tensor sin, int n_head, int n_kv_head) -> (Tensor, Tensor, Tensor)")
torch.library.define("longctx::rope_qkv_bwd", "(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin) -> Tensor")


def _split_shapes(qkv, n_head, n_kv_head):
    B, T, width = qkv.shape
    D = width // (n_head + 2 * n_kv_head)
    return (B, T, n_head, D), (B, T, n_kv_head, D)


@torch.library.impl("longctx::rope_qkv_fwd", "CompositeExplicitAutograd")
def _rope_fwd_impl(qkv, cos, sin, n_head, n_kv_head):
    q_shape, kv_shape = _split_shapes(qkv, n_head, n_kv_head)
    q, k, v = qkv.new_empty(q_shape), qkv.new_empty(kv_shape), qkv.new_empty(kv_shape)
    _launch(_contig_last(qkv), q, k, v, cos, sin, n_head, n_kv_head, backward=False)
    return q, k, v


@torch.library.register_fake("longctx::rope_qkv_fwd")
def _(qkv, cos, sin, n_head, n_kv_head):
    q_shape, kv_shape = _split_shapes(qkv, n_head, n_kv_head)
    return qkv.new_empty(q_shape), qkv.new_empty(kv_shape), qkv.new_empty(kv_shape)


def _packed_like(dq, dk):
    """An empty (B, T, (H + 2 Hk) * D) gradient of the packed projection."""
    B, T, H, D = dq.shape
    return dq.new_empty((B, T, (H + 2 * dk.shape[2]) * D))


@torch.library.impl("longctx::rope_qkv_bwd", "CompositeExplicitAutograd")
def _rope_bwd_impl(dq, dk, dv, cos, sin):
    dqkv = _packed_like(dq, dk)
    dq, dk, dv = (_contig_last(t) for t in (dq, dk, dv))
    _launch(dqkv, dq, dk, dv, cos, sin, dq.shape[2], dk.shape[2], backward=True)
    return dqkv


@torch.library.register_fake("longctx::rope_qkv_bwd")
def _(dq, dk, dv, cos, sin):
    return _packed_like(dq, dk)


_rope_fwd_op = torch.ops.longctx.rope_qkv_fwd.default
_rope_bwd_op = torch.ops.longctx.rope_qkv_bwd.default


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, n_head, n_kv_head):
        ctx.save_for_backward(cos, sin)
        return _rope_fwd_op(qkv, cos, sin, n_head, n_kv_head)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        return _rope_bwd_op(dq, dk, dv, cos, sin), None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_head: int,
             n_kv_head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (B, T, (n_head + 2 n_kv_head) * D), last dim contiguous; cos, sin (B or 1, T, D), any float
    dtype -> q (B, T, n_head, D), k, v (B, T, n_kv_head, D), contiguous, in qkv's dtype: q and k rotated
    by RoPE (rotate-half), v copied. Differentiable in qkv. Runs the Triton kernel (CUDA, or Triton's
    interpreter under TRITON_INTERPRET=1 on CPU)."""
    if qkv.dim() != 3:
        raise ValueError(f"rope_qkv: qkv must be (batch, seq, (n_head + 2 * n_kv_head) * head_dim), got {tuple(qkv.shape)}")
    B, T, width = qkv.shape
    heads = n_head + 2 * n_kv_head
    if n_head < 1 or n_kv_head < 1 or width % heads or (width // heads) % 2:
        raise ValueError(f"rope_qkv: qkv's last dim {width} is not (n_head={n_head} + 2 * n_kv_head={n_kv_head}) "
                         "heads of an even head_dim")
    D = width // heads
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != T or t.shape[2] != D or t.stride(2) != 1:
            raise ValueError(f"rope_qkv: {name} must be ({B} or 1, {T}, {D}) with its last dim contiguous, "
                             f"got shape {tuple(t.shape)}, strides {t.stride()}")
        if t.device != qkv.device:
            raise ValueError(f"rope_qkv: {name} is on {t.device}, qkv on {qkv.device}")
    if not (qkv.is_cuda or (qkv.device.type == "cpu" and INTERPRET)):
        raise ValueError("rope_qkv runs a Triton kernel: qkv must be on a CUDA device, or on CPU with TRITON_INTERPRET=1")
    return _RopeQKV.apply(qkv, cos, sin, n_head, n_kv_head)
