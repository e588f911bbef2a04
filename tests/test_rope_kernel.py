"""The RoPE-on-QKV Triton kernel (kernels/rope.py) against model/rope.py's apply_rope in float64:
q, k, v and the gradient of the packed projection, on random shapes (odd lengths, GQA, broadcast and
per-row tables). On CPU the kernel runs in Triton's interpreter (tests/conftest.py)."""
import pytest
import torch

from kernels.rope import rope_qkv
from model.rope import RotaryEmbedding, apply_rope


def reference(qkv, cos, sin, H, Hk):
    B, T, width = qkv.shape
    D = width // (H + 2 * Hk)
    q, k, v = qkv.split([H * D, Hk * D, Hk * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, Hk, D), v.view(B, T, Hk, D)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def tables(B, T, D, device, per_row, generator):
    rope = RotaryEmbedding(D, 4 * T, theta=10000.0)
    if per_row:   # gathered positions, as with packed documents: a (B, T, D) table per row
        return rope(torch.randint(0, 4 * T, (B, T), generator=generator).to(device))
    return rope.prefix(B, T, device)   # rows start at 0: one table broadcast (stride 0) over the batch


def run(fn, qkv, cos, sin, H, Hk, grads):
    x = qkv.detach().clone().requires_grad_()
    outs = fn(x, cos, sin, H, Hk)
    sum(((o.double() * g.double()).sum() for o, g in zip(outs, grads))).backward()
    return [o.detach() for o in outs], x.grad


@pytest.mark.parametrize("B,T,H,Hk,D,per_row", [
    (1, 1, 1, 1, 8, False), (2, 37, 3, 1, 16, True), (1, 130, 4, 2, 64, False), (3, 65, 2, 2, 32, True),
    (1, 19, 6, 3, 24, False),   # head_dim/2 = 12, not a power of two
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rope_qkv_matches_reference(B, T, H, Hk, D, per_row, dtype, device):
    g = torch.Generator().manual_seed(B * 1000 + T * 10 + D)
    cos, sin = tables(B, T, D, device, per_row, g)
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(device, dtype)
    grads = [torch.randn(B, T, n, D, generator=g).to(device, dtype) for n in (H, Hk, Hk)]
    got, got_grad = run(rope_qkv, qkv, cos, sin, H, Hk, grads)
    ref, ref_grad = run(reference, qkv.double(), cos.double(), sin.double(), H, Hk, [t.double() for t in grads])
    low, low_grad = run(reference, qkv, cos, sin, H, Hk, grads)   # the reference in the input's dtype
    assert got_grad.dtype == dtype and got_grad.shape == qkv.shape
    for name, a, r, lo in zip(["q", "k", "v", "dqkv"], [*got, got_grad], [*ref, ref_grad], [*low, low_grad]):
        assert a.shape == r.shape and a.dtype == dtype and a.is_contiguous(), name
        err, base = (a.double() - r).abs().max().item(), (lo.double() - r).abs().max().item()
        # fp32 products summed with or without a fused multiply-add may round to neighbouring values: one ulp
        ulp = torch.finfo(dtype).eps * r.abs().max().item()
        assert err <= 2 * base + ulp, f"{name}: error {err:.3g} vs the reference in {dtype}: {base:.3g}"
        if dtype == torch.bfloat16:
            # fp32 math rounded to nearest like the GPU and torch, also under the interpreter (whose fp32 -> bf16
            # cast truncates): the exact result rounded, but where fp32 arithmetic lands next to a boundary
            misses = (a != r.to(dtype)).sum().item()
            assert misses <= max(1, a.numel() // 100), f"{name}: {misses} of {a.numel()} not the rounded result"
    torch.testing.assert_close(got[2], qkv[..., (H + Hk) * D:].reshape(B, T, Hk, D), rtol=0, atol=0)


def test_rope_qkv_strided_input(device):
    # a projection output seen through a slice (last dim contiguous, rows strided) reads as its copy
    g = torch.Generator().manual_seed(7)
    B, T, H, Hk, D = 2, 21, 2, 1, 16
    cos, sin = tables(B, T, D, device, False, g)
    wide = torch.randn(B, T, (H + 2 * Hk) * D + 8, generator=g).to(device)
    qkv = wide[..., 8:]
    for a, b in zip(rope_qkv(qkv, cos, sin, H, Hk), rope_qkv(qkv.contiguous(), cos, sin, H, Hk)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(H=3), "n_head=3"),
    (dict(cos_T=5), "cos must be"),
    (dict(qkv_dim=2), "qkv must be"),
])
def test_rope_qkv_rejects_bad_shapes(bad, match, device):
    B, T, H, Hk, D = 1, 8, 2, 1, 8
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, device=device)
    if bad.get("qkv_dim") == 2:
        qkv = qkv[0]
    cos = torch.ones(1, bad.get("cos_T", T), D, device=device)
    with pytest.raises(ValueError, match=match):
        rope_qkv(qkv, cos, torch.zeros_like(cos), bad.get("H", H), Hk)


def test_rope_qkv_compiles_as_one_opaque_op(device):
    # torch.compile sees the forward and backward as ops with known output shapes (register_fake), no graph break
    g = torch.Generator().manual_seed(3)
    B, T, H, Hk, D = 1, 24, 2, 2, 16
    cos, sin = tables(B, T, D, device, False, g)
    qkv = torch.randn(B, T, (H + 2 * Hk) * D, generator=g).to(device)
    grads = [torch.randn(B, T, n, D, generator=g).to(device) for n in (H, Hk, Hk)]
    torch._dynamo.reset()
    compiled = torch.compile(rope_qkv, backend="aot_eager", fullgraph=True)
    (got, got_grad), (ref, ref_grad) = (run(fn, qkv, cos, sin, H, Hk, grads) for fn in (compiled, rope_qkv))
    for a, b in zip([*got, got_grad], [*ref, ref_grad]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
