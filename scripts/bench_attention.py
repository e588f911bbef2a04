"""Attention kernel benchmark: TFLOP/s and peak extra memory, ours vs PyTorch, in one run.

    make bench                                    # the standard grid (CUDA)
    make bench ARGS="--dims 128 --seqlens 16384 --causal 1"
    make bench ARGS="--sweep"                     # also search launch parameters per pass first
    make bench ARGS="--dims 64 --causal 1 --seqlens 8192 --tokens 8192 --model-dim 768"  # GPT-2 small's
    make bench ARGS="--host-overhead --dims 64 --causal 0 --seqlens 256 --tokens 256 --providers ours sdpa_cudnn"
    make bench ARGS="--dtype float16 --tutorial PATH --providers ours tutorial tutorial_nows sdpa_cudnn"  # Triton's
    make bench ARGS="--dims 64 --seqlens 1024 2048 --providers ours ours_tma ours_tma+fwd=64,64,4,2"  # TMA forward

Grid as in the field (FlashAttention papers, docs/perf-notes.md): bf16, B * N = 16K tokens (B = 1 at
N >= 16K), H * D = 2048. FLOPs: forward 4 * B * H * N^2 * D, halved when causal; forward+backward
3.5x forward. Times are medians of triton.testing.do_bench after warm-up. Every provider runs in
this same process on the same inputs. Results go to --out as JSON and CSV, with a PNG plot.
"""
import argparse
import contextlib
import cProfile
import csv
import io
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import flash_attn_func  # noqa: E402
from kernels import flash_bwd_hopper, flash_fwd_hopper  # noqa: E402
from kernels.launch import (KernelConfig, get_config, override_atomic_dq, override_configs,  # noqa: E402
                            override_gluon, override_one_launch, override_tma_fwd, parse_launch_spec)

TOKENS, MODEL_DIM = 16384, 2048


