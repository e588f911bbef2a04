"""FlashAttention forward on Hopper (sm_90), warp-specialized, in Gluon (Triton's explicit dialect).

The same online softmax as kernels/flash_fwd.py (base-2 scores with the scale folded in, natural-log
LSE out), with the work split into warp roles instead of one software pipeline that syncs all warps
at every key tile. One program owns BLOCK_M = 128 query rows of one head:

- a producer warp loads the two 64-row halves of Q once, then streams K and V tiles (BLOCK_N rows)
  through a ring of STAGES shared-memory slots with TMA, K and V on separate "ready" mbarriers so the
  scores can start before V has landed; it refills a slot once both consumers released it;
- two consumer warpgroups each own 64 query rows, their running max, sum and output in registers.
  The loop is pipelined by one tile: iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}
  together, then runs tile j's softmax (P from registers, one FFMA per score: the max is taken on the
  raw scores).
- the two consumers take turns issuing their products ("turn" mbarriers, FA3's ping-pong), so one
  warpgroup's exponentials run while the other's products occupy the tensor cores. Without the turns
  both tend to compute exponentials at the same time and leave the tensor cores idle.

Causal masking is applied only on the tiles that cross the diagonal. Scope: kernels/hopper.py from MIN_SEQLEN
on (``supported``; kernels/policy.py decides, rule "fwd.gluon"); everything else runs the Triton forward. Tested
on the GPU and compiled for sm_90a without one (tests/test_gluon_hopper.py, scripts/kernel_report.py).
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

from . import policy
from .dispatch import Cached
from .hopper import CONSUMER_REGS, MAXNREG, in_scope, row_descriptor, warpgroup_layout

BLOCK_M = gl.constexpr(128)   # query rows per program, 64 per consumer warpgroup
HALF_M = gl.constexpr(64)


@gluon.jit
def _producer(args, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """One warp: both halves of Q once, then K and V tile by tile through the slot ring."""
    (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, turn,
     q_row0, k_row0, h, hk, m0, n_tiles, qk_scale, Out, LSE, stride_om, lse_row0, j_lo, DocStart) = args
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    for half in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [q_row0 + half * HALF_M, h * HEAD_DIM], q_bar, q_smem.index(half))
    for j in range(n_tiles):   # the program's j-th key tile is key tile j_lo + j (DOCS: from the first query's document)
        slot = j % STAGES
        mbarrier.wait(empty.index(slot), ((j // STAGES) & 1) ^ 1)
        row = k_row0 + (j_lo + j) * BLOCK_N
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row, hk * HEAD_DIM], k_ready.index(slot), k_bufs.index(slot))
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row, hk * HEAD_DIM], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _softmax_step(s, j, m_i, l_i, qk_scale, offs_m, offs_c, first_row, q_start, last_start, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, DOCS: gl.constexpr):
    """Key tile j's raw scores s -> (probabilities p, new running max, new running sum, rescale factor).
    The max is taken on the raw scores (qk_scale > 0), so each score costs one FFMA (s * scale - max), not
    a multiply and a subtract. Causal: only tiles reaching past this warpgroup's first row are masked;
    every row sees key 0 in the first tile, so its running max is finite from then on.
    DOCS: keys before a row's document start (q_start, per row) are masked too, on the tiles that begin before
    the last row's start; a row may then see no key in its first tiles, so the exponentials subtract 0 where
    the running max is still -inf (p and the rescale factor 0, not NaN)."""
    if CAUSAL:
        if (j + 1) * BLOCK_N > first_row + 1:
            s = gl.where(offs_m[:, None] >= (j * BLOCK_N + offs_c)[None, :], s, float("-inf"))
    if DOCS:
        if j * BLOCK_N < last_start:
            s = gl.where((j * BLOCK_N + offs_c)[None, :] >= q_start[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if DOCS:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, m_new, l_i * alpha + gl.sum(p, 1), alpha


@gluon.jit
def _consumer(args, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              DOCS: gl.constexpr, HALF: gl.constexpr):
    """One warpgroup: output rows [m0 + HALF * 64, + 64) and their LSE.

    Software-pipelined by one tile: iteration j issues S_j = Q K_j^T and then O += P_{j-1} V_{j-1}, waits
    for S_j only, starts tile j's softmax, then waits for the PV product and rescales O; tile j-2's slot is
    released at the top of iteration j. Nothing is in flight across the loop's back-edge (ptxas serializes
    every wgmma of a kernel where something is). ptxas moves the PV wait up into the row max, before
    any exponential (sm_90a SASS), so within one warpgroup the overlap is small; the turns supply the
    rest: the two warpgroups take turns issuing ("turn" mbarriers, FA3's ping-pong), so one's products
    run while the other computes exponentials instead of both doing the same thing at the same time."""
    (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, turn,
     q_row0, k_row0, h, hk, m0, n_tiles, qk_scale, Out, LSE, stride_om, lse_row0, j_lo, DocStart) = args
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = warpgroup_layout(BLOCK_N)
    o_layout: gl.constexpr = warpgroup_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    # issue turns: warpgroup 0's k-th issue waits phase (k & 1) ^ 1 of turn[0] (the first passes at once),
    # warpgroup 1's waits phase k & 1 of turn[1]; each arrives on the other's barrier after issuing
    mine = turn.index(HALF)
    other = turn.index(1 - HALF)
    flip: gl.constexpr = 1 - HALF

    first_row = m0 + HALF * HALF_M
    offs_m = first_row + gl.arange(0, HALF_M, layout=row_s)
    offs_c = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
    s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
    q_s = q_smem.index(HALF)
    if DOCS:   # each row's document start (row-relative); the last row's is the largest
        q_start = gl.load(DocStart + q_row0 + HALF * HALF_M + gl.arange(0, HALF_M, layout=row_s))
        last_start = gl.max(q_start, 0)
    else:
        q_start = offs_m
        last_start = 0
    mbarrier.wait(q_bar, 0)

    # tile 0: scores only
    mbarrier.wait(mine, flip)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_s, k_bufs.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.arrive(other, count=1)
    s = warpgroup_mma_wait(0, deps=(s, ))
    p, m_i, l_i, alpha = _softmax_step(s, j_lo, gl.full([HALF_M], float("-inf"), gl.float32, row_s),
                                       gl.zeros([HALF_M], gl.float32, row_s), qk_scale, offs_m, offs_c, first_row,
                                       q_start, last_start, BLOCK_N, CAUSAL, DOCS)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    for j in range(1, n_tiles):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        mbarrier.wait(mine, (j & 1) ^ flip)
        # tile j-2's slot, whose PV product finished in the previous iteration. Released here rather than
        # right after that wait: there ptxas scheduled the arrive, with its warpgroup barrier, in the
        # middle of the softmax
        mbarrier.arrive(empty.index((j + STAGES - 2) % STAGES), count=1, pred=j >= 2)
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
        mbarrier.arrive(other, count=1)
        s = warpgroup_mma_wait(1, deps=(s, ))
        p, m_i, l_i, alpha = _softmax_step(s, j_lo + j, m_i, l_i, qk_scale, offs_m, offs_c, first_row, q_start,
                                           last_start, BLOCK_N, CAUSAL, DOCS)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
    # the last tile's PV
    last = (n_tiles - 1) % STAGES
    mbarrier.wait(mine, (n_tiles & 1) ^ flip)
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
    mbarrier.arrive(other, count=1)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    mbarrier.arrive(empty.index(last), count=1)

    acc = acc / gl.convert_layout(l_i, row_o)[:, None]
    rows = q_row0 + HALF * HALF_M + gl.arange(0, HALF_M, layout=row_o)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(Out + (h * HEAD_DIM).to(gl.int64) + rows.to(gl.int64)[:, None] * stride_om + offs_d[None, :],
             acc.to(dtype))
    gl.store(LSE + lse_row0 + HALF * HALF_M + gl.arange(0, HALF_M, layout=row_s),
             (m_i + gl.log2(l_i)) * 0.6931471805599453)


@gluon.jit
def _consumer_hi(args, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 DOCS: gl.constexpr):
    _consumer(args, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, DOCS, 1)


@gluon.jit
def _attn_fwd_hopper(q_desc, k_desc, v_desc, Out, LSE, qk_scale, seqlen, stride_om, stride_lb, stride_lh, DocStart,
                     NUM_HEADS: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, DOCS: gl.constexpr = False):
    """grid: (batch * NUM_HEADS * seqlen / BLOCK_M,), a head's query blocks adjacent, longest rows first.
    Descriptors over (batch * seqlen, heads * HEAD_DIM) row views; Out (batch, seqlen, heads, HEAD_DIM)
    with row stride stride_om; LSE (batch, heads, seqlen) fp32.
    DOCS (causal only): packed documents in the batch layout, DocStart (batch * seqlen,) int32 the row-relative
    position where each token's document starts; a query sees the keys of its own document up to itself, and
    the key loop starts at the tile of the program's first query's document."""
    num_m = seqlen // BLOCK_M
    pid = gl.program_id(0)
    pid_bh = pid // num_m
    m0 = (num_m - 1 - pid % num_m) * BLOCK_M
    b = pid_bh // NUM_HEADS
    h = pid_bh % NUM_HEADS
    hk = h // GROUP
    q_row0 = b * seqlen + m0
    k_row0 = b * seqlen
    n_tiles = (m0 + BLOCK_M) // BLOCK_N if CAUSAL else seqlen // BLOCK_N
    lse_row0 = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + m0
    if DOCS:
        gl.static_assert(CAUSAL, "documents are masked causally")
        j_lo = gl.load(DocStart + q_row0) // BLOCK_N
    else:
        j_lo = 0
    n_tiles = n_tiles - j_lo

    gl.static_assert(STAGES >= 3, "a slot is released two tiles after its scores: the ring needs 3 slots")
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, HEAD_DIM], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)   # both consumer warpgroups release a slot
    fence_async_shared()

    args = (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, empty, turn,
            q_row0, k_row0, h, hk, m0, n_tiles, qk_scale, Out, LSE, stride_om, lse_row0, j_lo, DocStart)
    gl.warp_specialize([(_consumer, (args, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, DOCS, 0)),
                        (_consumer_hi, (args, HEAD_DIM, BLOCK_N, STAGES, CAUSAL, DOCS)),
                        (_producer, (args, HEAD_DIM, BLOCK_N, STAGES, CAUSAL))],
                       [4, 1], [CONSUMER_REGS, 24])


# The shortest sequence (causal or not) whose forward this kernel runs, per head dim: policy.GLUON_FWD_MIN_SEQLEN
# (its measurement: policy.RULES "fwd.gluon"); shorter ones run the Triton forward.
MIN_SEQLEN = policy.GLUON_FWD_MIN_SEQLEN


def _overrides():
    from .launch import active   # launch.py loads this module (at the first launch on a GPU), not the other way
    return active()


def supported(q, k, v, left: int, right: int, varlen: bool) -> bool:
    """Whether this kernel takes the forward of these inputs: kernels/hopper.py's scope (its causal length rule
    is the backward's), from MIN_SEQLEN tokens on (the overrides in force)."""
    return (policy.gluon_fwd_length_ok(q.shape[-1], q.shape[1], _overrides())
            and in_scope((q, k, v), left, right, varlen, min_causal=0))


def launch_config(head_dim: int) -> tuple[int, int]:
    """(BLOCK_N, STAGES): key rows per tile and slots in the ring (policy.GLUON_FWD_LAUNCH, or override_launch's)."""
    return policy.gluon_fwd_launch(head_dim, _overrides())


def override_launch(block_n: int, stages: int):
    """Force this kernel's (BLOCK_N, STAGES) at every head dim for the block: benchmarks and tests."""
    from .launch import overriding
    return overriding(gluon_fwd_launch=(block_n, stages))


_launch = Cached(_attn_fwd_hopper)


def attn_fwd(q, k, v, out, lse, scale: float, causal: bool, key, launch: tuple[int, int] | None = None,
             doc_start: torch.Tensor | None = None):
    """Output into ``out`` ((B, N, H, D), contiguous) and the natural-log LSE into ``lse`` ((B, H, N) fp32).
    ``key``: the launch's kernels/dispatch.py key, which kernels/launch.py builds from its caller's tensors;
    ``launch``: (BLOCK_N, STAGES), policy.choose's (None: launch_config's). ``doc_start``: packed documents
    (causal only): (B * N,) int32, where each token's document starts within its row (kernels/mask.py
    ``document_bounds``)."""
    batch, seqlen, nheads, head_dim = q.shape
    block_n, stages = launch or launch_config(head_dim)
    grid = (batch * nheads * (seqlen // BLOCK_M.value),)
    _launch(
        key, grid, row_descriptor(q, HALF_M.value), row_descriptor(k, block_n), row_descriptor(v, block_n), out, lse,
        scale * 1.4426950408889634, seqlen, out.stride(1), lse.stride(0), lse.stride(1), doc_start,
        NUM_HEADS=nheads, GROUP=nheads // k.shape[2], HEAD_DIM=head_dim, BLOCK_N=block_n, STAGES=stages,
        CAUSAL=causal, DOCS=doc_start is not None, num_warps=4, maxnreg=MAXNREG)
