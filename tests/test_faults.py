"""What a user hits outside the happy path: each protection with the fault injected, and a check that
the answer is one line naming the file or key, with nothing already on disk lost.

Divergence (NaN/inf steps), a full disk and a kill mid-save, files that are not checkpoints, data files
that are not text, corpora too small for a window, wandb without a network, late failures in evaluation
and sampling, and the run directories a failed try leaves."""
import errno
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import train as train_module
from conftest import ROOT, SHRINK
from data import build_data
from training.checkpoint import (LATEST, CheckpointError, check_checkpoint_file, find_latest, load_checkpoint,
                                 save_checkpoint)
from training.logger import RunLogger, wandb_mode
from training.validate import ConfigError, validate


def checkpoints(ckpt_dir):
    return sorted(p.name for p in ckpt_dir.iterdir())


def finite(ckpt_path) -> bool:
    return all(torch.isfinite(t).all() for t in load_checkpoint(ckpt_path)["model"].values())


class NaNAfter(train_module.GPT):
    """The model, with its loss replaced by NaN on the forward calls in `bad` (1-based)."""
    bad: set = set()
    calls = 0

    def forward(self, *args, **kwargs):
        logits, loss = super().forward(*args, **kwargs)
        if self.training:
            NaNAfter.calls += 1
            if NaNAfter.calls in NaNAfter.bad:
                loss = loss * float("nan")
        return logits, loss


@pytest.fixture
def nan_steps(monkeypatch):
    def inject(steps):
        NaNAfter.bad, NaNAfter.calls = set(steps), 0
        monkeypatch.setattr(train_module, "GPT", NaNAfter)
    return inject


# --- non-finite steps ------------------------------------------------------------------------------

def test_a_nonfinite_step_is_skipped_and_training_goes_on(make_cfg, tmp_path, nan_steps):
    nan_steps({3})
    summary = train_module.train(make_cfg())
    assert summary["status"] == "finished" and summary["step"] == 8 and summary["skipped_steps"] == 1
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / LATEST)
    assert finite(tmp_path / "run" / "checkpoints" / LATEST)
    # AdamW counted 7 updates in 8 steps: the NaN step changed nothing (its update was skipped)
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {7.0}


def test_divergence_stops_with_one_line_and_keeps_the_good_checkpoints(make_cfg, tmp_path, nan_steps):
    nan_steps(range(6, 100))  # every step from the 6th on
    with pytest.raises(train_module.RunError, match=r"training diverged: 3 steps in a row \(to step 8\)") as e:
        train_module.train(make_cfg("train.max_steps=20", "train.ckpt_every=2", "train.ckpt_keep=2",
                                    "train.max_skipped_steps=3"))
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert "\n" not in str(e.value) and str(find_latest(ckpt_dir)) in str(e.value)
    # the skipped steps wrote no checkpoint at step 6 either: its weights are those of step 5, finite
    assert checkpoints(ckpt_dir) == [LATEST, "step_0000004.pt", "step_0000006.pt"]
    assert all(finite(ckpt_dir / name) for name in checkpoints(ckpt_dir))


def test_nonfinite_weights_are_never_checkpointed(make_cfg, tmp_path, monkeypatch):
    real = train_module.build_optimizer

    def poisoned(model, train, device):
        """AdamW whose 6th update writes a NaN into a weight (the gradients stay finite)."""
        optimizer, calls = real(model, train, device), [0]

        def poison(optimizer, args, kwargs):
            calls[0] += 1
            if calls[0] == 6:
                with torch.no_grad():
                    next(model.parameters()).view(-1)[0] = float("nan")
        optimizer.register_step_post_hook(poison)
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", poisoned)
    with pytest.raises(train_module.RunError, match="weights are not finite at step 8: checkpoint not written"):
        train_module.train(make_cfg())
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert checkpoints(ckpt_dir) == [LATEST, "step_0000004.pt"] and finite(ckpt_dir / LATEST)


def test_run_errors_reach_the_terminal_as_one_line(make_cfg, monkeypatch, capsys):
    def diverges(cfg):
        raise train_module.RunError("training diverged: ...")

    monkeypatch.setattr(train_module, "train", diverges)
    with pytest.raises(SystemExit) as e:
        train_module.main.__wrapped__(make_cfg())
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "error: training diverged: ..."


# --- disk full, a kill mid-save ----------------------------------------------------------------------

class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_is_one_line_and_the_earlier_checkpoints_stay(make_cfg, tmp_path, monkeypatch):
    import training.checkpoint as checkpoint
    real_fdopen, saves = os.fdopen, []

    def fdopen(fd, mode):
        saves.append(fd)
        return FullDisk(real_fdopen(fd, mode), room=1 << 40 if len(saves) == 1 else 1000)

    monkeypatch.setattr(checkpoint.os, "fdopen", fdopen)
    with pytest.raises(train_module.RunError) as e:
        train_module.train(make_cfg())
    message = str(e.value)
    assert message.startswith("checkpoint error: ") and "step_0000008.pt: disk full, checkpoint not written" in message
    assert "\n" not in message
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert checkpoints(ckpt_dir) == [LATEST, "step_0000004.pt"]   # no temp file, latest untouched
    assert load_checkpoint(ckpt_dir / LATEST)["step"] == 4


