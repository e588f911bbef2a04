"""train.py end to end on CPU with the real configs, shrunk: a 2-layer d_model-32 model on 32-token
sequences of a few stdlib modules, a few steps each, everything written under tmp_path."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train as train_module
from training.checkpoint import LATEST, CheckpointError, find_latest, load_checkpoint, save_checkpoint
from training.logger import wandb_mode
from training.validate import ConfigError, validate

from conftest import ROOT


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(out_dir) if "loss" in m}


# --- config errors ---------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.warmup_steps=-5", "train.warmup_steps"),
    ("train.lr=abc", "train.lr"),
])
def test_config_error_is_one_line_without_traceback(tmp_path, override, key):
    result = subprocess.run([sys.executable, "train.py", override, "logger=none", f"hydra.run.dir={tmp_path}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"config error: {key}: ")


@pytest.mark.parametrize("overrides, key", [
    (["model.n_head=3"], "model.d_model"),                          # 32 % 3 != 0
    (["model.n_head=4", "model.n_kv_head=3"], "model.n_kv_head"),
    (["model.pos=learned", "model.seq_len=16"], "model.seq_len"),   # table shorter than data.seq_len
    (["model.sdpa_backend=fastest"], "model.sdpa_backend"),
    (["model.attention=turbo"], "model.attention"),
    (["+model.n_embd=64"], "model.n_embd"),                         # not a GPTConfig field
    (["model.dropout=high"], "model.dropout"),
    pytest.param(["model.sdpa_backend=efficient"], "model.sdpa_backend",  # CUDA-only kernel, on CPU
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="valid where CUDA is")),
    (["+train.lr_decay=cosine"], "train.lr_decay"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.warmup_steps=-1"], "train.warmup_steps"),
    (["train.min_lr=1"], "train.min_lr"),
    (["train.compile=maybe"], "train.compile"),
    (["train.compile_mode=fastest"], "train.compile_mode"),
    # CUDA graphs overwrite the gradients of earlier micro-batches
    (["train.compile=true", "train.compile_mode=reduce-overhead", "train.grad_accum=2"], "train.compile_mode"),
    (["train.precision=fp16"], "train.precision"),
    (["train.betas=[0.9]"], "train.betas"),
    (["train.device=tpu"], "train.device"),
    (["train.resume=/no/such/checkpoint.pt"], "train.resume"),
    (["data.batch_size=0"], "data.batch_size"),
    (["+data.shuffle=true"], "data.shuffle"),
    (["logger.mode=loud"], "logger.mode"),
])
def test_validate_names_the_key(make_cfg, overrides, key):
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only errors")
def test_validate_cpu_only_errors(make_cfg, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET") as e:
        validate(make_cfg("model.attention=flash"))
    assert e.value.key == "model.attention"
    with pytest.raises(ConfigError) as e:
        validate(make_cfg("train.device=cuda"))
    assert e.value.key == "train.device"


def test_the_shipped_experiments_validate(make_cfg):
    for experiment in sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")):
        # n_kv_head=null: the shrunk model's 2 query heads cannot keep a GQA preset's 8 kv heads
        cfg = make_cfg(f"experiment={experiment}", "train.device=cpu", "model.attention=sdpa", "train.max_steps=1000",
                       "train.warmup_steps=10", "model.n_kv_head=null")
        validate(cfg)
        assert cfg.name == experiment and cfg.logger.group == experiment


# --- a run ---------------------------------------------------------------------------------------------

def test_short_run_learns_and_writes_everything(make_cfg, tmp_path, capsys):
    summary = train_module.train(make_cfg("train.max_steps=30", "train.warmup_steps=5", "train.eval_every=10",
                                          "train.ckpt_every=10", "train.ckpt_keep=2"))
    out_dir = tmp_path / "run"
    assert summary["status"] == "finished" and summary["step"] == 30

    losses = list(train_losses(out_dir).values())
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses

    metrics = read_metrics(out_dir)
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "seq_len"} <= metrics[0].keys()
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    ckpt_dir = out_dir / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST, "step_0000020.pt", "step_0000030.pt"]
    assert find_latest(ckpt_dir).name == "step_0000030.pt"
    ckpt = load_checkpoint(ckpt_dir / LATEST)  # weights_only=True
    assert ckpt["step"] == 30 and ckpt["loader"]["step"] == 30
    assert "sample_tokens: 8" in ckpt["config"]
    assert "--- sample" in capsys.readouterr().out

    result = subprocess.run([sys.executable, "sample.py", str(ckpt_dir / LATEST), "--prompt", "def f(",
                             "--max-new-tokens", "16"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "def f(" in result.stdout and len(result.stdout.split("---\n")[-1]) > len("def f(")


class Preempted(Exception):
    pass


def test_compile_mode_reaches_torch_compile(make_cfg, monkeypatch):
    # train.compile_mode is torch.compile's mode (on the CPU the graphs run through AOT autograd only: inductor's
    # C++ build is slow here, and CUDA graphs need CUDA)
    modes = []
    real = torch.compile

    def spy(model, mode=None, **kwargs):
        modes.append(mode)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    summary = train_module.train(make_cfg("train.max_steps=2", "train.compile=true", "train.compile_mode=reduce-overhead"))
    assert summary["status"] == "finished" and modes == ["reduce-overhead"]


def test_resume_continues_exactly(make_cfg, tmp_path, monkeypatch):
    """8 steps straight == 4 steps, killed after the step-4 checkpoint and evaluation, then resumed for 4 more."""
    train_module.train(make_cfg(run="straight"))
    straight = read_metrics(tmp_path / "straight")

    shared = f"train.ckpt_dir={tmp_path / 'ckpt'}"
    real_log = train_module.RunLogger.log

    def log_then_die(self, metrics, step):
        real_log(self, metrics, step)
        if step == 4 and "val_loss" in metrics:
            raise Preempted

    monkeypatch.setattr(train_module.RunLogger, "log", log_then_die)
    with pytest.raises(Preempted):
        train_module.train(make_cfg(shared, run="first"))
    monkeypatch.undo()
    summary = train_module.train(make_cfg(shared, "train.resume=latest", run="second"))

    resumed = read_metrics(tmp_path / "first") + read_metrics(tmp_path / "second")
    assert summary["status"] == "finished"
    assert [m["step"] for m in resumed] == [m["step"] for m in straight]
    for key in ("loss", "lr", "grad_norm", "val_loss"):  # exactly equal, not approximately
        assert [m.get(key) for m in resumed] == [m.get(key) for m in straight], key


def test_resume_rejects_another_model(make_cfg, tmp_path):
    train_module.train(make_cfg("train.max_steps=2", "train.warmup_steps=1", "train.sample_tokens=0"))
    with pytest.raises(ConfigError) as e:
        train_module.train(make_cfg("model.d_model=48", "model.n_head=2",
                                    f"train.resume={tmp_path / 'run' / 'checkpoints' / LATEST}", run="other"))
    assert e.value.key == "model.d_model"


# --- checkpoints ---------------------------------------------------------------------------------------

def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, ckpt_dir, step=1, keep=3)

    def torch_save_dies_halfway(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torch_save_dies_halfway)
    with pytest.raises(CheckpointError, match="disk full, checkpoint not written"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, ckpt_dir, step=2, keep=3)

    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST, "step_0000001.pt"]  # no temp file left
    assert torch.equal(load_checkpoint(ckpt_dir / LATEST, keys=("w",))["w"], torch.ones(3))


def test_checkpoints_beyond_keep_are_deleted(tmp_path):
    for step in range(1, 5):
        save_checkpoint({"step": step}, tmp_path, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_0000003.pt", "step_0000004.pt"]
    assert load_checkpoint(find_latest(tmp_path), keys=("step",))["step"] == 4


# --- logging -------------------------------------------------------------------------------------------

def test_wandb_without_login_runs_offline(make_cfg, tmp_path, no_wandb_login):
    assert wandb_mode("auto") == "offline"
    summary = train_module.train(make_cfg("logger=wandb", "train.max_steps=2", "train.warmup_steps=1",
                                          "train.sample_tokens=0"))
    assert summary["status"] == "finished"
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_a_wandb_failure_does_not_stop_training(make_cfg, tmp_path, no_wandb_login, monkeypatch):
    import wandb

    def init_fails(**kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", init_fails)
    with pytest.warns(UserWarning, match="wandb is down"):
        summary = train_module.train(make_cfg("logger=offline", "train.max_steps=2", "train.warmup_steps=1",
                                              "train.sample_tokens=0"))
    assert summary["status"] == "finished"
    assert len(train_losses(tmp_path / "run")) == 2
