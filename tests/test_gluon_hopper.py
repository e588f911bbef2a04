"""The warp-specialized Gluon kernels for Hopper: forward (kernels/flash_fwd_hopper.py) and backward
(kernels/flash_bwd_hopper.py: dK/dV, and with deterministic=False dQ too).

Gluon kernels do not run in Triton's interpreter: on a CPU machine they are compiled for sm_90a
(register reallocation, no serialized wgmma); on a Hopper GPU their outputs, LSE and gradients go
against the float64 oracle with the same criterion as every other kernel test, and against the
Triton kernels.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

import kernels.flash_bwd_hopper as bwd_hopper
import kernels.flash_fwd_hopper as fwd_hopper
from kernels import flash_attn_func
from kernels.dispatch import TESTED_TRITON, version
from kernels.hopper import MAXNREG, MIN_CAUSAL_SEQLEN, shapes_in_scope
from kernels.launch import override_gluon, override_tma_fwd, overriding
from kernels.reference import attention_ref
from test_kernels import check_against_oracle, make_qkv

ROOT = Path(__file__).resolve().parents[1]
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
# the launcher runs the Gluon kernels only with a Triton they were tested on; to test another, add it there
GLUON_TRITON = version(triton.__version__) in TESTED_TRITON["Gluon kernels"]
needs_hopper = pytest.mark.skipif(not (HOPPER and GLUON_TRITON), reason=(
    "needs a Hopper GPU" if not HOPPER else
    f"Triton {triton.__version__} is not in kernels/dispatch.py TESTED_TRITON['Gluon kernels']"))


@pytest.fixture
def calls(monkeypatch):
    """How many times each Gluon kernel ran: {"fwd": n, "dkdv": n}."""
    count = {"fwd": 0, "dkdv": 0}

    def spy(name, module, attr):
        real = getattr(module, attr)

        def wrapped(*args, **kwargs):
            count[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, attr, wrapped)
    spy("fwd", fwd_hopper, "attn_fwd")
    spy("dkdv", bwd_hopper, "attn_bwd")
    return count


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,H,Hk", [(2, 2048, 2, 2), (1, 2176, 4, 2), (1, 2048, 3, 1)],
                         ids=["B2", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_matches_oracle(D, causal, B, N, H, Hk, dtype, calls):
    inputs = make_qkv(B, N, N, H, Hk, D, dtype, torch.device("cuda"))
    check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
                         lambda q, k, v: attention_ref(q, k, v, causal=causal), inputs)
    assert calls == {"fwd": int(N >= fwd_hopper.MIN_SEQLEN[D]), "dkdv": 1}   # short d64 forwards run Triton's


@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,H,Hk,launch", [(2, 2048, 2, 2, (128, 3)), (1, 2176, 4, 2, (128, 4)),
                                             (1, 2048, 3, 1, (64, 3))], ids=["B2", "gqa", "mqa-64"])
def test_forward_launch_variants_at_head_dim_64(causal, B, N, H, Hk, launch, calls, monkeypatch):
    # the Gluon forward's other tile shapes and ring depths at head dim 64 (the launch variants test runs d128),
    # at lengths where the launcher keeps the Triton forward
    inputs = make_qkv(B, N, N, H, Hk, 64, torch.bfloat16, torch.device("cuda"))
    with (fwd_hopper.override_launch(*launch), override_tma_fwd(False),   # which takes d64 to 4K before it
          overriding(gluon_fwd_min_seqlen=((64, 128), (128, 128)))):    # the Gluon forward from 128 tokens
        check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
                             lambda q, k, v: attention_ref(q, k, v, causal=causal), inputs)
    assert calls == {"fwd": 1, "dkdv": 1}


def fused_calls(monkeypatch):
    """Per backward kernel launch from here on, whether it took dQ too (a dq_acc was passed)."""
    seen = []
    real = bwd_hopper.attn_bwd

    def wrapped(*args, dq_acc=None, **kwargs):
        seen.append(dq_acc is not None)
        return real(*args, dq_acc=dq_acc, **kwargs)
    monkeypatch.setattr(bwd_hopper, "attn_bwd", wrapped)
    return seen


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,H,Hk,dtype", [(2, 2048, 2, 2, torch.bfloat16), (1, 2176, 4, 2, torch.bfloat16),
                                            (1, 2048, 3, 1, torch.float16)], ids=["B2", "gqa-bf16", "mqa-fp16"])
def test_fused_dq_matches_oracle(D, causal, B, N, H, Hk, dtype, calls, monkeypatch):
    # deterministic=False: dQ accumulated inside the backward kernel by TMA reduce-add, no dQ pass (the launcher
    # fuses it at both head dims: kernels/policy.py FUSED_DQ_HEAD_DIMS)
    fused = fused_calls(monkeypatch)
    inputs = make_qkv(B, N, N, H, Hk, D, dtype, torch.device("cuda"))
    check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True,
                                                         deterministic=False),
                         lambda q, k, v: attention_ref(q, k, v, causal=causal), inputs)
    assert calls == {"fwd": int(N >= fwd_hopper.MIN_SEQLEN[D]), "dkdv": 1} and fused == [True]   # dQ came from the Gluon kernel


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,N,H,Hk", [(2, 2048, 4, 4), (1, 2176, 6, 3)], ids=["B2", "gqa"])
def test_fused_dq_in_head_groups_matches_oracle(D, B, N, H, Hk, calls, monkeypatch):
    # rule bwd.head_groups (forced by a one-byte cap): the fused backward per group of kv heads on head-sliced
    # views of q, k, v, dO and of the gradients it writes into; every group's launch takes the Gluon kernel
    fused = fused_calls(monkeypatch)
    inputs = make_qkv(B, N, N, H, Hk, D, torch.bfloat16, torch.device("cuda"))
    with overriding(dq_acc_max_bytes=1):
        check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True,
                                                             deterministic=False),
                             lambda q, k, v: attention_ref(q, k, v, causal=True), inputs, dlse=True)
    assert calls["dkdv"] == 2 * Hk and fused == [True] * (2 * Hk)   # two backwards, one launch per kv head


@needs_hopper
@pytest.mark.parametrize("fwd_launch,bwd_launch", [((128, 3), (64, 2)), ((64, 4), (64, 3)), ((64, 3), (32, 4))])
def test_launch_variants_and_packed_qkv(fwd_launch, bwd_launch, calls, monkeypatch):
    # every launch shape the benchmark may pick, against the oracle; then q, k, v as views of one packed
    # (B, N, 3, H, D) tensor (rows strided by 3 * H * D, as a fused qkv projection gives them), whose
    # results equal the Triton kernels' within rounding
    qkv = torch.randn(2, 2048, 3, 4, 128, device="cuda", dtype=torch.bfloat16)
    with fwd_hopper.override_launch(*fwd_launch), bwd_hopper.override_launch(*bwd_launch):
        check_against_oracle(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
                             lambda q, k, v: attention_ref(q, k, v, causal=True), list(qkv.unbind(2)))
        assert calls == {"fwd": 1, "dkdv": 1}
        dout = torch.randn(2, 2048, 4, 128, device="cuda", dtype=torch.bfloat16)
        fused = fused_calls(monkeypatch)   # the fused backward at this head dim (policy.FUSED_DQ_HEAD_DIMS)
        results = []
        for passes, deterministic in ((("fwd", "dkdv"), True), (("fwd", "dkdv"), False), ((), True)):
            packed = qkv.clone().requires_grad_()
            with override_gluon(*passes):
                out, lse = flash_attn_func(*packed.unbind(2), causal=True, return_lse=True,
                                           deterministic=deterministic)
                out.backward(dout)
            results.append([out, lse, packed.grad])
    # the packed views took the Gluon kernels (dQ by the Triton pass, then fused unless the launch has 32-row
    # tiles), and then the Triton ones
    assert calls == {"fwd": 3, "dkdv": 3} and fused == [False, bwd_launch[0] >= 64]
    for result in results[:2]:
        for a, b in zip(result, results[2]):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@needs_hopper
def test_out_of_scope_inputs_take_the_triton_kernel(calls):
    # a window; a length not a multiple of 128; head dim 96; causal shorter than MIN_CAUSAL_SEQLEN
    for kw, shape in [(dict(window_size=(32, 0)), (1, 2048, 2, 64)), ({}, (1, 2000, 2, 64)),
                      ({}, (1, 2048, 2, 96)), ({}, (1, MIN_CAUSAL_SEQLEN - 128, 2, 128))]:
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flash_attn_func(q, k, v, causal=True, **kw).sum().backward()
    assert calls == {"fwd": 1, "dkdv": 0}   # the forward's length rule takes the short causal one at d128
    q, k, v = (torch.randn(1, 2048, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flash_attn_func(q, k, v).sum().backward()   # d64 shorter than the forward's MIN_SEQLEN: only the backward
    assert calls == {"fwd": 1, "dkdv": 1}
    calls.update(fwd=0, dkdv=0)
    q, k, v = (torch.randn(1, 256, 2, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    with override_gluon():
        flash_attn_func(q, k, v).sum().backward()
    assert calls == {"fwd": 0, "dkdv": 0}
    with override_gluon("fwd"):
        flash_attn_func(q, k, v).sum().backward()
    assert calls == {"fwd": 1, "dkdv": 0}
    with pytest.raises(ValueError, match="unknown passes"):
        with override_gluon("dq"):
            pass


def test_fused_dq_head_dims():
    # which launches take dQ into the Gluon kernel (deterministic=False): head dims 64 and 128 with their
    # 64-row tiles; not 32-row tiles (the dQ product needs 64 rows)
    assert bwd_hopper.fuses_dq(64) and bwd_hopper.fuses_dq(128)
    with bwd_hopper.override_launch(32, 4):
        assert not bwd_hopper.fuses_dq(64)


def test_forward_length_rule(monkeypatch):
    # the forward's own minimum lengths per head dim (flash_fwd_hopper.MIN_SEQLEN), causal included, on top of
    # the shared scope (stubbed here: it needs a Hopper GPU); the backward keeps MIN_CAUSAL_SEQLEN
    seen = []

    def in_scope(tensors, left, right, varlen, min_causal):
        seen.append(min_causal)
        return True
    monkeypatch.setattr(fwd_hopper, "in_scope", in_scope)

    def runs(n, d, right=0):
        return fwd_hopper.supported(*[torch.empty(1, n, 2, d, dtype=torch.bfloat16)] * 3, -1, right, False)
    assert runs(1024, 128) and runs(128, 128) and runs(1024, 128, right=-1)
    assert not runs(2048, 64) and not runs(2048, 64, right=-1) and runs(4096, 64)
    assert not runs(4096, 96)   # no kernel for this head dim
    assert set(seen) == {0}


def test_scope():
    # which inputs the Gluon kernels take (the device aside): runs anywhere
    def qkv(B=1, N=2048, H=4, Hk=4, D=128, dtype=torch.bfloat16):
        return [torch.empty(B, N, h, D, dtype=dtype) for h in (H, Hk, Hk)]
    full, causal = (-1, -1), (-1, 0)
    assert shapes_in_scope(qkv(), *full, False) and shapes_in_scope(qkv(), *causal, False)
    assert shapes_in_scope(qkv(B=3, D=64, Hk=1, dtype=torch.float16), *causal, False)
    short = qkv(N=MIN_CAUSAL_SEQLEN - 128)
    assert shapes_in_scope(short, *full, False) and not shapes_in_scope(short, *causal, False)
    assert shapes_in_scope(short, *causal, False, min_causal=0)                 # the forward's own length rule
    packed = torch.empty(2, 2048, 3, 4, 128, dtype=torch.bfloat16).unbind(2)   # rows strided by 3 * H * D
    assert shapes_in_scope(list(packed), *causal, False)
    assert not shapes_in_scope(qkv(N=2000), *full, False)                      # not a multiple of 128
    assert not shapes_in_scope(qkv(D=96), *full, False)
    assert not shapes_in_scope(qkv(dtype=torch.float32), *full, False)
    assert not shapes_in_scope(qkv(), 256, 0, False)                           # a window
    assert not shapes_in_scope(qkv(), *full, True)                             # varlen
    q, k, v = qkv()
    assert not shapes_in_scope([q, k[:, :1024], v[:, :1024]], *full, False)    # seqlen_q != seqlen_k
    heads_apart = torch.empty(1, 2048, 128, 4, dtype=torch.bfloat16).transpose(2, 3)   # head dim strided
    assert not shapes_in_scope([heads_apart, k, v], *full, False)
    batch_gaps = torch.empty(2, 4096, 4, 128, dtype=torch.bfloat16)[:, :2048]           # batches not back to back
    assert not shapes_in_scope([batch_gaps, batch_gaps, batch_gaps], *full, False)


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                    reason="this Triton has no bundled ptxas")
def test_compile_for_hopper_warp_specialized():
    # no GPU needed: the kernels compile for sm_90a with register reallocation between the warp roles,
    # and their tensor-core products are not serialized (a few waits per loop, not one per HGMMA); the
    # fused-dQ backward reduce-adds dQ by TMA
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/kernel_report.py"), "--dims", "128", "--causal", "1",
                          "--passes", "fwd_ws", "dkdv_ws", "bwd_ws", "--json"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.strip().splitlines()[-3:]]
    assert [r["pass_name"] for r in reports] == ["fwd_ws", "dkdv_ws", "bwd_ws"]
    assert reports[2]["tma_reduce"] > 0 and reports[1]["tma_reduce"] == 0
    for r in reports:
        assert r["setmaxnreg"] > 0 and r["registers"] <= MAXNREG
        assert not r["serialized_wgmma"] and r["hgmma"] > 0 and r["depbar"] < r["hgmma"] / 4


@pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                    reason="this Triton has no bundled ptxas")
def test_compile_document_variants_for_hopper():
    # no GPU needed: the DOCS variants (packed documents in the batch layout) compile for sm_90a as the plain ones
    # do, and at GPT-2's head dim 64 without spills (at d128 the backward spills, as its plain variant does, more)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/kernel_report.py"), "--dims", "64", "--causal", "1",
                          "--passes", "fwd_ws_docs", "bwd_ws_docs", "--json"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.strip().splitlines()[-2:]]
    assert [r["pass_name"] for r in reports] == ["fwd_ws_docs", "bwd_ws_docs"] and reports[1]["tma_reduce"] > 0
    for r in reports:
        assert r["setmaxnreg"] > 0 and r["spill_stores"] == 0 and not r["serialized_wgmma"]


def packed_rows(B, N, seed=0):
    """Boundaries over B rows of N tokens as the loader makes them (a boundary at every row start): documents of
    1 token, shorter than a tile, across tile edges, and one as long as the row."""
    g = torch.Generator().manual_seed(seed)
    cu = [0]
    for b in range(B):
        if b == B - 1 and B > 1:   # one row of a single document
            cu.append((b + 1) * N)
            continue
        pos = 0
        for n in [1, 63, 64, 129] + [int(x) for x in torch.randint(1, 700, (64,), generator=g)]:
            if pos + n >= N:
                break
            pos += n
            cu.append(b * N + pos)
        cu.append((b + 1) * N)
    return torch.tensor(cu, dtype=torch.int32)


@needs_hopper
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,N,H,Hk", [(2, 2048, 2, 2), (3, 2176, 4, 2)], ids=["B2", "gqa"])
def test_documents_in_the_batch_layout_match_the_varlen_oracle(D, B, N, H, Hk):
    # the DOCS variants called directly (no launcher routes to them yet): out and LSE of the forward, dQ, dK, dV of
    # the fused backward, against the float64 oracle on the same tokens as varlen documents; errors within twice
    # those of the oracle run in bf16, as check_against_oracle's criterion
    import kernels.launch as launch
    from kernels.mask import document_bounds
    dev = torch.device("cuda")
    cu = packed_rows(B, N).to(dev)
    start, end = document_bounds(cu, B, N)
    q, k, v = make_qkv(B, N, N, H, Hk, D, torch.bfloat16, dev)
    dout = torch.randn_like(q)
    scale = D ** -0.5
    out, lse = torch.empty_like(q), torch.empty(B, H, N, device=dev, dtype=torch.float32)
    fwd_hopper.attn_fwd(q, k, v, out, lse, scale, True, ("docs-test", launch.signature(q, k, v, out, lse, start)),
                        doc_start=start)
    lse2 = (lse * 1.4426950408889634).contiguous()
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()   # (B, H, N), as the preprocess
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev)
    bwd_hopper.attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale, True,
                        ("docs-test", launch.signature(q, k, v, dout, lse2, start, end)), dq_acc=dq_acc,
                        docs=(start, end))
    got = [out, lse, dq_acc * scale, dk, dv]

    def oracle(dtype):
        flat = [t.reshape(B * N, *t.shape[2:]).to(dtype).requires_grad_() for t in (q, k, v)]
        o, l = attention_ref(*flat, softmax_scale=scale, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu)
        (o.double() * dout.reshape(B * N, H, D).double()).sum().backward()
        return [o.view(B, N, H, D), l.view(H, B, N).transpose(0, 1), *(t.grad.view(B, N, *t.shape[1:]) for t in flat)]
    ref, low = oracle(torch.float64), oracle(torch.bfloat16)
    for name, g, r, lo in zip(["out", "lse", "dq", "dk", "dv"], got, ref, low):
        err, base = (g.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        assert err <= 2 * base + 1e-5, f"{name}: error {err:.3g} > 2 x {base:.3g}"


def test_unchecked_descriptors_match_the_checked_constructor():
    # kernels/hopper.py builds its TMA descriptors without TensorDescriptor's checks (host time): for the
    # tensors the kernels take, the checked constructor accepts the same fields
    from dataclasses import fields

    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from kernels.hopper import row_descriptor
    packed = torch.empty(1, 256, 3, 4, 128, dtype=torch.float16).unbind(2)[1]   # rows strided by 3 * H * D
    made = [row_descriptor(torch.empty(2, 256, 4, 64, dtype=torch.bfloat16), 64), row_descriptor(packed, 128),
            bwd_hopper.vector_descriptor(torch.empty(2, 4, 256), 64),
            bwd_hopper.dq_descriptor(torch.empty(2, 256, 4, 128), 64)]
    for fast in made:
        checked = TensorDescriptor(fast.base, fast.shape, fast.strides, fast.block_shape, fast.layout)
        for field in fields(TensorDescriptor):
            mine, theirs = getattr(fast, field.name), getattr(checked, field.name)
            assert mine is theirs if field.name == "base" else mine == theirs, field.name
