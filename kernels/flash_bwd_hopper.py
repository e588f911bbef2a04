"""The backward on Hopper (sm_90), warp-specialized, in Gluon (Triton's explicit dialect): the dK/dV pass,
or with FUSED_DQ the whole backward (dQ too).

The Triton dK/dV kernel (kernels/flash_bwd.py) spends about half its issue gaps at CTA barriers: its
software pipeline syncs all eight warps twice per query tile, and no tensor-core work is in flight
while the exponentials and dS are computed (ncu, docs/perf-notes.md). Triton 3.6 gives that loop
neither warp roles nor mbarriers; Gluon gives both. Here one program owns a block of BLOCK_N = 128
keys of one KV head and runs three partitions:

- a producer warp streams the Q and dO tiles (BLOCK_M query rows each), with their rows of LSE and
  delta, through a ring of STAGES shared-memory slots with TMA, one "ready" mbarrier per slot, and
  waits on the slot's "empty" mbarrier before refilling it;
- two consumer warpgroups each own 64 of the keys (their K and V rows stay in shared memory) and their
  dK, dV accumulators in registers. Per query tile a consumer issues S^T = K Q^T and dP^T = V dO^T
  asynchronously, computes P^T while dP^T runs, issues dV += P^T dO, computes dS^T while dV runs,
  issues dK += dS^T Q, and releases the slot once its products have read it.

The consumers never wait for each other: no CTA-wide barrier, so while one computes exponentials the
other's products keep the tensor cores busy. GQA groups are summed in the accumulators as in the
Triton kernel. The dQ pass is then the Triton kernel's (deterministic: seven products per tile).

FUSED_DQ (deterministic=False, at the head dims in FUSED_DQ_HEAD_DIMS) takes dQ here instead: five
products per tile, no dQ pass recomputing P and dS. Each consumer also writes its dS^T rows (bf16) to
a shared tile of the tile's parity and arrives on its "ds_ready" mbarrier; the consumer whose index is
the parity waits for both halves, computes dQ = dS K over the program's 128 keys (64 columns at a
time), stages each part in fp32 in shared memory and adds it into a zeroed fp32 accumulator in global
memory with one TMA reduce-add (``cp.reduce.async.bulk.tensor ... add``), then frees the dS tile
("ds_free") for the tile two steps later. The additions from different key blocks land in whatever
order the programs reach them, so dQ may differ in its last bits from run to run.

Scope: kernels/hopper.py (``supported``; kernels/policy.py decides, rules "bwd.gluon" and "dq.fused_gluon");
anything else runs the Triton kernel. Gluon kernels do not run under TRITON_INTERPRET: they are tested on the
GPU, and compiled for sm_90a without one (tests/test_gluon_hopper.py, scripts/kernel_report.py).
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import policy
from .dispatch import Cached
from .hopper import (CONSUMER_REGS, HAS_TMA_REDUCE, MAXNREG, descriptor, in_scope, row_descriptor, thread_barrier,
                     tile_layout, tma_reduce_add, warpgroup_layout)

BLOCK_N = gl.constexpr(128)        # keys per program, 64 per consumer warpgroup
HALF_N = gl.constexpr(64)
DQ_COLS = gl.constexpr(64)         # dQ columns per product and per TMA reduce (fused dQ)


@gluon.jit
def _producer(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr):
    """One warp: K and V once, then every query tile's Q, dO, LSE and delta through the slot ring."""
    (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
     q_row0, k_row0, hk, m_lo, n_tiles, lse_base, stride_lh, offs_n0, qk_scale,
     DK, DV, stride_dkm, stride_dvm, sm_scale, lse_desc, delta_desc, lse_bufs, delta_bufs, DocStart,
     dq_desc, ds_bufs, dq_stage, ds_ready, ds_free) = args
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    for half in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [k_row0 + half * HALF_N, hk * HEAD_DIM], kv_bar,
                                        k_smem.slice(half * HALF_N, HALF_N))
        tma.async_copy_global_to_shared(v_desc, [k_row0 + half * HALF_N, hk * HEAD_DIM], kv_bar,
                                        v_smem.slice(half * HALF_N, HALF_N))
    it = 0
    for g in range(GROUP):
        col = (hk * GROUP + g) * HEAD_DIM
        lse_row = (lse_base + (hk * GROUP + g).to(gl.int64) * stride_lh).to(gl.int32) + m_lo
        for t in range(n_tiles):
            slot = it % STAGES
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(slot)
            mbarrier.expect(bar, 2 * q_desc.block_type.nbytes + 2 * lse_desc.block_type.nbytes)
            row = q_row0 + m_lo + t * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [row, col], bar, q_bufs.index(slot))
            tma.async_copy_global_to_shared(do_desc, [row, col], bar, do_bufs.index(slot))
            tma.async_copy_global_to_shared(lse_desc, [lse_row + t * BLOCK_M], bar, lse_bufs.index(slot))
            tma.async_copy_global_to_shared(delta_desc, [lse_row + t * BLOCK_M], bar, delta_bufs.index(slot))
            it += 1


