"""dK/dV pass of the backward on Hopper (sm_90), warp-specialized, in Gluon (Triton's explicit dialect).

The Triton dK/dV kernel (kernels/flash_bwd.py) spends about half its issue gaps at CTA barriers: its
software pipeline syncs all eight warps twice per query tile, and no tensor-core work is in flight
while the exponentials and dS are computed (ncu, docs/perf-notes.md). Triton 3.6 gives that loop
neither warp roles nor mbarriers; Gluon gives both. Here one program owns a block of BLOCK_N = 128
keys of one KV head and runs three partitions:

- a producer warp streams the Q and dO tiles (BLOCK_M query rows each) through a ring of STAGES
  shared-memory slots with TMA, one "ready" mbarrier per slot, and waits on the slot's "empty"
  mbarrier before refilling it;
- two consumer warpgroups each own 64 of the keys (their K and V rows stay in shared memory) and their
  dK, dV accumulators in registers. Per query tile a consumer issues S^T = K Q^T and dP^T = V dO^T
  asynchronously, computes P^T while dP^T runs, issues dV += P^T dO, computes dS^T while dV runs,
  issues dK += dS^T Q, and releases the slot once its products have read it.

The consumers never wait for each other: no CTA-wide barrier, so while one computes exponentials the
other's products keep the tensor cores busy. GQA groups are summed in the accumulators as in the
Triton kernel. The dQ pass stays the Triton kernel's.

Scope: kernels/hopper.py (``supported``); anything else runs the Triton kernel. Gluon kernels do not
run under TRITON_INTERPRET: they are tested on the GPU, and compiled for sm_90a without one
(tests/test_gluon_hopper.py, scripts/kernel_report.py).
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from .hopper import CONSUMER_REGS, MAXNREG, LaunchChoice, in_scope, row_descriptor, warpgroup_layout

BLOCK_N = gl.constexpr(128)        # keys per program, 64 per consumer warpgroup
HALF_N = gl.constexpr(64)


@gluon.jit
def _producer(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr):
    """One warp: K and V once, then every query tile's Q and dO through the slot ring."""
    (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
     q_row0, k_row0, hk, m_lo, n_tiles, Lse2, Delta, lse_base, stride_lh, offs_n0, qk_scale,
     DK, DV, stride_dkm, stride_dvm, sm_scale) = args
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    for half in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [k_row0 + half * HALF_N, hk * HEAD_DIM], kv_bar, k_smem.index(half))
        tma.async_copy_global_to_shared(v_desc, [k_row0 + half * HALF_N, hk * HEAD_DIM], kv_bar, v_smem.index(half))
    it = 0
    for g in range(GROUP):
        col = (hk * GROUP + g) * HEAD_DIM
        for t in range(n_tiles):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes)
            row = q_row0 + m_lo + t * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_bufs.index(slot))
            tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_bufs.index(slot))
            it += 1


@gluon.jit
def _consumer(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, HALF: gl.constexpr):
    """One warpgroup: dK and dV of keys [offs_n0 + HALF * 64, + 64), stored in fp32 registers."""
    (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
     q_row0, k_row0, hk, m_lo, n_tiles, Lse2, Delta, lse_base, stride_lh, offs_n0, qk_scale,
     DK, DV, stride_dkm, stride_dvm, sm_scale) = args
    dtype: gl.constexpr = q_desc.dtype
    # S^T and dP^T: (64 keys, BLOCK_M queries); dK, dV: (64 keys, HEAD_DIM)
    s_layout: gl.constexpr = warpgroup_layout(BLOCK_M)
    acc_layout: gl.constexpr = warpgroup_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)   # one value per query
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)   # one value per key

    k_s = k_smem.index(HALF)
    v_s = v_smem.index(HALF)
    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
    s_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout)
    offs_n = offs_n0 + HALF * HALF_N + gl.arange(0, HALF_N, layout=row_layout)
    offs_c = gl.arange(0, BLOCK_M, layout=col_layout)
    mbarrier.wait(kv_bar, 0)
    it = 0
    for g in range(GROUP):
        lse_ptr = Lse2 + lse_base + (hk * GROUP + g).to(gl.int64) * stride_lh
        delta_ptr = Delta + lse_base + (hk * GROUP + g).to(gl.int64) * stride_lh
        for t in range(n_tiles):
            slot = it % STAGES
            offs_m = m_lo + t * BLOCK_M + offs_c
            lse2 = gl.load(lse_ptr + offs_m)
            delta = gl.load(delta_ptr + offs_m)
            q_s = q_bufs.index(slot)
            do_s = do_bufs.index(slot)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            s_t = warpgroup_mma(k_s, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_s, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s_t = warpgroup_mma_wait(1, deps=(s_t, ))
            p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
            # causal: every tile takes the mask. Masking only the diagonal tiles (a runtime branch) cost
            # spills at d128 and 3% there (H200, docs/perf-notes.md); a separate masked loop serializes
            # the wgmma (two loops, as in the Triton kernel)
            if CAUSAL:
                p_t = gl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            p_op = gl.convert_layout(p_t.to(dtype), op_layout)
            dv = warpgroup_mma(p_op, do_s, dv, is_async=True)
            dp_t = warpgroup_mma_wait(1, deps=(dp_t, ))
            ds_t = p_t * (dp_t - delta[None, :])
            ds_op = gl.convert_layout(ds_t.to(dtype), op_layout)
            dk = warpgroup_mma(ds_op, q_s, dk, is_async=True)
            dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))
            mbarrier.arrive(empty.index(slot), count=1)
            it += 1
    rows = k_row0 + HALF * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, acc_layout))
    _store_tile(DK + (hk * HEAD_DIM).to(gl.int64), stride_dkm, rows, dk * sm_scale, acc_layout, HEAD_DIM)
    _store_tile(DV + (hk * HEAD_DIM).to(gl.int64), stride_dvm, rows, dv, acc_layout, HEAD_DIM)


