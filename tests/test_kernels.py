"""The Triton attention kernels against a float64 oracle: outputs, LSE and gradients.

Criterion (as in flash-attn's own tests): the kernel's max error against standard attention in
float64 is at most 2x the error of standard attention computed in the kernel's precision (products
in the input dtype, softmax in fp32), plus a small absolute epsilon. On CPU the kernels run in
Triton's interpreter (tests/conftest.py); with CUDA the same tests run compiled.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import kernels.flash_attn as flash_attn_module
from kernels import flash_attn_backward, flash_attn_func, flash_attn_varlen_func
import kernels.launch as launch_module
from kernels import flash_fwd_tma
from kernels.flash_fwd import _cast
from kernels.launch import (KernelConfig, override_atomic_dq, override_configs, override_gluon, override_one_launch,
                            override_tma_fwd)
from kernels.reference import attention_ref, blockwise_attention

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float16, torch.bfloat16]


def _grads(fn, inputs, dout, dlse):
    """Run ``fn`` (returns out, lse) and backprop ``sum(out * dout) + sum(lse * dlse)``."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out, lse = fn(*inputs)
    loss = (out.double() * dout.double()).sum()
    if dlse is not None:
        loss = loss + (lse.double().nan_to_num(0.0, 0.0, 0.0) * dlse.double()).sum()
    loss.backward()
    return out.detach(), lse.detach(), [t.grad for t in inputs]


def _max_err(a, b):
    a, b = a.double(), b.double()
    # -inf LSE rows must agree exactly; compare the finite rest
    if (a == -math.inf).any() or (b == -math.inf).any():
        assert torch.equal(a == -math.inf, b == -math.inf), "rows with LSE -inf differ"
        fin = torch.isfinite(b)
        a, b = a[fin], b[fin]
    assert not torch.isnan(a).any(), "NaN in kernel result"
    return (a - b).abs().max().item() if a.numel() else 0.0


def check_against_oracle(kernel_fn, ref_fn, inputs, dlse=False):
    """kernel_fn / ref_fn: (q, k, v) -> (out, lse). Compares out, lse, dq, dk, dv."""
    q = inputs[0]
    out_shape = q.shape
    dout = torch.randn(out_shape, device=q.device, dtype=q.dtype)
    got_out, got_lse, got_g = _grads(kernel_fn, inputs, dout, None)
    dl = torch.randn_like(got_lse) if dlse else None
    if dlse:
        got_out, got_lse, got_g = _grads(kernel_fn, inputs, dout, dl)
    ref_out, ref_lse, ref_g = _grads(ref_fn, [t.double() for t in inputs], dout, dl)
    low_out, low_lse, low_g = _grads(ref_fn, inputs, dout, dl)
    names = ["out", "lse", "dq", "dk", "dv"]
    for name, got, ref, low in zip(names, [got_out, got_lse, *got_g], [ref_out, ref_lse, *ref_g],
                                   [low_out, low_lse, *low_g]):
        err, base = _max_err(got, ref), _max_err(low, ref)
        # epsilon as flash-attn's tests: twice the rounding error of the dtype at the values' scale
        finite = ref[torch.isfinite(ref)].to(q.dtype)
        eps = 1e-5 + (2 * (finite + 0.3 - 0.3 - finite).abs().max().item() if finite.numel() else 0)
        assert err <= 2 * base + eps, f"{name}: error {err:.3g} > 2 x {base:.3g} + {eps:.1g}"


def make_qkv(B, Nq, Nk, H, Hk, D, dtype, device, scale=1.0):
    q = torch.randn(B, Nq, H, D, dtype=dtype, device=device) * scale
    k = torch.randn(B, Nk, Hk, D, dtype=dtype, device=device) * scale
    v = torch.randn(B, Nk, Hk, D, dtype=dtype, device=device)
    return q, k, v


def check_batch(B, Nq, Nk, H, Hk, D, dtype, device, causal=False, window=(-1, -1), dlse=False, scale=1.0,
                deterministic=True):
    inputs = make_qkv(B, Nq, Nk, H, Hk, D, dtype, device, scale)
    check_against_oracle(
        lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window_size=window, return_lse=True,
                                        deterministic=deterministic),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, window_size=window), inputs, dlse)


SHAPES = [  # (B, Nq, Nk, H, Hk, D): odd lengths, Nq != Nk both ways, GQA, padded head dims
    (2, 1, 1, 2, 2, 32),
    (1, 17, 17, 2, 2, 64),
    (2, 97, 97, 4, 2, 80),
    (1, 64, 129, 2, 1, 128),
    (1, 129, 64, 3, 3, 40),
]


def _id(s):
    B, Nq, Nk, H, Hk, D = s
    return f"B{B}-Nq{Nq}-Nk{Nk}-H{H}-Hk{Hk}-D{D}"


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_forward_backward(shape, causal, dtype, device):
    check_batch(*shape, dtype, device, causal=causal)


@pytest.mark.parametrize("shape,causal,window", [
    ((2, 97, 97, 4, 2, 80), True, (-1, -1)),     # GQA, padded head dim
    ((1, 64, 129, 2, 1, 128), False, (-1, -1)),  # Nq < Nk, MQA
    ((1, 129, 64, 3, 3, 40), True, (-1, -1)),    # Nq > Nk: rows that see no key
    ((1, 90, 90, 2, 2, 64), True, (13, -1)),     # sliding window
], ids=["gqa-causal", "mqa-full", "nq-gt-nk", "window"])
def test_atomic_dq_backward(shape, causal, window, device):
    # the Triton kernel's atomic dQ (deterministic=False, forced: the launcher prefers the split where the
    # Gluon kernel does not run): dQ summed with fp32 atomics inside the dK/dV pass; same accuracy bar
    with override_atomic_dq(True):
        check_batch(*shape, torch.bfloat16, device, causal=causal, window=window, dlse=True, deterministic=False)


