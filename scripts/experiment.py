"""Long-context experiments, one command each: train the runs with train.py's train(), evaluate their
checkpoints, write reports/<name>/results.json, and build report.md (tables, PNG plots, the commands,
the environment, the corpus) from that file alone.

    python scripts/experiment.py e1_scaling          # peak memory and tokens/s vs context per backend / plan (GPU)
    python scripts/experiment.py e2_passkey          # passkey accuracy, context x depth heatmaps (GPU)
    python scripts/experiment.py e3_context          # loss overall and by position vs context, 2 seeds (GPU)
    python scripts/experiment.py e4_extend           # 4K -> 32K: RoPE unchanged / PI / theta / YaRN, +- fine-tune (GPU)
    python scripts/experiment.py e3_context --smoke  # the CPU-sized variant, configs/experiment/e3_context_smoke.yaml
    python scripts/experiment.py e3_context --report-only   # report.md and plots again from its results.json
    python scripts/experiment.py e2_passkey train.max_steps=500 runner.contexts=[1024,4096]
    python scripts/experiment.py e3_context --resume outputs/experiments/e3_context/<date_time>   # after a crash

Each experiment is configs/experiment/<name>.yaml: the runs' settings as usual, plus a `runner:`
block read only here (contexts, seeds, evaluation grid, ...). Other words are Hydra overrides applied
to every run. Training metrics go where train() puts them (metrics.jsonl, wandb) under
outputs/experiments/<name>/<date_time>/<run>/; every number a report shows is in its results.json, so
--report-only rebuilds the same report.md without training (a hand-written reading.md beside it is
placed under the summary). Smoke variants report under outputs/reports/ (ignored by git), never over
the committed reports/. A finished run leaves its row in <run>/run.json (E2 and E3: with its evaluation; E1:
each swept configuration its rows in <config>/run.json):
--resume DIR continues an interrupted invocation, taking those runs as they are and resuming the unfinished
one from its newest checkpoint. An E2 or E3 run whose record kept its evaluation needs no checkpoint, so the
records alone, carried to another machine, let a later invocation add runs (a seed, runner.span_controls). Paths in reports are relative to the repository. E3 and E4 score every model
on the same target tokens (training/eval_tokens.py). E1 trains no runs: it is scripts/bench_context.py's
sweep, its points logged the same way.
"""
import argparse
import functools
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data import DataConfig, build_data, load_corpus  # noqa: E402
from data.corpus import corpus_fingerprint  # noqa: E402
from data.packing import split_documents  # noqa: E402
from data.tasks import PasskeyTask, passkey_scores  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from scripts import bench_context  # noqa: E402
from train import train  # noqa: E402
from training.checkpoint import (CheckpointError, check_checkpoint_file, find_latest,  # noqa: E402
                                 load_checkpoint)
from training.device import autocast, resolve_device  # noqa: E402
from training.eval_tokens import cut_pieces, position_bins, score, select_pieces  # noqa: E402
from training.validate import ConfigError, config_error, validate  # noqa: E402

# The results.json layout this script writes and --report-only reads; older files lack what the
# reports now show (the corpus, the identical-token evaluation).
FORMAT = 2
# each finished run's row of the report, beside its checkpoints: what --resume takes instead of training it again
RUN_RECORD = "run.json"
# train.* keys left out of results.json: paths of this machine
PATH_KEYS = ("ckpt_dir", "resume", "init_from")


class RunFailed(Exception):
    """A training run ended without finishing (out of memory): the experiment cannot go on."""


