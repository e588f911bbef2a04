"""FlashAttention backward in Triton: recompute P from Q, K and the saved LSE; nothing N x N is stored.

delta = rowsum(dO * O) (minus dLSE when the LSE itself gets a gradient, since d lse_i / d s_ij = p_ij)
first: by ``_attn_bwd_preprocess``, or by the dQ programs as they start (``PREPROCESS``) when the dQ pass
runs on its own before the dK/dV pass. ``_attn_bwd``'s programs are of two kinds:
- dK/dV programs (``_attn_bwd_dkdv_program``): one per key block of one KV head; each walks every
  query head of its GQA group and the query blocks that see it, so dK/dV are summed over the group
  in fp32 registers with no atomics.
- dQ programs (``_attn_bwd_dq_program``): one per query block; each walks the key blocks like the
  forward.
The launcher runs them as two launches (dQ with the preprocess, then dK/dV) or as one grid holding both kinds
(``PROGRAMS="both"``, as FlexAttention's backward); ``use_one_launch`` in kernels/launch.py picks
(one launch for small grids on Hopper, where the two kinds fill each other's tails).
Seven matrix products per tile pair instead of five with an atomic fp32 dQ: deterministic, and each
pass is tuned on its own. ``FUSED_DQ`` is the five-product variant (FlashAttention-2's): the dK/dV
pass also computes each tile pair's dS K and adds it into an fp32 dQ with relaxed atomics, and the
dQ pass is skipped; the order of those additions varies run to run. It was slower than the split
wherever measured, so the launcher runs it only when asked (``override_atomic_dq``).
``SOFTCAP`` / ``ALIBI`` recompute the forward's modified scores (``flash_fwd._score_mod``); softcap's
backward multiplies dS by 1 - tanh^2. Off (0.0 / False), their code is not generated.
"""
import triton
import triton.language as tl

from .flash_fwd import _cast, _dot, _score_mod
from .mask import _kv_block_range, _q_block_range, _sequence_bounds, _tile_visible



@triton.jit
def _attn_bwd_preprocess(Out, DOut, DLse, Delta, Lse, Lse2, DQAcc, num_rows,
                         stride_ob, stride_om, stride_oh,
                         stride_dob, stride_dom, stride_doh,
                         stride_qb, stride_qm, stride_qh,
                         stride_lb, stride_lh,
                         NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, WRITE_LSE2: tl.constexpr,
                         ZERO_DQ: tl.constexpr):
    # grid: (cdiv(num_rows, BLOCK_M), batch * heads); rows are positions along the sequence axis.
    # WRITE_LSE2: also Lse2 = Lse * log2(e), +inf where Lse is -inf (the Gluon backward's form of the LSE).
    # ZERO_DQ: also zero the fp32 dQ accumulator of the atomic / reduce-add backward (one launch fewer than
    # a separate fill; every row is visited, also varlen rows outside any document)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // NUM_HEADS).to(tl.int64)
    h = (pid_bh % NUM_HEADS).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    row_ok = offs_m < num_rows
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_m.to(tl.int64)
    o = tl.load(Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_dob + h * stride_doh + rows[:, None] * stride_dom + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    l_off = b * stride_lb + h * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLse + l_off, mask=row_ok, other=0.0)
    tl.store(Delta + l_off, delta, mask=row_ok)
    if WRITE_LSE2:
        lse = tl.load(Lse + l_off, mask=row_ok, other=0.0)
        tl.store(Lse2 + l_off, tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), mask=row_ok)
    if ZERO_DQ:
        tl.store(DQAcc + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :],
                 tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32), mask=mask)


