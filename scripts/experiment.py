"""Long-context experiments, one command each: train the runs with train.py's train(), evaluate their
checkpoints, write reports/<name>/report.md (tables, the commands, the environment) with PNG plots.

    python scripts/experiment.py e1_scaling          # peak memory and tokens/s vs context per backend / plan (GPU)
    python scripts/experiment.py e2_passkey          # passkey accuracy, context x depth heatmaps (GPU)
    python scripts/experiment.py e3_context          # perplexity and loss by position vs context (GPU)
    python scripts/experiment.py e4_extend           # 4K -> 32K by RoPE scaling, with/without fine-tune (GPU)
    python scripts/experiment.py e3_context --smoke  # the CPU-sized variant, configs/experiment/e3_context_smoke.yaml
    python scripts/experiment.py e2_passkey train.max_steps=500 runner.contexts=[1024,4096]

Each experiment is configs/experiment/<name>.yaml: the runs' settings as usual, plus a `runner:`
block read only here (contexts, evaluation grid, ...). Other words are Hydra overrides applied to
every run. Training metrics go where train() puts them (metrics.jsonl, wandb) under
outputs/experiments/<name>/<date_time>/<run>/; evaluation results go to the report and results.json.
E1 trains no runs: it is scripts/bench_context.py's sweep, its points logged the same way.
"""
import argparse
import functools
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import build_data  # noqa: E402
from data.tasks import IGNORE_INDEX, PasskeyTask, passkey_scores  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import bench_context  # noqa: E402
from train import train  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.device import autocast, resolve_device, to_device  # noqa: E402
from training.validate import ConfigError, config_error, validate  # noqa: E402


class RunFailed(Exception):
    """A training run ended without finishing (out of memory): the experiment cannot go on."""


