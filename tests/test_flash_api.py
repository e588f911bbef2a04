"""flash-attn 2 drop-in: signatures, dropout_p in the 4th position, softcap and ALiBi in the Triton kernels
(outputs, LSE and gradients against the float64 oracle), the packed variants, and argument checks.

On CPU the kernels run in Triton's interpreter (tests/conftest.py), so the shapes stay small.
"""
import inspect
import random

import pytest
import torch

import kernels
import kernels.flash_attn as flash_attn_module
import kernels.launch as launch
from kernels import policy
from kernels import (flash_attn_backward, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                     flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)
from kernels.launch import override_atomic_dq, override_one_launch
from kernels.reference import attention_ref
from test_kernels import check_against_oracle, make_qkv

# flash-attn 2.x (flash_attn/flash_attn_interface.py): parameter names, order and defaults, copied by hand
_TAIL = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
         ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_REQ = inspect.Parameter.empty
FLASH_ATTN_2 = {
    "flash_attn_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), *_TAIL],
    "flash_attn_varlen_func": [("q", _REQ), ("k", _REQ), ("v", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                               ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), *_TAIL, ("block_table", None)],
    "flash_attn_qkvpacked_func": [("qkv", _REQ), *_TAIL],
    "flash_attn_kvpacked_func": [("q", _REQ), ("kv", _REQ), *_TAIL],
    "flash_attn_varlen_qkvpacked_func": [("qkv", _REQ), ("cu_seqlens", _REQ), ("max_seqlen", _REQ), *_TAIL],
    "flash_attn_varlen_kvpacked_func": [("q", _REQ), ("kv", _REQ), ("cu_seqlens_q", _REQ), ("cu_seqlens_k", _REQ),
                                        ("max_seqlen_q", _REQ), ("max_seqlen_k", _REQ), *_TAIL],
}