@gluon.jit
def _consumer(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, FUSED_DQ: gl.constexpr, DOCS: gl.constexpr, HALF: gl.constexpr):
    """One warpgroup: dK and dV of keys [offs_n0 + HALF * 64, + 64), stored in fp32 registers; with FUSED_DQ
    also dQ of every other query tile (those with tile index % 2 == HALF), reduce-added into dq_desc.
    DOCS: a query sees the keys from its document's start (DocStart, per query) up to itself."""
    (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
     q_row0, k_row0, hk, m_lo, n_tiles, lse_base, stride_lh, offs_n0, qk_scale,
     DK, DV, stride_dkm, stride_dvm, sm_scale, lse_desc, delta_desc, lse_bufs, delta_bufs, DocStart,
     dq_desc, ds_bufs, dq_stage, ds_ready, ds_free) = args
    dtype: gl.constexpr = q_desc.dtype
    # S^T and dP^T: (64 keys, BLOCK_M queries); dK, dV: (64 keys, HEAD_DIM)
    s_layout: gl.constexpr = warpgroup_layout(BLOCK_M)
    acc_layout: gl.constexpr = warpgroup_layout(HEAD_DIM)
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)   # one value per query
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)   # one value per key

    k_s = k_smem.slice(HALF * HALF_N, HALF_N)
    v_s = v_smem.slice(HALF * HALF_N, HALF_N)
    dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
    dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
    s_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, s_layout)
    offs_n = offs_n0 + HALF * HALF_N + gl.arange(0, HALF_N, layout=row_layout)
    offs_c = gl.arange(0, BLOCK_M, layout=col_layout)
    if FUSED_DQ:
        # dQ of a query tile: (BLOCK_M queries, DQ_COLS columns) at a time, from both warpgroups' dS^T
        dq_layout: gl.constexpr = warpgroup_layout(DQ_COLS)
        dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, dq_layout)
        dq_s = dq_stage.index(HALF)
    mbarrier.wait(kv_bar, 0)
    it = 0
    for g in range(GROUP):
        for t in range(n_tiles):
            slot = it % STAGES
            offs_m = m_lo + t * BLOCK_M + offs_c
            q_s = q_bufs.index(slot)
            do_s = do_bufs.index(slot)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            s_t = warpgroup_mma(k_s, q_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_s, do_s.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            s_t = warpgroup_mma_wait(1, deps=(s_t, ))
            # the tile's LSE and delta come with Q and dO (the producer's TMA), read when needed: held in
            # registers across the products they cost 32 per thread, which d128 does not have to spare
            lse2 = lse_bufs.index(slot).load(col_layout)
            p_t = gl.exp2(s_t * qk_scale - lse2[None, :])
            # causal: every tile takes the mask. Masking only the diagonal tiles (a runtime branch) cost
            # spills at d128 and 3% there (H200, docs/perf-notes.md); a separate masked loop serializes
            # the wgmma (two loops, as in the Triton kernel)
            if DOCS:   # causal within the query's document: its start <= key <= query
                q_start = gl.load(DocStart + q_row0 + offs_m)
                p_t = gl.where((offs_m[None, :] >= offs_n[:, None]) & (q_start[None, :] <= offs_n[:, None]), p_t, 0.0)
            elif CAUSAL:
                p_t = gl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
            p_op = gl.convert_layout(p_t.to(dtype), op_layout)
            dv = warpgroup_mma(p_op, do_s, dv, is_async=True)
            dp_t = warpgroup_mma_wait(1, deps=(dp_t, ))
            delta = delta_bufs.index(slot).load(col_layout)
            ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
            ds_op = gl.convert_layout(ds_t, op_layout)
            dk = warpgroup_mma(ds_op, q_s, dk, is_async=True)
            if FUSED_DQ:
                # this warpgroup's 64 rows of the tile's dS^T (128 keys, BLOCK_M queries) into the buffer
                # of this tile's parity, once the dQ products of two tiles ago have read it
                buf = it % 2
                phase = (it // 2) & 1
                mbarrier.wait(ds_free.index(buf), phase ^ 1)
                ds_bufs.index(buf).slice(HALF * HALF_N, HALF_N).store(ds_t)
                fence_async_shared()
                thread_barrier()
                mbarrier.arrive(ds_ready.index(buf), count=1)
            dv, dk, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv, dk, p_op, ds_op))
            mbarrier.arrive(empty.index(slot), count=1)
            if FUSED_DQ:
                if buf == HALF:
                    # dQ (BLOCK_M, HEAD_DIM) = dS K over the program's 128 keys, DQ_COLS columns at a time,
                    # each reduce-added in fp32 by TMA (unscaled: the launcher applies sm_scale)
                    mbarrier.wait(ds_ready.index(buf), phase)
                    ds_all = ds_bufs.index(buf).permute((1, 0))
                    row = q_row0 + m_lo + t * BLOCK_M
                    col = (hk * GROUP + g) * HEAD_DIM
                    for c in gl.static_range(HEAD_DIM // DQ_COLS):
                        dq = warpgroup_mma(ds_all, k_smem.slice(c * DQ_COLS, DQ_COLS, dim=1), dq_zero,
                                           use_acc=False, is_async=True)
                        dq = warpgroup_mma_wait(0, deps=(dq, ))
                        if c == HEAD_DIM // DQ_COLS - 1:
                            mbarrier.arrive(ds_free.index(buf), count=1)
                        tma.store_wait(0)          # the previous reduce has read the staging tile
                        thread_barrier()
                        dq_s.store(dq)
                        fence_async_shared()
                        thread_barrier()
                        tma_reduce_add(dq_desc, [row, col + c * DQ_COLS], dq_s)
            it += 1
    if FUSED_DQ:
        tma.store_wait(0)
    rows = k_row0 + HALF * HALF_N + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, acc_layout))
    _store_tile(DK + (hk * HEAD_DIM).to(gl.int64), stride_dkm, rows, dk * sm_scale, acc_layout, HEAD_DIM)
    _store_tile(DV + (hk * HEAD_DIM).to(gl.int64), stride_dvm, rows, dv, acc_layout, HEAD_DIM)


