"""Where a training step's time goes: device time per category of kernel (attention, matmuls, norms,
RoPE, loss, optimizer, copies, the rest) and the gaps between kernels, for configurations of
scripts/bench_context.py, side by side in one run. What issue 23 goal 2 (end-to-end MFU) is read from.

    make bench-step                                              # GPT-2 124M at 8K, ours vs SDPA cuDNN, compiled
    make bench-step ARGS="--configs flash flash+docs --seq-len 8192 --batch 4 --no-compile"
    make bench-step ARGS="--model tiny --configs sdpa_flash --seq-len 128 --device cpu --no-compile"

Per configuration: the model bench_context builds (random tokens; +docs configurations packed documents),
`--warmup` steps (compilation, autotuning), `--steps` timed steps back to back (CUDA events; tokens/s and
MFU as bench_context counts them), then `--profile-steps` steps under torch.profiler. Each kernel (on a
CPU: each operator's self time) falls in the first category of CATEGORIES whose pattern its name holds;
`gap` is the timed step minus the device's busy time per step (launch gaps, host work, synchronizations;
negative where kernels of several streams overlap). Writes profile.json (and with --trace, a Chrome trace
per configuration) to --out.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts import bench_context  # noqa: E402
from training.device import autocast, peak_flops, resolve_device  # noqa: E402
from training.memory import warm_host_memory  # noqa: E402
from training.validate import COMPILE_MODES, CUDAGRAPH_MODES  # noqa: E402

# (category, substrings of a lower-cased kernel or operator name); the first match wins, so the specific
# kinds come before the generic ones (a compiled model's fused kernels are named after the ops they fuse:
# triton_per_fused_native_layer_norm_... is a norm). Kernel names in docs/bench's H200 logs (torch 2.11): ours
# _attn_fwd* / _attn_bwd* (every attention kernel of kernels/), cuDNN's cudnn_generated_fort_native_sdpa_*,
# FlexAttention's triton_tem_fused_flex_attention_*, cuBLAS nvjet_sm90_*, our RoPE _rope_qkv_kernel.
CATEGORIES = (
    ("attention", ("attn", "attention", "fmha", "flash", "sdpa", "triton_tem_fused")),
    ("rope", ("rope",)),
    ("matmul", ("gemm", "xmma", "nvjet", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                "aten::baddbmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax", "logsumexp")),
    ("norm", ("layer_norm", "layernorm", "rms_norm", "rmsnorm")),
    ("copies", ("memcpy", "memset", "copy_", "to_copy", "aten::cat", "aten::clone", "contiguous")),
)
OTHER = "other"   # elementwise and fused pointwise kernels: residual adds, GELU, masks, casts, embedding
DEFAULT_CONFIGS = ["flash", "sdpa_cudnn"]


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in CATEGORIES if any(k in low for k in keys)), OTHER)


def batch_inputs(name: str, seq_len: int, batch: int, vocab: int, device: torch.device, doc_len: int) -> dict:
    """Random tokens (batch, seq_len) and targets; +docs configurations: bench_context's packed documents in
    every row, as boundaries over the flattened batch (the loader's layout)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq_len), generator=g)
    y = torch.randint(0, vocab, (batch, seq_len), generator=g)
    inputs = dict(input_ids=x.to(device), targets=y.to(device))
    if bench_context.backend(name, device).docs:
        cu, position_ids, lengths = bench_context.packed_documents(seq_len, doc_len)
        starts = torch.cat([cu[:-1] + b * seq_len for b in range(batch)] + [torch.tensor([batch * seq_len])])
        inputs |= dict(cu_seqlens=starts.to(torch.int32).to(device), position_ids=position_ids.repeat(batch, 1).to(device))
        inputs["attended"] = sum(n * n for n in lengths) / seq_len
    return inputs


def profile_config(name: str, model_name: str, seq_len: int, batch: int, device: torch.device, compile: str | None,
                   warmup: int, steps: int, profile_steps: int, doc_len: int, trace: Path | None = None) -> dict:
    """One configuration's timed steps and its profiled ones -> a row (see the module docstring)."""
    cuda = device.type == "cuda"
    model = bench_context.build(name, model_name, seq_len, device).to(device)
    if cuda and bench_context.backend(name, device).plan[0] == "offload":   # pinned buffers outside the steps
        warm_host_memory(model, batch, seq_len, torch.bfloat16)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model, mode=compile) if compile else model
    inputs = batch_inputs(name, seq_len, batch, model.config.vocab_size, device, doc_len)
    attended = inputs.pop("attended", seq_len)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cudagraphs = cuda and compile in CUDAGRAPH_MODES   # as train.py: every step a new generation of graph outputs
    kernels = bench_context.pass_context(name)

    def step():
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if "cu_seqlens" in inputs:   # a new boundaries tensor per step, as a loader's batch
            inputs["cu_seqlens"] = inputs["cu_seqlens"].clone()
        with autocast("auto", device), kernels():
            _, loss = step_model(**inputs)
        with kernels():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    sync()
    ends = [bench_context.clock(cuda)]
    for _ in range(steps):
        step()
        ends.append(bench_context.clock(cuda))
    sync()
    step_s = statistics.median(bench_context.seconds(a, b) for a, b in zip(ends, ends[1:]))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(profile_steps):
            step()
        sync()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    kernels: dict[str, float] = {}   # name -> microseconds over the profiled steps
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:   # operators: their kernels are their own entries
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        if us > 0 and not e.key.startswith("ProfilerStep"):
            kernels[e.key] = kernels.get(e.key, 0.0) + us
    per_step = {k: us / 1e3 / profile_steps for k, us in kernels.items()}   # ms per step
    categories = {cat: 0.0 for cat, _ in CATEGORIES} | {OTHER: 0.0}
    for k, ms in per_step.items():
        categories[category(k)] += ms
    busy = sum(per_step.values())
    tokens = batch * seq_len
    peak = peak_flops(device)
    top = sorted(per_step.items(), key=lambda kv: -kv[1])[:15]
    return dict(config=bench_context.label(name, compile or False), seq_len=seq_len, batch=batch,
                step_ms=step_s * 1e3, tokens_per_s=tokens / step_s,
                mfu=model.flops_per_token(attended) * tokens / step_s / peak if peak else None,
                busy_ms=busy, gap_ms=step_s * 1e3 - busy, categories=categories,
                top=[dict(name=k[:120], ms=ms, category=category(k)) for k, ms in top])