def test_atomic_dq_backward_varlen(device):
    cu = torch.tensor([0, 5, 5, 46, 70], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(74, 4, 32, dtype=torch.float16, device=device) for _ in range(3))   # 4 rows after the last doc
    with override_atomic_dq(True):
        check_against_oracle(
            lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 41, 41, causal=True, return_lse=True,
                                                   deterministic=False),
            lambda q, k, v: attention_ref(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), [q, k, v])


@pytest.mark.parametrize("layout", ["batch", "varlen", "alibi"])
def test_head_groups_backward(layout, device, monkeypatch):
    # rule bwd.head_groups, forced by a cap of one byte: the fused backward over groups of kv heads (3 kv heads of
    # 2 query heads each: 3 groups), each with its own fp32 dQ accumulator, writing into the caller's gradients.
    # The oracle's outputs and gradients (dLSE too), and every accumulator a group's size, not the whole's
    sizes = []
    real = launch_module.dq_accumulator
    monkeypatch.setattr(launch_module, "dq_accumulator", lambda shape, dev: sizes.append(tuple(shape)) or real(shape, dev))
    with override_atomic_dq(True), launch_module.overriding(dq_acc_max_bytes=1):
        if layout == "varlen":
            cu = torch.tensor([0, 9, 9, 50, 70], dtype=torch.int32, device=device)   # an empty document, 3 rows after
            q = torch.randn(73, 6, 40, dtype=torch.bfloat16, device=device)
            k, v = (torch.randn(73, 3, 40, dtype=torch.bfloat16, device=device) for _ in range(2))
            check_against_oracle(
                lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 41, 41, causal=True, return_lse=True,
                                                       deterministic=False),
                lambda q, k, v: attention_ref(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), [q, k, v],
                dlse=True)
        else:
            slopes = torch.rand(2, 6, device=device) if layout == "alibi" else None   # (B, H): sliced per group
            check_against_oracle(
                lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_lse=True,
                                                deterministic=False),
                lambda q, k, v: attention_ref(q, k, v, causal=True, alibi_slopes=slopes),
                make_qkv(2, 97, 97, 6, 3, 40, torch.bfloat16, device), dlse=True)
    assert len(sizes) == 6 and all(s[-2] == 2 for s in sizes), sizes   # 2 backwards x 3 groups of 2 query heads


def test_deterministic_false_takes_the_split_unless_forced(device, monkeypatch):
    # without the Gluon kernel, deterministic=False runs the deterministic split (faster where measured);
    # override_atomic_dq(True) runs the atomic variant: the launch's FUSED_DQ tells them apart
    import kernels.launch as launch
    fused = []
    real = launch._BWD

    def spy(key, grid, *args, **kwargs):
        fused.append(kwargs["FUSED_DQ"])
        return real(key, grid, *args, **kwargs)
    monkeypatch.setattr(launch, "_BWD", spy)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 40, 40, 2, 2, 32, torch.float16, device))
    with launch.override_gluon():
        flash_attn_func(q, k, v, causal=True, deterministic=False).sum().backward()
        assert fused and not any(fused)
        fused.clear()
        with override_atomic_dq(True):
            flash_attn_func(q, k, v, causal=True, deterministic=False).sum().backward()
        assert fused == [True]


@pytest.mark.parametrize("D", [8, 16, 96, 256])
def test_head_dims(D, device):
    check_batch(1, 33, 40, 2, 1, D, torch.bfloat16, device, causal=True)


@pytest.mark.parametrize("Hk", [1, 2, 3], ids=["mqa", "gqa3", "gqa2"])
def test_gqa(Hk, device):
    check_batch(2, 45, 45, 6, Hk, 32, torch.float16, device, causal=True)


@pytest.mark.parametrize("window,causal,Nq,Nk", [
    ((4, -1), True, 70, 70),
    ((16, -1), True, 50, 90),
    ((8, 3), False, 61, 61),
    ((-1, 5), False, 90, 50),
    ((0, 0), False, 33, 33),
    ((20, 20), True, 64, 64),
])
def test_sliding_window(window, causal, Nq, Nk, device):
    check_batch(1, Nq, Nk, 2, 1, 32, torch.bfloat16, device, causal=causal, window=window)