class Experiment:
    """One experiment: composes each run's config, trains it, evaluates checkpoints, writes the report."""

    def __init__(self, name: str, overrides: list[str], outputs: Path, reports: Path, command: str):
        self.name, self.overrides, self.command = name, overrides, command
        self.out_root = outputs / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.report_dir = reports / name
        self.cfg = self.compose(path_override("out_dir", self.out_root))  # as configured, before each run's settings
        validate(self.cfg)  # a mistake stops us here, not after the first run
        self.runner = self.cfg.runner
        self.device = resolve_device(self.cfg.train.device)
        self.amp = functools.partial(autocast, self.cfg.train.precision, self.device)
        self.runs: list[dict] = []     # one row per training run, for the report
        self.sections: list[str] = []  # the report's results, in order
        self.results: dict = {"experiment": name, "command": command}  # results.json
        self.report_dir.mkdir(parents=True, exist_ok=True)

    @functools.cached_property
    def data(self):
        """Built once, at first use: before the first run (see train()), so that run's wall-clock is
        training, not tokenizer training; never for an experiment without runs (E1). Every run shares
        this data config (only seq_len, batch size and passkey mix differ), hence this tokenizer and
        val split; the val loader never mixes in passkey samples."""
        try:
            return build_data(self.cfg.data, self.cfg.cache_dir)
        except ValueError as e:
            raise config_error(e) from None

    def compose(self, *run_overrides: str):
        """The experiment's config, then the user's overrides, then this run's (which win)."""
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            return compose("config", overrides=[f"experiment={self.name}",
                                                path_override("cache_dir", ROOT / ".cache"),  # train.py's default
                                                *self.overrides, *run_overrides])

    def context(self, seq_len: int) -> list[str]:
        """data.seq_len and a data.batch_size that keep runner.tokens_per_step: the same tokens per
        step, hence the same token budget, at every context."""
        tokens = self.runner.tokens_per_step
        if tokens % seq_len:
            raise ConfigError("runner.tokens_per_step", f"{tokens} is not a multiple of the context {seq_len}",
                              "use a power of two at least as large as the longest context")
        return [f"data.seq_len={seq_len}", f"data.batch_size={tokens // seq_len}"]

    def train(self, label: str, *overrides: str) -> dict:
        """train() one run into <out_root>/<label>; its summary plus what the report's run table shows."""
        overrides = (path_override("out_dir", self.out_root / label), f"logger.name={label}", *overrides)
        cfg = self.compose(*overrides)
        self.data  # noqa: B018 - prepared before the clock starts
        start = time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - start
        if summary["status"] != "finished":
            raise RunFailed(f"run {label} ended with status {summary['status']!r} at step {summary['step']} "
                            f"(seq_len {cfg.data.seq_len}, batch {cfg.data.batch_size}); see {cfg.out_dir}")
        # the median over log intervals: the first includes start-up, evaluations are excluded by train()
        speeds = [m["tokens_per_s"] for m in read_jsonl(Path(cfg.out_dir) / "metrics.jsonl") if "tokens_per_s" in m]
        run = {"run": label, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "steps": summary["step"],
               "tokens": summary["step"] * cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
               "wall_clock_s": seconds, "tokens_per_s": statistics.median(speeds), "loss": summary["loss"],
               "val_ppl": summary["val_ppl"], "out_dir": cfg.out_dir, "checkpoint": summary["checkpoint"],
               "overrides": list(overrides)}
        self.runs.append(run)
        return run

    def load(self, checkpoint: str, **changes) -> GPT:
        """A trained model from its checkpoint, built as sample.py builds it; `changes` edit its GPTConfig
        (RoPE settings) without touching the weights."""
        ckpt = load_checkpoint(checkpoint)
        model = GPT(GPTConfig(**{**ckpt["model_config"], **changes})).to(self.device)
        model.load_state_dict(ckpt["model"])
        return model.eval()

    def passkey(self, model: GPT, length: int, depths: list[float]) -> dict[float, float]:
        """Teacher-forced passkey accuracy at `length` by depth; the same prompts for every model."""
        return {depth: key for depth, (key, _) in self.passkey_scores(model, length, depths).items()}

    def passkey_scores(self, model: GPT, length: int, depths: list[float]) -> dict[float, tuple[float, float]]:
        """{depth: (key accuracy, answer-token accuracy)} at `length`, data.tasks.passkey_scores."""
        def model_fn(input_ids):
            with self.amp():
                return model(input_ids.to(self.device))[0]
        return passkey_scores(model_fn, self.data.tokenizer, length, depths, self.runner.eval_trials,
                              self.cfg.train.seed)

    def check_long_context(self, passkey_lengths: list[int] = ()) -> None:
        """Models run past their training length (only RoPE can), on prompts that fit a passkey."""
        if self.cfg.model.pos != "rope":
            raise ConfigError("model.pos", f"{self.cfg.model.pos!r}: a learned position table cannot run past the "
                              "training length", "use model.pos=rope")
        if passkey_lengths and min(passkey_lengths) < (shortest := PasskeyTask(self.data.tokenizer).min_length):
            raise ConfigError("runner", f"length {min(passkey_lengths)} is shorter than a passkey prompt ({shortest} "
                              "tokens with this tokenizer)", "use longer contexts or a larger data.vocab_size")

    def loss_by_position(self, model: GPT, length: int, n_windows: int, edges: list[int]) -> tuple[list, float]:
        """Mean next-token loss on n_windows val windows of `length` tokens, by the predicting token's
        position in its document (how much context it had) in buckets [edges[i], edges[i+1]), and
        over all tokens. The same windows for every model (a fresh loader, the same seed)."""
        loader = self.data.loader("val", 1, length, seed=self.cfg.train.seed, doc_masking=self.cfg.data.doc_masking)
        edges_t = torch.tensor(edges, device=self.device)
        total, count = torch.zeros(len(edges) - 1, device=self.device), torch.zeros(len(edges) - 1, device=self.device)
        with torch.no_grad():
            for _ in range(n_windows):
                batch = to_device(next(loader), self.device)
                with self.amp():
                    logits, _ = model(batch["input_ids"], position_ids=batch["position_ids"],
                                      cu_seqlens=batch["cu_seqlens"])
                targets = batch["targets"].flatten()
                keep = targets != IGNORE_INDEX
                loss = F.cross_entropy(logits.flatten(0, 1).float()[keep], targets[keep], reduction="none")
                bucket = torch.bucketize(batch["position_ids"].flatten()[keep], edges_t, right=True) - 1
                total += torch.bincount(bucket, weights=loss, minlength=len(total))
                count += torch.bincount(bucket, minlength=len(count))
        by_bucket = [t / n if n else None for t, n in zip(total.tolist(), count.tolist())]  # None: no token got there
        return by_bucket, (total.sum() / count.sum()).item()

    def plot(self, fig, filename: str, alt: str) -> None:
        fig.savefig(self.report_dir / filename, dpi=120, bbox_inches="tight")
        plt.close(fig)
        self.sections.append(f"![{alt}]({filename})")

    def write_report(self, title: str, summary: str) -> Path:
        """report.md and results.json; the training-run sections only for an experiment that has runs."""
        env = environment(self.device)
        lines = [f"# {title}: `{self.name}`", "", summary, "", "## Results", "", *[s + "\n" for s in self.sections]]
        if self.runs:
            runs = table(["run", "context", "batch", "steps", "tokens", "wall-clock (s)", "tokens/s (median)",
                          "final loss", "val ppl (own context)"],
                         [[r["run"], r["seq_len"], r["batch_size"], r["steps"], r["tokens"], r["wall_clock_s"],
                           r["tokens_per_s"], r["loss"], r["val_ppl"]] for r in self.runs])
            lines += ["## Training runs", "", runs, "",
                      "Wall-clock is the whole train() call (evaluations and checkpoints included; data prepared "
                      "before the first run). Outputs (metrics.jsonl, checkpoints, wandb) under "
                      f"`{self.out_root}`.", ""]
        lines += ["## Reproduce", "", "```bash", self.command, "```", ""]
        if self.runs:
            train_commands = "\n".join(shlex.join(["python", "train.py", f"experiment={self.name}",
                                                   *self.overrides, *r["overrides"]]) for r in self.runs)
            lines += ["Config overrides given on the command line (applied to every run): "
                      + (", ".join(f"`{o}`" for o in self.overrides) or "none") + ". "
                      f"Each training run is `train.py` with `configs/experiment/{self.name}.yaml` and these "
                      "overrides:", "", "```bash", train_commands, "```", ""]
        lines += ["## Environment", "", *[f"- {k}: {v}" for k, v in env.items()], ""]
        path = self.report_dir / "report.md"
        path.write_text("\n".join(lines))
        self.results |= {"runs": self.runs, "environment": env}
        (self.report_dir / "results.json").write_text(json.dumps(self.results, indent=1))
        return path