@gluon.jit
def _consumer_hi(args, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr, FUSED_DQ: gl.constexpr, DOCS: gl.constexpr):
    _consumer(args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, FUSED_DQ, DOCS, 1)


@gluon.jit
def _store_tile(ptr, stride_row, offs_n, acc, layout: gl.constexpr, HEAD_DIM: gl.constexpr):
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    gl.store(ptr + offs_n.to(gl.int64)[:, None] * stride_row + offs_d[None, :], acc.to(ptr.dtype.element_ty))


@gluon.jit
def _attn_bwd_hopper(q_desc, do_desc, k_desc, v_desc, dq_desc, lse_desc, delta_desc, DK, DV, sm_scale, qk_scale,
                     seqlen,
                     stride_lb, stride_lh, stride_dkm, stride_dvm, DocStart, DocEnd,
                     NUM_KV_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, FUSED_DQ: gl.constexpr,
                     DOCS: gl.constexpr = False):
    """grid: (batch * NUM_KV_HEADS * seqlen / BLOCK_N,), key blocks of one head adjacent (heaviest first
    when causal). Q, dO, K, V descriptors are over (batch * seqlen, heads * HEAD_DIM) row views; DK, DV
    are (batch, seqlen, kv heads, HEAD_DIM) with row stride stride_dkm / stride_dvm; lse_desc and delta_desc
    are 1-D descriptors (tiles of BLOCK_M) over the flattened (batch, heads, seqlen) fp32 LSE times log2(e)
    (+inf where it is -inf) and delta, strides stride_lb, stride_lh. FUSED_DQ: dq_desc is an fp32
    (batch * seqlen, heads * HEAD_DIM) accumulator of zeros (tiles BLOCK_M x DQ_COLS) that receives dS K.
    DOCS (causal only): packed documents in the batch layout, DocStart / DocEnd (batch * seqlen,) int32 where
    each token's document starts and ends (exclusive) within its row; the query loop ends at the tile holding
    the end of the block's last key's document."""
    num_n = seqlen // BLOCK_N
    pid = gl.program_id(0)
    pid_bh = pid // num_n
    n0 = (pid % num_n) * BLOCK_N
    b = pid_bh // NUM_KV_HEADS
    hk = pid_bh % NUM_KV_HEADS
    q_row0 = b * seqlen
    k_row0 = q_row0 + n0
    m_lo = n0 if CAUSAL else 0
    if DOCS:
        gl.static_assert(CAUSAL, "documents are masked causally")
        m_hi = gl.load(DocEnd + k_row0 + BLOCK_N - 1)   # the queries past it see none of these keys
        n_tiles = (m_hi - m_lo + BLOCK_M - 1) // BLOCK_M
    else:
        n_tiles = (seqlen - m_lo) // BLOCK_M
    lse_base = b.to(gl.int64) * stride_lb

    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    lse_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], lse_desc.layout)
    delta_bufs = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], delta_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # both consumer warpgroups release a slot
    mbarrier.init(kv_bar, count=1)
    if FUSED_DQ:
        # dS^T of two tiles (by parity), both warpgroups' rows; one fp32 dQ staging tile per warpgroup
        ds_bufs = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype))
        dq_stage = gl.allocate_shared_memory(gl.float32, [2, BLOCK_M, DQ_COLS], dq_desc.layout)
        ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(ds_ready.index(i), count=2)   # both warpgroups wrote their rows
            mbarrier.init(ds_free.index(i), count=1)    # the tile's dQ products (one warpgroup) read them
        fused = (dq_desc, ds_bufs, dq_stage, ds_ready, ds_free)
    else:
        fused = (0, 0, 0, 0, 0)   # unused placeholders
    fence_async_shared()

    args = (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_bufs, do_bufs, ready, empty, kv_bar,
            q_row0, k_row0, hk, m_lo, n_tiles, lse_base, stride_lh, n0, qk_scale,
            DK, DV, stride_dkm, stride_dvm, sm_scale, lse_desc, delta_desc, lse_bufs, delta_bufs, DocStart) + fused
    gl.warp_specialize([(_consumer, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, FUSED_DQ, DOCS, 0)),
                        (_consumer_hi, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL, FUSED_DQ, DOCS)),
                        (_producer, (args, GROUP, HEAD_DIM, BLOCK_M, STAGES, CAUSAL))],
                       [4, 1], [CONSUMER_REGS, 24])


