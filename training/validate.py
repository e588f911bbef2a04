"""Check the whole config before anything is built.

A user error becomes a ConfigError that train.py prints as one line,
`config error: <key>: <what is wrong>; <fix>`, instead of a traceback minutes into a run.
Hydra already rejects overrides of keys that do not exist; this adds the rest: keys added with `+`
or in a new preset, types (Hydra takes `train.lr=abc` as a string), ranges and combinations.
"""
import os
import re
import types
import typing
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data import DataConfig
from model import GPTConfig

from .checkpoint import CheckpointError, check_checkpoint_file
from .device import resolve_device
from .distributed import degrees, world_size
from .memory import CHECKPOINT_MODES

# torch.compile's modes; those that capture CUDA graphs (cudagraph trees) reuse their output memory on the
# next replay, which corrupts gradients accumulated over micro-batches (pytorch/pytorch#169545)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")


# Keys and types of the groups this package consumes. The model and data groups are checked by
# their own packages (GPTConfig, DataConfig), so a field added there needs no edit here.
TRAIN_SCHEMA = {
    "optimizer": str, "lr": float, "min_lr": float, "warmup_steps": int, "max_steps": int,
    "weight_decay": float, "betas": list, "grad_clip": float, "grad_accum": int, "precision": str,
    "compile": bool, "compile_mode": str, "seed": int, "device": str, "log_every": int, "eval_every": int,
    "eval_batches": int, "eval_passkey": bool, "passkey_depths": list, "passkey_trials": int,
    "ckpt_every": int, "ckpt_dir": str, "ckpt_keep": int, "resume": str | None, "init_from": str | None,
    "sample_prompt": str, "sample_tokens": int,
    "activation_checkpointing": str, "seq_chunk": int, "loss_chunk": int, "max_skipped_steps": int,
}
LOGGER_SCHEMA = {"mode": str, "project": str, "group": str, "name": str | None, "dir": str}
PARALLEL_SCHEMA = {"dp_shard": int, "cp": int}
# what context parallelism runs: the ring calls our kernels (or their PyTorch reference on the CPU)
CP_ATTENTION = ("auto", "flash", "reference")
CHOICES = {
    "train.optimizer": ("adamw",),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.compile_mode": COMPILE_MODES,
    "train.activation_checkpointing": CHECKPOINT_MODES,
    "logger.mode": ("auto", "online", "offline", "none"),
}


class ConfigError(Exception):
    """A mistake in the config: which key, what is wrong with it, and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str = ""):
        super().__init__(f"{key}: {problem}" + (f"; {fix}" if fix else ""))
        self.key = key


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first problem found in cfg (model, data, train, logger, parallel groups).
    The parallel group is checked against this job's world size (torchrun's WORLD_SIZE; 1 without)."""
    for key in ("name", "out_dir", "cache_dir"):
        _check_value(key, cfg.get(key), str)
    # null vocab_size / seq_len are filled from the tokenizer / data.seq_len (gpt_config)
    model_schema = {**typing.get_type_hints(GPTConfig), "vocab_size": int | None, "seq_len": int | None}
    _check_group(cfg, "model", model_schema, required=False)
    _check_group(cfg, "train", TRAIN_SCHEMA, required=True)
    _check_group(cfg, "logger", LOGGER_SCHEMA, required=True)
    _check_group(cfg, "parallel", PARALLEL_SCHEMA, required=True)
    for key, options in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in options:
            raise ConfigError(key, f"{value!r} is not one of {options}", f"set {key}={options[0]}")
    _check_train(cfg.train)
    try:
        DataConfig.from_cfg(cfg.data)
    except ValueError as e:
        raise config_error(e) from None
    _check_model(cfg)
    _check_parallel(cfg, world_size())


def gpt_config(cfg: DictConfig, vocab_size: int) -> GPTConfig:
    """GPTConfig from the model group: a null vocab_size is the tokenizer's, a null seq_len is
    data.seq_len. GPTConfig's own checks become ConfigErrors naming the model key."""
    fields = OmegaConf.to_container(cfg.model, resolve=True)
    if fields["vocab_size"] is None:
        fields["vocab_size"] = vocab_size
    if fields["seq_len"] is None:
        fields["seq_len"] = cfg.data.seq_len
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        # GPTConfig's messages read "GPTConfig.<field>...: <problem>; <fix>".
        match = re.match(r"GPTConfig\.(\w+)", str(e))
        key = f"model.{match.group(1)}" if match else "model"
        raise ConfigError(key, str(e).removeprefix("GPTConfig.")) from None


def config_error(e: ValueError) -> ConfigError:
    """The data package's ValueErrors read "data.<key>: <problem>"; keep the key apart."""
    key, _, problem = str(e).partition(": ")
    return ConfigError(key, problem)


