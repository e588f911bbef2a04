"""train.py over several processes (training/distributed.py) on CPU and gloo, against one process.

A job of several processes must be the one-process run, split: the same losses, gradient norms, val losses
and weights on the same global batches (fp32, tight tolerance), whatever the layout (dp 2, dp 4, cp 2,
dp 2 x cp 2), and the same again after a checkpoint is resumed at another world size. Each spawned job
starts its processes once (a FileStore group in tmp) and runs all its training runs in turn; every run leaves
its record in its run directory (metrics.jsonl, checkpoints), which the tests read. The corpus is many short
files, so that rows hold different numbers of targets (document boundaries are ignored targets): only then
does the loss weighting across ranks show.
"""
import contextlib
import datetime
import errno
import json
import json.decoder
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train as train_module
from conftest import ROOT, SHRINK
from data import build_data
from data.loader import take_rows
from training import distributed
from training import checkpoint
from training.checkpoint import (LATEST, CheckpointError, find_latest, load_checkpoint, remove_stale_temp,
                                 save_checkpoint)
from training.validate import ConfigError, validate

# Every run: 4 steps, checkpoints and evaluations at 2 and 4; each run below adds its own
RUN = ["train.device=cpu", "data.max_docs=null", "data.val_fraction=0.1", "train.max_steps=4", "train.eval_every=2",
       "train.ckpt_every=2", "train.eval_batches=1", "train.sample_tokens=0"]
CP = ["model.attention=reference"]   # what the context-parallel ring runs: our kernels (their PyTorch reference here)
# Not bitwise: FSDP sums each gradient over the ranks in another order than one process sums it over rows, and
# the ring merges attention blockwise. Losses, gradient norms and val losses agree to ~3e-7 (relative). AdamW's
# first steps normalise every update to about lr, so a gradient entry near 0 turns that rounding into up to
# ~1e-5 of a weight (one process with the reference kernels instead of SDPA differs from itself by 5e-6);
# the mutations below move losses by > 6e-4 and weights by > 2e-2.
TOL = dict(rtol=1e-5, atol=1e-6)
WEIGHT_TOL = dict(rtol=0.0, atol=5e-5)


def short_documents(directory: Path) -> Path:
    """120 text files of 15-120 characters of Python source (the stdlib's json decoder): documents of a few
    tokens to a few dozen."""
    directory.mkdir(parents=True, exist_ok=True)
    source = Path(json.decoder.__file__).read_text()
    rng = random.Random(0)
    for i in range(120):
        start, length = rng.randrange(len(source) - 200), rng.randrange(15, 120)
        (directory / f"doc{i:03d}.txt").write_text(source[start:start + length])
    return directory


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return short_documents(tmp_path_factory.mktemp("docs"))


@pytest.fixture(scope="module")
def compose_run(tmp_path_factory, cache_dir, docs):
    """Config of a run named `name` (its out_dir under the module's tmp), as a plain resolved dict."""
    root = tmp_path_factory.mktemp("runs")

    def make(name, *overrides):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("config", overrides=[f"out_dir={root / name}", f"cache_dir={cache_dir}", *SHRINK,
                                               "data=files", f"data.paths=[{docs}/*.txt]", *RUN, *overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    return make


def metrics(cfg: dict) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg["out_dir"]) / "metrics.jsonl").read_text().splitlines()]


def series(cfg: dict, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(cfg) if key in m}


def weights(cfg: dict, step: int = 4) -> dict[str, torch.Tensor]:
    ckpt_dir = Path(cfg["out_dir"]) / "checkpoints"
    path = next(p for p in ckpt_dir.iterdir() if p.name.startswith(f"step_{step:07d}."))
    return load_checkpoint(path, keys=("model",))["model"]