def standard_attention(q, k, v, causal):
    """What a user writes by hand (nanoGPT without SDPA): materializes the N x N scores."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n = q.shape[-2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def _with_context(fn, context):
    """fn, timed inside `context()` (a launch setting that must hold for the backward too)."""
    fn.context = context
    return fn


def variant(name, causal):
    """'ours_2launch+dkdv=64,128,8,2,counted[+dq=...]' (or ours / ours_1launch): ours with these launch
    parameters, for same-run comparisons of launch-table candidates. 'ours+wsf=BLOCK_N,STAGES' and
    'ours+ws=BLOCK_M,STAGES': the Gluon forward / dK/dV kernels (kernels/flash_{fwd,bwd}_hopper.py) with
    these parameters (either or both); 'ours_atomic+ws=...' the same with deterministic=False (the Gluon
    backward with dQ fused, where it fuses it)."""
    base, *specs = name.split("+")
    usage = (f"provider {name!r}: expected ours[_1launch|_2launch|_tma]+PASS=BLOCK_M,BLOCK_N,WARPS,STAGES[,counted] "
             "or ours[_atomic]+wsf=BLOCK_N,STAGES[+ws=BLOCK_M,STAGES]")
    if base not in ("ours", "ours_atomic", "ours_1launch", "ours_2launch", "ours_tma") or not specs:
        raise ValueError(usage)
    gluon = {}   # kernel module -> (block, stages)
    for spec in specs:
        key, _, values = spec.partition("=")
        if key in ("ws", "wsf"):
            parts = values.split(",")
            if base not in ("ours", "ours_atomic") or len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise ValueError(usage)
            gluon[flash_bwd_hopper if key == "ws" else flash_fwd_hopper] = tuple(map(int, parts))
    if (gluon and len(gluon) != len(specs)) or (base == "ours_atomic" and not gluon):
        raise ValueError(usage)
    configs = {} if gluon else dict(parse_launch_spec(spec) for spec in specs)
    one = {"ours": None, "ours_atomic": None, "ours_1launch": True, "ours_2launch": False, "ours_tma": None}[base]

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            stack.enter_context(override_configs(**configs))
            if one is not None:
                stack.enter_context(override_one_launch(one))
            if base == "ours_tma":
                stack.enter_context(tma_forward())
            for module, launch in gluon.items():
                stack.enter_context(module.override_launch(*launch))
            if flash_fwd_hopper in gluon:   # the Gluon forward's variants: not the TMA forward where it runs
                stack.enter_context(override_tma_fwd(False))
            yield
    deterministic = base != "ours_atomic"
    return "bnhd", _with_context(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic),
                                 context)


def tma_forward():
    """The forward with TMA loads (kernels/flash_fwd_tma.py) wherever it takes the inputs, before the Gluon one."""
    return override_tma_fwd(True)


@contextlib.contextmanager
def triton_atomic():
    """The Triton kernels only, deterministic=False taking their atomic dQ."""
    with override_gluon(), override_atomic_dq(True):
        yield


def _no_tutorial(path) -> str:
    return f"--tutorial {path}: no such file (expected python/tutorials/06-fused-attention.py from a Triton checkout)"


def load_tutorial(path):
    """``attention(q, k, v, causal, sm_scale)`` of the Triton tutorial's fused attention, imported from `path`
    (python/tutorials/06-fused-attention.py of a Triton checkout at the installed version; our tree does not
    carry it). It takes fp16 (B, H, N, D) contiguous inputs, N a multiple of 128."""
    import importlib.util
    file = Path(path)
    if not file.is_file():
        raise ValueError(_no_tutorial(path))
    spec = importlib.util.spec_from_file_location("triton_tutorial_fused_attention", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "attention", None)):
        raise ValueError(f"--tutorial {path}: expected a module defining attention(q, k, v, causal, sm_scale)")
    return module.attention


def make_providers(causal, n, flex_ok, one_launch_dkdv=None, variants=(), tutorial=None):
    """name -> (layout, fn). layout 'bnhd' is ours; 'bhnd' is PyTorch's. one_launch_dkdv: the dK/dV
    parameters for ours_1launch (the "bwd" sweep's winner); variants: names for variant(); tutorial: the
    Triton tutorial's attention function (load_tutorial), the provider "tutorial"."""
    @contextlib.contextmanager
    def one_launch():
        with override_one_launch(True), (override_configs(dkdv=one_launch_dkdv) if one_launch_dkdv
                                         else contextlib.nullcontext()):
            yield

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    providers = {
        # the default call (deterministic=False, flash-attn's default, since issue 23) / the deterministic backward
        "ours": ("bnhd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal)),
        "ours_det": ("bnhd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=True)),
        # the Triton kernels where ours would take the Gluon ones (kernels/flash_{fwd,bwd}_hopper.py)
        "ours_triton": ("bnhd", _with_context(lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
                                              override_gluon)),
        # deterministic=False: the five-product backward where the launcher takes it (dQ reduce-added by TMA in
        # the Gluon kernel at the head dims kernels/flash_bwd_hopper.py fuses), else the split; forward is ours.
        # The same call as "ours" now that deterministic=False is the default; kept for existing commands
        "ours_atomic": ("bnhd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=False)),
        # the Triton kernels only, with their atomic-dQ variant forced (kernels/launch.py: override_atomic_dq)
        "ours_triton_atomic": ("bnhd", _with_context(
            lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=False), triton_atomic)),
        # the deterministic backward forced into one launch (dK/dV and dQ programs in one grid) / two
        "ours_1launch": ("bnhd", _with_context(
            lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=True), one_launch)),
        "ours_2launch": ("bnhd", _with_context(
            lambda q, k, v: flash_attn_func(q, k, v, causal=causal, deterministic=True),
            lambda: override_one_launch(False))),
        # the forward with TMA loads (kernels/flash_fwd_tma.py) wherever it takes the inputs, with the launch
        # table's forward tiles / never (ours as before it ran by default: Gluon or pointer-load forward)
        "ours_tma": ("bnhd", _with_context(lambda q, k, v: flash_attn_func(q, k, v, causal=causal), tma_forward)),
        "ours_notma": ("bnhd", _with_context(lambda q, k, v: flash_attn_func(q, k, v, causal=causal),
                                             lambda: override_tma_fwd(False))),
        "sdpa_flash": ("bhnd", sdpa(SDPBackend.FLASH_ATTENTION)),
        "sdpa_cudnn": ("bhnd", sdpa(SDPBackend.CUDNN_ATTENTION)),
        "standard": ("bhnd", lambda q, k, v: standard_attention(q, k, v, causal)),
    }
    if tutorial is not None:
        # the tutorial's default call (Triton 3.6: warp_specialize=True, which on Hopper builds the TMA
        # descriptors on the device) and warp specialization off, what its own benchmark runs on Hopper for
        # causal forward and for the backward
        providers["tutorial"] = ("bhnd", lambda q, k, v: tutorial(q, k, v, causal, q.shape[-1] ** -0.5))
        providers["tutorial_nows"] = ("bhnd", lambda q, k, v: tutorial(q, k, v, causal, q.shape[-1] ** -0.5, False))
    if flex_ok:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # one compilation per shape and grad mode: past dynamo's default limit of 8 recompiles flex
        # silently falls back to an unfused path that materializes the scores
        torch._dynamo.config.recompile_limit = 1024
        flex = torch.compile(flex_attention, dynamic=False)
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, n, n,
                                     device="cuda")
        providers["flex"] = ("bhnd", lambda q, k, v: flex(q, k, v, block_mask=mask))
    for name in variants:
        providers[name] = variant(name, causal)
    return providers


def _setup(fn, layout, B, N, H, D, mode, dtype=torch.bfloat16):
    """Inputs for one point and the step to time: forward, or forward and backward."""
    shape = (B, N, H, D) if layout == "bnhd" else (B, H, N, D)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, generator=gen).requires_grad_(mode == "fwd_bwd")
               for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=dtype, generator=gen)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v)
    else:
        def step():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v).backward(dout)
    return step, (q, k, v)


