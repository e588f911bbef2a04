"""kernels/dispatch.py: launches looked up by the caller's key, which must name the JIT's own compiled kernel.

On a GPU the whole suite runs with the check on (tests/conftest.py), so every cached launch of the attention
op is compared with the JIT's choice; here a small kernel shows the cache's behaviour by itself.
"""
import pytest
import torch
import triton
import triton.language as tl

from kernels import dispatch
from kernels.dispatch import Cached


@triton.jit
def _scale_add_one(X, Y, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask) * alpha + 1.0, mask=mask)


def _run(launch, key, x, alpha, block=32):
    y = torch.empty_like(x)
    launch(key, (triton.cdiv(x.numel(), block),), x, y, x.numel(), alpha, BLOCK=block)
    return y


def test_each_key_runs_its_own_kernel(device):
    # lengths with different specializations (64: a multiple of 16; 63 and 200: not) and a different
    # constexpr under one key: each call computes its own result, cached or not
    launch = Cached(_scale_add_one)
    for n, alpha, block in ((64, 3.0, 32), (63, -1.0, 32), (64, 0.5, 32), (200, 2.0, 32), (200, 2.0, 64)):
        x = torch.randn(n, device=device)
        torch.testing.assert_close(_run(launch, ("n", n), x, alpha, block), x * alpha + 1)
    if device.type == "cuda":
        # one compiled kernel kept per (device, key, constexprs); the float is not part of the key
        assert len(launch.kernels) == 4
    else:
        assert not launch.enabled   # the interpreter's kernels take the JIT's path every time


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_check_catches_a_key_that_misses_a_specialization(monkeypatch):
    # a key that ignores the length: 64 and 63 compile differently (divisibility by 16), so the second
    # call would run the first one's kernel; the check says so instead
    monkeypatch.setattr(dispatch, "CHECK", True)
    launch = Cached(_scale_add_one)
    _run(launch, "same", torch.randn(64, device="cuda"), 1.0)
    _run(launch, "same", torch.randn(64, device="cuda"), 1.0)   # same specialization: fine
    with pytest.raises(AssertionError, match="another compiled kernel"):
        _run(launch, "same", torch.randn(63, device="cuda"), 1.0)


def test_cached_launch_passes_every_parameter_in_order(monkeypatch):
    # the path a GPU takes, with a stand-in JIT function and compiled kernel (runs anywhere): the first call
    # goes through the JIT, the next ones to the kernel's launcher with grid, stream and all parameters
    # in the kernel's order, constexprs included and launch options left out; a new constexpr value misses
    launched, jitted = [], []

    class Kernel:
        function, packed_metadata = "fn", "meta"

        def run(self, *values):
            launched.append(values)

    class Jit:
        arg_names = ["X", "n", "BLOCK", "FLAG"]

        def __getitem__(self, grid):
            return lambda *args, **kwargs: jitted.append((grid, args, kwargs)) or Kernel()
    monkeypatch.setattr(dispatch, "CHECK", False)   # the check reads the real JIT's caches
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    launch = Cached(Jit())
    launch.enabled = True
    launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
    launch("k", (5, 2), "y", 9, BLOCK=32, FLAG=True, num_warps=4)
    assert len(jitted) == 1
    assert launched == [(5, 2, 1, 1234, "fn", "meta", None, None, None, "y", 9, 32, True)]
    launch("k", (3,), "x", 7, BLOCK=64, FLAG=True, num_warps=4)
    assert len(jitted) == 2 and len(launch.kernels) == 2


def _plain(X, n, BLOCK: tl.constexpr):
    pass


def test_other_tritons_take_the_jit_path(monkeypatch):
    # the cached path reads Triton 3.6's internals: with another version every launch goes through the JIT
    from triton.runtime.jit import JITFunction
    compiled = JITFunction(_plain)   # a compiled-path kernel object even where the interpreter is on
    assert Cached(compiled).enabled
    monkeypatch.setattr(dispatch.triton, "__version__", "3.7.0")
    assert not Cached(compiled).enabled
    assert dispatch.version("3.6.0") == (3, 6) and dispatch.version("3.6.0+git1234") == (3, 6)