# --- the experiments -------------------------------------------------------------------------------------

def e1_scaling(x: Experiment) -> Path:
    """scripts/bench_context.py's sweep (no train.py runs): per attention backend and memory plan, full
    training steps at contexts doubling until out of memory; peak memory and tokens/s vs context."""
    r = x.runner
    configs = list(r.configs)
    for key, names, known in (("runner.model", [r.model], bench_context.MODELS),
                              ("runner.configs", configs, bench_context.CONFIGS)):
        if unknown := [n for n in names if n not in known]:
            raise ConfigError(key, f"unknown {', '.join(map(repr, unknown))}", f"choose from {', '.join(known)}")
    if not 0 < r.start <= r.max:
        raise ConfigError("runner.start", f"{r.start} is not in 1..runner.max ({r.max})", "start at a shorter context")
    rows = bench_context.sweep(configs, r.model, r.start, r.max, r.steps, r.long_steps, r.long_from,
                               r.max_step_seconds, x.device, x.out_root, wandb=x.cfg.logger.mode,
                               project=x.cfg.logger.project, log=lambda row: print(json.dumps(row), flush=True),
                               max_by_config=dict(r.get("max_by_config") or {}),
                               breakdown_at=tuple(r.get("breakdown_at") or ()))

    cuda = x.device.type == "cuda"

    def overview(name: str) -> list:
        """The configuration in words, its longest context that trained, and what stopped the doubling."""
        attention, sdpa_backend, (checkpointing, seq_chunk, loss_chunk) = bench_context.backend(name, x.device)
        plan = "none" if checkpointing == "none" else f"{checkpointing}, seq_chunk {seq_chunk}, loss_chunk {loss_chunk}"
        mine = [row for row in rows if row["config"] == name]
        ok = [row for row in mine if row["status"] == "ok"]
        stop = (mine[-1]["status"] if mine[-1]["status"] != "ok" else
                f"step > {r.max_step_seconds} s" if mine[-1]["step_s"] > r.max_step_seconds else
                "runner.max_by_config" if name in (r.get("max_by_config") or {}) else "runner.max")
        return [name, f"sdpa ({sdpa_backend})" if attention == "sdpa" else attention, plan,
                human(ok[-1]["seq_len"]) if ok else "none", f"{ok[-1]['tokens_per_s']:,.0f}" if ok else None, stop]

    x.sections.append("Longest context that trained, per configuration:\n\n" + table(
        ["config", "attention", "memory plan", "longest context", "tokens/s there", "stopped by"],
        [overview(name) for name in configs]))
    x.sections.append("Every point (out of memory and errors are results too):\n\n"
                      + bench_context.markdown_table(rows))
    x.sections.append(
        "Step s: median of the timed steps (the first is not timed unless it is the only one; with `offload` "
        "the pinned host buffers are allocated before any step, `training.memory.warm_host_memory`). MFU: model "
        "FLOPs (`GPT.flops_per_token`) over the device's dense bf16 peak, where known. "
        + ("Peak GiB: `torch.cuda.max_memory_allocated` in a step. Kept for backward: GPU memory allocated "
           "by the forward pass (what it keeps for backward, plus what it returns: the loss and, without "
           "loss_chunk, the logits)." if cuda else
           "Peak GiB: not measured on a CPU. Kept for backward: the distinct tensors autograd saves "
           "(`saved_tensors_hooks`), parameters excluded; the plan's `offload` parks its tensors outside "
           "autograd, so they are not counted.")
        + " Params + RoPE: parameters and the RoPE cos/sin table; AdamW state: its moments after a step.")
    for row in rows:
        if "peak_breakdown" in row:
            x.sections.append(
                f"What holds the memory at the peak, `{row['config']}` at {human(row['seq_len'])} tokens "
                f"({row['status']}): live allocations at the highest point of the allocator's trace, by the "
                "innermost frame of this repository that allocated them (`training/memory_breakdown.py`):\n\n"
                + bench_context.breakdown_table(row))
    for filename, alt in bench_context.plot(rows, {"model": r.model, "device": environment(x.device)["device"]},
                                            x.report_dir):
        x.sections.append(f"![{alt}]({filename})")
    x.sections.append(f"Per-configuration metrics.jsonl and wandb runs (one group per sweep) under `{x.out_root}`.")
    x.results |= {"model": r.model, "model_config": bench_context.MODELS[r.model],
                  "configs": {name: dict(zip(("attention", "sdpa_backend", "memory_plan"),
                                             bench_context.backend(name, x.device))) for name in configs},
                  "rows": rows}
    shape = bench_context.MODELS[r.model]
    return x.write_report(
        "E1 memory and throughput vs context",
        f"Full training steps (forward, backward, AdamW) of `{r.model}` ({shape['n_layer']} layers, d_model "
        f"{shape['d_model']}, vocab {shape['vocab_size']}) on batch 1 of random tokens, "
        f"{'bf16 autocast' if cuda else 'fp32'}, per attention backend with the memory plan on (`+plan`: "
        f"activation checkpointing `{bench_context.PLAN[0]}`, seq_chunk {bench_context.PLAN[1]}, loss_chunk "
        f"{bench_context.PLAN[2]}) and off. The context doubles from {human(r.start)} to at most {human(r.max)} "
        f"until the first out-of-memory (a result: OOM), or a step slower than {r.max_step_seconds} s; "
        f"{r.steps} step(s) per point" + (f", {r.long_steps} from {human(r.long_from)} on." if r.long_from <= r.max
                                          else ".")
        + ("" if cuda else " On a CPU our kernels run as `attention=reference` (their CPU path)."))