@triton.jit
def _attn_bwd_dkdv_tile(dk, dv, k, v, q_row, do_row, stride_qm, stride_dom, lse_base, delta_base, dq_base,
                        stride_dqm, offs_m, offs_n, offs_d, seqlen_q, seqlen_k, window_left, window_right, qk_scale,
                        sm_scale, slope2, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                        PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, SOFTCAP: tl.constexpr,
                        ALIBI: tl.constexpr):
    """One query tile's share of this key block's dK and dV (and of dQ when FUSED_DQ). q_row / do_row
    point at the tile's first row (int64 arithmetic stays in those scalars; in-tile offsets fit int32)."""
    offs_r = tl.arange(0, BLOCK_M)
    q_ptrs = q_row + offs_r[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = do_row + offs_r[:, None] * stride_dom + offs_d[None, :]
    d_mask = offs_d[None, :] < HEAD_DIM
    if MASKED:
        row_ok = offs_m < seqlen_q
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_mask, other=0.0)
        do = tl.load(do_ptrs, mask=row_ok[:, None] & d_mask, other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    else:
        if HEAD_DIM == HEAD_DIM_PAD:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
        else:
            q = tl.load(q_ptrs, mask=d_mask, other=0.0)
            do = tl.load(do_ptrs, mask=d_mask, other=0.0)
        lse = tl.load(lse_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    # rows that saw no key have LSE -inf; +inf makes their P exactly 0 instead of NaN
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    qkT = _dot(k, tl.trans(q), None, PRECISION)       # (BLOCK_N, BLOCK_M)
    if SOFTCAP > 0.0 or ALIBI:
        sT, tT = _score_mod(qkT * qk_scale, offs_m[None, :], offs_n[:, None], seqlen_k - seqlen_q, slope2,
                            SOFTCAP, ALIBI)
        pT = tl.math.exp2(sT - lse2[None, :])
    else:
        pT = tl.math.exp2(qkT * qk_scale - lse2[None, :])
    if MASKED:
        visT = _tile_visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                             HAS_LEFT, HAS_RIGHT)
        pT = tl.where(tl.trans(visT), pT, 0.0)
    dv = _dot(_cast(pT, do.dtype, PRECISION), do, dv, PRECISION)
    dpT = _dot(v, tl.trans(do), None, PRECISION)       # (BLOCK_N, BLOCK_M)
    dsT = pT * (dpT - delta[None, :])
    if SOFTCAP > 0.0:   # d softcap * tanh(u / softcap) / du
        dsT = dsT * (1.0 - tT * tT)
    dk = _dot(_cast(dsT, q.dtype, PRECISION), q, dk, PRECISION)
    if FUSED_DQ:   # this key block's share of dQ, added into the fp32 accumulator
        # (BLOCK_M, HEAD_DIM_PAD)
        dq = _dot(tl.trans(_cast(dsT, k.dtype, PRECISION)), k, None, PRECISION) * sm_scale
        tl.atomic_add(dq_base + offs_m.to(tl.int64)[:, None] * stride_dqm + offs_d[None, :], dq,
                      mask=(offs_m[:, None] < seqlen_q) & d_mask, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                         stride_qm, stride_dom, stride_dqm, offs_n, offs_d, start, end,
                         seqlen_q, seqlen_k, window_left, window_right, qk_scale, sm_scale, slope2,
                         BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, COUNTED: tl.constexpr,
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Query rows [start, end) in tiles of BLOCK_M. COUNTED runs the tiles as `range(n_tiles)` instead
    of `tl.range(start, end, BLOCK_M)`: with the latter, and three such loops in the kernel, ptxas 12.8
    serializes every wgmma of the kernel on sm_90 (warning C7515; docs/perf-notes.md). The launch
    table picks the form (KernelConfig.counted)."""
    offs_r = tl.arange(0, BLOCK_M)
    q_row = q_base + start.to(tl.int64) * stride_qm
    do_row = do_base + start.to(tl.int64) * stride_dom
    if COUNTED:
        offs_m = start + offs_r
        for _ in range(0, tl.cdiv(end - start, BLOCK_M)):
            dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, q_row, do_row, stride_qm, stride_dom, lse_base, delta_base,
                                         dq_base, stride_dqm, offs_m, offs_n, offs_d, seqlen_q, seqlen_k,
                                         window_left, window_right, qk_scale, sm_scale, slope2, BLOCK_M, HEAD_DIM,
                                         HEAD_DIM_PAD, MASKED, HAS_LEFT, HAS_RIGHT, PRECISION, FUSED_DQ, SOFTCAP,
                                         ALIBI)
            offs_m += BLOCK_M
            q_row += BLOCK_M * stride_qm
            do_row += BLOCK_M * stride_dom
    else:
        for start_m in tl.range(start, end, BLOCK_M):
            dk, dv = _attn_bwd_dkdv_tile(dk, dv, k, v, q_row, do_row, stride_qm, stride_dom, lse_base, delta_base,
                                         dq_base, stride_dqm, start_m + offs_r, offs_n, offs_d, seqlen_q, seqlen_k,
                                         window_left, window_right, qk_scale, sm_scale, slope2, BLOCK_M, HEAD_DIM,
                                         HEAD_DIM_PAD, MASKED, HAS_LEFT, HAS_RIGHT, PRECISION, FUSED_DQ, SOFTCAP,
                                         ALIBI)
            q_row += BLOCK_M * stride_qm
            do_row += BLOCK_M * stride_dom
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_program(pid, Q, K, V, DOut, LSE, Delta, DK, DV, DQAcc, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
                           sm_scale, qk_scale, seqlen_q, seqlen_k, window_left, window_right, num_n_blocks,
                           stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                           stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                           stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                           stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                           NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                           HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                           PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, COUNTED: tl.constexpr,
                           SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """dK and dV of one key block of one KV head (program `pid` of the dK/dV grid)."""
    pid_bh = pid // num_n_blocks
    pid_n = pid % num_n_blocks
    b = pid_bh // NUM_KV_HEADS
    hk = pid_bh % NUM_KV_HEADS
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CuSeqlensQ, CuSeqlensK, seqlen_q, seqlen_k,
                                                            IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n < seqlen_k:   # varlen: blocks past this document's end have nothing to do
        b64 = b.to(tl.int64)
        k_row0 = (k_start + start_n).to(tl.int64)
        offs_c = tl.arange(0, BLOCK_N)
        offs_n = start_n + offs_c
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        kv_mask = (offs_n < seqlen_k)[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_row0 * stride_kn
                    + offs_c[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_row0 * stride_vn
                    + offs_c[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

        lo, mid_lo, mid_hi, hi = _q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                                                BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        q_row0 = q_start.to(tl.int64)
        for g in range(GROUP):
            h = (hk * GROUP + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + h * stride_qh + q_row0 * stride_qm
            do_base = DOut + b64 * stride_dob + h * stride_doh + q_row0 * stride_dom
            lse_base = LSE + b64 * stride_lb + h * stride_lh + q_row0
            delta_base = Delta + b64 * stride_lb + h * stride_lh + q_row0
            dq_base = DQAcc + b64 * stride_dqb + h * stride_dqh + q_row0 * stride_dqm
            slope2 = 0.0
            if ALIBI:   # (batch, nheads) contiguous, as the launcher lays the slopes out
                slope2 = tl.load(AlibiSlopes + b64 * (NUM_KV_HEADS * GROUP) + h) * 1.4426950408889634
            if HAS_RIGHT:  # query rows entering at the diagonal / right window edge: masked
                dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                              stride_qm, stride_dom, stride_dqm, offs_n, offs_d, lo, mid_lo,
                                              seqlen_q, seqlen_k, window_left, window_right, qk_scale, sm_scale,
                                              slope2, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                              PRECISION, FUSED_DQ, COUNTED, SOFTCAP, ALIBI)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                          stride_qm, stride_dom, stride_dqm, offs_n, offs_d, mid_lo, mid_hi,
                                          seqlen_q, seqlen_k, window_left, window_right, qk_scale, sm_scale,
                                          slope2, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, False, HAS_LEFT, HAS_RIGHT,
                                          PRECISION, FUSED_DQ, COUNTED, SOFTCAP, ALIBI)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                          stride_qm, stride_dom, stride_dqm, offs_n, offs_d, mid_hi, hi,
                                          seqlen_q, seqlen_k, window_left, window_right, qk_scale, sm_scale,
                                          slope2, BLOCK_M, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT,
                                          PRECISION, FUSED_DQ, COUNTED, SOFTCAP, ALIBI)
        dk_base = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + k_row0 * stride_dkn
        dv_base = DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + k_row0 * stride_dvn
        tl.store(dk_base + offs_c[:, None] * stride_dkn + offs_d[None, :],
                 _cast(dk * sm_scale, DK.dtype.element_ty, PRECISION), mask=kv_mask)
        tl.store(dv_base + offs_c[:, None] * stride_dvn + offs_d[None, :],
                 _cast(dv, DV.dtype.element_ty, PRECISION), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                       offs_m, offs_d, start, end, seqlen_q, seqlen_k, window_left, window_right,
                       qk_scale, slope2,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                       PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    d_mask = offs_d[None, :] < HEAD_DIM
    k_ptrs = k_base + start.to(tl.int64) * stride_kn + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + start.to(tl.int64) * stride_vn + offs_n[:, None] * stride_vn + offs_d[None, :]
    for start_n in tl.range(start, end, BLOCK_N):
        if MASKED:
            kv_mask = ((start_n + offs_n)[:, None] < seqlen_k) & d_mask
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif HEAD_DIM == HEAD_DIM_PAD:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
        qk = _dot(q, tl.trans(k), None, PRECISION)
        if SOFTCAP > 0.0 or ALIBI:
            s, t = _score_mod(qk * qk_scale, offs_m[:, None], (start_n + offs_n)[None, :], seqlen_k - seqlen_q,
                              slope2, SOFTCAP, ALIBI)
            p = tl.math.exp2(s - lse2[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            vis = _tile_visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, window_left, window_right,
                                HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        dp = _dot(do, tl.trans(v), None, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP > 0.0:
            ds = ds * (1.0 - t * t)
        dq = _dot(_cast(ds, k.dtype, PRECISION), k, dq, PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return dq


@triton.jit
def _attn_bwd_dq_program(pid, Q, K, V, DOut, LSE, Delta, DQ, Out, DLse, Lse2, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
                         sm_scale, qk_scale, seqlen_q, seqlen_k, window_left, window_right, num_m_blocks,
                         stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                         stride_dqb, stride_dqm, stride_dqh, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                         PRECISION: tl.constexpr, PREPROCESS: tl.constexpr, HAS_DLSE: tl.constexpr,
                         WRITE_LSE2: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """dQ of one query block of one head (program `pid` of the dQ grid; longest rows first). PREPROCESS: the
    preprocess's work for these rows too, for the dK/dV pass that follows (Delta from Out and DOut, less DLse
    when HAS_DLSE; with WRITE_LSE2 also Lse2, the Gluon kernel's base-2 LSE), instead of a launch of
    _attn_bwd_preprocess."""
    pid_bh = pid // num_m_blocks
    pid_m = num_m_blocks - 1 - pid % num_m_blocks
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    hk = h // GROUP
    q_start, seqlen_q, k_start, seqlen_k = _sequence_bounds(b, CuSeqlensQ, CuSeqlensK, seqlen_q, seqlen_k,
                                                            IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m < seqlen_q:
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        q_row0 = (q_start + start_m).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_M)
        offs_m = start_m + offs_r
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        row_ok = offs_m < seqlen_q
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm
                    + offs_r[:, None] * stride_qm + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DOut + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom
                     + offs_r[:, None] * stride_dom + offs_d[None, :], mask=q_mask, other=0.0)
        l_off = b64 * stride_lb + h64 * stride_lh + q_row0 + offs_r
        lse = tl.load(LSE + l_off, mask=row_ok, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        if PREPROCESS:   # as _attn_bwd_preprocess computes them
            o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + q_row0 * stride_om
                        + offs_r[:, None] * stride_om + offs_d[None, :], mask=q_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            if HAS_DLSE:
                delta -= tl.load(DLse + l_off, mask=row_ok, other=0.0)
            tl.store(Delta + l_off, delta, mask=row_ok)
            if WRITE_LSE2:
                tl.store(Lse2 + l_off, lse2, mask=row_ok)
        else:
            delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)
        k_base = K + b64 * stride_kb + k_start.to(tl.int64) * stride_kn + hk.to(tl.int64) * stride_kh
        v_base = V + b64 * stride_vb + k_start.to(tl.int64) * stride_vn + hk.to(tl.int64) * stride_vh
        dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
        slope2 = 0.0
        if ALIBI:
            slope2 = tl.load(AlibiSlopes + b64 * NUM_HEADS + h64) * 1.4426950408889634

        lo, mid_lo, mid_hi, hi = _kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        if HAS_LEFT:
            dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                                    offs_m, offs_d, lo, mid_lo, seqlen_q, seqlen_k, window_left,
                                    window_right, qk_scale, slope2,
                                    BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT, PRECISION, SOFTCAP,
                                    ALIBI)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                                offs_m, offs_d, mid_lo, mid_hi, seqlen_q, seqlen_k, window_left,
                                window_right, qk_scale, slope2,
                                BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, False, HAS_LEFT, HAS_RIGHT, PRECISION, SOFTCAP, ALIBI)
        dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn,
                                offs_m, offs_d, mid_hi, hi, seqlen_q, seqlen_k, window_left,
                                window_right, qk_scale, slope2,
                                BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, True, HAS_LEFT, HAS_RIGHT, PRECISION, SOFTCAP, ALIBI)
        tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + q_row0 * stride_dqm
                 + offs_r[:, None] * stride_dqm + offs_d[None, :], _cast(dq * sm_scale, DQ.dtype.element_ty, PRECISION),
                 mask=q_mask)


@triton.jit
def _attn_bwd(Q, K, V, DOut, LSE, Delta, DK, DV, DQ, Out, DLse, Lse2, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
              sm_scale, qk_scale, seqlen_q, seqlen_k, window_left, window_right,
              num_n_blocks, num_m_blocks, num_dkdv_programs,
              stride_qb, stride_qm, stride_qh,
              stride_kb, stride_kn, stride_kh,
              stride_vb, stride_vn, stride_vh,
              stride_dob, stride_dom, stride_doh,
              stride_dkb, stride_dkn, stride_dkh,
              stride_dvb, stride_dvn, stride_dvh,
              stride_dqb, stride_dqm, stride_dqh,
              stride_ob, stride_om, stride_oh,
              stride_lb, stride_lh,
              NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
              IS_VARLEN: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              PRECISION: tl.constexpr, FUSED_DQ: tl.constexpr, COUNTED: tl.constexpr, PROGRAMS: tl.constexpr,
              PREPROCESS: tl.constexpr, HAS_DLSE: tl.constexpr, WRITE_LSE2: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The backward's grid. PROGRAMS "dkdv": every program is a dK/dV program (BLOCK_M1 x BLOCK_N1
    tiles; with FUSED_DQ it also adds dQ into the fp32 DQ); "dq": every program is a dQ program
    (BLOCK_M2 x BLOCK_N2), with PREPROCESS also writing Delta and Lse2 for a dK/dV pass that follows it;
    "both": the first num_dkdv_programs are dK/dV programs and the rest dQ programs, one launch for the whole
    backward (as FlexAttention's). Out, DLse, Lse2 and Out's strides are used only under PREPROCESS."""
    tl.static_assert(BLOCK_M1 >= 16 and BLOCK_N1 >= 16 and BLOCK_M2 >= 16 and BLOCK_N2 >= 16)
    tl.static_assert(HEAD_DIM_PAD >= 16)
    pid = tl.program_id(0)
    if PROGRAMS == "both":
        tl.static_assert(not FUSED_DQ)
        is_dkdv = pid < num_dkdv_programs
        dq_pid = pid - num_dkdv_programs
    else:   # a compile-time choice: the other kind's code is not generated
        tl.static_assert(PROGRAMS == "dkdv" or PROGRAMS == "dq")
        tl.static_assert(PROGRAMS == "dq" or not PREPROCESS)
        is_dkdv = PROGRAMS == "dkdv"
        dq_pid = pid
    if is_dkdv:
        _attn_bwd_dkdv_program(pid, Q, K, V, DOut, LSE, Delta, DK, DV, DQ, CuSeqlensQ, CuSeqlensK, AlibiSlopes,
                               sm_scale, qk_scale, seqlen_q, seqlen_k, window_left, window_right, num_n_blocks,
                               stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                               stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                               stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
                               stride_dqb, stride_dqm, stride_dqh, stride_lb, stride_lh,
                               NUM_HEADS // GROUP, GROUP, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M1, BLOCK_N1,
                               IS_VARLEN, HAS_LEFT, HAS_RIGHT, PRECISION, FUSED_DQ, COUNTED, SOFTCAP, ALIBI)
    else:
        _attn_bwd_dq_program(dq_pid, Q, K, V, DOut, LSE, Delta, DQ, Out, DLse, Lse2, CuSeqlensQ, CuSeqlensK,
                             AlibiSlopes,
                             sm_scale, qk_scale, seqlen_q, seqlen_k, window_left, window_right, num_m_blocks,
                             stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                             stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
                             stride_dqb, stride_dqm, stride_dqh, stride_ob, stride_om, stride_oh, stride_lb, stride_lh,
                             NUM_HEADS, GROUP, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M2, BLOCK_N2,
                             IS_VARLEN, HAS_LEFT, HAS_RIGHT, PRECISION, PREPROCESS, HAS_DLSE, WRITE_LSE2, SOFTCAP,
                             ALIBI)