class Experiment:
    """One experiment: composes each run's config, trains it, evaluates checkpoints, collects results."""

    def __init__(self, name: str, overrides: list[str], outputs: Path, reports: Path, command: str,
                 resume: Path | None = None):
        self.name, self.overrides, self.command = name, overrides, command
        # resume: an earlier invocation's runs directory; its finished runs are taken as they are (RUN_RECORD),
        # an interrupted one continues from its newest checkpoint (train.resume=latest)
        self.resume = resume
        self.out_root = resume or outputs / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        self.report_dir = reports / name
        self.cfg = self.compose(path_override("out_dir", self.out_root))  # as configured, before each run's settings
        validate(self.cfg)  # a mistake stops us here, not after the first run
        self.runner = self.cfg.runner
        self.device = resolve_device(self.cfg.train.device)
        self.amp = functools.partial(autocast, self.cfg.train.precision, self.device)
        self.runs: list[dict] = []  # one row per training run, for the report
        self.results: dict = {}     # the experiment's own numbers; finish() adds what every report has
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

    @functools.cached_property
    def corpus(self) -> dict:
        """Which corpus the runs trained on (the site corpus differs between machines): corpus_record."""
        config = DataConfig.from_cfg(self.cfg.data)
        return corpus_record(load_corpus(config, Path(self.cfg.cache_dir)), self.data, config)

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

    def seeds(self) -> list[int]:
        """runner.seeds: each context is trained once per seed (train.seed: initialization and batch order;
        the data split and the evaluation stay the same)."""
        seeds = list(self.runner.seeds)
        if not seeds or len(set(seeds)) != len(seeds):
            raise ConfigError("runner.seeds", f"{seeds} must be distinct and at least one", "e.g. [0, 1]")
        return seeds

    def train(self, label: str, *overrides: str) -> dict:
        """train() one run into <out_root>/<label>; its summary plus what the report's run table shows,
        paths relative to the repository (self.path() turns them back)."""
        record = self.out_root / label / RUN_RECORD
        if self.resume and record.is_file():   # finished before: its row as it was, if it and its checkpoint are whole
            try:
                run = json.loads(record.read_text())
                if not isinstance(run.get("score"), dict):   # scored before: the checkpoint is not needed again
                    check_checkpoint_file(self.path(run["checkpoint"]))
            except (ValueError, KeyError, AttributeError, CheckpointError) as e:   # then train.resume=latest decides
                print(f"experiment.py: {label}: {record.name} or its checkpoint is unusable ({e}): resumed instead")
            else:
                print(f"experiment.py: {label} finished before (--resume): not trained again")
                if "parameters" in run:   # kept beside its evaluation: no model need be loaded for the report
                    self.results.setdefault("parameters", run["parameters"])
                self.runs.append({k: v for k, v in run.items() if k not in ("score", "parameters")})
                return run
        # a run this invocation's predecessor started (its directory is there): from its newest checkpoint, if any;
        # a run new to the directory (one --extend or a larger runner block adds) starts as a plain one
        resumed = ("train.resume=latest",) if self.resume and (self.out_root / label).is_dir() else ()
        overrides = (path_override("out_dir", self.out_root / label), f"logger.name={label}", *overrides, *resumed)
        cfg = self.compose(*overrides)
        self.data, self.corpus  # noqa: B018 - prepared before the clock starts (a failing corpus: before any run)
        start = time.perf_counter()
        summary = train(cfg)
        seconds = time.perf_counter() - start
        if summary["status"] != "finished":
            raise RunFailed(f"run {label} ended with status {summary['status']!r} at step {summary['step']} "
                            f"(seq_len {cfg.data.seq_len}, batch {cfg.data.batch_size}); see {cfg.out_dir}")
        # the median over log intervals: the first includes start-up, evaluations are excluded by train()
        metrics = read_jsonl(Path(cfg.out_dir) / "metrics.jsonl")   # every invocation's lines (a resume appends)
        speeds = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        if resumed:   # resumed at its last step, train() ran no step: the loss and checkpoint are the earlier ones
            for key in ("loss", "val_ppl"):
                summary.setdefault(key, next((m[key] for m in reversed(metrics) if key in m), None))
            summary["checkpoint"] = summary["checkpoint"] or str(find_latest(Path(cfg.train.ckpt_dir)))
        run = {"run": label, "seq_len": cfg.data.seq_len, "batch_size": cfg.data.batch_size, "seed": cfg.train.seed,
               "steps": summary["step"],
               "tokens": summary["step"] * cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum,
               "wall_clock_s": seconds, "tokens_per_s": statistics.median(speeds), "loss": summary["loss"],
               "val_ppl": summary["val_ppl"], "out_dir": relative(cfg.out_dir),
               "checkpoint": relative(summary["checkpoint"]), "overrides": [shown(o) for o in overrides]}
        if resumed:   # its wall-clock is the part trained by this invocation
            run["resumed"] = True
        write_record(record, run)
        self.runs.append(run)
        return run

    def scored(self, run: dict, evaluate: Callable[[], dict]) -> dict:
        """The run's evaluation: the one its record kept (a run taken from an earlier invocation, whose checkpoint
        may be gone: results carried to another machine), else evaluate() now, kept in its record for such a
        resume. Only evaluations that need nothing else of the run (E2's and E3's) go through here."""
        if isinstance(run.get("score"), dict):
            return run["score"]
        result = evaluate()
        write_record(self.out_root / run["run"] / RUN_RECORD,
                     run | {"score": result, "parameters": self.results["parameters"]})   # load() counted them
        return result

    @staticmethod
    def path(relative_path: str) -> Path:
        return ROOT / relative_path

    def load(self, checkpoint: str, **changes) -> GPT:
        """A trained model from its checkpoint (a run's relative path), built as sample.py builds it;
        `changes` edit its GPTConfig (RoPE settings) without touching the weights."""
        ckpt = load_checkpoint(self.path(checkpoint))
        model = GPT(GPTConfig(**{**ckpt["model_config"], **changes})).to(self.device)
        model.load_state_dict(ckpt["model"])
        self.results.setdefault("parameters", sum(p.numel() for p in model.parameters()))
        return model.eval()

    def model_fn(self, model: GPT):
        """The model as eval_tokens and data.tasks call it: input ids (B, T) -> logits (B, T, V)."""
        def logits(input_ids):
            with self.amp():
                return model(input_ids.to(self.device))[0]
        return logits

    def passkey_scores(self, model: GPT, length: int, depths: list[float]) -> dict[float, tuple[float, float]]:
        """{depth: (key accuracy, answer-token accuracy)} at `length`, data.tasks.passkey_scores; the same
        prompts for every model (the experiment's train.seed, not the run's)."""
        return passkey_scores(self.model_fn(model), self.data.tokenizer, length, depths, self.runner.eval_trials,
                              self.cfg.train.seed)

    def check_long_context(self, passkey_lengths: list[int] = ()) -> None:
        """Models run past their training length (only RoPE can), on prompts that fit a passkey."""
        if self.cfg.model.pos != "rope":
            raise ConfigError("model.pos", f"{self.cfg.model.pos!r}: a learned position table cannot run past the "
                              "training length", "use model.pos=rope")
        if passkey_lengths and min(passkey_lengths) < (shortest := PasskeyTask(self.data.tokenizer).min_length):
            raise ConfigError("runner", f"length {min(passkey_lengths)} is shorter than a passkey prompt ({shortest} "
                              "tokens with this tokenizer)", "use longer contexts or a larger data.vocab_size")

    @functools.cache
    def eval_pieces(self, length: int) -> np.ndarray:
        """The val pieces every model of this experiment is scored on (eval_tokens.select_pieces): the val
        documents cut into pieces of length + 1 tokens, runner.eval_tokens targets taken round-robin."""
        stride, budget = self.runner.eval_stride, self.runner.eval_tokens
        if not (isinstance(stride, (int, float)) and 0 < stride <= 1):
            raise ConfigError("runner.eval_stride", f"{stride!r} is not in (0, 1]",
                              "1 = non-overlapping windows, 0.5 = windows overlapping by half")
        if budget is not None and not (isinstance(budget, int) and budget >= 1):
            raise ConfigError("runner.eval_tokens", f"{budget!r} is not a positive integer", "or null: every val token")
        val = self.data.val
        pieces = select_pieces(cut_pieces(val.doc_starts, len(val), length), budget)
        self.results["eval"] = {"length": length, "stride": stride, "pieces": len(pieces),
                                "documents": len(set(pieces[:, 0].tolist())), "val_documents": val.num_docs,
                                "tokens": int((pieces[:, 3] - pieces[:, 2] - 1).sum()),
                                "edges": position_bins(length)}
        return pieces

    def score(self, model: GPT, context: int, length: int) -> dict:
        """The model, read in windows of `context` tokens, on the experiment's val pieces: the summary of
        eval_tokens.TokenScores (loss, loss by position bin, digest), plus its context and stride."""
        pieces = self.eval_pieces(length)
        stride = max(1, round(context * self.runner.eval_stride))
        scores = score(self.model_fn(model), np.asarray(self.data.val.tokens), self.data.val.doc_starts, pieces,
                       context, stride, batch_rows=max(1, self.runner.tokens_per_step // context))
        return {"context": context, "stride": stride, **scores.summary(position_bins(length))}

    def finish(self) -> Path:
        """results.json with everything the report shows, then report.md built from that file."""
        cfg = {group: OmegaConf.to_container(self.cfg[group], resolve=True) for group in ("model", "data", "train",
                                                                                          "runner")}
        self.results |= {
            "format": FORMAT, "experiment": self.name, "base": self.name.removesuffix("_smoke"),
            "command": self.command, "overrides": self.overrides, "device_type": self.device.type,
            "runner": cfg["runner"], "out_root": relative(self.out_root), "runs": self.runs,
            "config": {"model": cfg["model"], "data": cfg["data"],
                       "train": {k: v for k, v in cfg["train"].items() if k not in PATH_KEYS}},
            "environment": environment(self.device)}
        if self.runs:
            self.results["corpus"] = self.corpus
        path = self.report_dir / "results.json"
        path.write_text(json.dumps(self.results, indent=1))
        return write_report(json.loads(path.read_text()), self.report_dir)


def write_record(record: Path, run: dict) -> None:
    """A run's record, written whole or not at all: a resume trusts what it finds."""
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1))
    os.replace(tmp, record)