@gluon.jit
def _consumer_hi(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr):
    _consumer(args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, 1)


@gluon.jit
def _store_tile(ptr, stride_row, offs_n, acc, layout: gl.constexpr, HEAD_DIM: gl.constexpr):
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    gl.store(ptr + offs_n.to(gl.int64)[:, None] * stride_row + offs_d[None, :], acc.to(ptr.dtype.element_ty))


@gluon.jit
def _attn_bwd_dkdv_hopper(q_desc, do_desc, k_desc, v_desc, Lse2, Delta, DK, DV, sm_scale, qk_scale, seqlen,
                          stride_lb, stride_lh, stride_dkm, stride_dvm,
                          NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                          BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """grid: (batch * NUM_KV_HEADS * seqlen / BLOCK_N,), key blocks of one head adjacent (heaviest first
    when causal). Q, dO, K, V descriptors are over (batch * seqlen, heads * HEAD_DIM) row views; DK, DV
    are (batch, seqlen, kv heads, HEAD_DIM) with row stride stride_dkm / stride_dvm; Lse2 (the LSE times
    log2(e), +inf where it is -inf) and Delta are (batch, heads, seqlen) fp32."""
    num_n = seqlen // BLOCK_N
    pid = gl.program_id(0)
    pid_bh = pid // num_n
    n0 = (pid % num_n) * BLOCK_N
    b = pid_bh // NUM_KV_HEADS
    hk = pid_bh % NUM_KV_HEADS
    q_row0 = b * seqlen
    k_row0 = q_row0 + n0
    m_lo = n0 if CAUSAL else 0
    n_tiles = (seqlen - m_lo) // BLOCK_M
    lse_base = b.to(gl.int64) * stride_lb

    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF_N, HEAD_DIM], v_desc.layout)
    q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # both consumer warpgroups release a slot
    mbarrier.init(kv_bar, count=1)
    fence_async_shared()

    args = (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
            q_row0, k_row0, hk, m_lo, n_tiles, Lse2, Delta, lse_base, stride_lh, n0, qk_scale,
            DK, DV, stride_dkm, stride_dvm, sm_scale)
    gl.warp_specialize([(_consumer, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, 0)),
                        (_consumer_hi, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL)),
                        (_producer, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL))],
                       [4, 1], [CONSUMER_REGS, 24])


def supported(q, k, v, dout, left: int, right: int, varlen: bool) -> bool:
    """Whether this kernel can run the dK/dV pass of these inputs (kernels/hopper.py's scope)."""
    return in_scope((q, k, v, dout), left, right, varlen)


# (BLOCK_M, STAGES): query rows per tile and slots in the ring, per head dim (H200: 32-row tiles 5-9% slower,
# 3 slots level with 2 at d128; docs/perf-notes.md)
launch_config = LaunchChoice({64: (64, 3), 128: (64, 2)})
override_launch = launch_config.override


def attn_bwd_dkdv(q, k, v, dout, lse, delta, dk, dv, scale: float, causal: bool):
    """dK and dV into ``dk``, ``dv`` ((B, N, H_kv, D), contiguous); lse and delta (B, H, N) fp32."""
    # the kernel reads the LSE in base 2, with +inf for rows that saw no key (their P is then exactly 0,
    # not NaN): one pass over (B, H, N) here instead of a select and a multiply per element in the loop,
    # where the d64 kernel is bound by its elementwise work (docs/perf-notes.md)
    lse = torch.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    batch, seqlen, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    bm, st = launch_config(head_dim)
    grid = (batch * nheads_k * (seqlen // BLOCK_N.value),)
    _attn_bwd_dkdv_hopper[grid](
        row_descriptor(q, bm), row_descriptor(dout, bm), row_descriptor(k, HALF_N.value),
        row_descriptor(v, HALF_N.value), lse, delta, dk, dv,
        scale, scale * 1.4426950408889634, seqlen, lse.stride(0), lse.stride(1), dk.stride(1), dv.stride(1),
        NUM_KV_HEADS=nheads_k, GROUP=nheads // nheads_k, HEAD_DIM=head_dim, BLOCK_M=bm, STAGES=st,
        CAUSAL=causal, num_warps=4, maxnreg=MAXNREG)