def bench_one(fn, layout, B, N, H, D, causal, mode, dtype=torch.bfloat16):
    """Median ms and peak extra memory (GiB) of one provider at one point; 'OOM' on out of memory."""
    step, inputs = _setup(fn, layout, B, N, H, D, mode, dtype)
    try:
        with getattr(fn, "context", contextlib.nullcontext)():
            step()  # compile / warm
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            ms = triton.testing.do_bench(step, warmup=50, rep=200, grad_to_none=list(inputs), return_mode="median")
    except torch.OutOfMemoryError:
        return "OOM", "OOM"
    finally:
        del inputs, step
        torch.cuda.empty_cache()
    return ms, peak


def profile_one(fn, layout, B, N, H, D, steps=10, dtype=torch.bfloat16):
    """GPU time per kernel of one forward+backward step (ms, mean of `steps`), from the CUDA profiler.
    A kernel launched c times per step is reported as name#0 .. name#(c-1) in launch order (ours:
    _attn_bwd#0 is the dQ launch, #1 the dK/dV launch, when the backward takes two)."""
    from torch.profiler import ProfilerActivity, profile
    step, inputs = _setup(fn, layout, B, N, H, D, "fwd_bwd", dtype)
    with getattr(fn, "context", contextlib.nullcontext)():
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
    return kernel_times(prof.events(), steps)


def host_time(fn, layout, B, N, H, D, steps=200, dtype=torch.bfloat16):
    """(host us, wall us) per forward+backward step: the CPU time to issue `steps` steps back to back
    (after warm-up), and the time until the GPU finished them. At small shapes the GPU waits for the host,
    and host ~ wall measures the op's launch overhead."""
    step, inputs = _setup(fn, layout, B, N, H, D, "fwd_bwd", dtype)
    with getattr(fn, "context", contextlib.nullcontext)():
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        host = time.perf_counter() - t0
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    del inputs, step
    return host / steps * 1e6, wall / steps * 1e6