@pytest.mark.parametrize("name", sorted(FLASH_ATTN_2))
def test_signature_matches_flash_attn_2(name):
    params = list(inspect.signature(getattr(kernels, name)).parameters.values())
    positional = [(p.name, p.default) for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert positional == FLASH_ATTN_2[name]
    # ours beyond flash-attn's: keyword-only, so no positional call can reach it
    assert [(p.name, p.default, p.kind) for p in params if p.kind != p.POSITIONAL_OR_KEYWORD] == \
        [("return_lse", False, inspect.Parameter.KEYWORD_ONLY)]


def test_dropout_p_is_the_fourth_argument(device):
    q, k, v = make_qkv(1, 9, 9, 2, 2, 16, torch.float16, device)
    assert torch.equal(flash_attn_func(q, k, v, 0.0, causal=True), flash_attn_func(q, k, v, causal=True))
    assert torch.equal(flash_attn_func(q, k, v, 0, 0.5), flash_attn_func(q, k, v, softmax_scale=0.5))
    for bad in (0.1, 1.0, float("nan"), -0.5, "0"):
        with pytest.raises(ValueError, match="dropout_p"):
            flash_attn_func(q, k, v, bad)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, 0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        flash_attn_qkvpacked_func(torch.stack([q, k, v], 2), 0.1)


def test_return_attn_probs(device):
    q, k, v = make_qkv(2, 11, 7, 2, 1, 16, torch.float16, device)
    out, lse, probs = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref_out, ref_lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert probs is None and torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert lse.shape == (2, 2, 11) and lse.dtype == torch.float32


def _slopes(kind, B, H, device):
    if kind is None:
        return None
    return torch.rand(*((H,) if kind == "heads" else (B, H)), device=device) * 0.9 + 0.1


def _random_cases(n, seed=23):
    """(B, Nq, Nk, H, Hk, D, causal, softcap, alibi) drawn from a fixed seed: odd lengths, Nq != Nk, GQA."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        hk = rng.choice([1, 2])
        cases.append((rng.choice([1, 2]), rng.randint(1, 60), rng.randint(1, 60), hk * rng.choice([1, 2]), hk,
                      rng.choice([16, 24, 32]), rng.random() < 0.5, rng.choice([0.0, 2.0, 7.5]),
                      rng.choice(["heads", "batch"])))
    return cases


BATCH_CASES = [  # (B, Nq, Nk, H, Hk, D, causal, softcap, alibi)
    (2, 37, 37, 4, 2, 32, True, 3.0, None),       # softcap alone, GQA, odd length
    (1, 45, 70, 2, 1, 40, False, 0.0, "heads"),   # ALiBi (nheads,) alone, Nq < Nk, MQA, padded head dim
    (2, 70, 33, 4, 4, 32, True, 2.0, "batch"),    # both, (batch, nheads) slopes, Nq > Nk: rows without keys
    *_random_cases(3),
]


@pytest.mark.parametrize("case", BATCH_CASES, ids=lambda c: "B{}-Nq{}-Nk{}-H{}-Hk{}-D{}-{}-cap{}-{}".format(
    *c[:6], "causal" if c[6] else "full", *c[7:]))
def test_softcap_alibi_match_oracle(case, device):
    B, Nq, Nk, H, Hk, D, causal, softcap, alibi = case
    dtype = torch.bfloat16 if (Nq + Nk) % 2 else torch.float16
    slopes = _slopes(alibi, B, H, device)
    check_against_oracle(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal, softcap=softcap, alibi_slopes=slopes, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, softcap=softcap, alibi_slopes=slopes),
        make_qkv(B, Nq, Nk, H, Hk, D, dtype, device, scale=1.5))


def test_softcap_alibi_window_and_lse_gradient(device):
    slopes = _slopes("heads", 1, 2, device)
    kw = dict(window_size=(13, 4), softcap=4.0, alibi_slopes=slopes)
    check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **kw),
                         lambda q, k, v: attention_ref(q, k, v, **kw),
                         make_qkv(1, 50, 50, 2, 2, 32, torch.float16, device, scale=1.5), dlse=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_softcap_alibi_varlen(causal, device):
    # several documents, seqlen_q != seqlen_k per document (the bias and the causal diagonal are aligned to
    # each document's bottom right), an empty one, tail rows after the last; one slope row per document
    cu_q = torch.tensor([0, 5, 5, 36, 50], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 9, 30, 61], dtype=torch.int32, device=device)
    q = torch.randn(53, 4, 32, dtype=torch.float16, device=device) * 1.5
    k, v = (torch.randn(61, 2, 32, dtype=torch.float16, device=device) * s for s in (1.5, 1.0))
    slopes = _slopes("batch" if causal else "heads", 4, 4, device)
    kw = dict(causal=causal, softcap=3.0, alibi_slopes=slopes)
    check_against_oracle(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, 31, 31, return_lse=True, **kw),
        lambda q, k, v: attention_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw), [q, k, v])


def test_softcap_alibi_one_launch_and_atomic_dq(device):
    # the backward's other two forms: dK/dV and dQ programs in one grid, and the atomic-dQ dK/dV pass
    slopes = _slopes("batch", 2, 4, device)
    kw = dict(causal=True, softcap=2.5, alibi_slopes=slopes)
    inputs = make_qkv(2, 40, 40, 4, 2, 32, torch.bfloat16, device, scale=1.5)
    with override_one_launch(True):
        check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **kw),
                             lambda q, k, v: attention_ref(q, k, v, **kw), inputs)
    with override_atomic_dq(True):
        check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, deterministic=False, **kw),
                             lambda q, k, v: attention_ref(q, k, v, **kw), inputs)


def test_backward_from_kept_output_with_softcap_alibi(device):
    q, k, v = make_qkv(1, 29, 29, 2, 1, 16, torch.float16, device, scale=1.5)
    kw = dict(causal=True, softcap=3.0, alibi_slopes=_slopes("heads", 1, 2, device))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_func(*leaves, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    for g, leaf in zip(flash_attn_backward(dout, q, k, v, out.detach(), lse.detach(), **kw), leaves):
        assert torch.equal(g, leaf.grad)


def test_cpu_reference_path_has_softcap_alibi(monkeypatch):
    # without the interpreter the CPU runs kernels/reference.py's blockwise algorithm: same features
    monkeypatch.setattr(flash_attn_module, "INTERPRET", False)
    slopes = _slopes("batch", 2, 4, "cpu")
    kw = dict(causal=True, softcap=3.0, alibi_slopes=slopes)
    check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **kw),
                         lambda q, k, v: attention_ref(q, k, v, **kw),
                         make_qkv(2, 33, 47, 4, 2, 32, torch.bfloat16, "cpu", scale=1.5), dlse=True)
    cu = torch.tensor([0, 7, 7, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, 4, 16, dtype=torch.float16) * 1.5 for _ in range(3))
    slopes = _slopes("batch", 3, 4, "cpu")
    check_against_oracle(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 33, 33, softcap=2.0, alibi_slopes=slopes,
                                               return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, softcap=2.0, alibi_slopes=slopes),
        [q, k, v])


def test_score_mods_take_the_portable_kernels(monkeypatch, device):
    # softcap / ALiBi never reach the TMA or Gluon kernels (which lack them; kernels/policy.py takes them to the
    # Triton kernels on any machine), and the default call passes the Triton kernels SOFTCAP=0.0, ALIBI=False and
    # no slopes: the code without them
    asked, constexprs = [], []
    choose = policy.choose
    monkeypatch.setattr(policy, "choose",
                        lambda m, p, o=policy.DEFAULT: asked.append((p.softcap, p.alibi)) or choose(m, p, o))
    launch._clear_caches()   # every key below new: the policy is asked once per launch
    for name in ("_FWD", "_BWD"):
        real = getattr(launch, name)

        def spy(key, grid, *args, _real=real, _name=name, **kwargs):
            alibi = args[14] if _name == "_BWD" else args[7]   # the AlibiSlopes argument
            constexprs.append((_name, kwargs["SOFTCAP"], kwargs["ALIBI"], alibi is None))
            return _real(key, grid, *args, **kwargs)
        monkeypatch.setattr(launch, name, spy)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 20, 20, 2, 2, 16, torch.float16, device))
    flash_attn_func(q, k, v, causal=True).sum().backward()
    assert asked == [(False, False)] * 2
    assert set(constexprs) == {("_FWD", 0.0, False, True), ("_BWD", 0.0, False, True)}
    asked.clear()
    constexprs.clear()
    for kw in (dict(softcap=5.0), dict(alibi_slopes=torch.ones(2, device=device))):
        flash_attn_func(q, k, v, causal=True, **kw).sum().backward()
    assert asked == [(True, False)] * 2 + [(False, True)] * 2
    assert set(constexprs) == {("_FWD", 5.0, False, True), ("_BWD", 5.0, False, True),
                               ("_FWD", 0.0, True, False), ("_BWD", 0.0, True, False)}
    hopper = policy.Machine("cuda", major=9, num_sms=132, gluon=True, tma_fwd_tested=True, tma_reduce=True)
    for mods in (dict(softcap=True), dict(alibi=True)):   # where the TMA and Gluon kernels would run otherwise
        d = choose(hopper, policy.Problem(torch.float16, 64, 4096, 4096, -1, 0, deterministic=False, **mods))
        assert (d.fwd, d.bwd) == ("triton", "triton") and d.dq != "fused"


def _grads(fn, leaves, dout):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, lse = fn(*leaves)
    out.backward(dout)
    return [out, lse, *(t.grad for t in leaves)]


def _assert_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_packed_variants_equal_unpacked(device):
    kw = dict(causal=True, softcap=4.0, return_lse=True)
    qkv = torch.randn(2, 19, 3, 2, 16, dtype=torch.float16, device=device)
    dout = torch.randn(2, 19, 2, 16, dtype=torch.float16, device=device)
    packed = _grads(lambda t: flash_attn_qkvpacked_func(t, 0.0, None, **kw), [qkv], dout)
    plain = _grads(lambda q, k, v: flash_attn_func(q, k, v, **kw), list(qkv.unbind(2)), dout)
    _assert_equal(packed[:2], plain[:2])
    assert torch.equal(packed[2], torch.stack(plain[2:], 2))

    q = torch.randn(2, 11, 4, 16, dtype=torch.float16, device=device)
    kv = torch.randn(2, 19, 2, 2, 16, dtype=torch.float16, device=device)
    dout = torch.randn_like(q)
    akw = dict(alibi_slopes=_slopes("batch", 2, 4, device), return_lse=True)
    packed = _grads(lambda q, kv: flash_attn_kvpacked_func(q, kv, **akw), [q, kv], dout)
    plain = _grads(lambda q, k, v: flash_attn_func(q, k, v, **akw), [q, *kv.unbind(2)], dout)
    _assert_equal(packed[:3], plain[:3])
    assert torch.equal(packed[3], torch.stack(plain[3:], 2))


def test_varlen_packed_variants_equal_unpacked(device):
    cu = torch.tensor([0, 6, 6, 23], dtype=torch.int32, device=device)
    qkv = torch.randn(25, 3, 2, 16, dtype=torch.float16, device=device)
    dout = torch.randn(25, 2, 16, dtype=torch.float16, device=device)
    kw = dict(causal=True, alibi_slopes=_slopes("heads", 3, 2, device), return_lse=True)
    packed = _grads(lambda t: flash_attn_varlen_qkvpacked_func(t, cu, 17, **kw), [qkv], dout)
    plain = _grads(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 17, 17, **kw), list(qkv.unbind(1)), dout)
    _assert_equal(packed[:2], plain[:2])
    assert torch.equal(packed[2], torch.stack(plain[2:], 1))

    cu_k = torch.tensor([0, 9, 12, 20], dtype=torch.int32, device=device)
    q = torch.randn(25, 2, 16, dtype=torch.float16, device=device)
    kv = torch.randn(20, 2, 1, 16, dtype=torch.float16, device=device)
    kw = dict(softcap=3.0, return_lse=True)
    packed = _grads(lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu, cu_k, 17, 9, **kw), [q, kv], dout)
    plain = _grads(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu_k, 17, 9, **kw), [q, *kv.unbind(1)], dout)
    _assert_equal(packed[:3], plain[:3])
    assert torch.equal(packed[3], torch.stack(plain[3:], 1))


# ---- bad input: one clear error naming the argument, before any work ----

@pytest.mark.parametrize("kw,exc,match", [
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap="1"), ValueError, "softcap"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(nheads,\) = \(4,\)"),
    (dict(alibi_slopes=torch.ones(2, 2)), ValueError, r"or \(batch, nheads\) = \(2, 4\)"),
    (dict(alibi_slopes=torch.ones(1, 2, 4)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(4, device="meta")), ValueError, "alibi_slopes must be on q's device"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a torch.Tensor"),
])
def test_bad_softcap_alibi_raise(kw, exc, match, device):
    q, k, v = make_qkv(2, 8, 8, 4, 2, 16, torch.float16, device)
    if isinstance(kw.get("alibi_slopes"), torch.Tensor) and kw["alibi_slopes"].device.type != "meta":
        kw = dict(alibi_slopes=kw["alibi_slopes"].to(device))
    with pytest.raises(exc, match=match):
        flash_attn_func(q, k, v, **kw)


def test_bad_packed_and_varlen_only_arguments_raise(device):
    h = dict(dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_qkvpacked_func(torch.randn(2, 8, 2, 4, 16, **h))
    with pytest.raises(ValueError, match="qkv must have 5 dims"):
        flash_attn_qkvpacked_func(torch.randn(8, 3, 4, 16, **h))
    with pytest.raises(TypeError, match="qkv must be float16, bfloat16 or float32"):
        flash_attn_qkvpacked_func(torch.randn(2, 8, 3, 4, 16, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"kv must have shape \(batch, seqlen, 2, nheads, headdim\)"):
        flash_attn_kvpacked_func(torch.randn(2, 8, 4, 16, **h), torch.randn(2, 8, 3, 4, 16, **h))
    cu = torch.tensor([0, 8], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=r"qkv must have shape \(total, 3, nheads, headdim\)"):
        flash_attn_varlen_qkvpacked_func(torch.randn(8, 2, 4, 16, **h), cu, 8)
    with pytest.raises(ValueError, match=r"kv must have shape \(total, 2, nheads, headdim\)"):
        flash_attn_varlen_kvpacked_func(torch.randn(8, 4, 16, **h), torch.randn(8, 3, 4, 16, **h), cu, cu, 8, 8)
    q = torch.randn(8, 4, 16, **h)
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, block_table=torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape .* \(batch, nheads\) = \(1, 4\)"):
        flash_attn_varlen_func(q, q, q, cu, cu, 8, 8, alibi_slopes=torch.ones(2, 4, device=device))


def test_varlen_grid_follows_the_longest_document(device, monkeypatch):
    """A loose max_seqlen (a model passes its row length) launches documents x ceil(longest / BLOCK_M) query
    blocks, not documents x ceil(max_seqlen / BLOCK_M): the launch gets the longest document rounded up to
    GRID_ROUND, the forward and the backward alike; the results are those of the tight call."""
    from kernels.validate import GRID_ROUND
    seen = []
    real_fwd, real_bwd = flash_attn_module.attn_fwd, flash_attn_module.attn_bwd
    monkeypatch.setattr(flash_attn_module, "attn_fwd", lambda *a: seen.append(("fwd", a[8], a[9])) or real_fwd(*a))
    monkeypatch.setattr(flash_attn_module, "attn_bwd", lambda *a: seen.append(("bwd", a[12], a[13])) or real_bwd(*a))
    lengths = [3, 40, 0, 17, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 2, 16, device=device, dtype=torch.float16, requires_grad=True) for _ in range(3))
    loose = flash_attn_varlen_func(q, k, v, cu, cu, 4096, 4096, causal=True)
    loose.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert seen == [("fwd", GRID_ROUND, GRID_ROUND), ("bwd", GRID_ROUND, GRID_ROUND)]
    for t in (q, k, v):
        t.grad = None
    tight = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True)
    tight.float().sum().backward()
    assert seen[2:] == [("fwd", max(lengths), max(lengths)), ("bwd", max(lengths), max(lengths))]  # never raised
    assert torch.equal(loose, tight)
    for g, t in zip(grads, (q, k, v)):
        assert torch.equal(g, t.grad)


@pytest.mark.parametrize("lq, lk, kw", [
    (23, 23, dict(causal=True)),
    (8, 21, dict(causal=True, alibi="batch")),   # seqlen_q < seqlen_k: the diagonal at each document's bottom right
    (19, 19, dict(window_size=(5, 2), softcap=2.0)),
])
def test_documents_of_one_length_take_the_batch_launch(lq, lk, kw, device, monkeypatch):
    """Varlen documents that all have the same lengths (a ring's dense block, document-masked rows without a
    document boundary) run as a batch (total / L, L, heads, dim): the launch gets no offsets, so the Gluon
    kernels can take it on a GPU; out, LSE and gradients are the oracle's, and flash_attn_backward from the kept
    varlen LSE gives the autograd gradients. A non-uniform or partial cover stays varlen."""
    seen = []
    real_fwd, real_bwd = flash_attn_module.attn_fwd, flash_attn_module.attn_bwd
    monkeypatch.setattr(flash_attn_module, "attn_fwd", lambda *a: seen.append(("fwd", a[6] is None, a[0].dim()))
                        or real_fwd(*a))
    monkeypatch.setattr(flash_attn_module, "attn_bwd", lambda *a: seen.append(("bwd", a[10] is None, a[2].dim()))
                        or real_bwd(*a))
    n, H, Hk = 3, 4, 2
    cu_q = torch.arange(0, n * lq + 1, lq, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, n * lk + 1, lk, dtype=torch.int32, device=device)
    q = torch.randn(n * lq, H, 32, dtype=torch.float16, device=device) * 1.5
    k, v = (torch.randn(n * lk, Hk, 32, dtype=torch.float16, device=device) for _ in range(2))
    kw = dict(kw)
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = _slopes("batch", n, H, device)
    check_against_oracle(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, lq, lk, return_lse=True, **kw),
        lambda q, k, v: attention_ref(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw), [q, k, v])
    assert seen == [("fwd", True, 4), ("bwd", True, 4)]   # batch layout, no offsets, forward and backward
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = flash_attn_varlen_func(*leaves, cu_q, cu_k, lq, lk, return_lse=True, **kw)
    assert out.shape == q.shape and lse.shape == (H, n * lq)
    dout = torch.randn_like(out)
    out.backward(dout)
    kept = flash_attn_backward(dout, q, k, v, out.detach(), lse.detach(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               max_seqlen_q=lq, max_seqlen_k=lk, **kw)
    for g, leaf in zip(kept, leaves):
        assert g.shape == leaf.shape and torch.equal(g, leaf.grad)
    seen.clear()   # the last document one token short: not uniform, and a partial cover of q: both stay varlen
    short = cu_q.clone()
    short[-1] -= 1
    flash_attn_varlen_func(q, k, v, short, cu_k, lq, lk, **kw)
    assert seen == [("fwd", False, 3)]