def assert_same_run(got: dict, want: dict, steps=(1, 2, 3, 4)) -> None:
    """Losses, gradient norms, val losses (TOL) and final weights (WEIGHT_TOL) of two runs agree."""
    for key in ("loss", "grad_norm", "val_loss"):
        a, b = series(got, key), series(want, key)
        assert [s for s in a if s in steps] == [s for s in b if s in steps], key
        for s in a:
            if s in steps:
                torch.testing.assert_close(a[s], b[s], **TOL, msg=lambda m: f"{key} at step {s}: {m}")
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **WEIGHT_TOL, msg=lambda m: f"{name}: {m}")


def max_weight_change(got: dict, want: dict) -> float:
    a, b = weights(got), weights(want)
    return max((a[n] - b[n]).abs().max().item() for n in a)


# --- mutations: what the protections guard against, switched on inside the spawned processes ----------

@contextlib.contextmanager
def mutated(mutation: str | None, out_dir: Path):
    """The run's code with `mutation` switched on (None: as it is), in this spawned process."""
    with pytest.MonkeyPatch.context() as mp:
        if mutation == "compile_spy":   # not a mutation: what torch.compile is asked for, run by AOT autograd only
            real_compile = torch.compile

            def spy(fn, mode=None, **kwargs):
                out_dir.mkdir(parents=True, exist_ok=True)
                with open(out_dir / f"compiled-rank{dist.get_rank()}.txt", "a") as f:
                    f.write(f"{type(getattr(fn, '__self__', fn)).__name__} {mode}\n")
                return real_compile(fn, backend="aot_eager")
            mp.setattr(torch, "compile", spy)
        elif mutation == "local_mean":   # every rank backpropagates the mean over its own targets
            mp.setattr(train_module, "share_of_loss", lambda loss, targets, n_global, world: loss)
        elif mutation == "same_rows":   # every dp rank takes the first dp rank's rows
            real = distributed.take_rows
            mp.setattr(distributed, "take_rows",
                       lambda batch, start, stop, pad=False: real(batch, 0, stop - start, pad))
        elif mutation == "full_disk_at_4":   # rank 0's trainer.pt of step 4 hits a full disk, after every shard
            real_write = checkpoint._atomic_write

            def write(path, fn):
                if path.parent.name == ".step_0000004.dcp.tmp":
                    raise OSError(errno.ENOSPC, "No space left on device")
                real_write(path, fn)
            mp.setattr(checkpoint, "_atomic_write", write)
        elif mutation == "every_rank_logs":   # each rank writes the record
            real_init = train_module.RunLogger.__init__
            mp.setattr(train_module.RunLogger, "__init__",
                       lambda self, logger, out_dir, config, active=True: real_init(self, logger, out_dir, config))
        yield