def corpus_record(corpus, bundle, config: DataConfig, longest: int = 5) -> dict:
    """What a report says about its corpus: source, corpus_fingerprint (equal on two machines exactly when
    the documents are), documents, characters, tokens per split at the vocab, and the `longest` documents
    by tokens (name, tokens, split). Per-document token counts come from the packed splits, whose documents
    are the corpus's in split_documents' order, each followed by one EOT."""
    train_idx, val_idx = split_documents(len(corpus), config.val_fraction, config.seed)
    sizes = {}
    for split, indices, packed in (("train", train_idx, bundle.train), ("val", val_idx, bundle.val)):
        counts = np.diff(np.append(packed.doc_starts, len(packed))) - 1
        sizes |= {int(i): (split, int(n)) for i, n in zip(indices, counts)}
    names = corpus["name"][:]
    top = sorted(sizes, key=lambda i: (-sizes[i][1], i))[:longest]
    return {"source": config.source, "fingerprint": corpus_fingerprint(corpus), "documents": len(corpus),
            "characters": int(pc.sum(pc.utf8_length(corpus.with_format("arrow")["text"])).as_py() or 0),
            "vocab_size": bundle.vocab_size, "tokens": {"train": len(bundle.train), "val": len(bundle.val)},
            "longest": [{"name": names[i], "tokens": sizes[i][1], "split": sizes[i][0]} for i in top]}


# --- the experiments: run (train, evaluate, fill x.results) --------------------------------------------

def e1_scaling(x: Experiment) -> None:
    """scripts/bench_context.py's sweep (no train.py runs): per attention backend and memory plan, full
    training steps at contexts doubling until out of memory; peak memory and tokens/s vs context. Ours
    and the baselines (sdpa_cudnn+bp: PyTorch's best practice; flex+...docs: FlexAttention with a document
    block mask) in the same run. Every configuration is checked before the first point."""
    r = x.runner
    configs = list(r.configs)
    for key, names, known in (("runner.model", [r.model], bench_context.MODELS),
                              ("runner.configs", configs, bench_context.CONFIGS)):
        if unknown := [n for n in names if n not in known]:
            raise ConfigError(key, f"unknown {', '.join(map(repr, unknown))}", f"choose from {', '.join(known)}")
    if not 0 < r.start <= r.max:
        raise ConfigError("runner.start", f"{r.start} is not in 1..runner.max ({r.max})", "start at a shorter context")
    doc_len = r.get("doc_len", bench_context.DOC_LEN)
    if not isinstance(doc_len, int) or doc_len < 1:
        raise ConfigError("runner.doc_len", f"{doc_len!r} is not an int >= 1", "mean tokens per packed document, "
                          f"e.g. {bench_context.DOC_LEN}")
    for name in configs:   # the model each configuration builds, before any point runs
        try:
            bench_context.gpt_config(name, r.model, r.start, x.device)
        except ValueError as e:
            raise ConfigError("runner.configs", f"{name!r}: {e}", "drop it or change runner.model") from None
    rows, taken = [], {}
    for name in configs:   # one sweep per configuration, its rows recorded as it ends: what --resume takes
        record = x.out_root / name / RUN_RECORD   # beside the sweep's metrics.jsonl of that configuration
        if x.resume and (earlier := sweep_record(record, name)):
            print(f"experiment.py: {name} swept before (--resume): not measured again")
            rows += earlier["rows"]
            taken[name] = earlier["environment"]
            continue
        got = bench_context.sweep([name], r.model, r.start, r.max, r.steps, r.long_steps, r.long_from,
                                  r.max_step_seconds, x.device, x.out_root, wandb=x.cfg.logger.mode,
                                  project=x.cfg.logger.project, log=lambda row: print(json.dumps(row), flush=True),
                                  max_by_config=dict(r.get("max_by_config") or {}),
                                  breakdown_at=tuple(r.get("breakdown_at") or ()), doc_len=doc_len,
                                  group=f"context-{r.model}-{x.out_root.name}")   # one wandb group, resumes too
        record.parent.mkdir(parents=True, exist_ok=True)
        write_record(record, {"config": name, "rows": got, "environment": environment(x.device)})
        rows += got

    def described(name: str) -> dict:
        c = bench_context.backend(name, x.device)
        return dict(attention=c.attention, sdpa_backend=c.sdpa_backend, memory_plan=c.plan, documents=c.docs,
                    train_overrides=bench_context.train_overrides(name))

    x.results |= {"model": r.model, "model_config": bench_context.MODELS[r.model], "doc_len": doc_len,
                  "configs": {name: described(name) for name in configs}, "rows": rows, "taken": taken}


def sweep_record(record: Path, name: str) -> dict | None:
    """E1 --resume: a configuration's rows as an earlier invocation recorded them, or None (not swept, or a
    record that is not whole: then it is swept again)."""
    if not record.is_file():
        return None
    try:
        got = json.loads(record.read_text())
        if got["config"] != name or not all(row["config"] == name for row in got["rows"]):
            raise ValueError(f"rows of another configuration than {name!r}")
        got["environment"]["device"]  # noqa: B018 - kept so the report can say where they were measured
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"experiment.py: {name}: {record.name} is unusable ({e}): swept again")
        return None
    return got


def e2_passkey(x: Experiment) -> None:
    """Train at each context (once per seed); score every model on the whole length x depth grid."""
    r = x.runner
    contexts, lengths, depths = list(r.contexts), list(r.eval_lengths), list(r.eval_depths)
    x.check_long_context(lengths + contexts)
    accuracy, token_accuracy = {}, {}
    seeds = x.seeds()
    for seq_len in contexts:
        for seed in seeds:
            run = x.train(f"ctx{seq_len}_seed{seed}", *x.context(seq_len), f"train.seed={seed}")

            def evaluate(run=run) -> dict:
                model = x.load(run["checkpoint"])
                by_length = [x.passkey_scores(model, length, depths) for length in lengths]
                # rows depths, columns lengths; answer tokens: per length, mean over depths
                return {"accuracy": [[acc[d][0] for acc in by_length] for d in depths],
                        "token_accuracy": [float(np.mean([acc[d][1] for d in depths])) for acc in by_length]}
            got = x.scored(run, evaluate)
            accuracy.setdefault(seq_len, {})[seed] = got["accuracy"]
            token_accuracy.setdefault(seq_len, {})[seed] = got["token_accuracy"]
    x.results |= {"lengths": lengths, "depths": depths, "accuracy": accuracy, "token_accuracy": token_accuracy}


