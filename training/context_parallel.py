"""Context parallelism: every sequence split across the ranks of a process group, attention as a ring.

Sharding (head-tail balanced): a row of T tokens is cut into 2·cp chunks of c = T / (2·cp) and rank r
keeps chunks r and 2·cp−1−r, in that order, as its T_local = 2c tokens. Under a causal mask the work of
chunk i grows with i, so pairing an early chunk with a late one gives every rank the same work.

Ring attention (``context_parallel_attention``): the local queries stay put while the K/V blocks travel
round the ring, rank r receiving from r−1 and sending to r+1, so at step s rank r holds the block of
rank r−s. The next hop is posted (``batch_isend_irecv``) before the kernel runs on the block in hand, so
communication overlaps compute. Per step, each local query chunk a meets each key chunk b of the block:
b > a is skipped, b == a is the causal diagonal, b < a sees every key (only a window or a document
boundary cuts it). Documents become varlen pieces: for chunks a and b, every document intersecting both
is one kernel "sequence" with its queries in a and its keys in b (a document crosses chunk and rank
boundaries freely; only one document can reach from b into a later a). A sliding window trims each
piece to the keys some query of it can see and the queries that can see some key, so blocks beyond the
window cost nothing but their hop. The partial (O, LSE) of each kernel call is merged into the running
result in fp32 (``_merge``).

Backward keeps only the final O and LSE: K/V travel the same ring again, each step runs the kernel's
backward with the *global* O and LSE (so the recomputed P is the global softmax and delta = rowsum(dO∘O)
is the global one), dQ accumulates here in fp32, and the fp32 dK/dV accumulators travel with their block,
one hop behind it, back to the rank that owns it.

Why a ring and not an all-gather of K/V (Llama 3's choice): both move the same bytes forward, (cp−1)/cp of
the sequence's K/V per rank (GQA makes that small either way), and the ring's dK/dV hops cost what the
all-gather's reduce-scatter does. The ring holds two K/V blocks (in hand and arriving) instead of the
whole sequence's K/V per layer, which at 1M tokens is what decides how long a sequence fits; the
all-gather's fewer, larger kernel calls would win at short local lengths, where overlap hides little. We
have not measured either on several GPUs.

The plan of kernel calls depends only on the document boundaries, so it is built once per batch on the
host (one read-back of cu_seqlens) and shared by every layer, forward and backward.
"""
import bisect
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kernels import flash_attn_backward, flash_attn_varlen_func
from kernels.launch import INTERPRET
from kernels.mask import normalize_window
from kernels.reference import blockwise_attention, blockwise_attention_backward

# --- head-tail sharding ---------------------------------------------------------------------------


def _chunk(seq_len: int, cp: int) -> int:
    if seq_len % (2 * cp):
        raise ValueError(f"context parallelism over {cp} ranks needs a sequence length divisible by 2 * {cp}, "
                         f"got {seq_len}")
    return seq_len // (2 * cp)


def positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """int64 (T_local,) = (seq_len / cp,): the positions within a row of the tokens rank ``rank`` of ``cp`` holds."""
    c = _chunk(seq_len, cp)
    low, high = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(low, low + c), torch.arange(high, high + c)])