def _worker(rank: int, world: int, tmp: Path, alone: list, runs: list) -> None:
    torch.set_num_threads(1)   # the ranks share two cores
    if rank == 0:   # one-process runs: before the group exists, this is a world of 1
        for cfg in alone:
            train_module.train(OmegaConf.create(cfg))
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        for cfg, mutation in runs:
            with mutated(mutation, Path(cfg["out_dir"])):
                try:
                    train_module.train(OmegaConf.create(cfg))
                except train_module.RunError as e:   # what main() would print: kept for the test
                    (Path(cfg["out_dir"]) / f"error-rank{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def spawn(world: int, tmp: Path, runs: list, alone: list = ()) -> None:
    """Each config of `alone` as one process, then each (config, mutation) of runs on `world` processes.
    The children run our kernels' PyTorch reference on the CPU, not Triton's interpreter (20x slower here)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        torch.multiprocessing.spawn(_worker, args=(world, tmp, list(alone), runs), nprocs=world)


# --- the jobs ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def four(compose_run, tmp_path_factory):
    """4 processes: dp 4 (it saves the checkpoint the resumes below start from) and dp 2 x cp 2."""
    runs = {"dp4": compose_run("dp4", "data.batch_size=4"),
            "dp2cp2": compose_run("dp2cp2", "parallel.cp=2", *CP)}
    spawn(4, tmp_path_factory.mktemp("four"), [(cfg, None) for cfg in runs.values()])
    return runs


@pytest.fixture(scope="module")
def two(compose_run, four, tmp_path_factory):
    """First, one process alone: the references, and a resume of the 4-process dp 4 checkpoint of step 2.
    Then 2 processes: dp 2 (with a memory plan; compiled), cp 2 (with another memory plan), the mutations, a
    disk that fills up under rank 0, and resumes of the dp 4 checkpoint and of the one-process .pt checkpoint
    of step 2."""
    from_dp4 = Path(four["dp4"]["out_dir"]) / "checkpoints" / "step_0000002.dcp"
    one = {"b2": compose_run("one-b2"), "b4": compose_run("one-b4", "data.batch_size=4"),
           "b2-cp": compose_run("one-b2-cp", *CP),
           "resume-dp4": compose_run("one-resume-dp4", "data.batch_size=4", f"train.resume={from_dp4}")}
    from_pt = Path(one["b2"]["out_dir"]) / "checkpoints" / "step_0000002.pt"
    runs = {"dp2": (compose_run("dp2", "train.activation_checkpointing=block"), None),
            "cp2": (compose_run("cp2", "parallel.cp=2", "train.activation_checkpointing=selective", *CP), None),
            "dp2-local_mean": (compose_run("dp2-local_mean"), "local_mean"),
            "dp2-same_rows": (compose_run("dp2-same_rows"), "same_rows"),
            "cp2-local_mean": (compose_run("cp2-local_mean", "parallel.cp=2", *CP), "local_mean"),
            "dp2-every_rank_logs": (compose_run("dp2-every_rank_logs", "train.max_steps=1"), "every_rank_logs"),
            "dp2-full_disk": (compose_run("dp2-full_disk"), "full_disk_at_4"),
            "dp2-compile": (compose_run("dp2-compile", "train.compile=true"), "compile_spy"),
            "resume-dp4": (compose_run("resume-dp4", "data.batch_size=4", f"train.resume={from_dp4}"), None),
            "resume-pt": (compose_run("resume-pt", f"train.resume={from_pt}"), None)}
    spawn(2, tmp_path_factory.mktemp("two"), list(runs.values()), alone=one.values())
    return {name: cfg for name, (cfg, _) in runs.items()} | {f"one-{name}": cfg for name, cfg in one.items()}


@pytest.fixture(scope="module")
def one(two):
    """The one-process runs of the job `two`, by name."""
    return {name.removeprefix("one-"): cfg for name, cfg in two.items() if name.startswith("one-")}


# --- (a) a job of several processes is the one-process run ---------------------------------------------

@pytest.mark.parametrize("job, run, reference", [
    ("two", "dp2", "b2"),          # with activation_checkpointing=block
    ("two", "dp2-compile", "b2"),  # each block compiled, then sharded
    ("four", "dp4", "b4"),
    ("two", "cp2", "b2-cp"),       # with activation_checkpointing=selective: the ring's output is kept
    ("four", "dp2cp2", "b2-cp"),
])
def test_several_processes_train_as_one(request, one, job, run, reference):
    assert_same_run(request.getfixturevalue(job)[run], one[reference])


def test_compile_is_per_block_under_fsdp(two):
    # torchtitan's order: each block compiled, FSDP's all-gathers in the hooks between them (the whole model
    # compiled as one graph is the one-process path)
    for rank in range(2):
        lines = (Path(two["dp2-compile"]["out_dir"]) / f"compiled-rank{rank}.txt").read_text().splitlines()
        assert lines == ["Block default", "Block default"]


@pytest.mark.parametrize("run, reference", [
    ("dp2-local_mean", "b2"),      # the mean over each rank's targets, not over all of them
    ("dp2-same_rows", "b2"),       # every dp rank on the same rows
    ("cp2-local_mean", "b2-cp"),   # the same across the chunks of a row
])
def test_a_mutation_fails_the_comparison(two, one, run, reference):
    with pytest.raises(AssertionError):
        assert_same_run(two[run], one[reference])
    assert max_weight_change(two[run], one[reference]) > 20 * WEIGHT_TOL["atol"]


def test_rank_zero_alone_writes_the_record(two):
    # one line per step and evaluation, however many processes
    assert [(m["step"], "val_loss" in m) for m in metrics(two["dp2"])] == [
        (1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    assert [m["step"] for m in metrics(two["dp2-every_rank_logs"])] == [1, 1, 1, 1]   # the mutation: twice each
    checkpoints = Path(two["dp2"]["out_dir"]) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [LATEST, "step_0000002.dcp", "step_0000004.dcp"]


def test_a_failed_write_on_one_rank_stops_every_rank_and_keeps_the_last_checkpoint(two):
    run = Path(two["dp2-full_disk"]["out_dir"])
    errors = [(run / f"error-rank{r}.txt").read_text() for r in range(2)]
    assert "disk full, checkpoint not written" in errors[0]
    assert "another rank's write failed" in errors[1]
    ckpt_dir = run / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [LATEST, "step_0000002.dcp"]   # no temporary left
    assert find_latest(ckpt_dir).name == "step_0000002.dcp"
    assert load_checkpoint(ckpt_dir / LATEST, keys=("step",))["step"] == 2


def test_a_damaged_sharded_checkpoint_is_one_line(two, tmp_path):
    damaged = tmp_path / "step_0000004.dcp"
    shutil.copytree(Path(two["dp2"]["out_dir"]) / "checkpoints" / damaged.name, damaged)
    with open(damaged / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(CheckpointError, match="a shard is damaged, truncated or missing"):
        load_checkpoint(damaged, keys=("model",))
    (damaged / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint of this project: no .metadata$"):
        load_checkpoint(damaged, keys=("step",))


def test_stale_checkpoint_directories_are_removed_and_rotated(tmp_path):
    """A kill mid-save leaves a temporary .dcp directory (and maybe a latest.pt symlink being swapped in,
    which links a directory); keep-N rotation counts .dcp directories with .pt files, oldest first."""
    (tmp_path / "step_0000001.dcp").mkdir()
    (tmp_path / "step_0000001.dcp" / "__0_0.distcp").write_bytes(b"shard")
    (tmp_path / ".step_0000002.dcp.tmp").mkdir()
    (tmp_path / ".step_0000002.dcp.tmp" / "__1_0.distcp").write_bytes(b"half a shard")
    (tmp_path / ".latest.pt.123.tmp").symlink_to("step_0000001.dcp")
    assert [p.name for p in remove_stale_temp(tmp_path)] == [".latest.pt.123.tmp", ".step_0000002.dcp.tmp"]
    assert (tmp_path / "step_0000001.dcp" / "__0_0.distcp").exists()   # not followed through the symlink
    for step in (2, 3):
        save_checkpoint({"step": step}, tmp_path, step=step, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step_0000002.pt", "step_0000003.pt"]


# --- (b) a checkpoint resumes at another world size ----------------------------------------------------

def test_resume_at_another_world_size(two, four, one):
    """Saved by 4 processes at step 2, resumed by 2 and by 1: steps 3 and 4 are those of the 4-process run.
    Saved by 1 process (.pt), resumed by 2: those of the one-process run."""
    for resumed in (two["resume-dp4"], one["resume-dp4"]):
        assert [m["step"] for m in metrics(resumed)] == [3, 4, 4]
        assert_same_run(resumed, four["dp4"], steps=(3, 4))
    assert_same_run(two["resume-pt"], one["b2"], steps=(3, 4))


# --- (c) the parallel config, checked before any work ----------------------------------------------------

@pytest.mark.parametrize("world, overrides, key", [
    (3, ["parallel.cp=2"], "parallel.cp"),                     # 2 does not divide 3
    (4, ["parallel.dp_shard=3"], "parallel.dp_shard"),         # 3 x 1 != 4
    (1, ["parallel.dp_shard=2"], "parallel.dp_shard"),         # 2 ranks asked for, one process launched
    (4, ["parallel.cp=2", "data.seq_len=30", *CP], "data.seq_len"),   # 30 % 4 != 0
    (4, ["data.batch_size=2"], "data.batch_size"),             # 2 rows over 4 dp ranks
    (2, ["parallel.cp=2"], "model.attention"),                 # sdpa: not what the ring runs
    (2, ["parallel.cp=2", "train.eval_passkey=true", *CP], "train.eval_passkey"),
    (2, ["parallel.cp=2", "train.sample_tokens=8", *CP], "train.sample_tokens"),
    (2, ["parallel.cp=0"], "parallel.cp"),
])
def test_parallel_config_errors_name_the_key(make_cfg, monkeypatch, world, overrides, key):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as e:
        validate(make_cfg(*overrides))
    assert e.value.key == key and str(e.value).startswith(f"{key}: ")


@pytest.mark.parametrize("world, overrides", [
    (4, ["parallel.cp=2", "data.seq_len=36", *CP]),   # dp 2 x cp 2; 36 = 9 x (2 x 2)
    (4, ["parallel.dp_shard=4", "data.batch_size=8"]),
    (1, []),                                          # one process: the defaults
])
def test_parallel_configs_that_factor_pass(make_cfg, monkeypatch, world, overrides):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    validate(make_cfg(*overrides, "train.sample_tokens=0", "train.device=cpu"))   # gloo: on a GPU machine too


# --- the row slicing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("pad", [False, True])
def test_rows_of_a_batch_keep_their_documents(compose_run, pad):
    cfg = OmegaConf.create(compose_run("rows"))
    bundle = build_data(cfg.data, cfg.cache_dir)
    B, T = 4, 32
    batch = bundle.loader("train", B, T, seed=3, bucket_boundaries=pad).batch(0)
    whole = batch["cu_seqlens"]
    assert torch.equal(take_rows(batch, 0, B, pad)["cu_seqlens"], whole)   # all rows: the loader's own
    bounds = sorted(set(whole.tolist()))
    assert len(bounds) > B + 1   # documents start inside rows, not only at row starts
    for start, stop in ((0, 2), (2, 4), (1, 2), (3, 4)):
        rows = take_rows(batch, start, stop, pad)
        for name in ("input_ids", "targets", "position_ids"):
            assert torch.equal(rows[name], batch[name][start:stop])
        # the loader's boundaries within these rows, shifted to start at 0
        want = [b - start * T for b in bounds if start * T <= b <= stop * T]
        cu = rows["cu_seqlens"]
        assert cu.dtype == torch.int32 and sorted(set(cu.tolist())) == want
        assert not pad or (cu.numel() & (cu.numel() - 1)) == 0   # padded to a power of two, as the loader pads


# --- torchrun, end to end ------------------------------------------------------------------------------

def test_torchrun_job_writes_one_record_and_a_checkpoint_sample_reads(tmp_path, cache_dir, docs):
    """The real launch: torchrun's environment, Hydra's main on each rank, one run directory and record,
    the end-of-run sample printed once, and sample.py reading the sharded checkpoint whole."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               *SHRINK, "data=files", f"data.paths=[{docs}/*.txt]", *RUN, "train.max_steps=2", "train.sample_tokens=4",
               f"cache_dir={cache_dir}", f"hydra.run.dir={out}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert [(m["step"], "val_loss" in m) for m in metrics({"out_dir": out})] == [(1, False), (2, False), (2, True)]
    assert result.stdout.count("--- sample") == 1 and "2 processes (FSDP, dp 2 x cp 1)" in result.stdout
    assert (out / "checkpoints" / LATEST).resolve().name == "step_0000002.dcp"
    sample = subprocess.run([sys.executable, "sample.py", str(out / "checkpoints" / LATEST), "--max-new-tokens", "4"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr
    assert "step 2 of" in sample.stdout