def test_fully_masked_rows_are_zero_not_nan(device):
    # causal with Nq > Nk: the first Nq - Nk rows see no key (bottom-right alignment)
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 40, 16, 2, 2, 32, torch.float16, device))
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[:, :24] == 0)
    assert torch.all(lse[:, :, :24] == -math.inf)
    assert torch.isfinite(lse[:, :, 24:]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    check_batch(1, 40, 16, 2, 2, 32, torch.float16, device, causal=True)


def test_large_scores(device):
    # logits of magnitude ~ hundreds: online softmax must rescale without overflow
    check_batch(1, 80, 80, 2, 2, 64, torch.bfloat16, device, causal=True, scale=6.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_lse_gradient(dtype, device):
    # ring attention merges partial results through the LSE, so its gradient must be right too
    check_batch(1, 50, 70, 2, 1, 32, dtype, device, causal=True, dlse=True)


def test_fp32_is_exact(device):
    check_batch(1, 37, 53, 2, 2, 64, torch.float32, device, causal=True)


@pytest.mark.parametrize("cfg", [KernelConfig(16, 32, 4, 1), KernelConfig(64, 64, 4, 1)],
                         ids=["M16-N32", "M64-N64"])
def test_other_block_shapes(cfg, device):
    # BLOCK_N > BLOCK_M and large tiles exercise other splits between masked and unmasked blocks
    with override_configs(fwd=cfg, dkdv=cfg, dq=cfg):
        check_batch(1, 100, 77, 2, 1, 32, torch.float16, device, causal=True, window=(40, -1))
        check_batch(1, 65, 130, 2, 2, 32, torch.float16, device)


@pytest.mark.parametrize("deterministic", [True, False], ids=["split", "atomic"])
def test_counted_dkdv_loop(deterministic, device):
    # KernelConfig.counted: the dK/dV pass walks its query tiles as range(n_tiles) (on sm_90 ptxas
    # serializes the wgmma of the tl.range form, scripts/kernel_report.py); same gradients: uneven
    # tails, GQA, padded head dim, windows, Nq != Nk, rows that see no key, varlen with an empty document
    counted = KernelConfig(32, 16, 1, 1, counted=True) if device.type == "cpu" else KernelConfig(64, 64, 4, 2, counted=True)
    with override_configs(dkdv=counted, dkdv_fused=counted), override_atomic_dq(True):
        check_batch(2, 97, 97, 4, 2, 80, torch.bfloat16, device, causal=True, dlse=True, deterministic=deterministic)
        check_batch(1, 100, 77, 2, 1, 32, torch.float16, device, causal=True, window=(40, -1),
                    deterministic=deterministic)
        check_batch(1, 65, 130, 2, 2, 32, torch.float16, device, deterministic=deterministic)
        cu = torch.tensor([0, 5, 5, 46, 70], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(74, 4, 32, dtype=torch.float16, device=device) for _ in range(3))
        check_against_oracle(
            lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 41, 41, causal=True, return_lse=True,
                                                   deterministic=deterministic),
            lambda q, k, v: attention_ref(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), [q, k, v])


def test_one_launch_backward(device):
    # PROGRAMS="both": dK/dV and dQ programs in one grid, dQ's tiles differing from dK/dV's; same
    # gradients: GQA, padded head dim, uneven tails, windows, Nq != Nk, varlen with an empty document
    dkdv = KernelConfig(32, 16, 1, 1, counted=True) if device.type == "cpu" else KernelConfig(64, 64, 4, 2, counted=True)
    dq = KernelConfig(16, 32, 1, 1) if device.type == "cpu" else KernelConfig(64, 32, 4, 2)
    with override_one_launch(True), override_configs(dkdv=dkdv, dq=dq):
        check_batch(2, 97, 97, 4, 2, 80, torch.bfloat16, device, causal=True, dlse=True)
        check_batch(1, 100, 77, 2, 1, 32, torch.float16, device, causal=True, window=(40, -1))
        check_batch(1, 65, 130, 2, 2, 32, torch.float16, device)
        cu = torch.tensor([0, 5, 5, 46, 70], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(74, 4, 32, dtype=torch.float16, device=device) for _ in range(3))
        check_against_oracle(
            lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 41, 41, causal=True, return_lse=True),
            lambda q, k, v: attention_ref(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), [q, k, v])


