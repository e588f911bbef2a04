"""FlashAttention forward in Triton: tiles of Q against streamed tiles of K/V, online softmax in fp32.

Scores live in base 2 (softmax_scale * log2(e) folded into one multiply, exp2 instead of exp); the
stored LSE is the natural-log one the API promises. Nothing of size N x N is ever materialized.
One program owns BLOCK_M query rows of one (sequence, head); it walks the key blocks that
``_kv_block_range`` says it can see, masking only the blocks on the window's edges.

Score modifications (``_score_mod``, shared with the backward): ``SOFTCAP`` > 0 (a constexpr float) caps
the scaled scores, s = softcap * tanh(s / softcap), and ``ALIBI`` adds -slope * |i + seqlen_k - seqlen_q - j|
(flash-attn's bias; slopes from ``AlibiSlopes``, (batch, nheads) fp32), both before the mask. With
SOFTCAP = 0.0 and ALIBI = False (AlibiSlopes None) their code is not generated: the default kernel is
the one without them.
"""
import triton
import triton.language as tl

from .mask import _kv_block_range, _sequence_bounds, _tile_visible


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. PRECISION "upcast" works around Triton 3.6's interpreter,
    whose bf16 dot multiplies the raw bit patterns: operands go to fp32 first (exact for bf16)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype). Under "upcast" (the interpreter with bf16) rounded to nearest even by hand first: Triton
    3.6's interpreter truncates fp32 -> bf16 (half the values land one ulp low), where the GPU rounds."""
    if PRECISION == "upcast":
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@triton.jit
def _score_mod(x, q_idx, k_idx, off, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scaled scores in base 2 (x = qk * softmax_scale * log2(e)) -> (modified scores, tanh of the
    softcap) in base 2. q_idx / k_idx: the tile's query / key positions within the sequence, shaped to
    broadcast against x (either orientation); off = seqlen_k - seqlen_q; slope2 = the head's ALiBi slope *
    log2(e). tanh(y) = 1 - 2 / (exp(2y) + 1) with y = x / (SOFTCAP * log2(e)): exact limits +-1, no NaN."""
    t = x
    if SOFTCAP > 0.0:
        t = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 / SOFTCAP)) + 1.0)
        x = t * (SOFTCAP * 1.4426950408889634)
    if ALIBI:
        x = x - slope2 * tl.abs(q_idx + off - k_idx).to(tl.float32)
    return x, t


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                    offs_m, offs_d, start, end, seqlen_q, seqlen_k, window_left, window_right,
                    qk_scale, slope2,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    # 64-bit start so multi-million-token sequences index correctly; per-step increments stay small.
    k_ptrs = k_base + start.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    d_mask = offs_d[None, :] < HEAD_DIM
    for start_n in tl.range(start, end, BLOCK_N):
        if MASKED:
            kv_mask = ((start_n + offs_n)[:, None] < seqlen_k) & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PRECISION)
        if SOFTCAP > 0.0 or ALIBI:   # modified scores (module docstring); the default kernel takes the branches below
            s, _ = _score_mod(qk * qk_scale, offs_m[:, None], (start_n + offs_n)[None, :], seqlen_k - seqlen_q,
                              slope2, SOFTCAP, ALIBI)
            if MASKED:
                vis = _tile_visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                    HAS_LEFT, HAS_RIGHT)
                s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        elif MASKED:
            vis = _tile_visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                HAS_LEFT, HAS_RIGHT)
            qk = tl.where(vis, qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # a row that has seen no visible key yet keeps m = -inf; shift it by 0 instead (no NaN)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_use[:, None])
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(qk * qk_scale - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
        acc = _dot(_cast(p, v.dtype, PRECISION), v, acc, PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, Out, LSE, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
              qk_scale, seqlen_q, seqlen_k, window_left, window_right, num_m_blocks,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_ob, stride_om, stride_oh,
              stride_lb, stride_lh,
              NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and HEAD_DIM_PAD >= 16)
    # 1-D grid over (sequence * head, query block); query blocks in reverse so that, under a causal
    # mask, the longest rows start first and the short ones fill the tail.
    pid = tl.program_id(0)
    pid_bh = pid // num_m_blocks
    pid_m = num_m_blocks - 1 - pid % num_m_blocks
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CuSeqlensQ, CuSeqlensK, seqlen_q, seqlen_k,
                                                            IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    b64 = b.to(tl.int64)
    q_row0 = (q_start + start_m).to(tl.int64)
    q_base = Q + b64 * stride_qb + q_row0 * stride_qm + h.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk.to(tl.int64) * stride_vh

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < seqlen_q
    q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_r[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    slope2 = 0.0
    if ALIBI:   # slopes as the launcher lays them out: (batch, nheads), contiguous
        slope2 = tl.load(AlibiSlopes + b * NUM_HEADS + h) * 1.4426950408889634

    lo, mid_lo, mid_hi, hi = _kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                             BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if HAS_LEFT:  # keys entering the window from the left: masked
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                        offs_m, offs_d, lo, mid_lo, seqlen_q, seqlen_k,
                                        window_left, window_right, qk_scale, slope2,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                        PRECISION, SOFTCAP, ALIBI)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                    offs_m, offs_d, mid_lo, mid_hi, seqlen_q, seqlen_k,
                                    window_left, window_right, qk_scale, slope2,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, HAS_LEFT, HAS_RIGHT,
                                    PRECISION, SOFTCAP, ALIBI)
    # the diagonal / right window edge and a ragged last key block: masked
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                                    offs_m, offs_d, mid_hi, hi, seqlen_q, seqlen_k,
                                    window_left, window_right, qk_scale, slope2,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                    PRECISION, SOFTCAP, ALIBI)

    # Rows that saw no key at all (l = 0) give output 0 and LSE -inf, never NaN.
    seen = l_i > 0.0
    acc = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_base = Out + b64 * stride_ob + q_row0 * stride_om + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_r[:, None] * stride_om + offs_d[None, :], _cast(acc, Out.dtype.element_ty, PRECISION),
             mask=q_mask)
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_row0
    tl.store(lse_base + offs_r, lse, mask=row_ok)
