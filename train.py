"""Train a GPT: `python train.py [group=preset ...] [key=value ...]` (Hydra; start at configs/config.yaml).

    python train.py                                          # tiny model, stdlib corpus, CPU, minutes
    python train.py experiment=gpt2_small_16k                # an experiment by name
    python train.py -m model.attention=flash,naive data.seq_len=4096,16384   # a sweep
    torchrun --nproc_per_node=8 train.py parallel.cp=2     # 8 GPUs: FSDP, context parallel in pairs

train(cfg) checks the config and joins the job's process group (one process: none), then run(cfg, par) is
the whole run, top to bottom: build data, loaders and model, restore a checkpoint, loop (forward, backward,
clip, step unless non-finite; log, checkpoint, evaluate), print a sample. Everything a run needs is built
and checked before its first step, and each checkpoint is written before that step's evaluation, so no
mistake or crash found late costs the training done. Its components live in training/; with several
processes every rank runs the same loop on its share of each global batch (training/distributed.py), and
rank 0 alone logs and prints.
"""
import contextlib
import dataclasses
import functools
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from data import build_data
from data.tasks import PasskeyTask
from model import GPT
from training.checkpoint import (KEYS, TRAINER_KEYS, CheckpointError, find_latest, load_checkpoint, load_state,
                                 remove_stale_temp, save_checkpoint, save_sharded_checkpoint)
from training.device import autocast, peak_flops, peak_memory_gib, resolve_device, to_device
from training.distributed import (Parallel, apply_fsdp, clip_grad_norm, fsdp_dtypes, gathered, init_distributed,
                                  local_tensor, share_of_loss, shutdown)
from training.evaluate import passkey, val_loss
from training.generate import generate_text
from training.logger import RunLogger
from training.memory import apply_memory_plan
from training.optim import build_optimizer, build_schedule, warmup_steps
from training.rng import rng_state, seed_all, set_rng_state
from training.validate import CUDAGRAPH_MODES, ConfigError, config_error, gpt_config, validate


def train(cfg: DictConfig) -> dict:
    """Run one training job; returns its summary (status, step, losses, throughput, memory, paths).

    Raises ConfigError for a mistake in cfg: before anything is built, except the few that only the
    data, the tokenizer or a checkpoint can reveal, which are found before the first step. Raises
    RunError when training cannot go on (non-finite steps, a checkpoint that cannot be written).
    Under torchrun every process calls this; each returns the same summary.
    """
    validate(cfg)
    par = init_distributed(cfg.parallel.dp_shard, cfg.parallel.cp, resolve_device(cfg.train.device))
    try:
        if par.distributed and (shared := par.broadcast(str(cfg.out_dir))) != str(cfg.out_dir):
            # Hydra names the run directory after each process's clock, which may have turned a second
            # between ranks: all write into rank 0's, and the others' stay empty
            remove_if_unused(Path(cfg.out_dir))
            cfg = OmegaConf.merge(cfg, {"out_dir": shared})
        return run(cfg, par)
    finally:
        shutdown(par)


