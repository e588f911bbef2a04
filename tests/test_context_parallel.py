"""Context parallelism (training/context_parallel.py): head-tail sharding, the plan of kernel calls, and
the ring against one-process attention (output and gradients) on gloo, with 2 and 4 ranks spawned here.

One spawned job of 4 processes runs every case and returns results through files: float64 on the PyTorch
reference over a 4-rank group and a 2-rank subgroup, float32 on the Triton kernels under the interpreter
(tiny) over the other 2 ranks, and the GPT with apply_context_parallel. Tests marked slow share that job."""
import contextlib
import datetime
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreter_trouble
from kernels.mask import normalize_window, visible
from kernels.reference import attention_ref
from model import GPT, GPTConfig, attention
from training import context_parallel as cp_mod
from training.context_parallel import (apply_context_parallel, context_parallel_attention, position_ids, positions,
                                       shard, shard_batch, unshard)
from training.memory import apply_memory_plan

# --- sharding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_head_tail_shards_round_trip_and_balance(cp):
    T = 6 * cp
    x = torch.randn(2, T, 3)
    shards = [shard(x, r, cp) for r in range(cp)]
    assert torch.equal(unshard(shards), x)
    held = [positions(T, r, cp) for r in range(cp)]
    for r, pos in enumerate(held):
        assert torch.equal(shards[r], x[:, pos])
        c = T // (2 * cp)   # chunks r and 2 cp - 1 - r
        assert pos.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * cp - 1 - r) * c, (2 * cp - r) * c))
    assert sorted(torch.cat(held).tolist()) == list(range(T))
    # causal work (keys seen per query) is the same on every rank
    assert len({int((pos + 1).sum()) for pos in held}) == 1
    with pytest.raises(ValueError, match="divisible by 2"):
        shard(torch.zeros(1, T + 1), 0, cp)


def test_position_ids_restart_at_documents_as_the_loader_numbers_them():
    B, T, cp = 2, 24, 3
    cu = torch.tensor([0, 5, 5, 6, 30, 31, 48], dtype=torch.int32)   # an empty and two 1-token documents
    starts = set(cu.tolist()) | set(range(0, B * T, T))
    full = torch.tensor([max(s for s in starts if s <= t) for t in range(B * T)])   # each token's document start
    full = (torch.arange(B * T) - full).view(B, T)
    batch = {"input_ids": torch.randint(0, 9, (B, T)), "targets": torch.randint(0, 9, (B, T)), "cu_seqlens": cu}
    for r in range(cp):
        assert torch.equal(position_ids(cu, B, T, r, cp), shard(full, r, cp))
        local = shard_batch(batch, r, cp)   # no position_ids in the batch: computed
        assert local["cu_seqlens"] is cu and torch.equal(local["targets"], shard(batch["targets"], r, cp))
        assert torch.equal(local["position_ids"], shard(full, r, cp))
        assert torch.equal(shard_batch({**batch, "position_ids": full}, r, cp)["position_ids"], shard(full, r, cp))
    rows = position_ids(None, B, T, 1, cp)
    assert torch.equal(rows, positions(T, 1, cp).expand(B, -1))


# --- the plan: documents and windows as varlen pieces ----------------------------------------------


def _visible_pairs(cu, B, T, window):
    """(B*T, B*T) bool: flat query i may see flat key j (same document and row, causal, window)."""
    bounds = torch.tensor(sorted(set(cu) | set(range(0, B * T + 1, T))))
    tok = torch.arange(B * T)
    doc = torch.searchsorted(bounds, tok, right=True)
    vis = (doc[:, None] == doc[None, :]) & (tok[None, :] <= tok[:, None])
    return vis & (tok[:, None] - tok[None, :] <= window) if window >= 0 else vis


