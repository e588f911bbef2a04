"""Argument checks for the public attention functions: fail fast with the argument's name.

Everything here runs before any allocation or launch, so bad input never reaches Triton as a compile
error, an illegal memory access or a silently wrong answer.
"""
import math
import weakref

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Offsets that passed check_cu_seqlens: (weakref q, weakref k, versions and sizes, the launch's max_seqlen
# pair), newest last. A model
# passes one tensor to every layer; a context-parallel ring a few per batch (training/context_parallel.py).
_checked: list = []
CHECKED_KEPT = 16
# check_cu_seqlens rounds the longest document up to this for the launch grid: the kernels' largest BLOCK_M,
# so at most one query block per document is empty, and few distinct values reach the launch caches
GRID_ROUND = 128
MAX_HEAD_DIM = 256


def _check_tensor(name, t, ndim, layout):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_qkv(q, k, v, varlen: bool):
    """Shapes, dtypes and devices of q/k/v; returns (nheads, nheads_k, head_dim)."""
    ndim = 3 if varlen else 4
    qs = "(total_q, nheads, headdim)" if varlen else "(batch, seqlen_q, nheads, headdim)"
    ks = "(total_k, nheads_k, headdim)" if varlen else "(batch, seqlen_k, nheads_k, headdim)"
    _check_tensor("q", q, ndim, qs)
    _check_tensor("k", k, ndim, ks)
    _check_tensor("v", v, ndim, ks)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    nheads, head_dim = q.shape[-2], q.shape[-1]
    nheads_k = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k must have q's head dim {head_dim}, got {k.shape[-1]}")
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise ValueError(f"nheads of q ({nheads}) must be a multiple of nheads of k/v ({nheads_k})")
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be a multiple of 8 between 8 and {MAX_HEAD_DIM}, got {head_dim}")
    return nheads, nheads_k, head_dim


def check_options(head_dim, softmax_scale, window_size):
    """Checks window_size; returns the softmax scale to use (head_dim ** -0.5 by default)."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2
            and all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite float or None, got {softmax_scale!r}")
    return float(softmax_scale)


def check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """cu_seqlens: int32, 1-D, same length, start at 0, non-decreasing, within the totals.

    Reads the (tiny) offsets back to the host once, so max_seqlen can be checked too: a max_seqlen
    smaller than a document would silently drop rows from the launch grid.

    Returns (max_seqlen_q, max_seqlen_k, uniform) for the launch: the longest document rounded up to
    GRID_ROUND (and at most the caller's bound). Callers often pass a loose bound (a model passes its row
    length T), and the grid is documents x ceil(max_seqlen / BLOCK_M) programs: with many short documents
    nearly all of them would start only to find no rows. uniform: (L_q, L_k) when every document has the same
    lengths L_q >= 1 and L_k >= 1 and they cover all rows of q and k (a batch in varlen form: a ring's dense
    block, rows without documents), else None. Under torch.compile (no read-back) the caller's values and None.
    """
    for name, cu, total, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be 1-D of length batch + 1 >= 2, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
        mname = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
            raise ValueError(f"{mname} must be a non-negative int, got {max_len!r}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_seqlens_q.numel()} and {cu_seqlens_k.numel()}")
    if torch.compiler.is_compiling():
        return max_seqlen_q, max_seqlen_k, None
    # A model passes the same cu_seqlens to every layer: read the offsets back (a device sync) once
    # per tensor and version, not once per layer.
    key = (cu_seqlens_q._version, cu_seqlens_k._version, q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k)
    for ref_q, ref_k, was, tight in _checked:
        if ref_q() is cu_seqlens_q and ref_k() is cu_seqlens_k and was == key:
            return tight
    stats = read_back(cu_seqlens_q, cu_seqlens_k)
    for (name, total, max_len), (first, last, min_len, longest) in zip(
            (("cu_seqlens_q", q.shape[0], max_seqlen_q), ("cu_seqlens_k", k.shape[0], max_seqlen_k)), stats):
        if first != 0:
            raise ValueError(f"{name} must start at 0, got {first}")
        if min_len < 0:
            raise ValueError(f"{name} must be non-decreasing (document lengths >= 0)")
        if last > total:
            raise ValueError(f"{name}[-1] = {last} exceeds the {total} rows of "
                             f"{'q' if name.endswith('q') else 'k'}")
        mname = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
        if longest > max_len:
            raise ValueError(f"{mname} = {max_len} is smaller than the longest document ({longest})")
    tight = tuple(min(max_len, -(-max(longest, 1) // GRID_ROUND) * GRID_ROUND)
                  for max_len, (_, _, _, longest) in zip((max_seqlen_q, max_seqlen_k), stats))
    uniform = tuple(longest for _, _, _, longest in stats)
    if not all(0 < shortest == longest and last == total for (_, last, shortest, longest), total
               in zip(stats, (q.shape[0], k.shape[0]))):
        uniform = None
    tight = (*tight, uniform)
    _checked.append((weakref.ref(cu_seqlens_q), weakref.ref(cu_seqlens_k), key, tight))
    del _checked[:-CHECKED_KEPT]
    return tight


def read_back(cu_seqlens_q, cu_seqlens_k) -> list:
    """(first, last, shortest, longest) of each offsets tensor, in one read-back to the host: the one
    host-device synchronization of a varlen call, which a test counts."""
    return torch.stack([torch.stack([cu[0], cu[-1], cu.diff().min(), cu.diff().max()])
                        for cu in (cu_seqlens_q, cu_seqlens_k)]).tolist()


def check_dropout(dropout_p):
    """dropout_p must be 0: attention dropout is not implemented (the kernels stay dropout-free)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0, got {dropout_p!r}: attention dropout is not supported. "
                         "(flash-attn's argument order is q, k, v, dropout_p, softmax_scale, ...: pass "
                         "softmax_scale by name)")


def check_softcap(softcap) -> float:
    """softcap: a finite float >= 0, 0 meaning off (flash-attn silently turns a negative one off; we refuse it)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) \
            or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0.0 = off), got {softcap!r}")
    return float(softcap)


def check_alibi(alibi_slopes, q, batch: int, nheads: int):
    """alibi_slopes: None, or fp32 (nheads,) or (batch, nheads) on q's device (batch = documents in varlen)."""
    if alibi_slopes is None:
        return
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != q.device:
        raise ValueError(f"alibi_slopes must be on q's device {q.device}, got {alibi_slopes.device}")
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got {tuple(alibi_slopes.shape)}")


def check_block_table(block_table):
    if block_table is not None:
        raise ValueError("block_table (a paged KV cache) is not supported: pass block_table=None")


def unpack(name: str, t, n: int, varlen: bool):
    """qkv (n = 3) or kv (n = 2) packed along dim -3 -> its n views; checked first, so a mistake names the
    packed argument rather than q / k / v."""
    parts = ("q, k, v" if n == 3 else "k, v")
    layout = (f"(total, {n}, nheads, headdim)" if varlen else f"(batch, seqlen, {n}, nheads, headdim)")
    _check_tensor(name, t, 4 if varlen else 5, layout)
    if t.shape[-3] != n:
        raise ValueError(f"{name} must have shape {layout} ({parts} stacked along dim {t.dim() - 3}), "
                         f"got {tuple(t.shape)}")
    return t.unbind(-3)