def table(rows: list[dict]) -> str:
    cats = [c for c, _ in CATEGORIES] + [OTHER]
    head = ["config", "step ms", "tokens/s", "MFU", *cats, "gap"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        share = lambda ms: f"{ms:.2f} ({ms / r['step_ms']:.0%})"  # noqa: E731
        mfu = f"{r['mfu']:.3f}" if r["mfu"] is not None else "n/a"
        lines.append("| " + " | ".join([r["config"], f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:,.0f}", mfu,
                                        *[share(r["categories"][c]) for c in cats], share(r["gap_ms"])]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help=f"bench_context.CONFIGS names ({DEFAULT_CONFIGS})")
    ap.add_argument("--model", default="gpt2_small", help=f"one of {', '.join(bench_context.MODELS)}")
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    ap.add_argument("--no-compile", action="store_true", help="eager, as train.compile=false")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (median step time)")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--doc-len", type=int, default=bench_context.DOC_LEN, help="+docs configurations: mean document length")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=Path("results/profile_step"))
    ap.add_argument("--trace", action="store_true", help="also a Chrome trace per configuration in --out")
    args = ap.parse_args(argv)
    try:   # every argument checked before any model is built
        bench_context.check_configs(args.configs)
        if args.model not in bench_context.MODELS:
            raise ValueError(f"--model {args.model!r}: expected one of {', '.join(bench_context.MODELS)}")
        for flag in ("seq_len", "batch", "steps", "profile_steps", "doc_len"):
            if getattr(args, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected an integer >= 1")
        if args.warmup < 1:
            raise ValueError(f"--warmup {args.warmup}: expected >= 1 (the first step compiles and autotunes)")
        if not args.no_compile and args.compile not in COMPILE_MODES:
            raise ValueError(f"--compile {args.compile!r}: expected one of {', '.join(COMPILE_MODES)} (or --no-compile)")
        device = resolve_device(args.device)
        for name in args.configs:
            bench_context.gpt_config(name, args.model, args.seq_len, device)
            if why := bench_context.unavailable(name, device):
                raise ValueError(f"--configs {name}: {why}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    compile = None if args.no_compile else args.compile
    rows = []
    for name in args.configs:
        rows.append(profile_config(name, args.model, args.seq_len, args.batch, device, compile, args.warmup,
                                   args.steps, args.profile_steps, args.doc_len,
                                   args.out / f"trace_{name}.json" if args.trace else None))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "top"}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else device.type, torch=torch.__version__,
               model=args.model, compile=compile)
    (args.out / "profile.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print(table(rows))
    for r in rows:
        print(f"\n{r['config']}: top kernels (ms per step)")
        for t in r["top"]:
            print(f"  {t['ms']:8.3f}  {t['category']:9s}  {t['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
