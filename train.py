"""Train a GPT: `python train.py [group=preset ...] [key=value ...]` (Hydra; start at configs/config.yaml).

    python train.py                                          # tiny model, stdlib corpus, CPU, minutes
    python train.py experiment=gpt2_small_16k                # an experiment by name
    python train.py -m model.attention=flash,naive data.seq_len=4096,16384   # a sweep

train(cfg) is the whole run, top to bottom: check the config, build data, loaders and model, restore a
checkpoint, loop (forward, backward, clip, step unless non-finite; log, checkpoint, evaluate), print a
sample. Everything a run needs is built and checked before its first step, and each checkpoint is
written before that step's evaluation, so no mistake or crash found late costs the training done.
Its components live in training/.
"""
import dataclasses
import functools
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
from training.checkpoint import (CheckpointError, find_latest, load_checkpoint, remove_stale_temp,
                                 save_checkpoint)
from training.device import autocast, peak_flops, peak_memory_gib, resolve_device, to_device
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
    """
    validate(cfg)
    t = cfg.train
    B, T, accum = cfg.data.batch_size, cfg.data.seq_len, t.grad_accum
    out_dir, ckpt_dir = Path(cfg.out_dir), Path(t.ckpt_dir)
    device = resolve_device(t.device)
    amp = functools.partial(autocast, t.precision, device)
    torch.set_float32_matmul_precision("high")  # TF32 for the matmuls autocast leaves in fp32 (CUDA)
    seed_all(t.seed)
    # CUDA graphs (compile_mode reduce-overhead / max-autotune): a graph per input shape, so the loaders pad
    # cu_seqlens to a few lengths (data/loader.py: bucket_boundaries)
    cudagraphs = t.compile and t.compile_mode in CUDAGRAPH_MODES and device.type == "cuda"
    loader_args = dict(seed=t.seed, doc_masking=cfg.data.doc_masking, bucket_boundaries=cudagraphs)

    if t.warmup_steps > t.max_steps:
        print(f"train.warmup_steps={t.warmup_steps} > train.max_steps={t.max_steps}: warming up over all "
              f"{warmup_steps(t)} steps")

    # data: tokenizer and packed tokens come from cache_dir after the first run. Both loaders are built
    # now: a val split too short for one window fails here, not at the first evaluation.
    try:
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

    # model, optimizer, schedule
    model_config = gpt_config(cfg, bundle.vocab_size)
    raw_model = apply_memory_plan(GPT(model_config).to(device), t.activation_checkpointing, t.seq_chunk,
                                  t.loss_chunk)
    if t.init_from is not None:
        # Another run's weights, nothing else (a fine-tune). Strict: every tensor, same shapes; settings
        # that shape no weight (rope_theta, rope_scaling_factor, seq_len with RoPE, attention) may differ.
        try:
            raw_model.load_state_dict(load_checkpoint(t.init_from, keys=("model",))["model"])
        except CheckpointError as e:
            raise ConfigError("train.init_from", str(e), "pass a step_*.pt or latest.pt of an earlier run") from None
        except RuntimeError as e:
            first = str(e).split("\n\t")[1].strip()  # torch lists each mismatch on a line of its own
            raise ConfigError("train.init_from", f"{t.init_from} does not fit this model: {first}",
                              "keep the model shape of the run that wrote it") from None
    model = torch.compile(raw_model, mode=t.compile_mode) if t.compile else raw_model
    optimizer = build_optimizer(raw_model, t, device)
    schedule = build_schedule(optimizer, t)

    # resume: everything that decides the next step comes back, so the run continues exactly
    step = 0
    try:
        remove_stale_temp(ckpt_dir)   # what a kill mid-save left behind
        resume = find_latest(ckpt_dir) if t.resume == "latest" else t.resume
        ckpt = None if resume is None else load_checkpoint(resume)
    except CheckpointError as e:
        raise ConfigError("train.resume", str(e), "pass a checkpoint this project wrote, or train.resume=null "
                          "to start afresh") from None
    if t.resume == "latest" and resume is None:
        print(f"train.resume=latest: no checkpoint in {ckpt_dir} yet; starting at step 0")
    if ckpt is not None:
        for key, was in ckpt["model_config"].items():
            if getattr(model_config, key) != was:
                raise ConfigError(f"model.{key}", f"{getattr(model_config, key)!r}, but the checkpoint {resume} "
                                  f"has {was!r}", "resume with the checkpoint's model settings")
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        train_loader.load_state_dict(ckpt["loader"])
        set_rng_state(ckpt["rng"])
        step = ckpt["step"]
        print(f"resumed from {resume} at step {step}")

    config = {**OmegaConf.to_container(cfg, resolve=True), "model": dataclasses.asdict(model_config)}
    logger = RunLogger(cfg.logger, out_dir, config)
    n_params = raw_model.num_params()
    # "auto" resolved as model/attention.py does, so run tables compare the kernels actually used
    attention = {"auto": "flash" if device.type == "cuda" else "reference"}.get(model_config.attention,
                                                                                 model_config.attention)
    flops_per_token, device_flops = raw_model.flops_per_token(T), peak_flops(device)
    tokens_per_step = B * T * accum
    print(f"{n_params / 1e6:.2f}M parameters, {attention} attention, {tokens_per_step} tokens/step, "
          f"{device}{f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''}; out_dir {out_dir}")

    status, metrics, evals, ckpt_path = "failed", {}, {}, None
    skipped, skipped_in_a_row = 0, 0
    pbar = tqdm(total=t.max_steps, initial=step, desc="train", dynamic_ncols=True)
    interval_start, interval_step = time.perf_counter(), step
    try:
        while step < t.max_steps:
            loss_sum = torch.zeros((), device=device)
            for _ in range(accum):
                batch = to_device(next(train_loader), device)
                if cudagraphs:   # a new generation of the graphs' outputs: the last step's are known to be dead
                    torch.compiler.cudagraph_mark_step_begin()
                with amp():
                    _, loss = model(**batch)
                (loss / accum).backward()
                loss_sum += loss.detach()
            # grad_clip=0: max_norm=inf leaves the gradients alone but still measures their norm
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), t.grad_clip or float("inf"))
            # One read-back a step: a NaN/inf loss or gradient must not reach the weights (and from them every
            # later checkpoint). The step still counts, so the schedule and the data order stay those of the run.
            if torch.isfinite(loss_sum + grad_norm).item():
                optimizer.step()
                skipped_in_a_row = 0
            else:
                skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
                pbar.write(f"step {step + 1}: loss {loss_sum.item() / accum:.4g}, gradient norm {grad_norm.item():.4g}: "
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
                           "peak_mem_gib": peak_memory_gib(device), "seq_len": T}
                if device_flops is not None:
                    metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / device_flops
                logger.log(metrics, step)
                pbar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}",
                                 mem=f"{metrics['peak_mem_gib']:.2f}GiB")
                interval_start, interval_step = time.perf_counter(), step

            evaluate, checkpoint = step % t.eval_every == 0 or last, step % t.ckpt_every == 0 or last
            if checkpoint:   # before the evaluation: whatever that does, this step's training is kept
                if not all(torch.isfinite(p).all() for p in raw_model.parameters()):
                    raise RunError(f"the weights are not finite at step {step}: checkpoint not written; last "
                                   f"checkpoint: {find_latest(ckpt_dir) or 'none'}")
                ckpt_path = save_checkpoint({
                    "step": step,
                    "model": raw_model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "loader": train_loader.state_dict(),
                    "rng": rng_state(),
                    "model_config": dataclasses.asdict(model_config),
                    "config": OmegaConf.to_yaml(cfg, resolve=True),
                    "tokenizer": bundle.tokenizer.to_str(),
                }, ckpt_dir, step, t.ckpt_keep)
            if evaluate:
                val_loader.load_state_dict(val_start)   # every evaluation scores the same tokens
                evals = val_loss(model, val_loader, t.eval_batches, device, amp)
                if t.eval_passkey:
                    evals |= passkey(raw_model, bundle.tokenizer, T, list(t.passkey_depths), t.passkey_trials,
                                     t.seed, device, amp)
                logger.log(evals, step)
                pbar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in evals.items()))
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
        summary = {"status": status, "step": step, "n_params": n_params, "seq_len": T,
                   "attention": attention, "peak_mem_gib": peak_memory_gib(device), "skipped_steps": skipped,
                   **{k: metrics[k] for k in ("loss", "tokens_per_s", "mfu") if k in metrics}, **evals,
                   "out_dir": str(out_dir), "checkpoint": str(ckpt_path) if ckpt_path else None}
        logger.finish(summary)

    if status == "finished" and t.sample_tokens > 0:
        try:   # the checkpoint is written: a failing sample costs nothing but the sample
            text = generate_text(raw_model, bundle.tokenizer, t.sample_prompt, t.sample_tokens, temperature=0.8,
                                 top_k=50, device=device, autocast=amp)
            print(f"--- sample ({t.sample_tokens} tokens) ---\n{text}\n---")
        except Exception as e:
            print(f"sample failed ({type(e).__name__}: {e}); the run and its checkpoint are complete",
                  file=sys.stderr)
    return summary


class RunError(Exception):
    """Training cannot go on (diverged, or a checkpoint cannot be written); the message is one line and
    says what is on disk."""


HYDRA_FILES = (".hydra", "train.log")   # what Hydra writes into a run directory before train() starts


def remove_if_unused(out_dir: Path) -> None:
    """Delete a run directory that holds nothing but Hydra's own files (the run failed before writing
    anything), and its date directory if that is then empty: a failed try leaves no empty folder."""
    if (not out_dir.is_dir() or out_dir.resolve() == Path.cwd().resolve()
            or any(p.name not in HYDRA_FILES for p in out_dir.iterdir())):
        return
    for name in HYDRA_FILES:
        path = out_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out_dir.rmdir()
    try:
        out_dir.parent.rmdir()   # outputs/<date>/ when this was its only run; fails harmlessly otherwise
    except OSError:
        pass


@hydra.main(config_path="configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    try:
        summary = train(cfg)
    except ConfigError as e:  # a user's mistake: one line, no traceback
        print(f"config error: {e}", file=sys.stderr)
        remove_if_unused(out_dir)
        sys.exit(2)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        remove_if_unused(out_dir)
        raise
    if summary["status"] != "finished" and HydraConfig.get().mode != RunMode.MULTIRUN:
        sys.exit(1)


if __name__ == "__main__":
    main()