def _pairs_planned(cu, B, T, rank, cp, window):
    """How often each (flat query, flat key) pair is computed by rank's calls over the whole ring."""
    plan = cp_mod._plan(torch.tensor(cu, dtype=torch.int32), B, T // cp, rank, cp, window, "cpu")
    flat = lambda r: (torch.arange(B)[:, None] * T + positions(T, r, cp)).flatten()   # noqa: E731
    counts = torch.zeros(B * T, B * T, dtype=torch.int64)
    for s, calls in enumerate(plan):
        rows_of, cols_of = flat(rank), flat((rank - s) % cp)
        for call in calls:
            left, right = normalize_window(call.causal, call.window)
            cq, ck = call.cu_q.tolist(), call.cu_k.tolist()
            for i in range(len(cq) - 1):
                n_q, n_k = cq[i + 1] - cq[i], ck[i + 1] - ck[i]
                rows = rows_of[call.q.start + cq[i]:call.q.start + cq[i + 1]]
                cols = cols_of[call.k.start + ck[i]:call.k.start + ck[i + 1]]
                counts[rows[:, None], cols[None, :]] += visible(torch.arange(n_q), torch.arange(n_k), n_q, n_k,
                                                                left, right)
    return counts, flat(rank)


def test_plan_computes_every_visible_pair_once_and_nothing_else():
    # random layouts: rings of 1-4 ranks (3 is no power of two), chunks of 1-5 tokens, documents empty, of
    # one token or crossing chunks and rows, windows from 0 to beyond the sequence; the kernel's own
    # visibility rule (kernels/mask.py) decodes each call
    rng = random.Random(0)
    for _ in range(120):
        cp, B, c = rng.choice([1, 2, 3, 4]), rng.choice([1, 2]), rng.choice([1, 2, 3, 5])
        T = 2 * cp * c
        cu = sorted([0, B * T] + [rng.randint(0, B * T) for _ in range(rng.randint(0, 6))])
        window = rng.choice([-1, -1, 0, 1, 2, 5, 100])
        want = _visible_pairs(cu, B, T, window).long()
        for rank in range(cp):
            counts, mine = _pairs_planned(cu, B, T, rank, cp, window)
            assert torch.equal(counts[mine], want[mine]), dict(cp=cp, B=B, T=T, cu=cu, window=window, rank=rank)


# --- the ring on gloo --------------------------------------------------------------------------------

# name, B, T, H, Hk, cu_seqlens (None: one sequence per row), window. T = 40: chunks of 10 (2 ranks) and
# 5 (4 ranks); the documents cross chunk and row boundaries, with an empty one, two of one token, odd lengths.
DOCS = [0, 7, 7, 8, 23, 24, 41, 57, 80]
REFERENCE_CASES = [   # float64: the PyTorch reference
    ("causal-B2-H4", 2, 40, 4, 4, None, -1),
    ("gqa-docs-B2-H4-Hk2", 2, 40, 4, 2, DOCS, -1),
    # most rows see no key of the other ranks' blocks (LSE -inf in those steps)
    ("mqa-docs-window3-B2-H4-Hk1", 2, 40, 4, 1, DOCS, 3),
    ("window7-B1-H2-Hk1", 1, 40, 2, 1, None, 7),
    ("window0-B1-H2", 1, 40, 2, 2, None, 0),
    ("padded-boundaries-B2-H2", 2, 40, 2, 2, [0, 13, 40, 80, 80, 80], -1),
]
TRITON_CASES = [   # float32: the Triton kernels under the interpreter (slow), on 2 ranks
    ("gqa-docs-B1-H2-Hk1", 1, 16, 2, 1, [0, 3, 3, 4, 11, 16], -1),
    ("docs-window2-B2-H2-Hk1", 2, 16, 2, 1, [0, 3, 3, 4, 11, 21, 32], 2),
]
# The first case's inputs through a ring that drops the work of step 1, or that merges partial results by
# a plain average instead of by their LSE: the comparison must catch both.
BROKEN = ("drop_step", "average")
MODEL_MODES = ("none", "selective")   # training/memory.py's plans: the ring, and its keep/backward pair
# The groups of one 4-process job and what each runs; "cp2" is a subgroup whose ranks are not the global
# ones, and runs beside "cp2-triton" on the other two processes.
GROUPS = {"cp4": [0, 1, 2, 3], "cp2": [2, 3], "cp2-triton": [0, 1]}
WORK = {"cp4": ("reference", "model"), "cp2": ("reference", "broken", "model"), "cp2-triton": ("triton",)}
RING_GROUPS = [name for name in GROUPS if "reference" in WORK[name]]
MODEL = dict(vocab_size=61, seq_len=40, n_layer=2, n_head=4, n_kv_head=2, d_model=32, mlp="swiglu", norm="rmsnorm",
             attention="reference")


def _inputs(case, dtype, seed):
    name, B, T, H, Hk, cu, window = case
    g = torch.Generator().manual_seed(seed)
    q, dout = (torch.randn(B, T, H, 16, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(B, T, Hk, 16, generator=g, dtype=dtype) for _ in range(2))
    return dict(q=q, k=k, v=v, dout=dout, cu=None if cu is None else torch.tensor(cu, dtype=torch.int32),
                window=window)


def _model(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**MODEL, **overrides})).double()