def e3_context(x: Experiment) -> None:
    """Train at each context with constant tokens per step, once per seed; score every model on the same
    val target tokens, each in windows of its own context."""
    r = x.runner
    contexts = list(r.contexts)
    length = r.eval_length or max(contexts)
    if length < max(contexts):
        raise ConfigError("runner.eval_length", f"{length} is shorter than the longest context {max(contexts)}",
                          "pieces that short would not let that model use its context; use null")
    seeds = x.seeds()
    # the controls: a context trained on the longest context's batches cut into its own rows (data.sample_span):
    # the same places in the corpus per step as the longest model, so batch diversity and context length part
    span, controls = max(contexts), list(r.get("span_controls") or [])
    for c in controls:
        if not (isinstance(c, int) and 0 < c < span and span % c == 0):
            raise ConfigError("runner.span_controls", f"{c!r} is not a context that divides the longest one ({span})",
                              "e.g. [1024], or [] for none")
    x.eval_pieces(length)  # checked and cut before the first run
    scores, control_scores = {}, {}
    for seq_len in contexts:
        for seed in seeds:
            run = x.train(f"ctx{seq_len}_seed{seed}", *x.context(seq_len), f"train.seed={seed}")
            scores.setdefault(seq_len, {})[seed] = x.scored(
                run, lambda run=run, seq_len=seq_len: x.score(x.load(run["checkpoint"]), seq_len, length))
    for seq_len in controls:
        for seed in seeds:
            run = x.train(f"ctx{seq_len}_span{span}_seed{seed}", *x.context(seq_len), f"data.sample_span={span}",
                          f"train.seed={seed}")
            control_scores.setdefault(seq_len, {})[seed] = x.scored(
                run, lambda run=run, seq_len=seq_len: x.score(x.load(run["checkpoint"]), seq_len, length))
    x.results["scores"] = scores
    x.results["span_controls"] = {"span": span, "scores": control_scores}


def e4_extend(x: Experiment) -> None:
    """Train short (once per seed); at the long context score each RoPE method (runner.methods; `none` leaves
    RoPE as trained) without fine-tuning and after the same fine-tune, and the short model in its own windows:
    loss on the identical tokens, passkey at each of runner.passkey_lengths (the short model: at its own)."""
    r = x.runner
    short, long = r.short_context, r.long_context
    depths = list(r.eval_depths)
    lengths = list(r.get("passkey_lengths") or [long])
    if not all(isinstance(n, int) and short < n <= long for n in lengths) or len(set(lengths)) != len(lengths):
        raise ConfigError("runner.passkey_lengths", f"{lengths} must be distinct prompt lengths above "
                          f"runner.short_context ({short}) and at most runner.long_context ({long})",
                          f"e.g. [{2 * short}, {long}], or null for [{long}]")
    lengths.sort()
    x.check_long_context([short, long, *lengths])
    seeds = x.seeds()
    x.eval_pieces(long)  # checked and cut before the first run
    methods = {m: OmegaConf.to_container(c, resolve=True) for m, c in r.methods.items()}
    variants: dict[str, dict] = {}

    def evaluate(label: str, method: str | None, finetune_steps: int, model: GPT, context: int,
                 passkey_at: list[int], seed: int) -> None:
        passkey = {n: x.passkey_scores(model, n, depths) for n in passkey_at}
        v = variants.setdefault(label, {"variant": label, "method": method, "finetune_steps": finetune_steps,
                                        "context": context, "passkey_lengths": passkey_at, "by_seed": {}})
        v["by_seed"][seed] = {"passkey": {str(n): float(np.mean([key for key, _ in accs.values()]))
                                          for n, accs in passkey.items()},
                              "by_depth": [key for key, _ in passkey[max(passkey_at)].values()],   # the longest
                              **x.score(model, context, long)}

    for seed in seeds:
        base = x.train(f"short{short}_seed{seed}", *x.context(short), f"train.seed={seed}")["checkpoint"]
        evaluate(f"trained at {human(short)}, in {human(short)} windows", None, 0, x.load(base), short, [short], seed)
        for method, changes in methods.items():
            evaluate(f"{method_label(method, changes)}, no fine-tune", method, 0, x.load(base, **changes), long,
                     lengths, seed)
            tuned = x.train(f"finetune_{method}_seed{seed}", *x.context(long),
                            *[f"model.{k}={v}" for k, v in changes.items()],
                            path_override("train.init_from", x.path(base)), f"train.seed={seed}",
                            *[f"train.{k}={v}" for k, v in r.finetune.items()])
            evaluate(f"{method_label(method, changes)} + {tuned['steps']}-step fine-tune", method, tuned["steps"],
                     x.load(tuned["checkpoint"]), long, lengths, seed)
    x.results |= {"variants": list(variants.values()), "methods": methods}


EXPERIMENTS = {"e1_scaling": e1_scaling, "e2_passkey": e2_passkey, "e3_context": e3_context, "e4_extend": e4_extend}


# --- the reports: results.json -> (title, summary, result sections; plots saved beside) ----------------

