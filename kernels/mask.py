"""Which (query, key) pairs may attend, and which key/query blocks a tile must visit.

One rule, used by the Triton kernels and the PyTorch reference alike. Positions are 0-based within a
sequence; ``off = seqlen_k - seqlen_q`` aligns the causal diagonal bottom-right (flash-attn >= 2.1),
so query ``i`` sits at key position ``i + off``. Query ``i`` sees key ``j`` iff ``j < seqlen_k`` and

    j <= i + off + right   (when right >= 0; causal is right = 0)
    j >= i + off - left    (when left  >= 0)

``window_size = (left, right)`` with -1 meaning unbounded on that side, as in flash-attn.
"""
import torch
import triton
import triton.language as tl


def normalize_window(causal: bool, window_size) -> tuple[int, int]:
    """(left, right) after folding ``causal`` in: causal caps the right side at 0."""
    left, right = int(window_size[0]), int(window_size[1])
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def visible(rows: torch.Tensor, cols: torch.Tensor, seqlen_q: int, seqlen_k: int, left: int, right: int):
    """Boolean (len(rows), len(cols)) mask of the pairs that may attend."""
    diag = rows[:, None] + (seqlen_k - seqlen_q)
    cols = cols[None, :]
    vis = cols < seqlen_k
    if right >= 0:
        vis = vis & (cols <= diag + right)
    if left >= 0:
        vis = vis & (cols >= diag - left)
    return vis


@triton.jit
def _sequence_bounds(b, CuSeqlensQ, CuSeqlensK, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence b: its document's rows from cu_seqlens in
    varlen mode, the whole padded sequence (batch stride does the rest) otherwise."""
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + b)
        k_start = tl.load(CuSeqlensK + b)
        return q_start, tl.load(CuSeqlensQ + b + 1) - q_start, k_start, tl.load(CuSeqlensK + b + 1) - k_start
    zero = b * 0   # a tensor like b, so callers can .to(tl.int64) it in either mode
    return zero, seqlen_q, zero, seqlen_k


@triton.jit
def _kv_block_range(start_m, seqlen_q, seqlen_k, window_left, window_right,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key blocks a query block [start_m, start_m + BLOCK_M) visits, as four BLOCK_N-aligned bounds.

    [lo, mid_lo) and [mid_hi, hi) hold blocks that need the mask; [mid_lo, mid_hi) blocks are fully
    visible to every row of the query block and fully inside seqlen_k, so they skip all masking.
    """
    off = seqlen_k - seqlen_q
    hi = seqlen_k
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M + off + window_right)
    hi = tl.maximum(hi, 0)
    lo = 0
    mid_lo = 0
    if HAS_LEFT:
        lo = tl.maximum(start_m + off - window_left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        # first block whose every key is within the window of the block's last row
        mid_lo = tl.maximum(start_m + BLOCK_M - 1 + off - window_left, 0)
        mid_lo = tl.cdiv(mid_lo, BLOCK_N) * BLOCK_N
    lo = tl.minimum(lo, hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    # last block fully visible to the block's first row and fully inside seqlen_k
    full = seqlen_k
    if HAS_RIGHT:
        full = tl.minimum(full, start_m + off + window_right + 1)
    mid_hi = (tl.maximum(full, 0) // BLOCK_N) * BLOCK_N
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _q_block_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query blocks that see any key of [start_n, start_n + BLOCK_N): the transpose of _kv_block_range.

    Same four BLOCK_M-aligned bounds; [mid_lo, mid_hi) rows see every key of the block and lie
    inside seqlen_q. A key block that runs past seqlen_k has no unmasked query blocks.
    """
    off = seqlen_k - seqlen_q
    lo = 0
    mid_lo = 0
    if HAS_RIGHT:
        lo = tl.maximum(start_n - off - window_right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
        mid_lo = tl.maximum(start_n + BLOCK_N - 1 - off - window_right, 0)
        mid_lo = tl.cdiv(mid_lo, BLOCK_M) * BLOCK_M
    hi = seqlen_q
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N - off + window_left)
    hi = tl.maximum(hi, 0)
    lo = tl.minimum(lo, hi)
    mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
    full = seqlen_q
    if HAS_LEFT:
        full = tl.minimum(full, start_n - off + window_left + 1)
    mid_hi = (tl.maximum(full, 0) // BLOCK_M) * BLOCK_M
    if start_n + BLOCK_N > seqlen_k:
        mid_hi = mid_lo
    mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _tile_visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask of visible pairs, rows and columns both inside their lengths."""
    diag = offs_m[:, None] + (seqlen_k - seqlen_q)
    vis = (offs_n[None, :] < seqlen_k) & (offs_m[:, None] < seqlen_q)
    if HAS_RIGHT:
        vis = vis & (offs_n[None, :] <= diag + window_right)
    if HAS_LEFT:
        vis = vis & (offs_n[None, :] >= diag - window_left)
    return vis


def document_bounds(cu_seqlens: torch.Tensor, batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed documents in the batch layout: for each of the batch * seqlen tokens, (start, end) int32 of its
    document within its row (end exclusive), from boundaries over the flattened tokens (a loader's cu_seqlens:
    every row start among them; trailing copies of batch * seqlen, empty documents, allowed). Device ops only,
    no read-back: what the Gluon kernels' DOCS variants take (kernels/flash_fwd_hopper.py, flash_bwd_hopper.py)."""
    cu = cu_seqlens.to(torch.int64)
    tokens = torch.arange(batch * seqlen, device=cu.device)
    doc = torch.searchsorted(cu, tokens, right=True) - 1
    row0 = tokens - tokens % seqlen
    start = torch.maximum(cu[doc], row0) - row0
    end = torch.minimum(cu[doc + 1], row0 + seqlen) - row0
    return start.to(torch.int32), end.to(torch.int32)