def _model_batch():
    g = torch.Generator().manual_seed(5)
    targets = torch.randint(0, MODEL["vocab_size"], (2, 40), generator=g)
    targets[0, 3:9] = -100
    return dict(input_ids=torch.randint(0, MODEL["vocab_size"], (2, 40), generator=g), targets=targets,
                cu_seqlens=torch.tensor(DOCS, dtype=torch.int32))


def _average_merge(out, lse, out_b, lse_b):
    out.add_(out_b.to(out.dtype)).mul_(0.5)
    lse.copy_(torch.logaddexp(lse, lse_b))


@contextlib.contextmanager
def _broken(kind):
    plan, merge = cp_mod._plan, cp_mod._merge
    if kind == "drop_step":
        cp_mod._plan = lambda *args: (lambda p: p[:1] + ((),) + p[2:])(plan(*args))
    elif kind == "average":
        cp_mod._merge = _average_merge
    try:
        yield
    finally:
        cp_mod._plan, cp_mod._merge = plan, merge


def _ring(inputs, group, rank, cp, broken=None):
    q, k, v = (shard(inputs[n], rank, cp).requires_grad_() for n in "qkv")
    with _broken(broken):
        out = context_parallel_attention(q, k, v, group, cu_seqlens=inputs["cu"], window=inputs["window"])
        out.backward(shard(inputs["dout"], rank, cp))
    return [out.detach(), q.grad, k.grad, v.grad]


def _ring_model(group, rank, cp, mode):
    """Logits of this rank's tokens and the parameter gradients, summed over the group, of the cp-parallel model."""
    model = apply_context_parallel(apply_memory_plan(_model(), mode), group)
    batch = _model_batch()
    local = shard_batch(batch, rank, cp)
    logits, _ = model(local["input_ids"], position_ids=local["position_ids"], cu_seqlens=local["cu_seqlens"])
    # the loss of the whole batch: this rank's sum over the global number of targets, gradients summed
    loss = F.cross_entropy(logits.flatten(0, 1), local["targets"].flatten(), ignore_index=-100, reduction="sum")
    (loss / (batch["targets"] != -100).sum()).backward()
    grads = [p.grad for p in model.parameters()]
    for g in grads:
        torch.distributed.all_reduce(g, group=group)
    return [logits.detach()] + grads


def _worker(rank, world, tmp):
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        job = torch.load(tmp / "job.pt")
        groups = {name: dist.new_group(ranks) if len(ranks) < world else dist.group.WORLD
                  for name, ranks in GROUPS.items()}   # every rank creates every group
        results = {}
        for name, ranks in GROUPS.items():
            if rank not in ranks:
                continue
            group, r, cp = groups[name], ranks.index(rank), len(ranks)
            for case, inputs in job[WORK[name][0]].items():
                results[name, case] = _ring(inputs, group, r, cp)
            for kind in BROKEN if "broken" in WORK[name] else ():
                results[name, kind] = _ring(job["reference"][REFERENCE_CASES[0][0]], group, r, cp, kind)
            for mode in MODEL_MODES if "model" in WORK[name] else ():
                results[name, "model", mode] = _ring_model(group, r, cp, mode)
        torch.save(results, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ring_job(tmp_path_factory):
    """Every case on every group, in one spawned job of 4 processes -> ({(group, case): per-group-rank
    results}, inputs by case). Its cost is mostly the four processes importing torch and Triton."""
    if why := interpreter_trouble():   # the children run the kernels in Triton's interpreter
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("context_parallel")
    job = {"reference": {c[0]: _inputs(c, torch.float64, seed) for seed, c in enumerate(REFERENCE_CASES)},
           "triton": {c[0]: _inputs(c, torch.float32, seed) for seed, c in enumerate(TRITON_CASES)}}
    torch.save(job, tmp / "job.pt")
    with pytest.MonkeyPatch.context() as mp:
        # the children decide at import which path float32 takes: the Triton kernels in the interpreter
        mp.setenv("TRITON_INTERPRET", "1")
        torch.multiprocessing.spawn(_worker, args=(4, tmp), nprocs=4)
    per_rank = [torch.load(tmp / f"rank{r}.pt") for r in range(4)]
    keys = set().union(*(p.keys() for p in per_rank))
    return {key: [per_rank[r][key] for r in GROUPS[key[0]]] for key in keys}, {**job["reference"], **job["triton"]}


def _unsharded(results):
    """Per-group-rank [out, dq, dk, dv] -> the full tensors, in order."""
    return [unshard(parts) for parts in zip(*results)]


def _one_process(inputs):
    """Output and q/k/v gradients of attention on the whole unsharded sequence: standard attention in fp64
    (kernels/reference.py's oracle) over the same documents."""
    q, k, v = (inputs[n].to(torch.float64, copy=True).requires_grad_() for n in "qkv")
    B, T, H, D = q.shape
    cu = [] if inputs["cu"] is None else inputs["cu"].tolist()
    bounds = torch.tensor(sorted(set(cu) | set(range(0, B * T + 1, T))), dtype=torch.int32)
    w = inputs["window"]
    out, _ = attention_ref(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), causal=True,
                           window_size=(w, 0) if w >= 0 else (-1, -1), cu_seqlens_q=bounds, cu_seqlens_k=bounds)
    out = out.view(q.shape)
    out.backward(inputs["dout"].double())
    return [out.detach(), q.grad, k.grad, v.grad]


