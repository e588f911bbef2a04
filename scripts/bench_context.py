"""Context sweep: how long a sequence each attention backend / memory plan can train on one GPU.

    make bench-context                                 # GPT-2 124M, every configuration below
    make bench-context ARGS="--configs flash+plan --start 262144 --max 1048576"

For each configuration, context lengths double from --start until the first out-of-memory (a
result, recorded, not a crash) or --max. Each point runs full training steps (forward, backward,
AdamW) on batch 1 of random tokens under bf16 autocast and records the step time, tokens/s, MFU
and a measured memory breakdown: parameters, AdamW state (+ gradients), what the forward pass
keeps for backward, and the peak. Writes context.json / context.csv / context_{memory,speed}.png
to --out.
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402
from training.device import peak_flops  # noqa: E402
from training.memory import apply_memory_plan  # noqa: E402

GIB = 2**30
# name -> (model.attention, model.sdpa_backend, memory plan (activation_checkpointing, seq_chunk, loss_chunk))
CONFIGS = {
    "flash+plan": ("flash", "efficient", ("offload", 65536, 16384)),
    "flash": ("flash", "efficient", ("none", 0, 0)),
    "sdpa_cudnn+plan": ("sdpa", "cudnn", ("offload", 65536, 16384)),
    "sdpa_cudnn": ("sdpa", "cudnn", ("none", 0, 0)),
    "sdpa_flash": ("sdpa", "flash", ("none", 0, 0)),
    "naive": ("naive", "efficient", ("none", 0, 0)),
}
MODELS = {  # GPT-2 sizes with the GPT-2 vocabulary (padded to 50304) and RoPE instead of a position table
    "gpt2_small": dict(n_layer=12, n_head=12, d_model=768),
    "gpt2_medium": dict(n_layer=24, n_head=16, d_model=1024),
}


def run_point(name, model_name, seq_len, steps):
    attention, sdpa_backend, plan = CONFIGS[name]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    cfg = GPTConfig(vocab_size=50304, seq_len=seq_len, attention=attention, sdpa_backend=sdpa_backend,
                    doc_masking=False, **MODELS[model_name])
    model = apply_memory_plan(GPT(cfg).cuda(), *plan)
    mem_params = torch.cuda.memory_allocated()
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), "cuda")
    x = torch.randint(0, 50304, (1, seq_len), device="cuda")
    y = torch.randint(0, 50304, (1, seq_len), device="cuda")
    times, rec = [], {}
    for i in range(steps):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, targets=y)
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == 0:   # the first step allocates AdamW's state: measure the steady state after it
            rec = dict(saved_for_backward_gib=kept / GIB)
    step_s = statistics.median(times[1:] if len(times) > 1 else times)
    tok_s = seq_len / step_s
    peak = torch.cuda.max_memory_allocated()
    flops = model.flops_per_token(seq_len) * tok_s
    dev_peak = peak_flops(torch.device("cuda"))
    del model, opt, x, y, loss
    return dict(rec, model_gib=mem_params / GIB,   # parameters + RoPE cos/sin table
                optimizer_state_gib=(before - mem_params) / GIB if steps > 1 else None,   # AdamW + grads
                peak_gib=peak / GIB, step_s=step_s, tokens_per_s=tok_s, mfu=flops / dev_peak if dev_peak else None)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--model", default="gpt2_small", choices=list(MODELS))
    ap.add_argument("--start", type=int, default=8192)
    ap.add_argument("--max", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed unless it is the only one)")
    ap.add_argument("--long-steps", type=int, default=1, help="steps per point from --long-from tokens on")
    ap.add_argument("--long-from", type=int, default=262144)
    ap.add_argument("--max-step-seconds", type=float, default=400.0, help="stop doubling past this step time")
    ap.add_argument("--out", default=os.environ.get("OUT", "context-out"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_context.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model}
    print(json.dumps(env), flush=True)
    rows = []
    for name in args.configs:
        n = args.start
        while n <= args.max:
            steps = args.long_steps if n >= args.long_from else args.steps
            try:
                r = dict(config=name, seq_len=n, status="ok", **run_point(name, args.model, n, steps))
            except torch.OutOfMemoryError:
                r = dict(config=name, seq_len=n, status="OOM")
            except Exception as e:  # noqa: BLE001 - a backend refusing a length is a result too
                r = dict(config=name, seq_len=n, status=f"error: {type(e).__name__}: {str(e)[:120]}")
            torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
            if r["status"] != "ok" or r["step_s"] > args.max_step_seconds:
                break
            n *= 2
    (out / "context.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "context.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    print(f"\n{env['gpu']}, {args.model}, batch 1, bf16 autocast, full step incl. AdamW")
    print("| config | context | step s | tokens/s | MFU | peak GiB | kept for bwd GiB | model GiB | AdamW+grads GiB |")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['config']} | {r['seq_len']} | {r['status']} | | | | | | |")
            continue
        mfu = f"{r['mfu']:.2f}" if r["mfu"] else "-"
        opt = f"{r['optimizer_state_gib']:.2f}" if r["optimizer_state_gib"] is not None else "-"
        print(f"| {r['config']} | {r['seq_len']} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {mfu} | "
              f"{r['peak_gib']:.2f} | {r['saved_for_backward_gib']:.2f} | {r['model_gib']:.2f} | {opt} |")
    plot(rows, env, out)


def plot(rows, env, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for key, label, fname in (("peak_gib", "peak GPU memory (GiB)", "context_memory.png"),
                              ("tokens_per_s", "training tokens/s", "context_speed.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["config"] for r in rows):
            pts = [(r["seq_len"], r[key]) for r in rows if r["config"] == name and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
            oom = [r["seq_len"] for r in rows if r["config"] == name and r["status"] == "OOM"]
            if oom and pts:
                ax.scatter(oom, [pts[-1][1]], marker="x", color="red")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens, batch 1)")
        ax.set_ylabel(label)
        ax.set_title(f"{env['model']} on {env['gpu']} (x = out of memory)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)


if __name__ == "__main__":
    main()