def test_one_launch_gradients_equal_two_launches(device):
    # the same programs in one grid or two: bit-identical gradients (no atomics either way)
    q, k, v = make_qkv(1, 70, 70, 2, 1, 32, torch.float16, device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn_like(q)
    grads = []
    for one in (False, True):
        with override_one_launch(one):
            grads.append(torch.autograd.grad(flash_attn_func(q, k, v, causal=True), (q, k, v), dout))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_one_launch_rule(monkeypatch):
    # one launch on Hopper for small grids (<= ONE_LAUNCH_MAX_WAVES waves) when the passes' warps and
    # stages agree; never on CPU or in fp32; the override wins
    import kernels.launch as launch
    monkeypatch.setattr(launch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(launch, "_num_sms", lambda index: 132)
    cuda, a, b = torch.device("cuda", 0), KernelConfig(64, 128, 8, 3, counted=True), KernelConfig(128, 64, 8, 3)
    limit = launch.ONE_LAUNCH_MAX_WAVES * 132
    assert launch.use_one_launch(a, b, limit, torch.bfloat16, cuda)
    assert not launch.use_one_launch(a, b, limit + 1, torch.bfloat16, cuda)
    assert not launch.use_one_launch(a, KernelConfig(128, 64, 8, 2), 100, torch.bfloat16, cuda)
    assert not launch.use_one_launch(a, KernelConfig(128, 64, 4, 3), 100, torch.bfloat16, cuda)
    assert not launch.use_one_launch(a, b, 100, torch.float32, cuda)
    assert not launch.use_one_launch(a, b, 100, torch.bfloat16, torch.device("cpu"))
    with override_one_launch(True):
        assert launch.use_one_launch(a, b, limit + 1, torch.bfloat16, torch.device("cpu"))


@triton.jit
def _cast_kernel(X, Y, N: tl.constexpr, PRECISION: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(Y + offs, _cast(tl.load(X + offs), Y.dtype.element_ty, PRECISION))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")   # the interpreter's numpy, -3e38 -> fp16 -inf
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_casts_round_to_nearest(dtype, device):
    # the kernels' fp32 -> input-dtype casts (P before P @ V, dS, the stored outputs) round to nearest even, as
    # torch and the GPU do; Triton 3.6's interpreter truncates to bf16, so kernels/flash_fwd.py's _cast rounds
    # by hand there (PRECISION "upcast"): ties, signs, tiny and huge values
    x = torch.cat([torch.randn(2000) * 10, torch.rand(2000) * 3 + 1,
                   torch.tensor([0.0, -0.0, 1.0, 1.00390625, 1.01171875, -1.00390625, 1e-30, -3e38, 65504.0])])
    x = torch.nn.functional.pad(x, (0, 4096 - x.numel())).to(device)
    y = torch.empty(4096, dtype=dtype, device=device)
    _cast_kernel[(1,)](x, y, N=4096, PRECISION=launch_module._precision(dtype))
    assert torch.equal(y, x.to(dtype))


def test_short_sequence_rule(monkeypatch):
    # _SM90_SHORT: d64's dQ pass takes 64-row tiles up to 16K tokens causal and 4K unmasked, asked for with a
    # seqlen (attn_bwd gives one only beside the Gluon dK/dV kernel); longer sequences, no seqlen, d128 and
    # other passes keep the table
    import kernels.launch as launch
    monkeypatch.setattr(launch, "_capability", lambda index: (9, 0))
    cuda, short = torch.device("cuda", 0), KernelConfig(64, 64, 4, 3)
    for causal, longest in ((True, 16384), (False, 4096)):
        table = launch.get_config("dq", 64, torch.bfloat16, cuda, causal)
        assert table != short
        assert launch.get_config("dq", 64, torch.float16, cuda, causal, 1024) == short
        assert launch.get_config("dq", 64, torch.bfloat16, cuda, causal, longest) == short
        assert launch.get_config("dq", 64, torch.bfloat16, cuda, causal, 2 * longest) == table
        assert launch.get_config("dq", 128, torch.bfloat16, cuda, causal, 1024) == launch.get_config(
            "dq", 128, torch.bfloat16, cuda, causal)
        assert launch.get_config("dkdv", 64, torch.bfloat16, cuda, causal, 1024) == launch.get_config(
            "dkdv", 64, torch.bfloat16, cuda, causal)
    with override_configs(dq=KernelConfig(128, 32, 4, 3)):
        assert launch.get_config("dq", 64, torch.bfloat16, cuda, True, 1024) == KernelConfig(128, 32, 4, 3)


def test_tma_forward_rule(monkeypatch):
    # _SM90_TMA_FWD: on Hopper, d64 takes the TMA forward up to 4K tokens causal (64x64 tiles) and 2K unmasked
    # (128x64); not longer, not d128, not fp32, not another GPU, not under forced forward tiles; the override
    # turns it on everywhere (launch table's tiles) or off. The rule as measured, with the Triton it was measured
    # on (with another one it picks nothing: tests/test_dispatch.py)
    import kernels.launch as launch
    from kernels.dispatch import TESTED_TRITON
    monkeypatch.setattr(triton, "__version__", "%d.%d.0" % min(TESTED_TRITON["TMA forward by default"]))
    monkeypatch.setattr(launch, "_capability", lambda index: (9, 0))
    cuda, bf16 = torch.device("cuda", 0), torch.bfloat16
    assert launch.tma_fwd_config(cuda, torch.float16, 64, True, 1024) == KernelConfig(64, 64, 4, 2)
    assert launch.tma_fwd_config(cuda, bf16, 64, True, 4096) == KernelConfig(64, 64, 4, 2)
    assert launch.tma_fwd_config(cuda, bf16, 64, True, 8192) is None
    assert launch.tma_fwd_config(cuda, bf16, 64, False, 2048) == KernelConfig(128, 64, 8, 3)
    assert launch.tma_fwd_config(cuda, bf16, 64, False, 4096) is None
    assert launch.tma_fwd_config(cuda, bf16, 128, True, 1024) is None
    assert launch.tma_fwd_config(cuda, torch.float32, 64, True, 1024) is None
    assert launch.tma_fwd_config(torch.device("cpu"), bf16, 64, True, 1024) is None
    with override_configs(fwd=KernelConfig(64, 32, 4, 2)):
        assert launch.tma_fwd_config(cuda, bf16, 64, True, 1024) is None
        with override_tma_fwd(True):
            assert launch.tma_fwd_config(cuda, bf16, 128, True, 65536) == KernelConfig(64, 32, 4, 2)
    with override_tma_fwd(False):
        assert launch.tma_fwd_config(cuda, bf16, 64, True, 1024) is None
    monkeypatch.setattr(launch, "_capability", lambda index: (8, 0))
    assert launch.tma_fwd_config(cuda, bf16, 64, True, 1024) is None


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,tiles", [((2, 128, 2, 2, 64), None), ((1, 256, 4, 2, 128), None),
                                         ((1, 96, 2, 1, 64), KernelConfig(32, 16, 4, 2))])   # (B, N, H, Hk, D)
def test_tma_forward(shape, tiles, dtype, causal, device, monkeypatch):
    # kernels/flash_fwd_tma.py (forced here: override_tma_fwd): dense whole-tile inputs with Q/K/V tiles loaded by
    # TMA descriptors; output, LSE and the gradients through them against the float64 oracle, and the kernel must
    # have run. GQA in the second shape; the third has three query blocks (forced tiles): the folded causal
    # grid (ceil(3 / 2) programs) must still give the middle block to one program
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or later")
    calls = []
    real = flash_fwd_tma.attn_fwd
    monkeypatch.setattr(flash_fwd_tma, "attn_fwd", lambda *args: (calls.append(1), real(*args))[1])
    B, N, H, Hk, D = shape
    with override_tma_fwd(True), override_gluon("dkdv"), override_configs(**({"fwd": tiles} if tiles else {})):
        check_batch(B, N, N, H, Hk, D, dtype, device, causal=causal)
    assert calls


def test_tma_forward_scope(device):
    # what the TMA forward leaves to the pointer-load one: varlen, windows, Nq != Nk, ragged tiles, other head
    # dims, fp32, a tile pair whose query tile is not a whole number of key tiles
    q, k, v = make_qkv(1, 128, 128, 2, 2, 64, torch.float16, device)
    if device.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        assert not flash_fwd_tma.supported(q, k, v, -1, 0, False, 64, 32)
        pytest.skip("TMA needs Hopper or later")
    assert flash_fwd_tma.supported(q, k, v, -1, 0, False, 64, 32)
    assert flash_fwd_tma.supported(q, k, v, -1, -1, False, 128, 64)
    assert not flash_fwd_tma.supported(q, k, v, -1, 0, True, 64, 32)
    assert not flash_fwd_tma.supported(q, k, v, 16, 0, False, 64, 32)
    assert not flash_fwd_tma.supported(q, k, v, -1, 8, False, 64, 32)
    assert not flash_fwd_tma.supported(q, k, v, -1, 0, False, 32, 64)
    q2, k2, v2 = make_qkv(1, 96, 96, 2, 2, 64, torch.float16, device)
    assert not flash_fwd_tma.supported(q2, k2, v2, -1, 0, False, 64, 32)
    q3, k3, v3 = make_qkv(1, 128, 256, 2, 2, 64, torch.float16, device)
    assert not flash_fwd_tma.supported(q3, k3, v3, -1, 0, False, 64, 32)
    q4, k4, v4 = make_qkv(1, 128, 128, 2, 2, 80, torch.float16, device)
    assert not flash_fwd_tma.supported(q4, k4, v4, -1, 0, False, 64, 32)
    q5, k5, v5 = make_qkv(1, 128, 128, 2, 2, 64, torch.float32, device)
    assert not flash_fwd_tma.supported(q5, k5, v5, -1, 0, False, 64, 32)
    # a head-sliced view reads as a strided (B * N, H * D) matrix; a sequence-sliced batch does not
    q6 = torch.randn(1, 128, 4, 64, dtype=torch.float16, device=device)[:, :, :2]
    assert flash_fwd_tma.supported(q6, k, v, -1, 0, False, 64, 32)
    q7, k7, v7 = (t[:, :128] for t in make_qkv(2, 256, 256, 2, 2, 64, torch.float16, device))
    assert not flash_fwd_tma.supported(q7, k7, v7, -1, 0, False, 64, 32)
    # under the override the pointer-load forward still takes what is out of scope, with the same results
    with override_tma_fwd(True), override_gluon("dkdv"):
        check_batch(1, 96, 96, 2, 2, 64, torch.float16, device, causal=True)


def _varlen_case(doc_lens_q, doc_lens_k, H, Hk, D, dtype, device, causal, window=(-1, -1), extra_rows=0):
    cu_q = torch.tensor([0] + doc_lens_q, device=device).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + doc_lens_k, device=device).cumsum(0).to(torch.int32)
    tq, tk = sum(doc_lens_q) + extra_rows, sum(doc_lens_k) + extra_rows
    q = torch.randn(tq, H, D, dtype=dtype, device=device)
    k = torch.randn(tk, Hk, D, dtype=dtype, device=device)
    v = torch.randn(tk, Hk, D, dtype=dtype, device=device)
    mq, mk = max(doc_lens_q), max(doc_lens_k)
    check_against_oracle(
        lambda q, k, v: flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, causal=causal,
                                               window_size=window, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, window_size=window,
                                      cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), [q, k, v])


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_with_empty_and_single_token_docs(causal, device):
    _varlen_case([5, 0, 1, 40, 17], [5, 0, 1, 40, 17], 4, 2, 64, torch.bfloat16, device, causal)