def report_e1(res: dict, out: Path) -> tuple[str, str, list[str]]:
    r, rows = res["runner"], res["rows"]
    cuda = res["device_type"] == "cuda"

    def overview(name: str) -> list:
        """The configuration in words, its longest context that trained, and what stopped the doubling."""
        c = res["configs"][name]
        checkpointing, seq_chunk, loss_chunk = c["memory_plan"]
        plan = "none" if checkpointing == "none" else f"{checkpointing}, seq_chunk {seq_chunk}, loss_chunk {loss_chunk}"
        mine = [row for row in rows if row["config"] == name]
        ok = [row for row in mine if row["status"] == "ok"]
        stop = (mine[-1]["status"] if mine[-1]["status"] != "ok" else
                f"step > {r['max_step_seconds']} s" if mine[-1]["step_s"] > r["max_step_seconds"] else
                "runner.max_by_config" if name in (r.get("max_by_config") or {}) else "runner.max")
        attention = {"sdpa": f"sdpa ({c['sdpa_backend']})", "flex": "flex (compiled, block mask)"}.get(
            c["attention"], c["attention"])
        if c.get("documents"):
            attention += ", per document"
        return [name, attention, plan,
                human(ok[-1]["seq_len"]) if ok else "none", f"{ok[-1]['tokens_per_s']:,.0f}" if ok else None, stop]

    baselines = []   # what the baseline rows are, for the configurations this run has
    names = list(res["configs"])
    if bp := [n for n in names if tuple(res["configs"][n]["memory_plan"]) == tuple(bench_context.BEST_PRACTICE)]:
        baselines.append(
            f"{', '.join(f'`{n}`' for n in bp)}: `+bp` is PyTorch's best practice for a long context, measured in "
            "this run: activation checkpointing of every block (`torch.utils.checkpoint`, the whole block recomputed "
            f"in backward), the loss in {human(bench_context.BEST_PRACTICE[2])}-token tiles (no N x vocab logits), "
            "no sequence tiling" + ("; `sdpa_cudnn+bp` with SDPA's cuDNN kernel (on a CPU, which has none, SDPA's "
                                    "CPU flash kernel)." if "sdpa_cudnn+bp" in bp else "."))
    if docs := [n for n in names if res["configs"][n].get("documents")]:
        baselines.append(
            f"{', '.join(f'`{n}`' for n in docs)}: one row of packed random documents (lengths uniform in 1.."
            f"{2 * res['doc_len'] - 1} tokens, mean {human(res['doc_len'])}: `runner.doc_len`; the same documents "
            "for every configuration at a context), each token attending only within its document: ours through "
            "the varlen API; the document-masked baseline is FlexAttention (`torch.compile`d `flex_attention`) "
            "with a block mask from compiled `create_block_mask` and a document `mask_mod` on the row's document "
            "ids, made once per step. MFU counts the attention FLOPs the documents need (sum of squared lengths).")
    equivalents = [f"`{n}`: `{' '.join(c['train_overrides'])}`" for n, c in res["configs"].items()
                   if c.get("train_overrides")]

    sections = [
        "Longest context that trained, per configuration:\n\n" + table(
            ["config", "attention", "memory plan", "longest context", "tokens/s there", "stopped by"],
            [overview(name) for name in res["configs"]])
        + "".join(f"\n\n- {line}" for line in baselines)
        + ("\n\nThe same settings in `train.py`:\n\n" + "\n".join(f"- {e}" for e in equivalents)
           if equivalents else ""),
        "Every point (out of memory, errors and skipped configurations are results too):\n\n"
        + bench_context.markdown_table(rows),
        "Step s: median of the timed steps (the first is not timed unless it is the only one; with `offload` "
        "the pinned host buffers are allocated before any step, `training.memory.warm_host_memory`). MFU: model "
        "FLOPs (`GPT.flops_per_token`) over the device's dense bf16 peak, where known. "
        + ("Peak GiB: `torch.cuda.max_memory_allocated` in a step. Kept for backward: GPU memory allocated "
           "by the forward pass (what it keeps for backward, plus what it returns: the loss and, without "
           "loss_chunk, the logits)." if cuda else
           "Peak GiB: not measured on a CPU. Kept for backward: the distinct tensors autograd saves "
           "(`saved_tensors_hooks`), parameters excluded; the plan's `offload` parks its tensors outside "
           "autograd, so they are not counted.")
        + " Params + RoPE: parameters and the RoPE cos/sin table; AdamW state: its moments after a step."]
    for row in rows:
        if "peak_breakdown" in row:
            sections.append(
                f"What holds the memory at the peak, `{row['config']}` at {human(row['seq_len'])} tokens "
                f"({row['status']}): live allocations at the highest point of the allocator's trace, by the "
                "innermost frame of this repository that allocated them (`training/memory_breakdown.py`):\n\n"
                + bench_context.breakdown_table(row))
    for filename, alt in bench_context.plot(rows, {"model": res["model"], "device": res["environment"]["device"]},
                                            out):
        sections.append(f"![{alt}]({filename})")
    sections.append(f"Per-configuration metrics.jsonl and wandb runs (one group per sweep) under `{res['out_root']}`.")
    if taken := res.get("taken"):   # --resume: configurations measured by an earlier invocation of these runs
        sections.append("Taken as they were from an earlier invocation (`--resume`), not measured again: " + "; ".join(
            f"`{n}` ({e['device']}, commit {e['commit']}, {e['date']})" for n, e in taken.items())
            + ". Their points come from another process, possibly another machine of the kind; the environment "
            "below is this invocation's.")
    shape, plan = res["model_config"], bench_context.PLAN
    summary = (
        f"Full training steps (forward, backward, AdamW) of `{res['model']}` ({shape['n_layer']} layers, d_model "
        f"{shape['d_model']}, vocab {shape['vocab_size']}) on batch 1 of random tokens, "
        f"{'bf16 autocast' if cuda else 'fp32'}, per attention backend with the memory plan on (`+plan`: "
        f"activation checkpointing `{plan[0]}`, seq_chunk {plan[1]}, loss_chunk {plan[2]}) and off. The context "
        f"doubles from {human(r['start'])} to at most {human(r['max'])} until the first out-of-memory (a result: "
        f"OOM), or a step slower than {r['max_step_seconds']} s; {r['steps']} step(s) per point"
        + (f", {r['long_steps']} from {human(r['long_from'])} on." if r["long_from"] <= r["max"] else ".")
        + ("" if cuda else " On a CPU our kernels run as `attention=reference` (their CPU path)."))
    return "E1 memory and throughput vs context", summary, sections


