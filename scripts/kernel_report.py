"""What the compiler makes of the attention kernels on Hopper, without a GPU: registers, spills and
serialized tensor-core instructions, per kernel and launch configuration.

    python scripts/kernel_report.py                                   # Hopper table entries, d64/d128
    python scripts/kernel_report.py --dims 128 --passes dkdv --config dkdv=64,128,8,3,counted
    python scripts/kernel_report.py --passes fwd_ws dkdv_ws bwd_ws --ws 64,3  # the Gluon kernels (dK/dV tiles, ring)
    python scripts/kernel_report.py --passes fwd_tma --config fwd=64,64,4,2    # the TMA forward with these tiles

Each kernel is compiled for sm_90a as the launcher would launch it on the benchmark's shapes (bf16,
H * D = 2048, row strides divisible by 16), then its PTX goes through the ptxas Triton itself uses
(`-v`) and its cubin through cuobjdump. Columns: registers per thread, spill stores / loads (bytes),
whether ptxas serialized the kernel's wgmma instructions (warning C7515), and in the SASS the number
of HGMMA instructions and of WARPGROUP.DEPBAR waits (one wait per HGMMA is serialized execution).
The warp-specialized Gluon kernels (fwd_ws; dkdv_ws, and bwd_ws with dQ fused: kernels/flash_{fwd,bwd}_hopper.py) show their
launch parameters as BLOCK_M, BLOCK_N, the default partition's 4 warps, STAGES; their registers are
the kernel's cap, which setmaxnreg raises to 240 for the consumer warpgroups (JSON: "setmaxnreg"
counts those instructions). Run it without TRITON_INTERPRET. docs/perf-notes.md records what it found.
"""
import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_report.py compiles the kernels for sm_90a: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import flash_fwd_tma  # noqa: E402
from kernels.flash_bwd import _attn_bwd  # noqa: E402
from kernels.flash_fwd import _attn_fwd  # noqa: E402
from kernels.launch import KernelConfig, hopper_config, parse_launch_spec  # noqa: E402
import kernels.flash_bwd_hopper as ws  # noqa: E402
import kernels.flash_fwd_hopper as fws  # noqa: E402
from kernels.hopper import MAXNREG, row_descriptor  # noqa: E402

MODEL_DIM = 2048                                   # as scripts/bench_attention.py
# pass -> kernel; "bwd" is the one-launch backward (dK/dV and dQ programs in one grid, the dK/dV
# parameters' warps and stages), compiled with the dkdv and dq entries' tiles
# "fwd_ws_docs", "bwd_ws_docs": the same forward and fused backward with packed documents (DOCS; causal only)
# "fwd_ws", "dkdv_ws", "bwd_ws": the warp-specialized Gluon kernels (kernels/flash_{fwd,bwd}_hopper.py), with
# their own launch parameters (--ws sets the backward's); bwd_ws is the backward with dQ fused (TMA reduce-add)
# "fwd_tma": the forward with TMA loads for dense whole-tile inputs (kernels/flash_fwd_tma.py, opt-in), with the
# fwd entry's parameters
KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd, "dq": _attn_bwd, "bwd": _attn_bwd,
           "fwd_ws": fws._attn_fwd_hopper, "dkdv_ws": ws._attn_bwd_hopper, "bwd_ws": ws._attn_bwd_hopper,
           "fwd_ws_docs": fws._attn_fwd_hopper, "bwd_ws_docs": ws._attn_bwd_hopper,
           "fwd_tma": flash_fwd_tma._attn_fwd_tma}
FP32_POINTERS = {"LSE", "Delta", "DLse", "Lse2"}


def signature(fn, constexprs: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) for `fn` with these constexpr values: capitalized
    arguments are tensors (bf16; fp32 for LSE, delta and the dQ accumulator; cu_seqlens absent),
    *_scale are fp32, the rest int32, strides and lengths divisible by 16; no ALiBi slopes (AlibiSlopes None)."""
    sig, cons, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name], cons[(i,)] = "constexpr", constexprs[name]
        elif name.startswith(("CuSeqlens", "AlibiSlopes")):
            sig[name], cons[(i,)] = "constexpr", None
        elif name[0].isupper():
            sig[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith(("stride_", "seqlen_")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cons, attrs


def constexprs(pass_name: str, d: int, causal: bool, cfg: KernelConfig, cfg_dq: KernelConfig) -> dict:
    """cfg: the pass's parameters (for "bwd", the dK/dV programs'); cfg_dq: the dQ programs' in "bwd"."""
    c = dict(NUM_HEADS=MODEL_DIM // d, GROUP=1, HEAD_DIM=d, HEAD_DIM_PAD=d, IS_VARLEN=False,
             HAS_LEFT=False, HAS_RIGHT=causal, PRECISION="tf32", SOFTCAP=0.0, ALIBI=False)
    if pass_name == "fwd":
        return c | dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
    dq = cfg if pass_name == "dq" else cfg_dq
    return c | dict(BLOCK_M1=cfg.BLOCK_M, BLOCK_N1=cfg.BLOCK_N, BLOCK_M2=dq.BLOCK_M, BLOCK_N2=dq.BLOCK_N,
                    FUSED_DQ=False, COUNTED=cfg.counted, PROGRAMS="both" if pass_name == "bwd" else pass_name,
                    # the dQ pass of a split backward runs first and does the preprocess (Delta; Lse2 for the
                    # Gluon dK/dV kernel), as kernels/launch.py launches it
                    PREPROCESS=pass_name == "dq", HAS_DLSE=False, WRITE_LSE2=pass_name == "dq")