def host_profile(fn, layout, B, N, H, D, steps=50, top=40, dtype=torch.bfloat16) -> str:
    """Where the host's time per forward+backward step goes: cProfile over `steps` steps issued back to back
    (after warm-up), the `top` functions by own time, as pstats prints them. cProfile slows the Python it
    counts: read the shares, not the microseconds. The backward runs on the calling thread here (CUDA
    backward otherwise runs on autograd's device thread, which the profiler would not see)."""
    step, inputs = _setup(fn, layout, B, N, H, D, "fwd_bwd", dtype)
    profiler = cProfile.Profile()
    with getattr(fn, "context", contextlib.nullcontext)(), torch.autograd.set_multithreading_enabled(False):
        for _ in range(20):
            step()
        torch.cuda.synchronize()
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
        torch.cuda.synchronize()
    del inputs, step
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def kernel_times(events, steps):
    """{kernel label: ms per step} from profiler events (see profile_one)."""
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    by_name = {}
    for e in kernels:
        by_name.setdefault(e.name[:70], []).append(e.time_range.elapsed_us())
    times = {}
    for name, durations in by_name.items():
        per_step = max(1, len(durations) // steps)
        for i, us in enumerate(durations):
            label = name if per_step == 1 else f"{name}#{i % per_step}"
            times[label] = times.get(label, 0.0) + us / 1000 / steps
    return times


def flops(B, N, H, D, causal, mode):
    f = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def check_correct(D, causal):
    """Our output and gradients against SDPA's math backend in fp32 on one mid-size point."""
    B, N, H = 2, 1000, 2048 // D // 4
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    out = flash_attn_func(q, k, v, causal=causal)
    out.backward(dout)
    ours = [out, q.grad, k.grad, v.grad]
    q32, k32, v32 = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    ref.backward(dout.float().transpose(1, 2))
    refs = [ref.transpose(1, 2), q32.grad.transpose(1, 2), k32.grad.transpose(1, 2), v32.grad.transpose(1, 2)]
    return {name: ((a.float() - b).norm() / b.norm()).item() for name, a, b in zip(("out", "dq", "dk", "dv"), ours, refs)}


# Launch parameters tried by --sweep, per pass: (BLOCK_M, BLOCK_N, warps, stages[, counted]).
SWEEP = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4),
            (64, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3)],
    "dkdv": [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 3), (32, 128, 8, 3), (64, 64, 4, 3),
             (32, 64, 4, 3), (64, 128, 4, 2), (128, 128, 8, 2), (64, 128, 16, 3),
             # counted query loop (KernelConfig.counted): wgmma not serialized (scripts/kernel_report.py)
             (64, 128, 8, 3, True), (64, 128, 8, 2, True), (32, 128, 8, 3, True), (64, 64, 8, 3, True)],
    "dq": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
           (64, 32, 4, 3), (128, 64, 4, 3), (64, 128, 8, 2), (128, 64, 16, 3)],
}
# the atomic-dQ dK/dV pass (deterministic=False) holds a dQ tile as well: the dK/dV candidates
# (16 warps: Flex's Hopper heuristic for d128; 23-47% slower for us, docs/perf-notes.md)
SWEEP["dkdv_fused"] = [c for c in SWEEP["dkdv"] if c[2] != 16]
# the one-launch backward (ours_1launch): its dK/dV parameters, whose warps and stages the dQ
# programs share (dQ's tiles stay at the dq entry)
SWEEP["bwd"] = [(64, 128, 8, 3, True), (64, 128, 8, 2, True), (64, 128, 8, 3), (64, 128, 8, 2),
                (32, 128, 8, 3, True), (64, 64, 8, 3, True), (128, 128, 8, 2, True)]