def report_e2(res: dict, out: Path) -> tuple[str, str, list[str]]:
    r, lengths, depths = res["runner"], res["lengths"], res["depths"]
    contexts, seeds = list(res["accuracy"]), res["runner"]["seeds"]
    per_seed_mean = {c: [np.mean(grid, axis=0).tolist() for grid in res["accuracy"][c].values()] for c in contexts}
    header = ["trained at", *[f"@{human(n)}" for n in lengths]]
    sections = [
        f"Teacher-forced passkey accuracy, mean over depths {', '.join(f'{d:g}' for d in depths)} (prompts per "
        f"cell: {r['eval_trials']}){seed_note(seeds)}:\n\n"
        + table(header, [[human(int(c)), *[spread([m[j] for m in per_seed_mean[c]], 2) for j in range(len(lengths))]]
                         for c in contexts]),
        "Answer tokens right (of the key's tokens, same prompts; partial progress the table above, which needs "
        "every token, does not show):\n\n"
        + table(header, [[human(int(c)), *[spread([t[j] for t in res["token_accuracy"][c].values()], 2)
                                           for j in range(len(lengths))]] for c in contexts])]
    for c in contexts:
        grid = np.mean(list(res["accuracy"][c].values()), axis=0)       # over seeds; rows depths, columns lengths
        fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.45 * len(depths) + 1.5), layout="constrained")
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [human(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (0 = start)")
        ax.set_title(f"passkey accuracy, model trained at {human(int(c))}" + (f", mean of {len(seeds)} seeds"
                                                                             if len(seeds) > 1 else ""))
        fig.colorbar(image, ax=ax, label="accuracy")
        sections.append(save(fig, out, f"passkey_ctx{c}.png", f"passkey heatmap, trained at {human(int(c))}"))
    data = res["config"]["data"]
    summary = (f"The same model ({model_words(res)}) trained on the same number of tokens at contexts "
               f"{', '.join(human(int(c)) for c in contexts)}, {len(seeds)} seed(s) each, with "
               f"`data.passkey_mix={data['passkey_mix']}` and `data.passkey_lengths={data['passkey_lengths']}` (that "
               "fraction of the training batches are passkey prompts, loss on the answer tokens only, so a run's "
               "final loss may be a passkey batch's), then scored on every (length, depth) cell, past its training "
               "length too (RoPE).")
    return "E2 passkey retrieval vs training context", summary, sections


def report_e3(res: dict, out: Path) -> tuple[str, str, list[str]]:
    r, ev, scores = res["runner"], res["eval"], res["scores"]
    contexts, seeds, edges = list(scores), r["seeds"], ev["edges"]
    runs = {run["run"]: run for run in res["runs"]}
    ctl = res.get("span_controls") or {"span": None, "scores": {}}
    # (row label, column label, run label prefix, scores by seed): the contexts, then the span controls
    models = [(human(int(c)), f"ctx {human(int(c))}", f"ctx{c}", scores[c]) for c in contexts]
    models += [(f"{human(int(c))}, rows of {human(ctl['span'])} spans", f"ctx {human(int(c))} ({human(ctl['span'])} "
                "spans)", f"ctx{c}_span{ctl['span']}", s) for c, s in ctl["scores"].items()]
    every = [s for *_, by_seed in models for s in by_seed.values()]
    sections = [identical_note(ev, every),
                f"Val loss on those tokens, each model in windows of its own context{seed_note(seeds)}:\n\n" + table(
                    ["context", "batch", "val loss (nats/token)", "val ppl", "wall-clock (s)", "tokens/s (median)"],
                    [[row, runs[f"{prefix}_seed{seeds[0]}"]["batch_size"],
                      spread([s["loss"] for s in by_seed.values()]),
                      spread([float(np.exp(s["loss"])) for s in by_seed.values()]),
                      spread([runs[f"{prefix}_seed{seed}"]["wall_clock_s"] for seed in seeds]),
                      spread([runs[f"{prefix}_seed{seed}"]["tokens_per_s"] for seed in seeds])]
                     for row, _, prefix, by_seed in models]),
                "Val loss by position in the piece (p tokens before the target: the most context any model could "
                f"use; bin lo-hi holds lo <= p < hi, the last also p = hi){seed_note(seeds)}:\n\n"
                + position_table(edges, {col: list(by_seed.values()) for _, col, _, by_seed in models})]
    if ctl["scores"]:
        sections.append(f"The span control (`runner.span_controls`): a model at the shorter context trained on the "
                        f"{human(ctl['span'])} model's kind of batch, {human(ctl['span'])}-token spans cut into its "
                        "own rows (`data.sample_span`), so each step reads as few places in the corpus as the "
                        f"{human(ctl['span'])} model's. If it scores like its plain twin, the number of places per step "
                        f"does not matter; if it lags like the {human(ctl['span'])} model, the few places per step, "
                        "not the context, hold that model back.")
        span = str(ctl["span"])
        if span in scores:   # the gap to the longest context, split at the control (means over seeds)
            def mean(by_seed: dict) -> float:
                return float(np.mean([s["loss"] for s in by_seed.values()]))
            for c, by_seed in ctl["scores"].items():
                plain, control, longest = mean(scores[c]), mean(by_seed), mean(scores[span])
                gap = longest - plain
                sections[-1] += (
                    f"\n\n- {human(int(c))}: the {human(ctl['span'])} model's loss minus the plain {human(int(c))} "
                    f"model's: {gap:+.3f} nats/token; the control's minus the plain model's: {control - plain:+.3f} "
                    f"(batches of few places, the same context); the {human(ctl['span'])} model's minus the "
                    f"control's: {longest - control:+.3f} (the same places per step, the longer context)"
                    + (f": {100 * (control - plain) / gap:.0f}% of the gap goes with the batches." if gap > 0 else "."))
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for c, color in zip(contexts, plt.cm.viridis(np.linspace(0, 0.85, len(contexts)))):
        plot_by_position(ax, edges, list(scores[c].values()), f"trained at {human(int(c))}", color)
        ax.axvline(int(c), color=color, linestyle=":", linewidth=1)
    for c, by_seed in ctl["scores"].items():
        plot_by_position(ax, edges, list(by_seed.values()), f"trained at {human(int(c))}, rows of "
                         f"{human(ctl['span'])} spans", "tab:red")
    ax.set_xlabel("position in the piece (tokens of context available)")
    ax.set_title(f"val loss by position, the same {ev['tokens']:,} target tokens for every model (dotted: context)",
                 fontsize=9)
    sections.append(save(fig, out, "loss_by_position.png", "val loss by position"))
    summary = (f"The same model ({model_words(res)}) trained at contexts {', '.join(human(int(c)) for c in contexts)}"
               f" with {r['tokens_per_step']} tokens per step (the batch shrinks as the context grows) and "
               f"{res['config']['train']['max_steps']} steps, {res['runs'][0]['tokens']:,} tokens per run, "
               f"{len(seeds)} seed(s) each; then scored on identical val tokens, as the FlashAttention paper's GPT-2 "
               "1K vs 4K.")
    return "E3 perplexity vs training context", summary, sections


def e4_seeds(v: dict) -> dict:
    """An E4 variant's evaluations by seed; results written before seeds and passkey lengths (one evaluation,
    passkey at its window only) read as one seed."""
    if "by_seed" in v:
        return v["by_seed"]
    return {"-": {**v, "passkey": {str(v["context"]): v["passkey_acc"]}}}


def report_e4(res: dict, out: Path) -> tuple[str, str, list[str]]:
    r, ev, variants = res["runner"], res["eval"], res["variants"]
    short, long, depths = r["short_context"], r["long_context"], r["eval_depths"]
    seeds = [s for s in e4_seeds(variants[0]) if s != "-"]
    lengths = sorted({int(n) for v in variants for e in e4_seeds(v).values() for n in e["passkey"]})

    def passkey(v: dict, n: int):
        got = [e["passkey"].get(str(n)) for e in e4_seeds(v).values()]
        return None if None in got else spread(got, 2)
    rows = []
    for v in variants:
        evals = list(e4_seeds(v).values())
        rows.append([v["variant"], human(v["context"]), spread([e["loss"] for e in evals]),
                     spread([float(np.exp(e["loss"])) for e in evals]), *[passkey(v, n) for n in lengths],
                     *[spread([e["by_depth"][i] for e in evals], 2) for i in range(len(depths))]])
    sections = [identical_note(ev, [e for v in variants for e in e4_seeds(v).values()]),
                f"Val loss on those tokens and passkey accuracy (mean over depths; a model at the length of its "
                f"windows and the extended ones at each `runner.passkey_lengths`; by depth: at the longest)"
                f"{seed_note(seeds)}:\n\n" + table(
                    ["variant", "windows", "val loss", "val ppl", *[f"passkey @{human(n)}" for n in lengths],
                     *[f"acc @depth {d:g}" for d in depths]], rows)]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[3, 2], layout="constrained")
    for v in variants:
        plot_by_position(ax_loss, ev["edges"], list(e4_seeds(v).values()), v["variant"], None)
    ax_loss.axvline(short, color="gray", linestyle=":", linewidth=1)
    ax_loss.set_xlabel("position in the piece (tokens of context available)")
    ax_loss.set_title(f"loss by position, the same tokens for every row (dotted: training context {human(short)})",
                      fontsize=9)
    ax_loss.legend(fontsize=7, loc="best")
    longest = [float(np.mean([e["passkey"][str(max(int(n) for n in e["passkey"]))] for e in e4_seeds(v).values()]))
               for v in variants]
    ax_acc.barh([v["variant"] for v in variants][::-1], longest[::-1])
    ax_acc.set_xlim(0, 1)
    ax_acc.set_xlabel("passkey accuracy")
    ax_acc.set_title("passkey retrieval at each row's longest length (mean over depths and seeds)", fontsize=9)
    sections.append(save(fig, out, "extension.png", "context extension: loss by position and passkey accuracy"))
    methods = "; ".join(f"{m}: " + (", ".join(f"`model.{k}={v}`" for k, v in c.items()) or "RoPE as trained")
                        for m, c in res["methods"].items())
    tuned = [run for run in res["runs"] if run["run"].startswith("finetune_")]
    summary = (f"A model ({model_words(res)}) trained at {human(short)} ({res['runs'][0]['steps']} steps, "
               f"{res['runs'][0]['tokens']:,} tokens), run at {human(long)} with each RoPE method ({methods}), as it "
               f"is and after the same fine-tune at {human(long)} from the {human(short)} weights "
               f"(`train.init_from`; {tuned[0]['steps']} steps, {tuned[0]['tokens']:,} tokens each); the `none` "
               "fine-tune is the control: how much of a method's gain the fine-tune alone gives. Passkey prompts "
               f"per depth: {r['eval_trials']}; {max(len(seeds), 1)} seed(s).")
    return "E4 context extension by RoPE scaling", summary, sections


REPORTS = {"e1_scaling": report_e1, "e2_passkey": report_e2, "e3_context": report_e3, "e4_extend": report_e4}


def write_report(res: dict, report_dir: Path) -> Path:
    """report.md (and its PNGs) in report_dir from a results.json's contents, nothing else: the same
    file whether written at the end of a run or rebuilt later with --report-only."""
    title, summary, sections = REPORTS[res["base"]](res, report_dir)
    lines = [f"# {title}: `{res['experiment']}`", "", summary, ""]
    if (reading := report_dir / "reading.md").exists():  # written by hand after a run; kept across rebuilds
        lines += [reading.read_text().strip(), ""]
    lines += ["## Results", "", *[s + "\n" for s in sections]]
    runs = res["runs"]
    if runs:
        c = res["corpus"]
        lines += ["## Corpus", "",
                  f"`data.source={c['source']}`: {c['documents']:,} documents, {c['characters']:,} characters; "
                  f"{c['tokens']['train']:,} train and {c['tokens']['val']:,} val tokens at vocab {c['vocab_size']} "
                  f"(documents held out whole, `data.val_fraction={res['config']['data']['val_fraction']}`). "
                  f"Fingerprint `{c['fingerprint']}` (sha256 of the documents' names and texts: the same corpus "
                  "exactly when the fingerprints match; the site corpus follows what is installed). Longest "
                  "documents:", "",
                  table(["document", "tokens", "split"], [[d["name"], f"{d['tokens']:,}", d["split"]]
                                                          for d in c["longest"]]), ""]
        lines += ["## Training runs", "",
                  table(["run", "context", "batch", "seed", "steps", "tokens", "wall-clock (s)", "tokens/s (median)",
                         "final loss", "val ppl (train()'s own windows)"],
                        [[r["run"], r["seq_len"], r["batch_size"], r["seed"], r["steps"], r["tokens"],
                          r["wall_clock_s"], r["tokens_per_s"], r["loss"], r["val_ppl"]] for r in runs]), "",
                  "Wall-clock is the whole train() call (evaluations and checkpoints included; data prepared "
                  "before the first run). The last column is train()'s validation, random windows of each run's "
                  "own length: not the same text across contexts (the results above are). Outputs "
                  f"(metrics.jsonl, checkpoints, wandb) under `{res['out_root']}`.", ""]
        reused = [r for r in runs if r.get("reused")]
        for origin in sorted({json.dumps(r["reused"], sort_keys=True) for r in reused}):
            o = json.loads(origin)
            names = ", ".join(r["run"] for r in reused if json.dumps(r["reused"], sort_keys=True) == origin)
            lines += [f"Taken as they were from an earlier invocation's results (`--extend`: commit {o['commit']}, "
                      f"{o['date']}, {o['device']}), not trained or scored again: {names}. The environment below "
                      "is this invocation's.", ""]
    lines += ["## Reproduce", "", "```bash", res["command"], "```", ""]
    if runs:
        train_commands = "\n".join(shlex.join(["python", "train.py", f"experiment={res['experiment']}",
                                               *res["overrides"], *r["overrides"]]) for r in runs)
        lines += ["Config overrides given on the command line (applied to every run): "
                  + (", ".join(f"`{o}`" for o in res["overrides"]) or "none") + ". "
                  f"Each training run is `train.py` with `configs/experiment/{res['experiment']}.yaml` and these "
                  "overrides (from the repository's root):", "", "```bash", train_commands, "```", ""]
    lines += ["## Environment", "", *[f"- {k}: {v}" for k, v in res["environment"].items()], ""]
    path = report_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def report_only(results: Path) -> Path:
    """Rebuild report.md and its plots beside `results` (a results.json) without training."""
    return write_report(read_results(results, "--report-only"), results.parent)


def read_results(results: Path, option: str) -> dict:
    if not results.exists():
        raise ConfigError(option, f"no {relative(results)}", "run the experiment first (or pass --reports)")
    res = json.loads(results.read_text())
    if res.get("format") != FORMAT:
        raise ConfigError(option, f"{relative(results)} has format {res.get('format')!r}, this script "
                          f"writes {FORMAT}", "run the experiment again to regenerate its results")
    return res


RUN_LABEL = re.compile(r"ctx(\d+)(?:_span(\d+))?_seed(\d+)")


def kept_score(res: dict, label: str) -> dict:
    """What Experiment.scored() kept for run `label`, read back from an E2 or E3 results.json."""
    context, span, seed = RUN_LABEL.fullmatch(label).groups()
    if res["base"] == "e2_passkey":
        return {"accuracy": res["accuracy"][context][seed], "token_accuracy": res["token_accuracy"][context][seed]}
    scores = res["span_controls"]["scores"] if span else res["scores"]
    return scores[context][seed]


def extendable(results: Path) -> dict:
    res = read_results(results, "--extend")
    if res["base"] not in ("e2_passkey", "e3_context"):
        raise ConfigError("--extend", f"{res['experiment']} keeps no evaluation with its runs",
                          "only E2 and E3 can be extended; run the others whole")
    return res


def extend_records(res: dict, root: Path) -> None:
    """--extend: the runs of an experiment's results.json written as finished, scored run records into a new
    runs directory, which the invocation then resumes: the runs the config adds (a seed, a span control) are
    trained, the others taken as they were."""
    for run in res["runs"]:
        (root / run["run"]).mkdir(parents=True)
        write_record(root / run["run"] / RUN_RECORD, run | {
            "score": kept_score(res, run["run"]), "parameters": res["parameters"],
            "reused": {"commit": res["environment"]["commit"], "date": res["environment"]["date"],
                       "device": res["environment"]["device"]}})


def check_same_config(x: Experiment, res: dict) -> None:
    """--extend mixes earlier runs with new ones: the model, data and train settings must be the ones they ran
    with (a key the earlier results do not have must be at its null default)."""
    for group, old in res["config"].items():
        new = OmegaConf.to_container(x.cfg[group], resolve=True)
        for key in sorted(set(old) | set(new)):
            if key in PATH_KEYS or (key not in old and new.get(key) is None):
                continue
            if old.get(key) != new.get(key):
                raise ConfigError(f"{group}.{key}", f"is {new.get(key)!r} here but the runs of the results were "
                                  f"trained with {old.get(key)!r}", "extend with the same config and overrides")


# --- helpers ---------------------------------------------------------------------------------------------

def path_override(key: str, path) -> str:
    """key=path as a Hydra override, the path quoted only if it holds a character Hydra's grammar reserves."""
    return f"{key}={path}" if re.fullmatch(r"[\w/.:+ -]+", str(path)) else f"{key}='{path}'"


def relative(path) -> str:
    """path relative to the repository's root: what results.json and the reports hold (no machine paths)."""
    return os.path.relpath(path, ROOT)


def shown(override: str) -> str:
    """An override as the report shows it: an absolute path value made relative to the repository."""
    key, _, value = override.partition("=")
    value = value.strip("'")
    return path_override(key, relative(value)) if os.path.isabs(value) else override


def human(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def method_label(method: str, changes: dict) -> str:
    return f"{method} (RoPE unchanged)" if not changes else method


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return "n/a" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *["| " + " | ".join(map(cell, row)) + " |" for row in rows]])