def tool(name: str) -> str:
    """The CUDA tool Triton itself uses (its TRITON_PTXAS_PATH-style override, else the one it bundles): the PTX
    version Triton emits follows that ptxas, so another ptxas can reject it (a CUDA 13 image: PTX 9.0 vs 8.7)."""
    from triton import knobs
    path = Path(getattr(knobs.nvidia, name).path)
    if not path.exists():
        sys.exit(f"{path} not found: this Triton install has no {name}")
    return str(path)


def _bind_and_compile(fn, source_cls, args, kwargs):
    """Compile `fn` for sm_90a with these launch arguments, bound by Triton's own argument binder (what the JIT
    would specialize them to at launch)."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, sig, cons, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(source_cls(fn, sig, cons, attrs), target=target, options=options.__dict__)


def compile_tma(d: int, causal: bool, cfg: KernelConfig):
    """kernels/flash_fwd_tma.py's forward as its launcher would launch it on the benchmark's shapes (1K tokens)."""
    heads, n = MODEL_DIM // d, 1024
    q, k, v, o = (torch.empty(1, n, heads, d, dtype=torch.bfloat16) for _ in range(4))
    lse = torch.empty(1, heads, n)
    desc = flash_fwd_tma._descriptor
    args = (desc(q, cfg.BLOCK_M), desc(k, cfg.BLOCK_N), desc(v, cfg.BLOCK_N), desc(o, cfg.BLOCK_M), lse, 0.1, n,
            n // cfg.BLOCK_M, lse.stride(0), lse.stride(1))
    kwargs = dict(NUM_HEADS=heads, GROUP=1, HEAD_DIM=d, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, CAUSAL=causal,
                  PRECISION="tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _bind_and_compile(KERNELS["fwd_tma"], ASTSource, args, kwargs)


def compile_gluon(pass_name: str, d: int, causal: bool):
    """A Gluon kernel ("fwd_ws", "dkdv_ws" or "bwd_ws") compiled for sm_90a as its launcher would launch it on the
    benchmark's shapes: the arguments are built on the CPU and bound by Triton's own argument binder.
    Returns the compiled kernel and its launch parameters as a KernelConfig (BLOCK_M, BLOCK_N, 4, STAGES)."""
    from triton.experimental.gluon._runtime import GluonASTSource
    heads, n = MODEL_DIM // d, 1024
    q, k, v, do = (torch.empty(1, n, heads, d, dtype=torch.bfloat16) for _ in range(4))
    lse = torch.empty(1, heads, n)
    docs = pass_name.endswith("_docs")
    bounds = (torch.empty(n, dtype=torch.int32), torch.empty(n, dtype=torch.int32)) if docs else (None, None)
    if pass_name.startswith("fwd_ws"):
        block_n, stages = fws.launch_config(d)
        cfg = KernelConfig(fws.BLOCK_M.value, block_n, 4, stages)
        args = (row_descriptor(q, fws.HALF_M.value), row_descriptor(k, block_n), row_descriptor(v, block_n), q, lse,
                0.1, n, q.stride(1), lse.stride(0), lse.stride(1), bounds[0])
        kwargs = dict(NUM_HEADS=heads, GROUP=1, HEAD_DIM=d, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal, DOCS=docs)
    else:
        block_m, stages = ws.launch_config(d)
        cfg = KernelConfig(block_m, ws.BLOCK_N.value, 4, stages)
        fused = pass_name.startswith("bwd_ws")
        dq = ws.dq_descriptor(torch.empty(1, n, heads, d), block_m) if fused else None
        args = (row_descriptor(q, block_m), row_descriptor(do, block_m), row_descriptor(k, ws.HALF_N.value),
                row_descriptor(v, ws.HALF_N.value), dq, ws.vector_descriptor(lse, block_m),
                ws.vector_descriptor(lse, block_m), k, v, 0.1, 0.1, n, lse.stride(0), lse.stride(1),
                k.stride(1), v.stride(1), *bounds)
        kwargs = dict(NUM_KV_HEADS=heads, GROUP=1, HEAD_DIM=d, BLOCK_M=block_m, STAGES=stages, CAUSAL=causal,
                      FUSED_DQ=fused, DOCS=docs)
    kwargs.update(num_warps=4, maxnreg=MAXNREG)
    return _bind_and_compile(KERNELS[pass_name], GluonASTSource, args, kwargs), cfg


def report(pass_name: str, d: int, causal: bool, cfg: KernelConfig, cfg_dq: KernelConfig | None = None) -> dict:
    """Compile one kernel and read ptxas's and the SASS's account of it."""
    fn = KERNELS[pass_name]
    if "_ws" in pass_name:
        compiled, cfg = compile_gluon(pass_name, d, causal)
    elif pass_name == "fwd_tma":
        compiled = compile_tma(d, causal, cfg)
    else:
        compiled = triton.compile(ASTSource(fn, *signature(fn, constexprs(pass_name, d, causal, cfg, cfg_dq or cfg))),
                                  target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx.write_text(compiled.asm["ptx"])
        cubin.write_bytes(compiled.asm["cubin"])
        ptxas = subprocess.run([tool("ptxas"), "-v", "-arch=sm_90a", str(ptx), "-o", os.devnull],
                               capture_output=True, text=True)
        sass = subprocess.run([tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    log = ptxas.stderr
    if ptxas.returncode:
        raise RuntimeError(f"ptxas failed on {pass_name} D{d}: {log.strip()[:300]}")

    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(pass_name=pass_name, D=d, causal=causal, config=cfg.__dict__, registers=number(r"Used (\d+) registers"),
                spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"),
                serialized_wgmma="C7515" in log, hgmma=len(re.findall(r"\bHGMMA\b", sass)),
                depbar=len(re.findall(r"WARPGROUP\.DEPBAR", sass)), shared_bytes=compiled.metadata.shared,
                setmaxnreg=len(re.findall(r"SETMAXREG", sass)), tma_reduce=compiled.asm["ptx"].count("cp.reduce.async.bulk"))


def parse_config(text: str) -> tuple[str, KernelConfig]:
    try:
        pass_name, cfg = parse_launch_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--config {e}") from None
    if pass_name not in ("fwd", "dkdv", "dq"):
        raise argparse.ArgumentTypeError(f"--config {text!r}: PASS must be one of fwd, dkdv, dq")
    return pass_name, cfg


def loop_column(pass_name: str, counted: bool) -> str:
    return ("counted" if counted else "tl.range") if pass_name in ("dkdv", "bwd") else "-"


def parse_ws(text: str) -> tuple[int, int]:
    try:
        block_m, stages = map(int, text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ws {text!r}: expected BLOCK_M,STAGES") from None
    return block_m, stages


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128], choices=[64, 128, 256])
    ap.add_argument("--causal", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    ap.add_argument("--passes", nargs="+", default=list(KERNELS), choices=list(KERNELS),
                    help="bwd: the one-launch backward, with the dkdv and dq parameters")
    ap.add_argument("--config", type=parse_config, action="append", default=[],
                    help="PASS=BLOCK_M,BLOCK_N,WARPS,STAGES[,counted] instead of the Hopper table entry (repeatable)")
    ap.add_argument("--ws", type=parse_ws, default=None, metavar="BLOCK_M,STAGES",
                    help="dkdv_ws launch parameters instead of kernels/flash_bwd_hopper.py's")
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    args = ap.parse_args(argv)
    chosen = dict(args.config)
    stack = contextlib.ExitStack()   # held until main returns
    if args.ws:
        stack.enter_context(ws.override_launch(*args.ws))
    rows = []
    if not args.json:
        print("| pass | D | causal | BLOCK_M, BLOCK_N, warps, stages | dK/dV loop | registers | spill stores / loads "
              "(bytes) | wgmma serialized (C7515) | HGMMA | DEPBAR waits | shared (bytes) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        for causal in map(bool, args.causal):
            for pass_name in args.passes:
                if pass_name.endswith("_docs") and not causal:   # documents are masked causally
                    continue
                table = {"bwd": "dkdv", "dkdv_ws": "dkdv", "bwd_ws": "dkdv", "fwd_ws": "fwd", "fwd_ws_docs": "fwd",
                         "bwd_ws_docs": "dkdv", "fwd_tma": "fwd"}.get(pass_name, pass_name)
                cfg = chosen.get(table) or hopper_config(table, d, causal)
                r = report(pass_name, d, causal, cfg, chosen.get("dq") or hopper_config("dq", d, causal))
                rows.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
                else:
                    c = r["config"]
                    print(f"| {pass_name} | {d} | {int(causal)} | {c['BLOCK_M']}, {c['BLOCK_N']}, {c['num_warps']}, "
                          f"{c['num_stages']} | {loop_column(pass_name, c['counted'])} | {r['registers']} | "
                          f"{r['spill_stores']} / {r['spill_loads']} | {'**yes**' if r['serialized_wgmma'] else 'no'} | "
                          f"{r['hgmma']} | {r['depbar']} | {r['shared_bytes']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
