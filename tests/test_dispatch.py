"""kernels/dispatch.py: launches looked up by the caller's key, which must name the JIT's own compiled kernel.

On a GPU the whole suite runs with the check on (tests/conftest.py), so every cached launch of the attention
op is compared with the JIT's choice; here a small kernel shows the cache's behaviour by itself.
"""
import pytest
import torch
import triton
import triton.language as tl

from kernels import dispatch
from kernels import launch as launch_module
from kernels.dispatch import Cached


# whether this Triton takes the cached path on a GPU (kernels/dispatch.py's TESTED_TRITON)
CACHED_HERE = dispatch.version(triton.__version__) in dispatch.TESTED_TRITON["cached launches"]


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
        assert launch.enabled == CACHED_HERE
        if CACHED_HERE:   # one compiled kernel kept per (device, key, constexprs); the float is not part of the key
            assert len(launch.kernels) == 4
    else:
        assert not launch.enabled   # the interpreter's kernels take the JIT's path every time


@pytest.mark.skipif(not (torch.cuda.is_available() and CACHED_HERE),
                    reason="needs CUDA and a Triton the cached launches were tested on")
def test_check_catches_a_key_that_misses_a_specialization(monkeypatch):
    # a key that ignores the length: 64 and 63 compile differently (divisibility by 16), so the second
    # call would run the first one's kernel; the check says so instead
    monkeypatch.setattr(dispatch, "CHECK", True)
    launch = Cached(_scale_add_one)
    _run(launch, "same", torch.randn(64, device="cuda"), 1.0)
    _run(launch, "same", torch.randn(64, device="cuda"), 1.0)   # same specialization: fine
    with pytest.raises(AssertionError, match="another compiled kernel"):
        _run(launch, "same", torch.randn(63, device="cuda"), 1.0)


def stand_in(monkeypatch):
    """A Cached launch around a stand-in JIT function and compiled kernel, on the path a GPU takes (runs anywhere):
    (launch, the JIT's calls, the compiled kernel's launcher calls). Its Triton version is not yet asked."""
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
    launch.enabled = None   # as for a compiled kernel (test_compiled_kernels_ask_at_their_first_launch)
    return launch, jitted, launched


def version_tested_for(path: str) -> str:
    """A version string of a Triton that `path` was tested on."""
    return "%d.%d.0" % min(dispatch.TESTED_TRITON[path])


UNTESTED_TRITON = "3.99.1"   # tested for no path


@pytest.fixture
def fresh_gate(monkeypatch):
    """The version gate as a new process finds it: nothing said yet, the Gluon kernels not yet loaded; a Triton
    version is set by the test (triton.__version__, which the gate reads)."""
    monkeypatch.setattr(dispatch, "_said_untested", [False])
    monkeypatch.setattr(launch_module, "INTERPRET", False)   # the GPU's path, whatever this machine runs
    launch_module._gluon_loaded.cache_clear()
    yield
    launch_module._gluon_loaded.cache_clear()


def untested_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "TESTED_TRITON" in str(w.message)]


def test_cached_launch_passes_every_parameter_in_order(monkeypatch, fresh_gate):
    # the first call goes through the JIT, the next ones to the kernel's launcher with grid, stream and all
    # parameters in the kernel's order, constexprs included and launch options left out; a new constexpr misses
    monkeypatch.setattr(triton, "__version__", version_tested_for("cached launches"))
    launch, jitted, launched = stand_in(monkeypatch)
    launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
    launch("k", (5, 2), "y", 9, BLOCK=32, FLAG=True, num_warps=4)
    assert len(jitted) == 1
    assert launched == [(5, 2, 1, 1234, "fn", "meta", None, None, None, "y", 9, 32, True)]
    launch("k", (3,), "x", 7, BLOCK=64, FLAG=True, num_warps=4)
    assert len(jitted) == 2 and len(launch.kernels) == 2


def _plain(X, n, BLOCK: tl.constexpr):
    pass


def test_compiled_kernels_ask_at_their_first_launch(monkeypatch, fresh_gate, recwarn):
    # a compiled kernel's Cached leaves the version question to its first launch, so importing kernels on a
    # machine that never launches one (CPU training with a CUDA torch) says nothing
    from triton.runtime.jit import JITFunction
    monkeypatch.setattr(triton, "__version__", UNTESTED_TRITON)
    assert Cached(JITFunction(_plain)).enabled is None
    assert not untested_warnings(recwarn)
    assert dispatch.version("3.6.0") == (3, 6) and dispatch.version("3.7.1+git1234") == (3, 7)


def test_an_untested_triton_runs_the_portable_kernels_and_says_so_once(monkeypatch, fresh_gate, recwarn):
    # with a Triton no path was tested on: every launch goes through the JIT, the Gluon kernels neither load nor
    # run, the TMA forward's default rule picks nothing; one warning, naming the version and all three
    monkeypatch.setattr(triton, "__version__", UNTESTED_TRITON)
    monkeypatch.setattr(launch_module, "_major", lambda device: 9)   # a Hopper GPU as the rules see it
    gpu = torch.device("cuda")
    for _ in range(2):
        launch, jitted, launched = stand_in(monkeypatch)
        launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
        launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
        assert launch.enabled is False and len(jitted) == 2 and not launched
        assert not launch_module._gluon("fwd", gpu) and not launch_module._gluon("dkdv", gpu)
        assert launch_module.tma_fwd_config(gpu, torch.float16, 64, True, 1024) is None
    said = untested_warnings(recwarn)
    assert len(said) == 1 and UNTESTED_TRITON in said[0]
    assert all(path in said[0] for path in dispatch.TESTED_TRITON)


def test_a_tested_triton_takes_each_version_tied_path(monkeypatch, fresh_gate, recwarn):
    # the same checks with the Triton each path was tested on: the gate opens, and says nothing
    monkeypatch.setattr(launch_module, "_major", lambda device: 9)
    gpu = torch.device("cuda")
    monkeypatch.setattr(triton, "__version__", version_tested_for("cached launches"))
    launch, jitted, launched = stand_in(monkeypatch)
    launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
    launch("k", (3,), "x", 7, BLOCK=32, FLAG=True, num_warps=4)
    assert launch.enabled is True and len(jitted) == 1 and len(launched) == 1
    monkeypatch.setattr(triton, "__version__", version_tested_for("Gluon kernels"))
    assert launch_module._gluon("fwd", gpu) and launch_module.flash_fwd_hopper is not None
    monkeypatch.setattr(triton, "__version__", version_tested_for("TMA forward by default"))
    assert launch_module.tma_fwd_config(gpu, torch.float16, 64, True, 1024) is not None
    assert not untested_warnings(recwarn)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's path: CPU only")
def test_the_interpreter_runs_nothing_version_tied(monkeypatch, recwarn):
    # on CPU the op runs the portable kernels under the interpreter with any Triton, and no version-tied path
    # is even considered: nothing to say
    from kernels import flash_attn_func
    monkeypatch.setattr(dispatch, "_said_untested", [False])
    monkeypatch.setattr(triton, "__version__", UNTESTED_TRITON)
    q, k, v = (torch.randn(1, 64, 2, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    flash_attn_func(q, k, v, causal=True).sum().backward()
    assert not untested_warnings(recwarn)
    assert not launch_module._gluon("fwd", q.device)