def _check_group(cfg: DictConfig, group: str, schema: dict, required: bool) -> None:
    if not isinstance(cfg.get(group), DictConfig):
        raise ConfigError(group, "missing or not a mapping", f"pick a preset: {group}=<name in configs/{group}/>")
    values = cfg[group]
    for key in values:
        if key not in schema:
            raise ConfigError(f"{group}.{key}", "unknown key", f"known keys: {', '.join(schema)}")
    for key, expected in schema.items():
        if key in values:
            _check_value(f"{group}.{key}", OmegaConf.select(values, key), expected)
        elif required:
            raise ConfigError(f"{group}.{key}", "missing", f"add it to the {group} preset")


def _check_value(key: str, value, expected) -> None:
    """Is value an instance of expected (a type, or a union like `int | None`)? YAML's ints pass as
    floats; bools never pass as ints."""
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for typ in allowed:
        if typ is type(None) and value is None:
            return
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if typ is list and OmegaConf.is_list(value):
            return
        if typ in (str, bool) and isinstance(value, typ):
            return
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(key, f"expected {names}, got {value!r} ({type(value).__name__})", f"give {key} a {names}")


def _check_train(train: DictConfig) -> None:
    def need(ok: bool, key: str, problem: str, fix: str) -> None:
        if not ok:
            raise ConfigError(f"train.{key}", problem, fix)

    need(train.max_steps >= 1, "max_steps", f"{train.max_steps} must be >= 1", "set train.max_steps=1000")
    need(train.lr > 0, "lr", f"{train.lr} must be > 0", "set train.lr=3e-4")
    need(0 <= train.min_lr <= train.lr, "min_lr", f"{train.min_lr} must lie in [0, train.lr={train.lr}]",
         "set train.min_lr to about lr/10")
    # a warmup longer than the run is clamped to it (training/optim.py), so a quick try needs no edit
    need(train.warmup_steps >= 0, "warmup_steps", f"{train.warmup_steps} must be >= 0", "set train.warmup_steps=20")
    need(train.weight_decay >= 0, "weight_decay", f"{train.weight_decay} must be >= 0", "set train.weight_decay=0.1")
    betas = list(train.betas)
    need(len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas), "betas",
         f"{betas} must be two numbers in [0, 1)", "set train.betas=[0.9,0.95]")
    need(train.grad_clip >= 0, "grad_clip", f"{train.grad_clip} must be >= 0 (0 = off)", "set train.grad_clip=1.0")
    for key in ("grad_accum", "log_every", "eval_every", "eval_batches", "passkey_trials", "ckpt_every", "ckpt_keep",
                "max_skipped_steps"):
        need(train[key] >= 1, key, f"{train[key]} must be >= 1", f"set train.{key}=1 or more")
    depths = list(train.passkey_depths)
    need(len(depths) > 0 and all(isinstance(d, (int, float)) and 0 <= d <= 1 for d in depths), "passkey_depths",
         f"{depths} must be a non-empty list of numbers in [0, 1]", "set train.passkey_depths=[0,0.5,1]")
    for key in ("seq_chunk", "loss_chunk"):
        need(train[key] >= 0, key, f"{train[key]} must be >= 0 (0 = no tiling)", f"set train.{key}=16384 or 0")
    need(not (train.compile and train.compile_mode in CUDAGRAPH_MODES and train.grad_accum > 1), "compile_mode",
         f"{train.compile_mode} captures CUDA graphs, whose replays overwrite the gradients of earlier micro-batches "
         f"(train.grad_accum={train.grad_accum})", "use train.compile_mode=default, or train.grad_accum=1 with a "
         "larger data.batch_size")
    need(train.sample_tokens >= 0, "sample_tokens", f"{train.sample_tokens} must be >= 0", "0 skips the sample")

    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?", train.device) is not None, "device",
         f"{train.device!r} is not auto, cpu, cuda or cuda:N", "set train.device=auto")
    need(not train.device.startswith("cuda") or torch.cuda.is_available(), "device",
         f"{train.device!r} but torch sees no CUDA device", "use train.device=auto or cpu")
    if resolve_device(train.device).type == "cuda" and train.precision == "bf16":
        need(torch.cuda.is_bf16_supported(), "precision", "bf16 on a GPU without bf16 support",
             "use train.precision=fp32")
    for key, path, fix in (("resume", train.resume, "pass a step_*.pt or latest.pt, or train.resume=latest"),
                           ("init_from", train.init_from, "pass a step_*.pt or latest.pt of an earlier run")):
        if path not in (None, "latest"):
            try:
                check_checkpoint_file(path)
            except CheckpointError as e:
                raise ConfigError(f"train.{key}", str(e), fix) from None