def _max_errors(got, want):
    return [(g.double() - w.double()).abs().max().item() for g, w in zip(got, want)]


@pytest.mark.slow
@pytest.mark.parametrize("group", RING_GROUPS)
@pytest.mark.parametrize("case", [c[0] for c in REFERENCE_CASES])
def test_ring_matches_one_process_reference(ring_job, case, group):
    results, inputs = ring_job
    got = _unsharded(results[group, case])
    assert all(torch.isfinite(t).all() for t in got)
    # float64 throughout except the reference's LSE, which it returns in fp32 as the kernels do: the merge
    # weights and the backward's P carry that rounding (~1e-7 of an LSE of a few units)
    for name, err in zip(("out", "dq", "dk", "dv"), _max_errors(got, _one_process(inputs[case]))):
        assert err < 1e-6, f"{name}: max error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("kind", BROKEN)
def test_broken_ring_fails_the_comparison(ring_job, kind):
    results, inputs = ring_job
    got = _unsharded(results["cp2", kind])
    assert max(_max_errors(got, _one_process(inputs[REFERENCE_CASES[0][0]]))) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("case", [c[0] for c in TRITON_CASES])
def test_ring_matches_one_process_triton(ring_job, case):
    results, inputs = ring_job
    got = _unsharded(results["cp2-triton", case])
    exact = _one_process(inputs[case])
    # one process with our kernels in the same precision: attention() as the model calls it
    q, k, v = (inputs[case][n].clone().requires_grad_() for n in "qkv")
    out = attention(q, k, v, "flash", cu_seqlens=inputs[case]["cu"], window=inputs[case]["window"])
    out.backward(inputs[case]["dout"])
    one = [out.detach(), q.grad, k.grad, v.grad]
    for name, err, base in zip(("out", "dq", "dk", "dv"), _max_errors(got, exact), _max_errors(one, exact)):
        # the ring adds fp32 merges of partial results to the one-process kernel's rounding
        assert err <= 2 * base + 1e-6, f"{name}: ring error {err:.2e}, one process {base:.2e}"


@pytest.fixture(scope="module")
def one_process_model():
    """Logits and gradients of the unsharded model, attention by SDPA's math kernel in fp64."""
    model = _model(attention="sdpa", sdpa_backend="math")
    batch = _model_batch()
    logits, loss = model(**batch, position_ids=position_ids(batch["cu_seqlens"], 2, 40, 0, 1))
    loss.backward()
    return [logits.detach()] + [p.grad for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("group", RING_GROUPS)
@pytest.mark.parametrize("mode", MODEL_MODES)
def test_model_under_context_parallel_matches_one_process(ring_job, one_process_model, mode, group):
    results, _ = ring_job
    parts = results[group, "model", mode]
    got = [unshard([p[0] for p in parts])] + parts[0][1:]   # every rank holds the summed gradients
    for err in _max_errors(got, one_process_model):
        assert err < 1e-6, f"max error {err:.2e}"


def test_apply_context_parallel_refuses_other_backends():
    for backend in ("sdpa", "naive"):
        model = GPT(GPTConfig(**{**MODEL, "attention": backend}))
        with pytest.raises(ValueError, match="runs our kernels"):
            apply_context_parallel(model, None)
    # the hook stays the plain attention on a model it was not applied to
    assert GPT(GPTConfig(**MODEL)).blocks[0].attn.attention_fn is attention