def test_varlen_q_k_lengths_differ_and_window(device):
    _varlen_case([3, 30, 0, 9], [10, 21, 4, 9], 2, 1, 32, torch.float16, device, True, window=(6, -1))


def test_varlen_rows_after_last_document(device):
    _varlen_case([7, 20], [7, 20], 2, 2, 32, torch.float16, device, True, extra_rows=5)


def test_varlen_documents_do_not_attend_across(device):
    # changing document 0 must leave document 1's output untouched
    q, k, v = (torch.randn(50, 2, 32, dtype=torch.float16, device=device) for _ in range(3))
    cu = torch.tensor([0, 20, 50], dtype=torch.int32, device=device)
    out1 = flash_attn_varlen_func(q, k, v, cu, cu, 30, 30, causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[:20] += 1.0
    v2[:20] -= 1.0
    out2 = flash_attn_varlen_func(q, k2, v2, cu, cu, 30, 30, causal=True)
    assert torch.equal(out1[20:], out2[20:])
    assert not torch.equal(out1[:20], out2[:20])


@pytest.mark.parametrize("varlen", [False, True], ids=["batch", "varlen"])
def test_backward_from_kept_output_matches_autograd(varlen, device):
    # flash_attn_backward (selective checkpointing's entry point) gives exactly the op's own gradients
    q, k, v = make_qkv(2, 37, 37, 4, 2, 32, torch.bfloat16, device)
    kw = dict(causal=True, window_size=(11, 0))
    if varlen:
        cu = torch.tensor([0, 9, 9, 50, 74], dtype=torch.int32, device=device)
        q, k, v = (t.reshape(74, *t.shape[2:]) for t in (q, k, v))
        kw |= dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=41, max_seqlen_k=41)
    fn = flash_attn_varlen_func if varlen else flash_attn_func
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*leaves, return_lse=True, **kw)
    dout = torch.randn_like(out)
    out.backward(dout)
    got = flash_attn_backward(dout, q, k, v, out.detach(), lse.detach(), **kw)
    for g, leaf in zip(got, leaves):
        assert torch.equal(g, leaf.grad)
    # the LSE as a strided view into a larger buffer (a kept forward's, sliced) gives the same gradients
    wide = torch.full((*lse.shape[:-1], lse.shape[-1] + 23), 5.0, device=device)
    wide[..., :lse.shape[-1]] = lse.detach()
    got = flash_attn_backward(dout, q, k, v, out.detach(), wide[..., :lse.shape[-1]], **kw)
    for g, leaf in zip(got, leaves):
        assert torch.equal(g, leaf.grad)
    with pytest.raises(ValueError, match="dout must have q's shape"):
        flash_attn_backward(dout[..., :16], q, k, v, out.detach(), lse.detach(), **kw)
    with pytest.raises(ValueError, match="lse must have shape"):   # e.g. the other layout's, or a row short
        flash_attn_backward(dout, q, k, v, out.detach(), lse.detach()[..., :-1], **kw)