def supported(q, k, v, dout, left: int, right: int, varlen: bool) -> bool:
    """Whether this kernel can run the dK/dV pass of these inputs (kernels/hopper.py's scope)."""
    return in_scope((q, k, v, dout), left, right, varlen)


# Head dims at which the backward takes dQ in this kernel when the caller allows a non-deterministic dQ
# (deterministic=False): policy.FUSED_DQ_HEAD_DIMS, its measurement in policy.RULES "dq.fused_gluon".
FUSED_DQ_HEAD_DIMS = policy.FUSED_DQ_HEAD_DIMS


def _overrides():
    from .launch import active   # launch.py loads this module (at the first launch on a GPU), not the other way
    return active()


def fuses_dq(head_dim: int) -> bool:
    """Whether attn_bwd computes dQ too (dq_acc) at this head dim (policy.fuses_dq, the overrides in force); the
    dQ product needs 64-row tiles, and the TMA reduce-add a Triton that builds it (HAS_TMA_REDUCE)."""
    return policy.fuses_dq(head_dim, HAS_TMA_REDUCE, _overrides())


def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, STAGES): query rows per tile and slots in the ring (policy.GLUON_BWD_LAUNCH, or override_launch's)."""
    return policy.gluon_bwd_launch(head_dim, _overrides())


def override_launch(block_m: int, stages: int):
    """Force this kernel's (BLOCK_M, STAGES) at every head dim for the block: benchmarks and tests."""
    from .launch import overriding
    return overriding(gluon_bwd_launch=(block_m, stages))


def dq_descriptor(dq_acc: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor over the fp32 dQ accumulator (B, N, H, D) as (B * N, H * D), tiles rows x DQ_COLS."""
    b, n, h, d = dq_acc.shape
    return descriptor(dq_acc, [b * n, h * d], [dq_acc.stride(1), 1], [rows, DQ_COLS.value],
                      tile_layout(rows, DQ_COLS.value, gl.float32))


def vector_descriptor(t: torch.Tensor, block: int) -> TensorDescriptor:
    """1-D TMA descriptor over a contiguous fp32 (B, H, N) tensor (the LSE, delta), tiles of `block` rows."""
    assert t.is_contiguous() and t.dtype == torch.float32 and t.numel() < 2**31   # int32 TMA coordinates
    return descriptor(t, [t.numel()], [1], [block], tile_layout(block, 0, gl.float32))


_launch = Cached(_attn_bwd_hopper)


def attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale: float, causal: bool, key, dq_acc: torch.Tensor | None = None,
             launch: tuple[int, int] | None = None, docs: tuple[torch.Tensor, torch.Tensor] | None = None):
    """dK and dV into ``dk``, ``dv`` ((B, N, H_kv, D) row views: contiguous heads, whole-batch rows, as a
    head-sliced view of a contiguous tensor, rule bwd.head_groups); lse2 and delta (B, H, N) fp32, contiguous.
    With ``dq_acc`` (fp32 zeros like q, contiguous) also dQ / scale, accumulated there by TMA reduce-add (the
    order of the additions varies from run to run); without it the dQ pass is the caller's. ``launch``: (BLOCK_M,
    STAGES), policy.choose's (None: launch_config's).

    lse2 is the LSE in base 2 (times log2(e)), +inf for rows that saw no key (their P is then exactly 0, not
    NaN); kernels/flash_bwd.py writes it with delta (WRITE_LSE2: the preprocess kernel before the fused
    backward, the dQ pass before the deterministic one), so the loop, which bounds the d64 kernel by its
    elementwise work, neither selects nor scales (docs/perf-notes.md). ``key``: the launch's
    kernels/dispatch.py key, which kernels/launch.py builds from its caller's tensors. ``docs``: packed
    documents (causal only), (doc_start, doc_end) (B * N,) int32 (kernels/mask.py ``document_bounds``)."""
    batch, seqlen, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    bm, st = launch or launch_config(head_dim)
    grid = (batch * nheads_k * (seqlen // BLOCK_N.value),)
    _launch(
        key, grid, row_descriptor(q, bm), row_descriptor(dout, bm), row_descriptor(k, HALF_N.value),
        row_descriptor(v, HALF_N.value), None if dq_acc is None else dq_descriptor(dq_acc, bm),
        vector_descriptor(lse2, bm), vector_descriptor(delta, bm), dk, dv,
        scale, scale * 1.4426950408889634, seqlen, lse2.stride(0), lse2.stride(1), dk.stride(1), dv.stride(1),
        *(docs or (None, None)),
        NUM_KV_HEADS=nheads_k, GROUP=nheads // nheads_k, HEAD_DIM=head_dim, BLOCK_M=bm, STAGES=st,
        CAUSAL=causal, FUSED_DQ=dq_acc is not None, DOCS=docs is not None, num_warps=4, maxnreg=MAXNREG)
