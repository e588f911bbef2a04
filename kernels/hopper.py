"""What the Gluon kernels for Hopper share (kernels/flash_fwd_hopper.py, kernels/flash_bwd_hopper.py):
which inputs they take, and the TMA descriptors over them.

Both kernels read Q, K, V (and dO) as 2-D row views (batch * seqlen, heads * head_dim), one tile a
TMA copy. They take bf16/fp16 inputs with head dim 64 or 128, the batch layout with seqlen_q ==
seqlen_k a multiple of 128, full or causal attention (no window), on sm_90; causal inputs from
MIN_CAUSAL_SEQLEN on in the backward (the forward has its own length rule). Everything else runs the
Triton kernels. Those rules, with the measurements behind them, are kernels/policy.py's (``gluon_shapes``, RULES);
``shapes_in_scope`` / ``in_scope`` here ask it about tensors.
"""
import functools

import torch
from triton._C.libtriton import ir
from triton.experimental.gluon import constexpr_function
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import policy
from .flash_fwd_tma import rows_view_ok

SEQ_MULTIPLE = policy.SEQ_MULTIPLE   # both kernels tile the sequence in blocks of 128 (two warpgroups of 64 rows)
# Causal sequences shorter than this run the Triton backward (policy.GLUON_BWD_MIN_CAUSAL_SEQLEN, with its
# measurement in policy.RULES "bwd.gluon"). The forward has its own rule.
MIN_CAUSAL_SEQLEN = policy.GLUON_BWD_MIN_CAUSAL_SEQLEN
MAXNREG = 168        # kernel-wide register cap: 3 warpgroups x 128 threads x 168 fit an SM's 64K registers
CONSUMER_REGS = gl.constexpr(240)  # each consumer warpgroup's registers per thread after setmaxnreg (the producer keeps 24)
# The barrier over a partition's threads (the same debug_barrier op in both): Gluon's thread_barrier in Triton 3.6,
# renamed barrier (with a cluster option, off here) in 3.7, so the kernels still compile there (scripts/kernel_report.py).
thread_barrier = getattr(gl, "thread_barrier", None) or gl.barrier


@constexpr_function
def warpgroup_layout(n):
    """The registers of one warpgroup's wgmma accumulator: 64 rows (four warps of 16) by n columns."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


def shapes_in_scope(tensors, left: int, right: int, varlen: bool, min_causal: int | None = None) -> bool:
    """Whether the Gluon kernels take these (q, k, v[, dout]) with this window, on any device; causal inputs
    from min_causal tokens on (the forward has its own length rule, flash_fwd_hopper.MIN_SEQLEN)."""
    q, k = tensors[0], tensors[1]
    problem = policy.Problem(q.dtype, q.shape[-1], q.shape[1], k.shape[1], left, right, varlen)
    return policy.gluon_shapes(problem, min_causal) and all(map(rows_view_ok, tensors))


@functools.lru_cache(maxsize=None)
def _is_hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


def in_scope(tensors, left: int, right: int, varlen: bool, min_causal: int | None = None) -> bool:
    """shapes_in_scope, on a Hopper GPU."""
    q = tensors[0]
    return (q.is_cuda and _is_hopper(q.device.index if q.device.index is not None else torch.cuda.current_device())
            and shapes_in_scope(tensors, left, right, varlen, min_causal))


@functools.lru_cache(maxsize=None)
def tile_layout(rows: int, cols: int, dtype) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a (rows, cols) TMA tile (cols 0: a 1-D tile of rows), built once (it costs
    more host time than the descriptor itself, and every launch builds several descriptors)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols] if cols else [rows], dtype)


def descriptor(base: torch.Tensor, shape: list, strides: list, block_shape: list, layout) -> TensorDescriptor:
    """``TensorDescriptor(base, shape, strides, block_shape, layout)`` without the constructor's checks, which
    cost ~3 us of host time each (the backward's launch takes seven descriptors). What they check holds by
    construction for every descriptor built here: ``in_scope`` admits only 16-byte aligned bases and row
    strides, the other tensors are fresh contiguous allocations, block shapes are the kernels' powers of two
    and the last stride is 1 (tests/test_gluon_hopper.py compares the two constructors)."""
    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.layout, desc.padding = (
        base, shape, strides, block_shape, layout, "zero")
    return desc


def row_descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """TMA descriptor over (B * N, H * D) reading tiles of `rows` rows by one head's D columns."""
    b, n, h, d = t.shape
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return descriptor(t, [b * n, h * d], [t.stride(1), 1], [rows, d], tile_layout(rows, d, dtype))


# The builder call tma_reduce_add makes is not part of Gluon's public API: where a Triton lacks it, the
# backward keeps its deterministic split (flash_bwd_hopper.fuses_dq).
try:
    from triton._C.libtriton import gluon_ir
    HAS_TMA_REDUCE = hasattr(gluon_ir.GluonOpBuilder, "create_async_tma_reduce")
except ImportError:
    HAS_TMA_REDUCE = False


@builtin
def tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """Add the shared-memory tile ``src`` into global memory at ``coord`` of ``tensor_desc`` by TMA
    (``cp.reduce.async.bulk.tensor ... add``; wait with ``tma.store_wait``). Triton 3.6 builds this op for
    Gluon but does not export it: the builder call mirrors ``tma.async_copy_shared_to_global``."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)