def test_a_kill_mid_save_leaves_no_debris(make_cfg, tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    save_checkpoint({"step": 1}, ckpt_dir, step=1, keep=3)
    # what a process killed inside _atomic_write / _atomic_symlink leaves
    debris = [ckpt_dir / ".step_0000002.pt.k3j9x.tmp", ckpt_dir / f".{LATEST}.4242.tmp"]
    for path in debris:
        path.write_bytes(b"x" * 4096)
    save_checkpoint({"step": 2}, ckpt_dir, step=2, keep=3)
    assert checkpoints(ckpt_dir) == [LATEST, "step_0000001.pt", "step_0000002.pt"]

    # ... and at the start of a run that resumes from that directory
    run_ckpt = f"train.ckpt_dir={ckpt_dir}"
    train_module.train(make_cfg(run_ckpt, "train.max_steps=2", "train.sample_tokens=0", "train.ckpt_every=100"))
    for path in debris:
        path.write_bytes(b"x")
    train_module.train(make_cfg(run_ckpt, "train.max_steps=3", "train.resume=latest", "train.sample_tokens=0",
                                "train.ckpt_every=100", run="again"))
    assert not any(p.name.endswith(".tmp") for p in ckpt_dir.iterdir())


# --- files that are not checkpoints ----------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory):
    """A text file, a truncated checkpoint, another program's torch file, a latest.pt pointing nowhere."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.pt").write_text("not a checkpoint\n")
    good = save_checkpoint({"step": 1, "model": {"w": torch.ones(1000)}}, d / "good", step=1, keep=1)
    (d / "truncated.pt").write_bytes(good.read_bytes()[:2000])
    torch.save({"state_dict": {}}, d / "foreign.pt")
    (d / "dangling").mkdir()
    (d / "dangling" / LATEST).symlink_to("step_0000009.pt")
    return d


@pytest.mark.parametrize("name, problem", [
    ("notes.pt", "not a checkpoint of this project (not a torch zip archive"),
    ("truncated.pt", "truncated or damaged"),
    ("missing.pt", "no such file"),
])
def test_resume_from_a_bad_file_is_refused_before_any_work(make_cfg, bad_checkpoints, name, problem):
    path = bad_checkpoints / name
    for key in ("resume", "init_from"):
        with pytest.raises(ConfigError) as e:
            validate(make_cfg(f"train.{key}={path}"))
        assert e.value.key == f"train.{key}" and f"{path}: {problem}" in str(e.value)


def test_foreign_torch_files_and_dangling_latest(make_cfg, bad_checkpoints, tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint of this project's train.py: no step, model"):
        load_checkpoint(bad_checkpoints / "foreign.pt")
    check_checkpoint_file(bad_checkpoints / "foreign.pt")   # a torch file: only its contents tell
    with pytest.raises(ConfigError, match="train.resume: .*foreign.pt: not a checkpoint of this project"):
        train_module.train(make_cfg(f"train.resume={bad_checkpoints / 'foreign.pt'}"))
    # resume=latest whose link target is gone must not silently start at step 0 over the old run
    with pytest.raises(ConfigError, match=r"latest.pt: links to 'step_0000009.pt', which does not exist"):
        train_module.train(make_cfg(f"train.ckpt_dir={bad_checkpoints / 'dangling'}", "train.resume=latest"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("name, problem", [("notes.pt", "not a checkpoint of this project"),
                                           ("truncated.pt", "truncated or damaged"),
                                           ("foreign.pt", "no step, model, model_config")])
def test_sample_from_a_bad_file_is_one_line(bad_checkpoints, name, problem):
    result = subprocess.run([sys.executable, "sample.py", str(bad_checkpoints / name)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith(f"error: checkpoint {bad_checkpoints / name}: ")
    assert problem in result.stderr and len(result.stderr.strip().splitlines()) == 1


# --- data that cannot be used ------------------------------------------------------------------------

def files_cfg(make_cfg, directory, *overrides):
    return make_cfg("data=files", f"data.paths=[{directory}/*.txt]", "data.max_docs=null", *overrides)


def test_a_file_that_is_not_utf8_is_named(make_cfg, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("def f():\n    return 1\n" * 200)
    (corpus / "b.txt").write_bytes("caf\u00e9 = 'latin-1'\n".encode("latin-1") * 200)
    (corpus / "c.txt").write_bytes(bytes(range(256)) * 8)     # binary
    cfg = files_cfg(make_cfg, corpus)
    with pytest.raises(ValueError, match=rf"data.paths: {corpus}/b.txt is not utf-8 text \(byte 0xe9 at offset 3"):
        build_data(cfg.data, tmp_path / "cache")
    (corpus / "b.txt").unlink()
    with pytest.raises(ValueError, match=rf"data.paths: {corpus}/c.txt is binary, not text"):
        build_data(cfg.data, tmp_path / "cache")
    # latin-1 decodes every byte: the user's way out when the files are in another encoding
    build_data(files_cfg(make_cfg, corpus, "data.encoding=latin-1", "data.val_fraction=0.4").data,
               tmp_path / "cache")
    with pytest.raises(ConfigError, match="data.encoding: must be a text encoding"):
        validate(files_cfg(make_cfg, corpus, "data.encoding=klingon"))


def test_an_empty_corpus_says_so(make_cfg, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("")
    (corpus / "b.txt").write_text("")
    with pytest.raises(ConfigError, match=r"data.paths: the corpus is empty \(2 documents, no text in any\)"):
        train_module.train(files_cfg(make_cfg, corpus))


def test_a_val_split_shorter_than_a_window_fails_before_the_first_step(make_cfg, tmp_path, cache_dir):
    bundle = build_data(make_cfg().data, cache_dir)
    T = len(bundle.val)   # a window is T + 1 tokens: one more than the val split holds
    assert len(bundle.train) > T + 1
    with pytest.raises(ConfigError) as e:
        train_module.train(make_cfg(f"data.seq_len={T}"))
    assert e.value.key == "data.val_fraction" and f"fewer than one window of data.seq_len + 1 = {T + 1:,}" in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()   # nothing trained, nothing lost


# --- late failures cost nothing of the training ---------------------------------------------------------

def test_an_evaluation_crash_at_the_end_keeps_the_final_checkpoint(make_cfg, tmp_path, monkeypatch):
    def val_loss_fails(model, loader, *args):
        if loader.seq_len:   # every call: the first evaluation is at step 4, after the step-4 checkpoint
            raise RuntimeError("evaluation broke")

    monkeypatch.setattr(train_module, "val_loss", val_loss_fails)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        train_module.train(make_cfg("train.eval_every=8"))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / LATEST)["step"] == 8


def test_a_sample_crash_keeps_the_run_finished(make_cfg, monkeypatch, capsys):
    def generate_fails(*args, **kwargs):
        raise RuntimeError("sampling broke")

    monkeypatch.setattr(train_module, "generate_text", generate_fails)
    summary = train_module.train(make_cfg())
    assert summary["status"] == "finished" and summary["checkpoint"].endswith("step_0000008.pt")
    assert "sample failed (RuntimeError: sampling broke)" in capsys.readouterr().err


# --- the command line: quick tries, no empty folders, no empty train.log -------------------------------

def test_quick_try_clamps_the_warmup_and_writes_no_empty_log(tmp_path, cache_dir):
    run = tmp_path / "outputs" / "run"
    result = subprocess.run([sys.executable, "train.py", *SHRINK, "train.max_steps=2", "train.warmup_steps=20",
                             f"cache_dir={cache_dir}", f"hydra.run.dir={run}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "train.warmup_steps=20 > train.max_steps=2: warming up over all 2 steps" in result.stdout
    assert (run / "metrics.jsonl").exists() and not (run / "train.log").exists()


@pytest.mark.parametrize("override", ["train.lr=abc", "data.paths=[/no/such/*.txt]"])
def test_a_failed_try_leaves_no_empty_run_folder(tmp_path, override):
    outputs = tmp_path / "outputs"
    result = subprocess.run([sys.executable, "train.py", "data=files", override, "logger=none",
                             f"hydra.run.dir={outputs / 'day' / 'time'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("config error: ")
    assert not (outputs / "day").exists()


# --- wandb without a network ----------------------------------------------------------------------------

@pytest.fixture
def silent_server():
    """A wandb server that accepts connections and never answers (a firewall, a dead proxy)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_an_unreachable_wandb_falls_back_to_offline_within_seconds(make_cfg, tmp_path, no_wandb_login,
                                                                   monkeypatch, silent_server, capsys):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    cfg = make_cfg("logger=wandb")
    assert wandb_mode(cfg.logger.mode) == "online"
    start = time.perf_counter()
    logger = RunLogger(cfg.logger, tmp_path / "run", {})
    elapsed = time.perf_counter() - start
    logger.finish({"status": "finished"})
    assert elapsed < 30, elapsed
    assert f"wandb: {silent_server} did not answer within 5 s; logging offline" in capsys.readouterr().err
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_wandb_mode_from_the_environment_wins(make_cfg, tmp_path, no_wandb_login, monkeypatch, capsys):
    import wandb
    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: modes.append(kwargs["mode"]))
    monkeypatch.setattr("training.logger.server_reachable", lambda url: True)
    monkeypatch.setenv("WANDB_MODE", "online")      # no API key: auto alone would say offline
    RunLogger(make_cfg("logger=wandb").logger, tmp_path / "a", {})
    RunLogger(make_cfg("logger=offline").logger, tmp_path / "b", {})
    assert modes == ["online", "online"]
    assert "WANDB_MODE=online overrides logger.mode=offline" in capsys.readouterr().err