def _check_model(cfg: DictConfig) -> None:
    vocab_size = cfg.model.get("vocab_size")
    model = gpt_config(cfg, vocab_size=1 if vocab_size is None else vocab_size)  # GPTConfig's own checks
    if model.pos == "learned" and model.seq_len < cfg.data.seq_len:
        raise ConfigError("model.seq_len", f"{model.seq_len} < data.seq_len={cfg.data.seq_len}, and a learned "
                          "position table has no rows past it", "set model.seq_len=null (= data.seq_len) or "
                          "use model.pos=rope")
    on_cpu = resolve_device(cfg.train.device).type != "cuda"
    if model.attention == "flash" and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("model.attention", "flash runs Triton kernels, which need a CUDA device or "
                          "TRITON_INTERPRET=1", "use model.attention=auto (reference kernels on CPU)")
    if model.attention == "sdpa" and on_cpu and model.sdpa_backend in ("efficient", "cudnn"):
        raise ConfigError("model.sdpa_backend", f"{model.sdpa_backend} is a CUDA-only SDPA kernel",
                          "use model.sdpa_backend=math on CPU")


def _check_parallel(cfg: DictConfig, world: int) -> None:
    """The degrees against the world size, and what a job of several processes cannot run."""
    p, t = cfg.parallel, cfg.train
    if p.cp < 1:
        raise ConfigError("parallel.cp", f"{p.cp} must be >= 1 (1 = no context parallelism)", "set parallel.cp=1")
    if p.dp_shard != -1 and p.dp_shard < 1:
        raise ConfigError("parallel.dp_shard", f"{p.dp_shard} must be >= 1, or -1 (= world size / parallel.cp)",
                          "set parallel.dp_shard=-1")
    launch = f"torchrun --nproc_per_node={max(p.dp_shard, 1) * p.cp} train.py ..."
    if p.dp_shard == -1 and world % p.cp:
        raise ConfigError("parallel.cp", f"{p.cp} does not divide the world size {world}",
                          f"launch a multiple of {p.cp} processes ({launch}) or change parallel.cp")
    if p.dp_shard != -1 and p.dp_shard * p.cp != world:
        raise ConfigError("parallel.dp_shard", f"{p.dp_shard} x parallel.cp={p.cp} = {p.dp_shard * p.cp} processes, "
                          f"but the world size is {world}", f"set parallel.dp_shard=-1 (= world / cp) or run {launch}")
    dp, cp = degrees(p.dp_shard, p.cp, world)
    if cfg.data.batch_size % dp:
        raise ConfigError("data.batch_size", f"{cfg.data.batch_size} (the global batch, in rows) is not divisible by "
                          f"the {dp} data-parallel ranks", f"use a multiple of {dp}")
    if cp > 1:
        if cfg.data.seq_len % (2 * cp):
            raise ConfigError("data.seq_len", f"{cfg.data.seq_len} is not divisible by 2 x parallel.cp = {2 * cp} "
                              "(each rank keeps two chunks of every row)", f"use a multiple of {2 * cp}")
        if cfg.model.attention not in CP_ATTENTION:
            raise ConfigError("model.attention", f"{cfg.model.attention} under parallel.cp={cp}: the context-parallel "
                              "ring runs our kernels", f"use one of {CP_ATTENTION}")
        if t.eval_passkey:
            raise ConfigError("train.eval_passkey", f"passkey prompts are scored whole, on one process, not under "
                              f"parallel.cp={cp}", "set train.eval_passkey=false, or evaluate a checkpoint with "
                              "scripts/experiment.py")
        if t.sample_tokens > 0:
            raise ConfigError("train.sample_tokens", f"generation runs on one process, not under parallel.cp={cp}",
                              "set train.sample_tokens=0 and sample the checkpoint with sample.py")
    if world > 1:
        if re.fullmatch(r"cuda:\d+", t.device):
            raise ConfigError("train.device", f"{t.device} names one GPU, but each of the {world} processes takes "
                              "cuda:LOCAL_RANK", "set train.device=auto or cuda")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if resolve_device(t.device).type == "cuda" and torch.cuda.device_count() < local:
            raise ConfigError("train.device", f"{local} processes on this node, but torch sees "
                              f"{torch.cuda.device_count()} GPUs", "launch one process per GPU (--nproc_per_node)")
        if t.compile and t.compile_mode in CUDAGRAPH_MODES and resolve_device(t.device).type == "cuda":
            raise ConfigError("train.compile_mode", f"{t.compile_mode} captures CUDA graphs, which FSDP's parameter "
                              "all-gathers (outside the graphs, into memory freed after each block) break",
                              "use train.compile_mode=default or max-autotune-no-cudagraphs")