def run(cfg: DictConfig, par: Parallel) -> dict:
    """train(cfg) once the config is checked, in this process's place of the job (par)."""
    t = cfg.train
    B, T, accum = cfg.data.batch_size, cfg.data.seq_len, t.grad_accum   # B: the global batch, all ranks' rows
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(t.ckpt_dir)
    device = par.device
    # Several processes: FSDP's mixed precision (bf16 parameters on CUDA) replaces autocast, where it applies
    param_dtype, reduce_dtype = fsdp_dtypes(t.precision, device) if par.distributed else (None, None)
    amp = contextlib.nullcontext if param_dtype is not None else functools.partial(autocast, t.precision, device)
    say = print if par.main else _silent   # one voice per job
    torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32 (CUDA)
    seed_all(t.seed)
    # CUDA graphs (compile_mode reduce-overhead / max-autotune): a graph per input shape, so the loaders pad
    # cu_seqlens to a few lengths (data/loader.py: bucket_boundaries)
    cudagraphs = t.compile and t.compile_mode in CUDAGRAPH_MODES and device.type == "cuda"
    loader_args = dict(seed=t.seed, doc_masking=cfg.data.doc_masking, bucket_boundaries=cudagraphs)

    if t.warmup_steps > t.max_steps:
        say(f"train.warmup_steps={t.warmup_steps} > train.max_steps={t.max_steps}: warming up over all "
            f"{warmup_steps(t)} steps")

    # data: tokenizer and packed tokens come from cache_dir after the first run (rank 0 builds them, the
    # others then read them). Both loaders are built now: a val split too short for one window fails here,
    # not at the first evaluation. Every rank draws the global batches; Parallel.local_batch takes its part.
    try:
        with par.rank_zero_first():
            bundle = build_data(cfg.data, cfg.cache_dir)
        bundle.check_windows(T)
        train_loader = bundle.loader("train", B, T, **loader_args)
        val_loader = bundle.loader("val", B, T, **loader_args)
    except ValueError as e:  # the data package names the data key at fault
        raise config_error(e) from None
    val_start = val_loader.state_dict()
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < bundle.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} < the tokenizer's {bundle.vocab_size}",
                          "set model.vocab_size=null (= the tokenizer's)")
    if t.eval_passkey and T < (shortest := PasskeyTask(bundle.tokenizer).min_length):
        raise ConfigError("train.eval_passkey", f"data.seq_len={T} is shorter than a passkey prompt ({shortest} "
                          "tokens)", "raise data.seq_len or set train.eval_passkey=false")

    # model, optimizer, schedule. The model stays a plain GPT; the systems are applied to it from outside, in
    # torchtitan's order: context parallelism, the memory plan, compile (per block), FSDP.
    model_config = gpt_config(cfg, bundle.vocab_size)
    raw_model = GPT(model_config).to(device)
    if par.cp > 1:
        from training.context_parallel import apply_context_parallel   # imports the kernels: cp jobs only
        apply_context_parallel(raw_model, par.cp_group())
    apply_memory_plan(raw_model, t.activation_checkpointing, t.seq_chunk, t.loss_chunk)
    if t.init_from is not None:
        # Another run's weights, nothing else (a fine-tune). Strict: every tensor, same shapes; settings
        # that shape no weight (rope_theta, rope_scaling_factor, seq_len with RoPE, attention) may differ.
        try:
            raw_model.load_state_dict(load_checkpoint(t.init_from, keys=("model",))["model"])
        except CheckpointError as e:
            raise ConfigError("train.init_from", str(e), "pass a step_*.pt, step_*.dcp or latest.pt of an earlier "
                              "run") from None
        except RuntimeError as e:
            first = str(e).split("\n\t")[1].strip()  # torch lists each mismatch on a line of its own
            raise ConfigError("train.init_from", f"{t.init_from} does not fit this model: {first}",
                              "keep the model shape of the run that wrote it") from None
    if par.distributed:
        if t.compile:   # block by block: FSDP's gathers run in its hooks between the blocks' graphs
            for block in raw_model.blocks:
                block.compile(mode=t.compile_mode)
        model = apply_fsdp(raw_model, par.fsdp_mesh(), param_dtype, reduce_dtype)   # still raw_model, sharded
    else:
        model = torch.compile(raw_model, mode=t.compile_mode) if t.compile else raw_model
    optimizer = build_optimizer(raw_model, t, device)
    schedule = build_schedule(optimizer, t)

    # resume: everything that decides the next step comes back, so the run continues exactly
    # (a .dcp directory of a job of several processes at any world size, a .pt of one process at any too)
    step = 0
    fix = "pass a checkpoint this project wrote, or train.resume=null to start afresh"
    try:
        if par.main:
            remove_stale_temp(ckpt_dir)   # what a kill mid-save left behind
        resume = find_latest(ckpt_dir) if t.resume == "latest" else t.resume
        sharded = resume is not None and Path(resume).is_dir()   # its weights are read into the model below
        ckpt = None if resume is None else load_checkpoint(resume, keys=TRAINER_KEYS if sharded else KEYS)
    except CheckpointError as e:
        raise ConfigError("train.resume", str(e), fix) from None
    if t.resume == "latest" and resume is None:
        say(f"train.resume=latest: no checkpoint in {ckpt_dir} yet; starting at step 0")
    if ckpt is not None:
        for key, was in ckpt["model_config"].items():
            if getattr(model_config, key) != was:
                raise ConfigError(f"model.{key}", f"{getattr(model_config, key)!r}, but the checkpoint {resume} "
                                  f"has {was!r}", "resume with the checkpoint's model settings")
        if sharded or par.distributed:   # resharded to this world size
            try:
                load_state(resume, ckpt, raw_model, optimizer)
            except CheckpointError as e:
                raise ConfigError("train.resume", str(e), fix) from None
        else:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        say(f"resumed from {resume} at step {step}")

    config = {**OmegaConf.to_container(cfg, resolve=True), "model": dataclasses.asdict(model_config)}
    logger = RunLogger(cfg.logger, out_dir, config, active=par.main)
    n_params = raw_model.num_params()
    # "auto" resolved as model/attention.py does, so run tables compare the kernels actually used
    attention = {"auto": "flash" if device.type == "cuda" else "reference"}.get(model_config.attention,
                                                                                 model_config.attention)
    flops_per_token, device_flops = raw_model.flops_per_token(T), peak_flops(device)
    if device_flops is not None:
        device_flops *= par.world   # MFU of the whole job
    tokens_per_step = B * T * accum   # of the whole job: every rank steps together
    layout = f", {par.world} processes (FSDP, dp {par.dp} x cp {par.cp})" if par.distributed else ""
    say(f"{n_params / 1e6:.2f}M parameters, {attention} attention, {tokens_per_step} tokens/step{layout}, "
        f"{device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; out_dir {out_dir}")

    status, metrics, evals, ckpt_path = "failed", {}, {}, None
    skipped, skipped_in_a_row = 0, 0
    pbar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not par.main)
    write = pbar.write if par.main else _silent
    interval_start, interval_step = time.perf_counter(), step
    try:
        while step < t.max_steps:
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                batch = to_device(par.local_batch(next(train_loader), pad=cudagraphs), device)
                n_targets = par.count_targets(batch["targets"])   # the job's, for this rank's share of the loss
                if cudagraphs:   # a new generation of the graphs' outputs: the last step's are known to be dead
                    torch.compiler.cudagraph_mark_step_begin()
                with amp():
                    _, loss = model(**batch)
                loss = share_of_loss(loss, batch["targets"], n_targets, par.world)
                (loss / accum).backward()
                loss_sum += loss.detach()
            loss_sum = par.mean(loss_sum)   # the job's loss, the same on every rank
            # grad_clip=0: max_norm=inf leaves the gradients alone but still measures their norm (of the whole
            # model, over the ranks' shards)
            grad_norm = clip_grad_norm(raw_model.parameters(), t.grad_clip or float("inf"))
            # One read-back a step: a NaN/inf loss or gradient must not reach the weights (and from them every
            # later checkpoint). The step still counts, so the schedule and the data order stay those of the run.
            # Both values are the job's, so every rank decides alike.
            if torch.isfinite(loss_sum + grad_norm).item():
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                write(f"step {step + 1}: loss {loss_sum.item() / accum:.4g}, gradient norm {grad_norm.item():.4g}: "
                      f"not finite, update skipped ({skipped_in_a_row} in a row)")
                if skipped_in_a_row >= t.max_skipped_steps:
                    raise RunError(f"training diverged: {skipped_in_a_row} steps in a row (to step {step + 1}) had a "
                                   f"non-finite loss or gradient (train.max_skipped_steps={t.max_skipped_steps}); "
                                   f"last checkpoint: {find_latest(ckpt_dir) or 'none'}; lower train.lr or set "
                                   "train.grad_clip")
            optimizer.zero_grad(set_to_none=True)
            lr = schedule.get_last_lr()[0]
            schedule.step()
            step += 1
            pbar.update()
            last = step == t.max_steps

            if step % t.log_every == 0 or last:
                # .item() waits for the device to finish the interval's steps; only then is the clock read (the
                # host runs ahead of the device, far ahead with CUDA graphs)
                loss_value, grad_norm_value = loss_sum.item() / accum, grad_norm.item()
                elapsed = time.perf_counter() - interval_start
                metrics = {"loss": loss_value, "lr": lr, "grad_norm": grad_norm_value, "skipped_steps": skipped,
                           "tokens_per_s": tokens_per_step * (step - interval_step) / elapsed,
                           "peak_mem_gib": par.max(peak_memory_gib(device)), "seq_len": T}
                if device_flops is not None:
                    metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / device_flops
                logger.log(metrics, step)
                pbar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                                 mem=f"{metrics['peak_mem_gib']:.2f}GiB")
                interval_start, interval_step = time.perf_counter(), step

            evaluate, checkpoint = step % t.eval_every == 0 or last, step % t.ckpt_every == 0 or last
            if checkpoint:   # before the evaluation: whatever that does, this step's training is kept
                if not par.all(all(torch.isfinite(local_tensor(p)).all() for p in raw_model.parameters())):
                    raise RunError(f"the weights are not finite at step {step}: checkpoint not written; last "
                                   f"checkpoint: {find_latest(ckpt_dir) or 'none'}")
                trainer = {
                    "step": step,
                    "schedule": schedule.state_dict(),
                    "loader": train_loader.state_dict(),
                    "rng": rng_state(),   # rank 0's: every rank seeds and draws alike
                    "model_config": dataclasses.asdict(model_config),
                    "config": OmegaConf.to_yaml(cfg, resolve=True),
                    "tokenizer": bundle.tokenizer.to_str(),
                }
                if par.distributed:
                    ckpt_path = save_sharded_checkpoint(raw_model, optimizer, trainer, ckpt_dir, step, t.ckpt_keep)
                else:
                    ckpt_path = save_checkpoint({**trainer, "model": raw_model.state_dict(),
                                                 "optimizer": optimizer.state_dict()}, ckpt_dir, step, t.ckpt_keep)
            if evaluate:
                val_loader.load_state_dict(val_start)   # every evaluation scores the same tokens
                # sharded like training (each rank its part of every batch), the sums reduced over the ranks
                evals = val_loss(model, val_loader, t.eval_batches, device, amp,
                                 functools.partial(par.local_batch, pad=cudagraphs), par.sum)
                if t.eval_passkey:
                    evals |= passkey(raw_model, bundle.tokenizer, T, list(t.passkey_depths), t.passkey_trials,
                                     t.seed, device, amp)
                logger.log(evals, step)
                write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in evals.items()))
            if evaluate or checkpoint:
                interval_start, interval_step = time.perf_counter(), step  # tokens/s counts training only
        status = "finished"
    except CheckpointError as e:
        raise RunError(f"checkpoint error: {e}") from None
    except torch.cuda.OutOfMemoryError:
        # A sweep over sequence lengths records the OOM and goes on; main() fails a single run.
        status = "oom"
        print(f"out of memory at step {step + 1} (seq_len {T}, batch {B}, {attention} attention)",
              file=sys.stderr)
    finally:
        pbar.close()
        # the ranks' largest peak, once all of them got here (a failure on one rank can leave the others elsewhere)
        peak = par.max(peak_memory_gib(device)) if status == "finished" else peak_memory_gib(device)
        summary = {"status": status, "step": step, "n_params": n_params, "seq_len": T,
                   "attention": attention, "peak_mem_gib": peak, "skipped_steps": skipped,
                   **{k: metrics[k] for k in ("loss", "tokens_per_s", "mfu") if k in metrics}, **evals,
                   "out_dir": str(out_dir), "checkpoint": str(ckpt_path) if ckpt_path else None}
        logger.finish(summary)

    if status == "finished" and t.sample_tokens > 0:
        try:   # the checkpoint is written: a failing sample costs nothing but the sample
            # several processes: every rank generates the same tokens in step (their forwards gather the shards)
            with gathered(raw_model):
                text = generate_text(raw_model, bundle.tokenizer, t.sample_prompt, t.sample_tokens, temperature=0.8,
                                     top_k=50, device=device, autocast=amp)
            say(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")
        except Exception as e:
            say(f"sample failed ({type(e).__name__}: {e}); the run and its checkpoint are complete",
                file=sys.stderr)
    return summary


def _silent(*args, **kwargs) -> None:
    """print, on the ranks other than 0."""


class RunError(Exception):
    """Training cannot go on (diverged, or a checkpoint cannot be written); the message is one line and
    says what is on disk."""


HYDRA_FILES = (".hydra", "train.log")   # what Hydra writes into a run directory before train() starts


def remove_if_unused(out_dir: Path) -> None:
    """Delete a run directory that holds nothing but Hydra's own files (the run failed before writing
    anything), and its date directory if that is then empty: a failed try leaves no empty folder.
    The processes of a job share one run directory and each tidies it: another may have removed it first."""
    if (not out_dir.is_dir() or out_dir.resolve() == Path.cwd().resolve()
            or any(p.name not in HYDRA_FILES for p in out_dir.iterdir())):
        return
    for name in HYDRA_FILES:
        path = out_dir / name
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    try:
        out_dir.rmdir()
    except OSError:   # removed by another rank, or written to since
        return
    try:
        out_dir.parent.rmdir()   # outputs/<date>/ when this was its only run; fails harmlessly otherwise
    except OSError:
        pass


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    # under torchrun the errors below are the same on every rank (decided on all of them alike): rank 0 says it
    first = os.environ.get("RANK", "0") == "0"
    try:
        summary = train(cfg)
    except ConfigError as e:  # a user's mistake: one line, no traceback
        if first:
            print(f"config error: {e}", file=sys.stderr)
        remove_if_unused(out_dir)
        sys.exit(2)
    except RunError as e:
        if first:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        remove_if_unused(out_dir)
        raise
    if summary["status"] != "finished" and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
