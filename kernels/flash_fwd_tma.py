"""The Triton forward for dense inputs with whole tiles, its Q/K/V tiles loaded by TMA descriptors.

Same algorithm as ``flash_fwd.py`` (base-2 scores, online softmax, the causal diagonal masked and every
other tile not), for the inputs that need none of that kernel's generality: batch layout (B, N, H, D) with
rows viewable as (B * N, H * D), no window but the causal one, as many keys as queries, N a multiple of
both tile sizes. Each tile then arrives by one TMA copy (``TensorDescriptor`` over the rows view, one
head's D columns) instead of per-thread pointer loads.

Why (docs/perf-notes.md, sessions 16-17): at d64, causal, 1K-4K tokens the Triton tutorial's forward, which
loads this way with 64x64 tiles, was 3-8% ahead of ours; our pointer-load forward got slower, not faster,
with its tiles (236 vs 273 TFLOP/s at 1K). This kernel, with its causal grid folded (each program one long
and one short query block), runs by default on Hopper where kernels/policy.py's ``TMA_FWD`` says (d64:
causal up to 4K, unmasked up to 2K; rule "fwd.tma", scope ``policy.tma_shapes``). H200 fp16, causal 1K / 2K:
303 / 344 TFLOP/s against the pointer-load forward's 262 / 307 and the tutorial's 261±45 / 330 in the same run.
"""
import functools

import torch
import triton
import triton.language as tl

from . import policy
from .flash_fwd import _cast, _dot

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:   # Triton < 3.4: the pointer-load forward runs everything
    TensorDescriptor = None


@triton.jit
def _tile(acc, l_i, m_i, q, k_desc, v_desc, row0, k_col, start_n, offs_m, qk_scale,
          BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into the running (acc, l, m); MASKED: the causal diagonal."""
    k = k_desc.load([row0 + start_n, k_col])
    qk = _dot(q, tl.trans(k), None, PRECISION)
    if MASKED:
        offs_n = start_n + tl.arange(0, BLOCK_N)
        # every row sees its own key, so each row's max is finite after its first diagonal tile
        qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = v_desc.load([row0 + start_n, k_col])
    acc = _dot(_cast(p, v.dtype, PRECISION), v, acc, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _query_block(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seqlen, pid_m, b, h, stride_lb, stride_lh,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Output and LSE of query block ``pid_m`` of head ``h`` of sequence ``b``."""
    row0 = b * seqlen
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([row0 + start_m, h * HEAD_DIM])
    k_col = (h // GROUP) * HEAD_DIM

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # keys wholly left of the diagonal (or all of them): unmasked
    for start_n in tl.range(0, start_m if CAUSAL else seqlen, BLOCK_N):
        acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_desc, v_desc, row0, k_col, start_n, offs_m, qk_scale,
                              BLOCK_N, False, PRECISION)
    if CAUSAL:   # the diagonal block's key tiles
        for start_n in tl.range(start_m, start_m + BLOCK_M, BLOCK_N):
            acc, l_i, m_i = _tile(acc, l_i, m_i, q, k_desc, v_desc, row0, k_col, start_n, offs_m, qk_scale,
                                  BLOCK_N, True, PRECISION)

    acc = acc / l_i[:, None]
    o_desc.store([row0 + start_m, h * HEAD_DIM], _cast(acc, o_desc.dtype, PRECISION))
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse)


@triton.jit
def _attn_fwd_tma(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seqlen, num_m_blocks, stride_lb, stride_lh,
                  NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    # grid (query blocks, batch * heads); causal: (ceil(query blocks / 2), batch * heads), each program folding
    # the i-th longest and the i-th shortest query block of its head (one block where they meet), so every
    # program visits the same number of key tiles (at d64 causal 4K: 373 vs 362 TFLOP/s unfolded, session 17)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    if CAUSAL:
        _query_block(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seqlen, num_m_blocks - 1 - pid, b, h,
                     stride_lb, stride_lh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, PRECISION)
        if pid < num_m_blocks - 1 - pid:
            _query_block(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seqlen, pid, b, h,
                         stride_lb, stride_lh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, PRECISION)
    else:
        _query_block(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seqlen, pid, b, h,
                     stride_lb, stride_lh, GROUP, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, PRECISION)


def rows_view_ok(t: torch.Tensor) -> bool:
    """(B, N, H, D) addressable as a (B * N, H * D) row view: contiguous heads, rows of whole batches,
    16-byte aligned rows (TMA). The Gluon kernels' scope (kernels/hopper.py) uses it too; it lives here because
    this module loads with any Triton, the Gluon ones only with a Gluon that has what they import (3.6, 3.7)."""
    b, n, h, d = t.shape
    s_b, s_n, s_h, s_d = t.stride()
    return (s_d == 1 and s_h == d and (b == 1 or s_b == n * s_n) and (s_n * t.element_size()) % 16 == 0
            and t.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def supported(q, k, v, left: int, right: int, varlen: bool, block_m: int, block_n: int) -> bool:
    """Whether this kernel takes these inputs with these tiles (module docstring, ``policy.tma_shapes``): on a GPU
    with TMA (Hopper on), or in Triton's interpreter."""
    machine = policy.Machine("cpu", tensor_descriptor=TensorDescriptor is not None)
    if q.is_cuda:
        machine = machine._replace(kind="cuda", major=_major(q.device.index if q.device.index is not None
                                                             else torch.cuda.current_device()))
    problem = policy.Problem(q.dtype, q.shape[-1], q.shape[1], k.shape[1], left, right, varlen)
    return policy.tma_shapes(machine, problem, block_m, block_n) and all(map(rows_view_ok, (q, k, v)))


def _descriptor(t: torch.Tensor, rows: int):
    b, n, h, d = t.shape
    return TensorDescriptor(t, [b * n, h * d], [t.stride(1), 1], [rows, d])


def attn_fwd(launch, key, q, k, v, out, lse, scale: float, causal: bool, cfg, precision: str):
    """Output into ``out`` ((B, N, H, D), contiguous) and the natural-log LSE into ``lse`` ((B, H, N) fp32),
    through ``launch`` (kernels/dispatch.py's Cached of ``_attn_fwd_tma``) with its caller's ``key``."""
    batch, seqlen, nheads, head_dim = q.shape
    num_m = seqlen // cfg.BLOCK_M
    launch(key, ((num_m + 1) // 2 if causal else num_m, batch * nheads),
           _descriptor(q, cfg.BLOCK_M), _descriptor(k, cfg.BLOCK_N), _descriptor(v, cfg.BLOCK_N),
           _descriptor(out, cfg.BLOCK_M), lse, scale * 1.4426950408889634, seqlen, num_m,
           lse.stride(0), lse.stride(1),
           NUM_HEADS=nheads, GROUP=nheads // k.shape[2], HEAD_DIM=head_dim, BLOCK_M=cfg.BLOCK_M,
           BLOCK_N=cfg.BLOCK_N, CAUSAL=causal, PRECISION=precision, num_warps=cfg.num_warps,
           num_stages=cfg.num_stages)