def sweep(D, causal, N, log, passes=tuple(SWEEP), tokens=TOKENS, model_dim=MODEL_DIM):
    """Best launch parameters for each pass at one point: fwd timed alone; dkdv / dq by fwd+bwd with
    the other backward pass at its current setting (two launches); dkdv_fused by fwd+bwd with
    deterministic=False on the Triton kernels, their atomic variant forced; bwd by fwd+bwd in one launch
    (the dK/dV parameters it takes)."""
    H, B = model_dim // D, max(1, tokens // N)
    best = {}
    for pass_name in passes:
        mode = "fwd" if pass_name == "fwd" else "fwd_bwd"
        deterministic = pass_name != "dkdv_fused"
        results = []
        for c in SWEEP[pass_name]:
            cfg = KernelConfig(*c)
            key = "dkdv" if pass_name == "bwd" else pass_name
            launches = override_one_launch(pass_name == "bwd") if pass_name != "fwd" else contextlib.nullcontext()
            if pass_name == "dkdv_fused":   # the Triton kernel's atomic variant, which these candidates tune
                launches = triton_atomic()
            try:
                with override_configs(**{**best, key: cfg}), launches:
                    ms, _ = bench_one(lambda q, k, v: flash_attn_func(q, k, v, causal=causal,
                                                                      deterministic=deterministic),
                                      "bnhd", B, N, H, D, causal, mode)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                log(f"  sweep {pass_name} D{D} {'causal' if causal else 'full'} {c}: {type(e).__name__}")
                continue
            if ms == "OOM":
                continue
            tf = flops(B, N, H, D, causal, mode) / ms / 1e9
            results.append((ms, c))
            log(f"  sweep {pass_name} D{D} {'causal' if causal else 'full'} N{N} {c}: {ms:.3f} ms {tf:.0f} TFLOP/s")
        ms, c = min(results)
        best[pass_name] = KernelConfig(*c)
        log(f"best {pass_name} D{D} {'causal' if causal else 'full'}: {c} {ms:.3f} ms")
    return best


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TUTORIAL_PROVIDERS = ("tutorial", "tutorial_nows")