def test_non_contiguous_inputs(device):
    # q, k, v sliced out of one packed qkv projection, as a model produces them
    qkv = torch.randn(2, 45, 3, 4, 32, dtype=torch.float16, device=device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    check_against_oracle(
        lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
        lambda q, k, v: attention_ref(q, k, v, causal=True), [q, k, v])


def test_deterministic(device):
    q, k, v = make_qkv(1, 70, 70, 4, 1, 32, torch.bfloat16, device)
    dout = torch.randn_like(q)
    runs = [_grads(lambda *t: flash_attn_func(*t, causal=True, return_lse=True), [q, k, v], dout, None)
            for _ in range(2)]
    for a, b in zip(runs[0][2], runs[1][2]):
        assert torch.equal(a, b)


def test_empty_sequences(device):
    q, k, v = make_qkv(2, 0, 9, 2, 2, 32, torch.float16, device)
    assert flash_attn_func(q, k, v).shape == (2, 0, 2, 32)
    q, k, v = make_qkv(1, 5, 0, 2, 2, 32, torch.float16, device)
    out, lse = flash_attn_func(q, k, v, return_lse=True)
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


# ---- the pure-PyTorch blockwise path (CPU training without a GPU) meets the same criterion ----

@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (True, (9, -1)),
                                           (False, (5, 7))])
def test_reference_blockwise_path(causal, window):
    from kernels.mask import normalize_window
    left, right = normalize_window(causal, window)
    inputs = make_qkv(2, 70, 90, 4, 2, 40, torch.bfloat16, "cpu")
    check_against_oracle(
        lambda q, k, v: blockwise_attention(q, k, v, 40 ** -0.5, left, right, block=32),
        lambda q, k, v: attention_ref(q, k, v, causal=causal, window_size=window), inputs, dlse=True)


def test_reference_blockwise_varlen():
    cu = torch.tensor([0, 3, 3, 40, 41], dtype=torch.int32)
    q, k, v = (torch.randn(41, 2, 32, dtype=torch.float16) for _ in range(3))
    check_against_oracle(
        lambda q, k, v: blockwise_attention(q, k, v, 32 ** -0.5, -1, 0, cu, cu, block=16),
        lambda q, k, v: attention_ref(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu), [q, k, v])