def e2_passkey(x: Experiment) -> Path:
    """Train at each context; score every model on the whole length x depth grid."""
    r = x.runner
    contexts, lengths, depths = list(r.contexts), list(r.eval_lengths), list(r.eval_depths)
    x.check_long_context(lengths + contexts)
    grids, token_acc = {}, {}
    for seq_len in contexts:
        run = x.train(f"ctx{seq_len}", *x.context(seq_len))
        model = x.load(run["checkpoint"])
        by_length = [x.passkey_scores(model, length, depths) for length in lengths]
        grids[seq_len] = [[acc[d][0] for acc in by_length] for d in depths]  # rows depths, columns lengths
        token_acc[seq_len] = [float(np.mean([acc[d][1] for d in depths])) for acc in by_length]
        del model

        fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.45 * len(depths) + 1.5), layout="constrained")
        image = ax.imshow(grids[seq_len], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i, row in enumerate(grids[seq_len]):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [human(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        ax.set_title(f"passkey accuracy, model trained at {human(seq_len)}")
        fig.colorbar(image, ax=ax, label="accuracy")
        x.plot(fig, f"passkey_ctx{seq_len}.png", f"passkey heatmap, trained at {human(seq_len)}")

    mean = {seq_len: np.mean(grid, axis=0).tolist() for seq_len, grid in grids.items()}  # over depths
    x.sections.insert(0, "Teacher-forced passkey accuracy, mean over depths "
                      f"{', '.join(f'{d:g}' for d in depths)} (prompts per cell: {r.eval_trials}):\n\n"
                      + table(["trained at", *[f"@{human(n)}" for n in lengths]],
                              [[human(seq_len), *accs] for seq_len, accs in mean.items()]))
    x.sections.insert(1, "Answer tokens right (of the key's tokens, same prompts; partial progress the table "
                      "above, which needs every token, does not show):\n\n"
                      + table(["trained at", *[f"@{human(n)}" for n in lengths]],
                              [[human(seq_len), *accs] for seq_len, accs in token_acc.items()]))
    x.results |= {"lengths": lengths, "depths": depths, "accuracy": {str(k): v for k, v in grids.items()},
                  "token_accuracy": {str(k): v for k, v in token_acc.items()}}
    return x.write_report("E2 passkey retrieval vs training context",
                          f"The same model trained on the same number of tokens at contexts "
                          f"{', '.join(map(human, contexts))} with `data.passkey_mix={x.cfg.data.passkey_mix}` (that "
                          "fraction of the training batches are passkey prompts, loss on the answer tokens only, "
                          "so a run's final loss may be a passkey batch's), then "
                          "scored on every (length, depth) cell, past its training length too (RoPE).")


def e3_context(x: Experiment) -> Path:
    """Train at each context with constant tokens per step; loss by position on the same long val windows."""
    r = x.runner
    contexts = list(r.contexts)
    length = r.position_eval_len or max(contexts)
    x.check_long_context()
    edges = position_buckets(length)
    curves, ppl_long = {}, {}
    for seq_len in contexts:
        run = x.train(f"ctx{seq_len}", *x.context(seq_len))
        curves[seq_len], loss = x.loss_by_position(x.load(run["checkpoint"]), length, r.position_eval_windows, edges)
        ppl_long[seq_len] = math.exp(loss)

    x.sections.append(table(["context", "batch", "val ppl (own context)", f"val ppl ({human(length)} windows)",
                             "wall-clock (s)", "tokens/s (median)"],
                            [[human(run["seq_len"]), run["batch_size"], run["val_ppl"], ppl_long[run["seq_len"]],
                              run["wall_clock_s"], run["tokens_per_s"]] for run in x.runs]))
    buckets = [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:])]
    x.sections.append(f"Val loss by position in the document (windows of {human(length)} tokens: "
                      f"{r.position_eval_windows}; a model's training context ends at its own length):\n\n"
                      + table(["position", *[f"ctx {human(c)}" for c in contexts]],
                              [[b, *[curves[c][i] for c in contexts]] for i, b in enumerate(buckets)]))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    mids = [max(1.0, (lo + hi) / 2) for lo, hi in zip(edges, edges[1:])]
    for seq_len, color in zip(contexts, plt.cm.viridis(np.linspace(0, 0.85, len(contexts)))):
        ax.plot(mids, np.array(curves[seq_len], dtype=float), marker="o", color=color,
                label=f"trained at {human(seq_len)}")
        ax.axvline(seq_len, color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("position in the document (tokens of context)")
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(f"loss by position, {human(length)}-token val windows (dotted: training context)")
    ax.legend()
    x.plot(fig, "loss_by_position.png", "val loss by position")
    x.results |= {"position_edges": edges, "loss_by_position": {str(k): v for k, v in curves.items()},
                  "val_ppl_long": {str(k): v for k, v in ppl_long.items()}}
    return x.write_report("E3 perplexity vs training context",
                          f"The same model at contexts {', '.join(map(human, contexts))}, with "
                          f"{r.tokens_per_step} tokens per step at each (the batch shrinks as the context grows), "
                          "as the FlashAttention paper's GPT-2 1K vs 4K.")


def e4_extend(x: Experiment) -> Path:
    """Train short; at the long context score the plain model, each RoPE change, and each after a fine-tune."""
    r = x.runner
    short, long = r.short_context, r.long_context
    depths = list(r.eval_depths)
    x.check_long_context([short, long])
    edges = position_buckets(long)
    base = x.train(f"short{short}", *x.context(short))["checkpoint"]
    rows, curves = [], {}

    def evaluate(label: str, model: GPT, length: int) -> None:
        accs = x.passkey(model, length, depths)
        curves[label], loss = x.loss_by_position(model, length, r.eval_windows, edges)
        rows.append({"variant": label, "length": length, "val_ppl": math.exp(loss),
                     "passkey_acc": sum(accs.values()) / len(accs), "by_depth": list(accs.values())})

    evaluate(f"trained at {human(short)}, at its own length", x.load(base), short)
    evaluate("plain (RoPE unchanged)", x.load(base), long)
    for method, changes in r.methods.items():
        changes = OmegaConf.to_container(changes, resolve=True)
        evaluate(f"{method}, no fine-tune", x.load(base, **changes), long)
        tuned = x.train(f"finetune_{method}", *x.context(long), *[f"model.{k}={v}" for k, v in changes.items()],
                        path_override("train.init_from", base), *[f"train.{k}={v}" for k, v in r.finetune.items()])
        evaluate(f"{method} + {tuned['steps']}-step fine-tune", x.load(tuned["checkpoint"]), long)

    resolved = {m: OmegaConf.to_container(c, resolve=True) for m, c in r.methods.items()}
    methods = "; ".join(f"{m}: " + ", ".join(f"`model.{k}={v}`" for k, v in c.items()) for m, c in resolved.items())
    x.sections.append(table(["variant", "eval length", "val ppl", "passkey acc",
                             *[f"acc @depth {d:g}" for d in depths]],
                            [[v["variant"], human(v["length"]), v["val_ppl"], v["passkey_acc"], *v["by_depth"]]
                             for v in rows]))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[3, 2], layout="constrained")
    mids = [max(1.0, (lo + hi) / 2) for lo, hi in zip(edges, edges[1:])]
    for row in rows[1:]:  # the reference row scores shorter windows
        ax_loss.plot(mids, np.array(curves[row["variant"]], dtype=float), marker="o", label=row["variant"])
    ax_loss.axvline(short, color="gray", linestyle=":", linewidth=1)
    ax_loss.set_xscale("log")
    ax_loss.set_xlabel("position in the document (tokens of context)")
    ax_loss.set_ylabel("val loss (nats/token)")
    ax_loss.set_title(f"loss by position at {human(long)} (dotted: training context {human(short)})")
    ax_loss.legend(fontsize=8, loc="best")
    ax_acc.barh([row["variant"] for row in rows][::-1], [row["passkey_acc"] for row in rows][::-1])
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("passkey accuracy")
    ax_acc.set_title("passkey retrieval (mean over depths)")
    x.plot(fig, "extension.png", "context extension: loss by position and passkey accuracy")
    x.results |= {"variants": rows, "position_edges": edges, "loss_by_position": curves}
    return x.write_report("E4 context extension by RoPE scaling",
                          f"A model trained at {human(short)}, evaluated at {human(long)}: unchanged, with each "
                          f"RoPE change ({methods}) and after fine-tuning with it at {human(long)} from the "
                          f"{human(short)} weights (`train.init_from`). Passkey prompts per depth: {r.eval_trials}; "
                          f"val windows: {r.eval_windows}.")


EXPERIMENTS = {"e1_scaling": e1_scaling, "e2_passkey": e2_passkey, "e3_context": e3_context, "e4_extend": e4_extend}


# --- helpers ---------------------------------------------------------------------------------------------

def path_override(key: str, path) -> str:
    """key=path as a Hydra override, the path quoted only if it holds a character Hydra's grammar reserves."""
    return f"{key}={path}" if re.fullmatch(r"[\w/.:+ -]+", str(path)) else f"{key}='{path}'"


def human(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def position_buckets(length: int) -> list[int]:
    """0, 16, 32, 64, ... doubling, then length: finer where the loss changes fastest."""
    return [0, *[2 ** i for i in range(4, max(4, math.ceil(math.log2(length))))], length]


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(map(cell, row)) + " |" for row in rows]])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def environment(device: torch.device) -> dict[str, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")  # Linux; platform.processor() is often empty there
        lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = f"CPU: {models[0] if models else platform.processor() or platform.machine()}"
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "python": platform.python_version(), "commit": git.stdout.strip() or "unknown",
            "date": datetime.now().isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help=f"one of {', '.join(EXPERIMENTS)} (a _smoke suffix = --smoke)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. train.max_steps=500")
    parser.add_argument("--smoke", action="store_true", help="the CPU-sized variant: <name>_smoke.yaml")
    parser.add_argument("--reports", type=Path, default=ROOT / "reports",
                        help="report.md, results.json and PNGs go to REPORTS/<name>/")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "experiments",
                        help="runs go to OUTPUTS/<name>/<date_time>/<run>/")
    args = parser.parse_intermixed_args(argv)
    base = args.name.removesuffix("_smoke")
    if base not in EXPERIMENTS:
        print(f"experiment.py: unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    name = f"{base}_smoke" if args.smoke or args.name != base else base
    command = shlex.join(["python", "scripts/experiment.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        report = EXPERIMENTS[base](Experiment(name, args.overrides, args.outputs.resolve(), args.reports.resolve(),
                                              command))
    except (ConfigError, HydraException) as e:  # a user's mistake: one line, no traceback
        print(f"config error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"experiment.py: {e}", file=sys.stderr)
        return 1
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