def spread(values: list, decimals: int | None = None) -> float | str | None:
    """Over seeds: one value as is, several as 'mean ± sample standard deviation'; None if any is None.
    decimals: both to that many places (accuracies: 0.76 ± 0.00, not a float's rounding noise as 7.9e-17);
    otherwise 4 significant digits and 2 for the deviation, trailing zeros kept (4.500 ± 0.035, not 4.5)."""
    if any(v is None for v in values):
        return None
    if len(values) == 1:
        return float(values[0]) if decimals is None else f"{values[0]:.{decimals}f}"
    mean, sd = statistics.mean(values), statistics.stdev(values)
    if decimals is not None:
        return f"{mean:.{decimals}f} ± {sd:.{decimals}f}"
    return f"{mean:#.4g} ± {sd:#.2g}"


def seed_note(seeds: list[int]) -> str:
    return f"; mean ± standard deviation over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""


def model_words(res: dict) -> str:
    m, n = res["config"]["model"], res["parameters"]
    size = f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    return f"{size} parameters: {m['n_layer']} layers, d_model {m['d_model']}, vocab {res['corpus']['vocab_size']}"


def identical_note(ev: dict, summaries: list[dict]) -> str:
    """What every model was scored on, and whether they all scored the very same tokens (one digest)."""
    digests = sorted({s["digest"] for s in summaries})
    same = (f"all {len(summaries)} evaluations scored these same tokens (digest `{digests[0]}`)" if len(digests) == 1
            else f"**the {len(summaries)} evaluations did NOT score the same tokens** (digests {', '.join(digests)})")
    return (f"Every model is scored on the same {ev['tokens']:,} val target tokens: {ev['pieces']} pieces of at most "
            f"{human(ev['length'])} + 1 tokens from {ev['documents']} of the {ev['val_documents']} val documents "
            f"(`runner.eval_tokens`, taken round-robin over documents), each read in windows of the model's own "
            f"context, stride {ev['stride']:g} x context (training/eval_tokens.py); {same}.")