def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.setattr(flash_attn_module, "INTERPRET", False)
    calls = []
    real = flash_attn_module.blockwise_attention
    monkeypatch.setattr(flash_attn_module, "blockwise_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = make_qkv(1, 20, 20, 2, 2, 32, torch.float32, "cpu")
    out = flash_attn_func(q, k, v, causal=True)
    assert calls and torch.allclose(out, attention_ref(q, k, v, causal=True)[0], atol=1e-5)


# ---- bad input: a clear error naming the argument, before any work ----

def _bad(device, **over):
    args = dict(q=torch.randn(2, 8, 4, 32, device=device, dtype=torch.float16),
                k=torch.randn(2, 8, 2, 32, device=device, dtype=torch.float16),
                v=torch.randn(2, 8, 2, 32, device=device, dtype=torch.float16))
    args.update(over)
    return args


@pytest.mark.parametrize("case,exc,match", [
    ("rank", ValueError, "q must have 4 dims"),
    ("batch", ValueError, "batch size"),
    ("dtype", TypeError, "k must have q's dtype"),
    ("heads", ValueError, "multiple of nheads of k/v"),
    ("headdim", ValueError, "head dim must be a multiple of 8"),
    ("headdim_big", ValueError, "head dim must be a multiple of 8"),
    ("kv_shape", ValueError, "v must have k's shape"),
    ("float64", TypeError, "q must be float16, bfloat16 or float32"),
    ("window", ValueError, "window_size"),
    ("scale", ValueError, "softmax_scale"),
    ("not_tensor", TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_raises(case, exc, match, device):
    h = torch.float16
    over = {
        "rank": dict(q=torch.randn(8, 4, 32, dtype=h, device=device)),
        "batch": dict(k=torch.randn(3, 8, 2, 32, dtype=h, device=device),
                      v=torch.randn(3, 8, 2, 32, dtype=h, device=device)),
        "dtype": dict(k=torch.randn(2, 8, 2, 32, dtype=torch.bfloat16, device=device)),
        "heads": dict(k=torch.randn(2, 8, 3, 32, dtype=h, device=device),
                      v=torch.randn(2, 8, 3, 32, dtype=h, device=device)),
        "headdim": {k: torch.randn(2, 8, n, 36, dtype=h, device=device) for k, n in zip("qkv", (4, 2, 2))},
        "headdim_big": {k: torch.randn(1, 2, 1, 264, dtype=h, device=device) for k in "qkv"},
        "kv_shape": dict(v=torch.randn(2, 9, 2, 32, dtype=h, device=device)),
        "float64": {k: torch.randn(2, 8, 2, 32, dtype=torch.float64, device=device) for k in "qkv"},
        "window": dict(window_size=(-2, 0)),
        "scale": dict(softmax_scale=-1.0),
        "not_tensor": dict(q=[[1.0]]),
    }[case]
    args = _bad(device)
    args.update(over)
    with pytest.raises(exc, match=match):
        flash_attn_func(**args)


@pytest.mark.parametrize("case,exc,match", [
    ("int64", TypeError, "cu_seqlens_q must be int32"),
    ("decreasing", ValueError, "cu_seqlens_k must be non-decreasing"),
    ("start", ValueError, "must start at 0"),
    ("overflow", ValueError, "exceeds the 10 rows"),
    ("max_seqlen", ValueError, "max_seqlen_q = 3 is smaller than the longest document"),
    ("lengths", ValueError, "same length"),
])
def test_bad_varlen_input_raises(case, exc, match, device):
    q = k = v = torch.randn(10, 2, 32, dtype=torch.float16, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    cu_q, cu_k, mq = torch.tensor([0, 4, 10], **i32), torch.tensor([0, 4, 10], **i32), 6
    if case == "int64":
        cu_q = cu_q.long()
    elif case == "decreasing":
        cu_k = torch.tensor([0, 6, 4], **i32)
    elif case == "start":
        cu_q = torch.tensor([1, 4, 10], **i32)
    elif case == "overflow":
        cu_q = torch.tensor([0, 4, 11], **i32)
    elif case == "max_seqlen":
        mq = 3
    elif case == "lengths":
        cu_k = torch.tensor([0, 10], **i32)
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, 6)


# ---- GPU only: memory is O(N) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_memory_is_linear_in_sequence_length():
    # fwd+bwd at 32K tokens: an N x N fp32 buffer per head would be 4 GiB; we allow ~the I/O tensors
    q, k, v = (torch.randn(1, 32768, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    flash_attn_func(q, k, v, causal=True).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    io_bytes = q.numel() * q.element_size()
    assert extra < 8 * io_bytes, f"peak extra memory {extra / 2**20:.0f} MiB"


def test_torch_compile_traces_the_op_in_one_graph(device):
    # the kernels are torch.library operators: torch.compile (fullgraph) must trace fwd and bwd without breaking
    q, k, v = (t.requires_grad_() for t in make_qkv(1, 40, 40, 4, 2, 32, torch.float16, device))
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), backend=backend,
                             fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = flash_attn_func(q, k, v, causal=True)
    ref.sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))


def test_cu_seqlens_checked_again_after_in_place_change(device):
    # the offsets are read back once per tensor version; an in-place edit must be checked anew
    q = k = v = torch.randn(10, 2, 32, dtype=torch.float16, device=device)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=device)
    flash_attn_varlen_func(q, k, v, cu, cu, 6, 6)
    flash_attn_varlen_func(q, k, v, cu, cu, 6, 6)
    cu[1] = 11
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen_func(q, k, v, cu, cu, 6, 6)


needs_ptxas = pytest.mark.skipif(not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists(),
                                 reason="this Triton has no bundled ptxas")


def kernel_report(*args):
    """scripts/kernel_report.py run without the interpreter: (the completed process, its last JSON row or None)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/kernel_report.py"), *args],
                         capture_output=True, text=True, env=env, timeout=600)
    rows = out.stdout.strip().splitlines() if out.returncode == 0 and "--json" in args else []
    return out, json.loads(rows[-1]) if rows else None


@needs_ptxas
def test_kernel_report_compiles_for_hopper():
    # scripts/kernel_report.py compiles for sm_90a without a GPU: the counted dK/dV loop at d128 runs its
    # wgmma unserialized (a few waits, not one per HGMMA) and the report reads registers and spills
    out, r = kernel_report("--dims", "128", "--causal", "0", "--passes", "dkdv", "--config", "dkdv=64,128,8,3,counted",
                           "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert r["pass_name"] == "dkdv" and r["config"]["counted"] and 0 < r["registers"] <= 255
    assert not r["serialized_wgmma"] and r["hgmma"] > 0 and r["depbar"] < r["hgmma"]
    bad, _ = kernel_report("--config", "dkdv=64,128")
    assert bad.returncode == 2 and "--config 'dkdv=64,128': expected PASS=BLOCK_M,BLOCK_N,WARPS,STAGES" in bad.stderr


@needs_ptxas
def test_kernel_report_compiles_the_tma_forward():
    # kernels/flash_fwd_tma.py (no GPU run yet) compiles for sm_90a with TMA descriptors for its arguments, its
    # wgmma unserialized and nothing spilled, at the tutorial's 64x64 tiles
    out, r = kernel_report("--dims", "64", "--causal", "1", "--passes", "fwd_tma", "--config", "fwd=64,64,4,2", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert r["pass_name"] == "fwd_tma" and r["config"]["BLOCK_M"] == 64 and 0 < r["registers"] <= 255
    assert not r["serialized_wgmma"] and r["hgmma"] > 0 and r["spill_stores"] == r["spill_loads"] == 0


def test_bench_kernel_times_labels_repeated_launches():
    # scripts/bench_attention.py --profile-seqlens: a kernel launched twice per step (our two-launch
    # backward) is reported per launch, in launch order
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_attention import kernel_times
    from types import SimpleNamespace as NS

    def ev(name, start, us, device=torch.autograd.DeviceType.CUDA):
        return NS(name=name, device_type=device, time_range=NS(start=start, elapsed_us=lambda: us))
    events = []
    for step in range(2):
        t = step * 100
        events += [ev("_attn_fwd", t, 2.0), ev("_attn_bwd_preprocess", t + 10, 0.5), ev("_attn_bwd", t + 20, 6.0),
                   ev("_attn_bwd", t + 40, 4.0), ev("aten::copy_", t + 50, 9.0, torch.autograd.DeviceType.CPU)]
    times = kernel_times(list(reversed(events)), steps=2)
    assert times == pytest.approx({"_attn_fwd": 0.002, "_attn_bwd_preprocess": 0.0005,
                                   "_attn_bwd#0": 0.006, "_attn_bwd#1": 0.004})


def test_bench_host_profile_sees_a_custom_backward(monkeypatch):
    # make bench ARGS="--host-overhead --host-profile": the profile covers the forward and the backward of an
    # autograd.Function, sorted by own time. On CUDA the backward would run on autograd's device thread, out of
    # the profiler's sight: the profiled steps turn autograd's threads off (on the CPU there are none anyway,
    # so the call itself is what is checked)
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_attention

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q):
            return q * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    def setup(fn, layout, B, N, H, D, mode, dtype=torch.bfloat16):
        q = torch.randn(B, N, H, D, requires_grad=True)
        return (lambda: fn(q, q, q).sum().backward()), (q,)

    monkeypatch.setattr(bench_attention, "_setup", setup)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    threading = []
    real_setting = torch.autograd.set_multithreading_enabled

    def setting(mode):
        threading.append(mode)
        return real_setting(mode)

    monkeypatch.setattr(torch.autograd, "set_multithreading_enabled", setting)
    text = bench_attention.host_profile(lambda q, k, v: Twice.apply(q), "bnhd", 1, 8, 1, 4, steps=7)
    assert threading == [False]
    assert "Ordered by: internal time" in text
    own = [line for line in text.splitlines() if "test_kernels.py" in line]
    assert any(line.split()[0] == "7" and "(backward)" in line for line in own), text
    assert any(line.split()[0] == "7" and "(forward)" in line for line in own), text


def test_bench_repeats_table_and_variant_providers():
    # make bench ARGS="--repeats 3": the table is the median and +- half the spread per provider and
    # point; "ours_2launch+dkdv=..." providers time launch-table candidates in the same run
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_attention import make_providers, print_table, variant
    rows = [dict(D=128, causal=True, N=16384, provider=p, mode="fwd_bwd", rep=r, ms=1.0, tflops=tf, peak_gib=0.25)
            for p, tfs in (("ours", (390.0, 410.0, 400.0)), ("flex", (380.0,))) for r, tf in enumerate(tfs)]
    lines = []
    print_table(rows, dict(gpu="H100", torch="x", triton="y"), lines.append)
    assert "| 128 | 1 | 16384 | 400±10 | 380 |" in lines[-1]
    layout, fn = make_providers(True, 64, False, variants=["ours_2launch+dkdv=64,128,8,2,counted"])[
        "ours_2launch+dkdv=64,128,8,2,counted"]
    assert layout == "bnhd" and callable(fn.context)
    for bad in ("ours+", "theirs+dkdv=64,128,8,2", "ours+dkdv=64,128,8", "ours_2launch+ws=64,3", "ours+ws=64",
                "ours+ws=64,3+dkdv=64,128,8,2", "ours_atomic+dkdv=64,128,8,2"):
        with pytest.raises(ValueError, match="expected"):
            variant(bad, True)
    # the Gluon kernels' launch candidates: forced while the provider runs, restored after
    from kernels import flash_bwd_hopper, flash_fwd_hopper
    _, fn = variant("ours+wsf=64,4+ws=32,4", True)
    with fn.context():
        assert (flash_fwd_hopper.launch_config(128), flash_bwd_hopper.launch_config(128)) == ((64, 4), (32, 4))
    assert (flash_fwd_hopper.launch_config(128), flash_bwd_hopper.launch_config(128)) == ((128, 3), (64, 2))
    _, fn = variant("ours_atomic+ws=64,3", True)   # deterministic=False: the fused backward's candidates
    with fn.context():
        assert flash_bwd_hopper.launch_config(128) == (64, 3)
    # the TMA forward (kernels/flash_fwd_tma.py) forced with a forward candidate; the Gluon forward's candidates
    # with the TMA forward off (it would take d64 up to 4K first)
    import kernels.launch as launch
    _, fn = variant("ours_tma+fwd=64,64,4,2", True)
    with fn.context():
        assert launch.active().tma_fwd is True
        assert launch.get_config("fwd", 64, torch.float16, torch.device("cuda"), True) == KernelConfig(64, 64, 4, 2)
    assert launch.active().tma_fwd is None
    _, fn = variant("ours+wsf=64,4", True)
    with fn.context():
        assert launch.active().tma_fwd is False
    assert launch.active().tma_fwd is None
    providers = make_providers(True, 64, False)
    assert callable(providers["ours_tma"][1].context) and callable(providers["ours_notma"][1].context)
    with pytest.raises(ValueError, match="expected"):
        variant("ours_tma+ws=64,3", True)


def test_bench_tutorial_provider(tmp_path, monkeypatch, capsys):
    # make bench ARGS="--dtype float16 --tutorial PATH --providers ours tutorial ...": the Triton tutorial's
    # attention(q, k, v, causal, sm_scale), imported from a file outside our tree (a stand-in here); refused
    # before any work without fp16, without the file or without the provider
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_attention
    stub = tmp_path / "fused_attention.py"
    stub.write_text("calls = []\n\n\ndef attention(q, k, v, causal, sm_scale, warp_specialize=True):\n"
                    "    calls.append((causal, sm_scale, warp_specialize))\n    return q\n")
    attention = bench_attention.load_tutorial(stub)
    providers = bench_attention.make_providers(True, 64, False, tutorial=attention)
    q = torch.zeros(1, 2, 8, 64)
    for name in ("tutorial", "tutorial_nows"):
        layout, fn = providers[name]
        assert layout == "bhnd" and fn(q, q, q) is q
    assert attention.__globals__["calls"] == [(True, 0.125, True), (True, 0.125, False)]
    assert "tutorial" not in bench_attention.make_providers(True, 64, False)
    with pytest.raises(ValueError, match="no such file"):
        bench_attention.load_tutorial(tmp_path / "missing.py")
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="attention"):
        bench_attention.load_tutorial(tmp_path / "other.py")
    for argv, message in ((["--providers", "ours", "tutorial"], "needs --tutorial"),
                          (["--tutorial", str(stub), "--providers", "tutorial"], "fp16 only"),
                          (["--providers", "tutorial_nows"], "needs --tutorial"),
                          (["--dtype", "float16", "--tutorial", str(stub)], "is in --providers"),
                          (["--dtype", "float16", "--tutorial", str(tmp_path / "none.py"), "--providers", "tutorial"],
                           "no such file")):
        monkeypatch.setattr(sys, "argv", ["bench_attention.py", *argv])
        with pytest.raises(SystemExit):
            bench_attention.main()
        assert message in capsys.readouterr().err


def test_document_bounds_per_token():
    # kernels/mask.py document_bounds against a loop over the documents: row-relative starts and ends, a document
    # cut at a row start (the loader puts a boundary there), trailing empty documents (bucket padding)
    from kernels.mask import document_bounds
    B, T = 3, 16
    cu = torch.tensor([0, 5, 16, 20, 37, 48, 48, 48], dtype=torch.int32)
    start, end = document_bounds(cu, B, T)
    want_start, want_end = [], []
    for t in range(B * T):
        d = max(i for i in range(len(cu) - 1) if cu[i] <= t < cu[i + 1])
        row0 = t // T * T
        want_start.append(max(int(cu[d]), row0) - row0)
        want_end.append(min(int(cu[d + 1]), row0 + T) - row0)
    assert start.dtype == end.dtype == torch.int32
    assert start.tolist() == want_start and end.tolist() == want_end
    assert start.tolist()[32:37] == [0, 0, 0, 0, 0] and end.tolist()[36] == 5   # row 2: [32, 37) then [37, 48)