def shard(x: torch.Tensor, rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of x (..., T, ...) along ``dim``: chunks rank and 2 cp − 1 − rank, concatenated."""
    c = _chunk(x.shape[dim], cp)
    return torch.cat([x.narrow(dim, rank * c, c), x.narrow(dim, (2 * cp - 1 - rank) * c, c)], dim)


def unshard(shards, dim: int = 1) -> torch.Tensor:
    """The inverse of ``shard``: every rank's shard, in rank order -> the full tensor."""
    halves = [s.chunk(2, dim) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


def position_ids(cu_seqlens: torch.Tensor | None, batch_size: int, seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """int64 (B, T_local): the position of each local token in its document, as the loader numbers them
    (0 at each row start and at each boundary of ``cu_seqlens``, global over the B * T tokens)."""
    pos = positions(seq_len, rank, cp)
    tokens = (torch.arange(batch_size)[:, None] * seq_len + pos).flatten()
    starts = torch.arange(0, batch_size * seq_len + 1, seq_len)
    if cu_seqlens is not None:
        starts = torch.cat([starts, cu_seqlens.cpu().long()]).sort().values
    start = starts[torch.searchsorted(starts, tokens, right=True) - 1]
    return (tokens - start).view(batch_size, -1)


def shard_batch(batch: dict, rank: int, cp: int) -> dict:
    """A loader batch (data/loader.py: input_ids, targets, position_ids (B, T), cu_seqlens) -> this rank's:
    every (B, T) tensor sharded, cu_seqlens unchanged (attention reads it in global coordinates), and
    position_ids computed if the batch has none (the model's default 0..T_local-1 would be wrong here)."""
    local = {key: value if key == "cu_seqlens" else shard(value, rank, cp) for key, value in batch.items()}
    if "position_ids" not in batch:
        B, T = batch["input_ids"].shape
        local["position_ids"] = position_ids(batch.get("cu_seqlens"), B, T, rank, cp).to(batch["input_ids"].device)
    return local


# --- the plan: which kernel calls each ring step makes --------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One varlen kernel call of a ring step: local query rows ``q`` (a span of the flattened B * T_local)
    against rows ``k`` of the K/V block in hand. Between the pieces, filler sequences with no keys (or no
    queries) skip the rows in between, so the spans go to the kernel as views, never gathered copies."""
    q: slice
    k: slice
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    window: tuple[int, int]


def _chunk_pieces(starts, ends, a, b, c, window):
    """(q_start, q_end, k_start, k_end, causal, left) in row positions for query chunk a, key chunk b <= a:
    one per document intersecting both, trimmed to the window; ``left`` is the kernel's window_size[0]."""
    qa0, qa1, kb0, kb1 = a * c, (a + 1) * c, b * c, (b + 1) * c
    i = bisect.bisect_right(ends, qa0)   # the first document still open where chunk a begins
    while i < len(starts) and starts[i] < qa1:
        qs, qe = max(starts[i], qa0), min(ends[i], qa1)
        if a == b:
            yield qs, qe, qs, qe, True, window
        else:
            ks, ke = max(starts[i], kb0), min(ends[i], kb1)
            if window >= 0:
                # keys some query of the piece can see, queries that can see some key
                ks, qe = max(ks, qs - window), min(qe, ke + window)
            if ks < ke and qs < qe:
                # query qs + i sees key ks + j iff j >= i + qs - ks - window; the kernel's rule for a
                # sequence of these lengths is j >= i + (ke - ks) - (qe - qs) - left
                yield qs, qe, ks, ke, False, window + ke - qe if window >= 0 else -1
            return   # a later document of chunk a starts after chunk b ends
        i += 1


def _calls(pieces, device):
    """Pieces (flat local q_start, q_end, k_start, k_end, causal, left) -> kernel calls: one per (causal, left)
    as long as the pieces' queries and keys both come in increasing order; another where they overlap."""
    lanes = {}
    for piece in sorted(pieces):
        group = lanes.setdefault(piece[4:], [])
        lane = next((lane for lane in group if lane[-1][1] <= piece[0] and lane[-1][3] <= piece[2]), None)
        if lane is None:
            group.append([piece])
        else:
            lane.append(piece)
    calls = []
    for (causal, left), group in lanes.items():
        for lane in group:
            q_lo, k_lo = lane[0][0], lane[0][2]
            cu_q, cu_k = [0], [0]
            for q0, q1, k0, k1, _, _ in lane:
                if q0 > q_lo + cu_q[-1]:   # skipped queries: a sequence without keys (out 0, LSE -inf)
                    cu_q.append(q0 - q_lo)
                    cu_k.append(cu_k[-1])
                if k0 > k_lo + cu_k[-1]:   # skipped keys: a sequence without queries
                    cu_q.append(cu_q[-1])
                    cu_k.append(k0 - k_lo)
                cu_q.append(q1 - q_lo)
                cu_k.append(k1 - k_lo)
            calls.append(_Call(
                q=slice(q_lo, q_lo + cu_q[-1]), k=slice(k_lo, k_lo + cu_k[-1]),
                cu_q=torch.tensor(cu_q, dtype=torch.int32, device=device),
                cu_k=torch.tensor(cu_k, dtype=torch.int32, device=device),
                max_q=max(y - x for x, y in zip(cu_q, cu_q[1:])), max_k=max(y - x for x, y in zip(cu_k, cu_k[1:])),
                causal=causal, window=(left, 0) if causal else (left, -1)))
    return tuple(calls)


def _build_plan(bounds, batch, local_len, rank, cp, window, device):
    """Per ring step s (the block of rank (rank − s) mod cp in hand), this rank's kernel calls.

    bounds: sorted document boundaries over the flattened B * T tokens, every row start included."""
    c, seq_len = local_len // 2, local_len * cp
    rows = []   # per row: (starts, ends) of its non-empty documents, in row positions
    for b in range(batch):
        lo, hi = bisect.bisect_left(bounds, b * seq_len), bisect.bisect_right(bounds, (b + 1) * seq_len)
        docs = [(x - b * seq_len, y - b * seq_len) for x, y in zip(bounds[lo:hi], bounds[lo + 1:hi]) if y > x]
        rows.append(([x for x, _ in docs], [y for _, y in docs]))
    own = (rank, 2 * cp - 1 - rank)
    steps = []
    for s in range(cp):
        src = (rank - s) % cp
        theirs = (src, 2 * cp - 1 - src)
        pieces = []
        for row, (starts, ends) in enumerate(rows):
            base = row * local_len
            for qslot, a in enumerate(own):
                for kslot, kb in enumerate(theirs):
                    if kb > a:
                        continue
                    for qs, qe, ks, ke, causal, left in _chunk_pieces(starts, ends, a, kb, c, window):
                        q0, k0 = base + qslot * c - a * c, base + kslot * c - kb * c
                        pieces.append((q0 + qs, q0 + qe, k0 + ks, k0 + ke, causal, left))
        steps.append(_calls(pieces, device))
    return tuple(steps)


_last_plan = None   # (key, weakref to cu_seqlens or None, plan): every layer of a batch asks for the same


def _plan(cu_seqlens, batch, local_len, rank, cp, window, device):
    """The ring's kernel calls for these document boundaries (``_build_plan``), built once per batch."""
    global _last_plan
    key = (batch, local_len, rank, cp, window, device, None if cu_seqlens is None else cu_seqlens._version)
    if _last_plan is not None and _last_plan[0] == key and (
            cu_seqlens is None if _last_plan[1] is None else _last_plan[1]() is cu_seqlens):
        return _last_plan[2]
    total = batch * local_len * cp
    bounds = set(range(0, total + 1, local_len * cp))   # rows never attend to each other
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] > total or any(y < x for x, y in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must rise from 0 to at most B * T = {total} (global positions, the same "
                             f"on every rank), got {cu[:4]} ... {cu[-4:]}")
        bounds.update(cu)
    plan = _build_plan(sorted(bounds), batch, local_len, rank, cp, window, device)
    _last_plan = (key, None if cu_seqlens is None else weakref.ref(cu_seqlens), plan)
    return plan


# --- the ring ---------------------------------------------------------------------------------------


def _triton(t: torch.Tensor) -> bool:
    """The kernels' own dispatch rule: Triton on CUDA or under the interpreter, else the PyTorch reference,
    called directly here so that float64, which the kernels refuse, runs it anywhere."""
    return t.dtype != torch.float64 and (t.is_cuda or (t.device.type == "cpu" and INTERPRET))


def _block_forward(q, k, v, call, scale, deterministic):
    """(out, lse (H, rows)) of one kernel call."""
    if _triton(q):
        return flash_attn_varlen_func(q, k, v, call.cu_q, call.cu_k, call.max_q, call.max_k, softmax_scale=scale,
                                      causal=call.causal, window_size=call.window, return_lse=True,
                                      deterministic=deterministic)
    return blockwise_attention(q, k, v, scale, *normalize_window(call.causal, call.window), call.cu_q, call.cu_k)


def _block_backward(dout, q, k, v, out, lse, call, scale, deterministic):
    """(dq, dk, dv) of one kernel call, P recomputed against the given (global) lse."""
    if _triton(q):
        return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=scale, causal=call.causal,
                                   window_size=call.window, cu_seqlens_q=call.cu_q, cu_seqlens_k=call.cu_k,
                                   max_seqlen_q=call.max_q, max_seqlen_k=call.max_k, deterministic=deterministic)
    return blockwise_attention_backward(dout, q, k, v, out, lse, scale, *normalize_window(call.causal, call.window),
                                        call.cu_q, call.cu_k)


def _merge(out, lse, out_b, lse_b):
    """Folds a partial result over the same rows into the running one, in place: out (rows, H, D) and
    lse (H, rows) fp32, out_b/lse_b a kernel call's. With w = σ(lse_b − lse), out ← out + w·(out_b − out)
    and lse ← log(e^lse + e^lse_b): no exponential of an unbounded difference, and a row that saw no key in
    the block (lse_b = −inf) gets w = 0, also when it has seen none before (−inf − −inf is NaN: w = 0)."""
    w = torch.sigmoid(lse_b - lse).nan_to_num_(0.0)
    out.lerp_(out_b.to(out.dtype), w.t().unsqueeze(-1))
    lse.copy_(torch.logaddexp(lse, lse_b))


def _hop(tensors, group):
    """Posts the sending of ``tensors`` to the next rank of the ring and the receiving of the previous rank's
    into new buffers -> (requests, buffers): wait on the requests before reading the buffers."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    to, of = dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)
    buffers = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, of, group) for t in buffers]
    return dist.batch_isend_irecv(ops), buffers


def _arrived(pending):
    requests, buffers = pending
    for request in requests:
        request.wait()
    return buffers


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ring_forward(q, k, v, group, plan, scale, deterministic):
    """q (B, T_local, H, D), k/v (B, T_local, Hk, D) -> out (B, T_local, H, D), lse (H, B * T_local) fp32
    (fp64 for fp64 input)."""
    B, T, H, D = q.shape
    qf = q.reshape(B * T, H, D)
    kv = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (k, v)]   # contiguous: they are sent
    out = torch.zeros(B * T, H, D, dtype=_acc_dtype(q.dtype), device=q.device)
    lse = torch.full((H, B * T), float("-inf"), dtype=out.dtype, device=q.device)
    for s, calls in enumerate(plan):
        pending = _hop(kv, group) if s + 1 < len(plan) else None
        for call in calls:
            out_b, lse_b = _block_forward(qf[call.q], kv[0][call.k], kv[1][call.k], call, scale, deterministic)
            _merge(out[call.q], lse[:, call.q], out_b, lse_b)
        if pending is not None:
            kv = _arrived(pending)
    return out.to(q.dtype).view(B, T, H, D), lse


def _ring_backward(dout, q, k, v, out, lse, group, plan, scale, deterministic):
    """(dq, dk, dv) of _ring_forward from its (out, lse) and the gradient dout of out."""
    B, T, H, D = q.shape
    qf, dof, of = (t.reshape(B * T, H, D) for t in (q, dout, out))
    kv = [t.reshape(B * T, *t.shape[2:]).contiguous() for t in (k, v)]   # contiguous: they are sent
    acc = _acc_dtype(q.dtype)
    dq = torch.zeros(qf.shape, dtype=acc, device=q.device)
    travelling = None   # the dK/dV accumulators of the block in hand, one hop behind it
    for s, calls in enumerate(plan):
        pending_kv = _hop(kv, group) if s + 1 < len(plan) else None
        dkv = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in kv]
        for call in calls:
            dq_c, dk_c, dv_c = _block_backward(dof[call.q], qf[call.q], kv[0][call.k], kv[1][call.k], of[call.q],
                                               lse[:, call.q], call, scale, deterministic)
            dq[call.q] += dq_c
            dkv[0][call.k] += dk_c
            dkv[1][call.k] += dv_c
        if travelling is not None:   # arrived while this step computed
            for mine, arrived in zip(dkv, _arrived(travelling)):
                mine += arrived
        # after the last step the hop brings each block's accumulators home: rank r holds block r + 1
        # (on a ring of one they are home already: no requests to wait on)
        travelling = _hop(dkv, group) if len(plan) > 1 else ([], dkv)
        if pending_kv is not None:
            kv = _arrived(pending_kv)
    dk, dv = _arrived(travelling)
    return dq.to(q.dtype).view(q.shape), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)


class _RingAttention(torch.autograd.Function):
    """Saves q, k, v and the final (out, lse) only; backward re-runs the ring from them."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan, scale, deterministic):
        out, lse = _ring_forward(q, k, v, group, plan, scale, deterministic)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, plan, scale, deterministic)
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_ring_backward(dout, *ctx.saved_tensors, *ctx.args), None, None, None, None


def _checked(q, k, v, group, cu_seqlens, window, softmax_scale):
    """(group, plan, scale) after checking the arguments of context_parallel_attention."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, T_local, heads, head_dim), got shape {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (B, T_local, Hk, D) with q's B, T_local and D; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (a KV cache has no place here)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k's heads ({k.shape[2]}) must divide q's ({q.shape[2]})")
    if q.shape[1] % 2:
        raise ValueError(f"T_local = {q.shape[1]} must be even: a rank holds two chunks of equal length")
    if not isinstance(window, int) or window < -1:
        raise ValueError(f"window must be an int >= -1 (-1 = unbounded), got {window!r}")
    group = group if group is not None else dist.group.WORLD
    rank, cp = dist.get_rank(group), dist.get_world_size(group)
    if cu_seqlens is not None and (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1):
        raise ValueError(f"cu_seqlens must be 1-D int32, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    plan = _plan(cu_seqlens, q.shape[0], q.shape[1], rank, cp, window, q.device)
    return group, plan, q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def context_parallel_attention(q, k, v, group, cu_seqlens=None, window: int = -1, softmax_scale=None,
                               deterministic: bool = True):
    """Causal attention of a sequence sharded over ``group`` (``shard``): this rank's queries against the
    whole sequence's keys. Differentiable in q, k and v.

    q (B, T_local, H, D); k, v (B, T_local, Hk, D) with Hk dividing H (GQA/MQA), this rank's tokens in
    ``shard`` order; fp16/bf16/fp32 (fp64 on the CPU reference path) -> out (B, T_local, H, D) in q's dtype.
    cu_seqlens: int32 (n_docs + 1,) document boundaries over the flattened B * T *global* tokens, the same
    on every rank (the loader's), or None for one sequence per row; documents may be empty. window >= 0:
    each query sees itself and ``window`` keys to its left. deterministic: the kernels' backward argument.
    Every rank of ``group`` must call this with the same shapes and boundaries.
    """
    group, plan, scale = _checked(q, k, v, group, cu_seqlens, window, softmax_scale)
    return _RingAttention.apply(q, k, v, group, plan, scale, deterministic)


# --- applied to a model -----------------------------------------------------------------------------

_OUR_KERNELS = ("auto", "flash", "reference")


class _ContextParallel:
    """model/attention.py's attention, attention_keep and attention_backward over one group, with their
    signatures: what apply_context_parallel installs on every block."""

    def __init__(self, group):
        self.group = group

    def _check(self, backend, q):
        if backend not in _OUR_KERNELS:
            # the KV-cache decoding path asks for "naive": generation runs on an unsharded model
            raise ValueError(f"context-parallel attention runs our kernels (attention 'auto', 'flash' or "
                             f"'reference'), got {backend!r}; generate with a model it was not applied to")
        if backend == "flash" and not (q.is_cuda or INTERPRET):
            raise ValueError("attention='flash' runs Triton kernels: it needs a CUDA device, or TRITON_INTERPRET=1 "
                             "on CPU; use attention='reference' (or 'auto') on CPU")

    def attention(self, q, k, v, backend, *, cu_seqlens=None, window=-1, sdpa_backend=None, deterministic=True):
        self._check(backend, q)
        return context_parallel_attention(q, k, v, self.group, cu_seqlens, window, deterministic=deterministic)

    def keep(self, q, k, v, backend, *, cu_seqlens=None, window=-1, sdpa_backend=None, deterministic=True):
        self._check(backend, q)
        group, plan, scale = _checked(q, k, v, self.group, cu_seqlens, window, None)
        with torch.no_grad():
            return _ring_forward(q, k, v, group, plan, scale, deterministic)

    def backward(self, dout, q, k, v, out, lse, backend, *, cu_seqlens=None, window=-1, sdpa_backend=None,
                 deterministic=True):
        group, plan, scale = _checked(q, k, v, self.group, cu_seqlens, window, None)
        return _ring_backward(dout, q, k, v, out, lse, group, plan, scale, deterministic)


def apply_context_parallel(model, group):
    """Runs the attention of every block of ``model`` (a model.GPT) as a ring over ``group``; returns it.

    The model's inputs must then be this rank's shard of each batch (``shard_batch``: global position ids
    for RoPE or learned positions, cu_seqlens global), and the loss a sum over the cp ranks. Works under
    training/memory.py's plans: ``selective`` and ``offload`` keep the ring's output and LSE and start its
    backward from them. The sdpa and naive backends are refused: the ring runs our kernels or their reference.
    """
    for i, block in enumerate(model.blocks):
        if block.attn.backend not in _OUR_KERNELS:
            raise ValueError(f"apply_context_parallel: block {i} has attention={block.attn.backend!r}; context "
                             f"parallelism runs our kernels, set attention to one of {_OUR_KERNELS}")
    cp = _ContextParallel(group)
    for block in model.blocks:
        block.attn.attention_fn, block.attn.attention_keep_fn = cp.attention, cp.keep
        block.attn.attention_backward_fn = cp.backward
    return model