def check_args(args, parser):
    """Argument combinations that cannot run, refused before any work."""
    asked = [p for p in args.providers if p in TUTORIAL_PROVIDERS]
    if asked and not args.tutorial:
        parser.error(f"provider '{asked[0]}' needs --tutorial PATH (python/tutorials/06-fused-attention.py of a "
                     "Triton checkout)")
    if args.tutorial and args.dtype != "float16":
        parser.error("--tutorial: the Triton tutorial's kernel is fp16 only; add --dtype float16")
    if args.tutorial and not asked:
        parser.error(f"--tutorial given but none of {', '.join(TUTORIAL_PROVIDERS)} is in --providers")
    if args.tutorial and not Path(args.tutorial).is_file():
        parser.error(_no_tutorial(args.tutorial))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
    ap.add_argument("--providers", nargs="+",
                    default=["ours", "ours_det", "sdpa_flash", "sdpa_cudnn", "flex", "standard"])
    ap.add_argument("--flex-seqlens", type=int, nargs="+", default=[0],
                    help="FlexAttention compiles per shape and mode (seconds each): only these lengths (default 0: every "
                         "length; e.g. --flex-seqlens 4096 16384 for a quicker grid)")
    ap.add_argument("--sweep", action="store_true", help="search launch parameters per pass first")
    ap.add_argument("--sweep-seqlen", type=int, default=8192)
    ap.add_argument("--sweep-passes", nargs="+", choices=list(SWEEP), default=list(SWEEP),
                    help="passes to search (the others keep their launch-table settings)")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="tokens per batch: B = max(1, tokens // N)")
    ap.add_argument("--model-dim", type=int, default=MODEL_DIM, help="H * D: H = model_dim // D (GPT-2 small: 768)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every provider this many times per point, interleaved; the table shows the "
                         "median and +- half the spread (METHOD.md: a difference inside the spread is noise)")
    ap.add_argument("--profile-seqlens", type=int, nargs="*", default=[],
                    help="also profile one forward+backward step per provider at these lengths: GPU ms per kernel")
    ap.add_argument("--host-overhead", action="store_true",
                    help="instead of the grid: CPU time to issue one forward+backward per provider at --seqlens "
                         "(e.g. --seqlens 256 8192), against the time until the GPU finished it")
    ap.add_argument("--host-profile", action="store_true",
                    help="with --host-overhead: also a cProfile of each provider's host time per point, written "
                         "to --out/host_profile_<provider>_d<D>_<causal|full>_<N>.txt")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                    help="inputs of every provider (the grid is bf16; the Triton tutorial runs fp16 only)")
    ap.add_argument("--tutorial", metavar="PATH",
                    help="the Triton tutorial's fused attention (python/tutorials/06-fused-attention.py of a Triton "
                         "checkout), benchmarked as providers 'tutorial' (its default call) and 'tutorial_nows' (warp "
                         "specialization off); needs --dtype float16")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    args = ap.parse_args()
    check_args(args, ap)
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU (the CPU path is for correctness, not speed)")

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "bench_log.txt", "a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "python": platform.python_version(),
           "dtype": args.dtype}
    log(json.dumps(env))
    dtype = DTYPES[args.dtype]
    tutorial = load_tutorial(args.tutorial) if args.tutorial else None
    if args.host_overhead:
        host_overhead(args, env, out_dir, log, tutorial, dtype)
        return
    rows, profiles = [], []
    for D in args.dims:
        for causal in map(bool, args.causal):
            log(f"correctness D{D} {'causal' if causal else 'full'} (rel. error vs fp32 math): {check_correct(D, causal)}")
            configs = (sweep(D, causal, args.sweep_seqlen, log, args.sweep_passes, args.tokens, args.model_dim)
                       if args.sweep else {})
            if configs:   # the winners before they are timed: a fast wrong kernel is not a result
                with override_configs(**configs), override_one_launch(False):
                    err = check_correct(D, causal)
                if "bwd" in configs:
                    with override_configs(**{**configs, "dkdv": configs["bwd"]}), override_one_launch(True):
                        err = {n: max(e, e1) for (n, e), e1 in zip(err.items(), check_correct(D, causal).values())}
                log(f"correctness D{D} {'causal' if causal else 'full'} with the swept parameters: {err}")
                if max(err.values()) > 1e-2:   # bf16 against fp32 math is ~2e-3
                    log("  WRONG: the swept parameters are dropped; the grid uses the launch tables")
                    configs = {}
            used = {p: configs.get(p) or get_config(p, D, torch.bfloat16, torch.device("cuda"), causal)
                    for p in ("fwd", "dkdv", "dq", "dkdv_fused")}
            used["bwd (ours_1launch's dkdv)"] = configs.get("bwd") or used["dkdv"]
            log(f"launch parameters D{D} {'causal' if causal else 'full'}: {used}")
            for N in args.seqlens:
                B, H = max(1, args.tokens // N), args.model_dim // D
                flex_ok = "flex" in args.providers and (0 in args.flex_seqlens or N in args.flex_seqlens)
                providers = make_providers(causal, N, flex_ok, configs.get("bwd"),
                                           [p for p in args.providers if "+" in p], tutorial)
                for rep, name in ((r, p) for r in range(args.repeats) for p in args.providers):
                    if name not in providers:
                        continue
                    layout, fn = providers[name]
                    for mode in args.modes:
                        with override_configs(**configs):
                            try:
                                ms, peak = bench_one(fn, layout, B, N, H, D, causal, mode, dtype)
                            except Exception as e:  # noqa: BLE001 - a backend that refuses a shape is a result
                                ms = peak = f"error: {type(e).__name__}"
                        tf = flops(B, N, H, D, causal, mode) / ms / 1e9 if isinstance(ms, float) else None
                        row = dict(D=D, causal=causal, N=N, B=B, H=H, provider=name, mode=mode, rep=rep, ms=ms,
                                   tflops=tf, peak_gib=peak)
                        rows.append(row)
                        log(json.dumps(row))
                if N in args.profile_seqlens:
                    for name in args.providers:
                        if name in providers and name != "standard":
                            layout, fn = providers[name]
                            with override_configs(**configs):
                                times = profile_one(fn, layout, B, N, H, D, dtype=dtype)
                            profiles.append(dict(D=D, causal=causal, N=N, provider=name, kernels_ms=times))
                            log(f"profile D{D} {'causal' if causal else 'full'} N{N} {name}: total "
                                f"{sum(times.values()):.3f} ms; " + "; ".join(f"{k} {v:.3f}" for k, v in times.items()))
    (out_dir / "bench.json").write_text(json.dumps({"env": env, "rows": rows, "profiles": profiles}, indent=1))
    with open(out_dir / "bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print_table(rows, env, log)
    log_file.close()
    plot(rows, env, out_dir / "bench.png")


def host_overhead(args, env, out_dir, log, tutorial=None, dtype=torch.bfloat16):
    """--host-overhead: host and wall microseconds per forward+backward step, per provider and point."""
    rows = []
    log(f"\nus per forward+backward step on {env['gpu']} (host: issuing it; wall: until the GPU finished)")
    log("| D | causal | N | B | H | " + " | ".join(f"{p} host / wall" for p in args.providers) + " |")
    for D in args.dims:
        for causal in map(bool, args.causal):
            for N in args.seqlens:
                B, H = max(1, args.tokens // N), args.model_dim // D
                providers = make_providers(causal, N, "flex" in args.providers, None,
                                           [p for p in args.providers if "+" in p], tutorial)
                cells = []
                for name in args.providers:
                    if name not in providers:
                        cells.append("-")
                        continue
                    layout, fn = providers[name]
                    host, wall = host_time(fn, layout, B, N, H, D, dtype=dtype)
                    rows.append(dict(D=D, causal=causal, N=N, B=B, H=H, provider=name, host_us=host, wall_us=wall))
                    cells.append(f"{host:.0f} / {wall:.0f}")
                    if args.host_profile:
                        path = out_dir / f"host_profile_{name}_d{D}_{'causal' if causal else 'full'}_{N}.txt"
                        path.write_text(host_profile(fn, layout, B, N, H, D, dtype=dtype))
                        log(f"host profile of {name}: {path}")
                    torch.cuda.empty_cache()
                log(f"| {D} | {int(causal)} | {N} | {B} | {H} | " + " | ".join(cells) + " |")
    (out_dir / "host_overhead.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))


def _summary(rs):
    """One provider at one point over its repeats: median TFLOP/s and half the spread, or the error."""
    tfs = sorted(r["tflops"] for r in rs if r["tflops"])
    if not tfs:
        return None, 0.0, (str(rs[0]["ms"])[:5] if rs else "-")
    med = statistics.median(tfs)
    half = (tfs[-1] - tfs[0]) / 2
    return med, half, f"{med:.0f}" + (f"±{half:.0f}" if len(tfs) > 1 else "")


def print_table(rows, env, log):
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    log(f"\nTFLOP/s on {env['gpu']} (torch {env['torch']}, triton {env['triton']}, {env.get('dtype', 'bfloat16')}); "
        "peak extra GiB of ours / sdpa_flash")
    for mode in dict.fromkeys(r["mode"] for r in rows):
        log(f"\n{mode}: | D | causal | N | " + " | ".join(providers) + " | ours/flash | mem ours | mem flash |")
        keys = dict.fromkeys((r["D"], r["causal"], r["N"]) for r in rows if r["mode"] == mode)
        for D, causal, N in keys:
            by = {p: [r for r in rows if (r["D"], r["causal"], r["N"], r["mode"], r["provider"]) == (D, causal, N, mode, p)]
                  for p in providers}
            summary = {p: _summary(rs) for p, rs in by.items()}
            ours, flash = summary["ours"][0] if "ours" in summary else None, summary.get("sdpa_flash", (None,))[0]
            ratio = ours / flash if ours and flash else math.nan
            mem = [by[p][0]["peak_gib"] if by.get(p) else None for p in ("ours", "sdpa_flash")]
            mem = [f"{m:.2f}" if isinstance(m, float) else str(m) for m in mem]
            log(f"| {D} | {int(causal)} | {N} | " + " | ".join(summary[p][2] for p in providers)
                + f" | {ratio:.2f} | {mem[0]} | {mem[1]} |")


def plot(rows, env, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = list(dict.fromkeys((r["mode"], r["D"], r["causal"]) for r in rows))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
    for ax, (mode, D, causal) in zip(axes.flat, panels):
        for p in dict.fromkeys(r["provider"] for r in rows):
            mine = [r for r in rows if (r["mode"], r["D"], r["causal"], r["provider"]) == (mode, D, causal, p)]
            pts = [(n, _summary([r for r in mine if r["N"] == n])[0]) for n in dict.fromkeys(r["N"] for r in mine)]
            pts = [(n, tf) for n, tf in pts if tf]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=p)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode} d{D} {'causal' if causal else 'full'}")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, bf16", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
