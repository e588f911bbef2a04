"""Kernel launches without the Triton JIT's per-call work, for launches whose specialization the caller
already knows.

``kernel[grid](*args, **constexprs)`` binds every argument, derives its specialization (each int's value
class, each pointer's alignment, each TMA descriptor's type), builds the cache key, checks the kernel's
globals and only then calls the compiled kernel's launcher. On the H200 host that cost 20-30 us per launch
on top of the launcher's own 7-11 us, and one forward+backward of our op launches three to five kernels. At
short sequences the GPU then waits for the host, and the benchmark (like a training step that is not a CUDA
graph) times the host (docs/perf-notes.md, session 15).

``Cached(jit_fn)`` is called as ``launch(key, grid, *args, **constexprs_and_options)``, the non-constexpr
arguments positional. The first call with a key (and those keyword values) runs the JIT, compiling if
needed, and keeps the compiled kernel; later calls go to its launcher directly. The key must determine
everything else the JIT specializes on: the caller builds it from the shapes, strides, dtypes, pointer
alignments and flags its arguments derive from (``launch.py``'s ``signature``). With
``LONGCTX_CHECK_LAUNCH_CACHE=1`` (the GPU tests set it) every cached launch also runs the JIT's own key
derivation and fails if that names another compiled kernel than the one the key kept.

What this reads of Triton (``JITFunction.device_caches`` and ``arg_names``, ``CompiledKernel.run``'s
arguments, the launch hooks) is Triton 3.6's. With another Triton (``TESTED_TRITON``), under
``TRITON_INTERPRET=1``, or with a launch hook set (Proton's, for instance), every call takes the JIT's path.

``TESTED_TRITON`` is also the one list of every other path tied to a Triton version, and ``tested`` the one
gate they all go through.
"""
import os
import warnings

import torch
import triton
from triton.runtime.jit import JITFunction

try:
    from triton import knobs
except ImportError:   # Triton < 3.4, which the cached path is off for anyway
    knobs = None

# The paths written against one Triton's internals or experimental API, and the (major, minor) releases each was
# tested on with a GPU (docs/perf-notes.md's runs; the H200 image has Triton 3.6). With any other Triton the path
# is off and the portable Triton kernels (flash_fwd.py, flash_bwd.py) run in its place. Under the interpreter
# (CPU) none of them runs whatever the version. Triton 3.7 (torch 2.12 and 2.13 require it on Linux) passes the
# CPU suite and compiles the Gluon and TMA kernels for sm_90a, but none of these has run on a GPU with it.
TESTED_TRITON = {
    "cached launches": {(3, 6)},          # Cached below: reads the JIT's caches and the launcher's arguments
    "Gluon kernels": {(3, 6)},            # flash_fwd_hopper.py, flash_bwd_hopper.py: Gluon is experimental
    "TMA forward by default": {(3, 6)},   # flash_fwd_tma.py where policy.py's TMA_FWD picks it
}
_said_untested: list[bool] = [False]

CHECK = os.environ.get("LONGCTX_CHECK_LAUNCH_CACHE", "0") == "1"
MAX_KEYS = 4096   # kept launches per kernel


def version(text: str) -> tuple[int, ...]:
    """'3.6.0' -> (3, 6); the major and minor numbers of a version string."""
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


def tested(path: str) -> bool:
    """Whether this Triton is one that ``path`` (a TESTED_TRITON key) was tested on. Asked where the path would
    otherwise run (on a GPU, never at import), so the first path found off says, in one warning per process,
    which Triton this is and every path that is off with it."""
    running = version(triton.__version__)
    if running in TESTED_TRITON[path]:
        return True
    if not _said_untested[0]:
        _said_untested[0] = True
        off = [name for name, versions in TESTED_TRITON.items() if running not in versions]
        tested_on = sorted({".".join(map(str, v)) for versions in TESTED_TRITON.values() for v in versions})
        warnings.warn(f"Triton {triton.__version__}: {', '.join(off)} off (tested with Triton {', '.join(tested_on)}, "
                      "kernels/dispatch.py TESTED_TRITON); the portable Triton kernels run instead", stacklevel=3)
    return False


def _no_hooks() -> bool:
    """No launch hook is set (Triton 3.6 keeps them in HookChains, empty by default; older ones use None)."""
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return not getattr(enter, "calls", enter) and not getattr(leave, "calls", leave)


class Cached:
    """A JIT kernel whose compiled variants are looked up by the caller's key (module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        self.names = list(getattr(fn, "arg_names", ()))
        # the interpreter's kernels have no compiled launcher to call; for compiled ones the Triton version is
        # asked at the first launch (None until then), not at import on a machine that never launches one
        self.enabled = None if isinstance(fn, JITFunction) and hasattr(fn, "device_caches") else False
        self.kernels: dict = {}   # (device, key, keyword values) -> (compiled kernel, keyword argument names)

    def __call__(self, key, grid, *args, **kwargs):
        if self.enabled is None:
            self.enabled = tested("cached launches")
        if not (self.enabled and _no_hooks()):
            self.fn[grid](*args, **kwargs)
            return
        device = torch._C._cuda_getDevice()
        full_key = (device, key, *kwargs.values())   # the constexprs and launch options too
        hit = self.kernels.get(full_key)
        if hit is None:
            self._first(full_key, grid, args, kwargs)
            return
        kernel, names = hit
        if CHECK:
            self._check(kernel, device, args, kwargs)
        kernel.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), kernel.function, kernel.packed_metadata, None, None,
                   None, *args, *[kwargs[name] for name in names])

    def _first(self, full_key, grid, args, kwargs):
        """The JIT's launch; its compiled kernel is kept when every parameter was passed (positionally or by
        name), so that a cached launch can pass them all in order."""
        kernel = self.fn[grid](*args, **kwargs)
        names = self.names[len(args):]
        if kernel is not None and hasattr(kernel, "run") and all(name in kwargs for name in names):
            if len(self.kernels) >= MAX_KEYS:   # many shapes (varlen batches' longest documents): start over
                self.kernels.clear()
            self.kernels[full_key] = (kernel, names)

    def _check(self, kernel, device, args, kwargs):
        """The JIT's own choice for these arguments must be the kernel the key kept."""
        from triton.runtime.jit import compute_cache_key
        kernel_cache, key_cache, _, _, binder = self.fn.device_caches[device]
        kwargs = dict(kwargs, debug=kwargs.get("debug", self.fn.debug) or knobs.runtime.debug,
                      instrumentation_mode=knobs.compilation.instrumentation_mode)
        _, specialization, options = binder(*args, **kwargs)
        chosen = kernel_cache.get(compute_cache_key(key_cache, specialization, options))
        if chosen is not kernel:
            raise AssertionError(f"launch cache of {self.fn.__name__}: the key kept another compiled kernel than "
                                 f"the JIT chooses for these arguments ({specialization})")