def position_table(edges: list[int], curves: dict[str, list[dict]]) -> str:
    """Loss by position bin, one column per curve (its summaries: one per seed), and the bin's token count."""
    first = next(iter(curves.values()))[0]
    return table(["position", "tokens", *curves],
                 [[f"{human(lo)}-{human(hi - 1 if i == len(edges) - 2 else hi)}", first["tokens_by_bin"][i],
                   *[spread([s["loss_by_bin"][i] for s in summaries]) for summaries in curves.values()]]
                  for i, (lo, hi) in enumerate(zip(edges, edges[1:]))])


def plot_by_position(ax, edges: list[int], summaries: list[dict], label: str, color) -> None:
    """One curve of loss by position bin (at the bins' geometric middles), mean over the summaries (seeds)
    with their min-max as a band."""
    mids = [float(np.sqrt(lo * max(lo, hi - 1))) for lo, hi in zip(edges, edges[1:])]
    curves = np.array([[np.nan if v is None else v for v in s["loss_by_bin"]] for s in summaries], dtype=float)
    line, = ax.plot(mids, curves.mean(axis=0), marker="o", color=color, label=label)
    if len(summaries) > 1:
        ax.fill_between(mids, curves.min(axis=0), curves.max(axis=0), color=line.get_color(), alpha=0.2)
    ax.set_xscale("log")
    ax.set_ylabel("val loss (nats/token)")
    ax.legend(fontsize=8)


def save(fig, out: Path, filename: str, alt: str) -> str:
    fig.savefig(out / filename, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return f"![{alt}]({filename})"


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
    parser.add_argument("--report-only", action="store_true",
                        help="no training: rebuild REPORTS/<name>/report.md and its plots from its results.json")
    parser.add_argument("--reports", type=Path, default=None,
                        help="report.md, results.json and PNGs go to REPORTS/<name>/ (default: reports/, and "
                             "outputs/reports/ for --smoke, so a CPU run never replaces a committed report)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "experiments",
                        help="runs go to OUTPUTS/<name>/<date_time>/<run>/")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue an interrupted invocation in its runs directory OUTPUTS/<name>/<date_time>: "
                             "its finished runs are reused, an unfinished one resumes from its last checkpoint")
    parser.add_argument("--extend", action="store_true",
                        help="E2/E3: take the runs of REPORTS/<name>/results.json as they are (no checkpoints "
                             "needed) and train only the runs the config adds (a seed, runner.span_controls)")
    args = parser.parse_intermixed_args(argv)
    base = args.name.removesuffix("_smoke")
    if base not in EXPERIMENTS:
        print(f"experiment.py: unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)}",
              file=sys.stderr)
        return 2
    smoke = args.smoke or args.name != base
    name = f"{base}_smoke" if smoke else base
    reports = (args.reports or ROOT / ("outputs/reports" if smoke else "reports")).resolve()
    command = shlex.join(["python", "scripts/experiment.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.report_only:
            if args.overrides:
                raise ConfigError("--report-only", f"takes no overrides, got {' '.join(args.overrides)}",
                                  "the results are rendered as they are")
            report = report_only(reports / name / "results.json")
        else:
            resume = None
            if args.extend and args.resume is not None:
                raise ConfigError("--extend", "and --resume together", "--extend starts its own runs directory")
            if args.extend:
                earlier = extendable(reports / name / "results.json")
                resume = args.outputs.resolve() / name / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
            if args.resume is not None:
                resume = args.resume.resolve()
                if not resume.is_dir():
                    raise ConfigError("--resume", f"{args.resume} is not a directory",
                                      "give the runs directory of an earlier invocation, "
                                      f"outputs/experiments/{name}/<date_time>")
            x = Experiment(name, args.overrides, args.outputs.resolve(), reports, command, resume)
            if args.extend:   # the config first: a mismatch leaves nothing behind
                check_same_config(x, earlier)
                extend_records(earlier, resume)
            EXPERIMENTS[base](x)
            report = x.finish()
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
