"""Checkpoints written atomically: `<ckpt_dir>/step_<N>.pt`, and `latest.pt` linking the newest.

A checkpoint is first written to a temporary file in the same directory, fsynced, then renamed
over its real name (rename is atomic within a filesystem), so a crash or a full disk mid-save
never leaves a half-written file under a real name and never touches the previous checkpoints.
A temporary file left by a process killed mid-write is removed at the next save or start
(remove_stale_temp). Checkpoints hold only tensors and plain containers, so they load with
torch.load(weights_only=True). Whatever goes wrong reading or writing one is a CheckpointError: one
line naming the file and what is wrong with it.

A job of several processes writes `step_<N>.dcp/` instead (save_sharded_checkpoint): model and optimizer
through torch.distributed.checkpoint (DCP), each rank writing its own shards (so multi-node jobs need a
shared filesystem), beside `trainer.pt` with everything else (step, schedule, loader, rng, model_config,
config, tokenizer). The directory is written under a temporary name and renamed by rank 0 once every rank is
done, so the same atomicity holds; latest.pt then links the directory. DCP reshards on load, so a directory
resumes at any world size (load_state), one process included (no process group needed), and
load_checkpoint reads its weights whole (sample.py, train.init_from) as from a .pt.
"""
import errno
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

LATEST = "latest.pt"
TEMP_GLOB = ".*.tmp"   # _atomic_write's, _atomic_symlink's and save_sharded_checkpoint's temporary names
# What train.py writes; a file without them was not written by this project's trainer.
KEYS = ("step", "model", "optimizer", "schedule", "loader", "rng", "model_config", "config", "tokenizer")
SHARDED = ("model", "optimizer")   # in a .dcp directory, DCP's shards; the rest of KEYS is its trainer.pt
TRAINER_KEYS = tuple(k for k in KEYS if k not in SHARDED)
TRAINER_FILE = "trainer.pt"
DCP_METADATA = ".metadata"         # DCP's index of a checkpoint's tensors


class CheckpointError(Exception):
    """A checkpoint that cannot be read or written: `<path>: <what is wrong>`."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write state as step_<step>.pt, point latest.pt at it, then delete all but the newest `keep`.

    Raises CheckpointError when the write fails (a full disk says so); the earlier checkpoints and
    latest.pt are then as they were."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp(ckpt_dir)
    path = ckpt_dir / f"step_{step:07d}.pt"
    try:
        _atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a failed write as 'unexpected pos': the file's own error says why
        cause = getattr(e, "write_error", None) or e
        raise CheckpointError(path, _write_failure(cause, ckpt_dir)) from None
    _publish(path, ckpt_dir, keep)
    return path


def save_sharded_checkpoint(model, optimizer, trainer: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Every rank of the job calls this: write step_<step>.dcp/ (module docstring), point latest.pt at it,
    then delete all but the newest `keep` checkpoints. model and optimizer: this rank's (FSDP-sharded) ones;
    trainer: the other entries of KEYS, written by rank 0.

    Raises CheckpointError on every rank when any rank's write fails; the earlier checkpoints and latest.pt
    are then as they were, and no temporary directory is left."""
    rank = dist.get_rank()
    path = ckpt_dir / f"step_{step:07d}.dcp"
    tmp = ckpt_dir / f".{path.name}.tmp"
    failure = None
    if rank == 0:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp(ckpt_dir)
            tmp.mkdir()
        except OSError as e:
            failure = e
    if _agree(failure is None):   # also the barrier: the temporary directory exists
        model_state, optim_state = get_state_dict(model, optimizer)
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
            if rank == 0:
                _atomic_write(tmp / TRAINER_FILE, lambda f: torch.save(trainer, f))
        except (OSError, RuntimeError, CheckpointException) as e:   # DCP raises its exception on every rank
            if isinstance(e, CheckpointException) and e.failures:   # the first failing rank's own error
                e = next(iter(e.failures.values()))[0]
            failure = getattr(e, "write_error", None) or e
        written = _agree(failure is None)   # also the barrier: every rank's shards are on disk
    else:
        written = False
    if rank == 0 and written:
        try:
            _replace_dir(tmp, path)
            _publish(path, ckpt_dir, keep)
        except OSError as e:
            failure = e
    if rank == 0 and failure is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    # also the barrier: nobody goes on (to a resume, the next save) before the rename
    if not _agree(written and failure is None):
        cause = failure or RuntimeError("another rank's write failed (its error is above)")
        raise CheckpointError(path, _write_failure(cause, ckpt_dir))
    return path


def _agree(ok: bool) -> bool:
    """Whether ok holds on every rank of the job; every rank waits here for all the others."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor(int(ok), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the directory tmp to path; an existing path (the same step written again after a resume from an
    earlier one) is moved aside first, as a rename cannot replace a non-empty directory, then deleted."""
    old = path.with_name(f".{path.name}.old.tmp")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _publish(path: Path, ckpt_dir: Path, keep: int) -> None:
    """latest.pt -> path, durably; then the checkpoints beyond the newest `keep` go."""
    _atomic_symlink(ckpt_dir / LATEST, path.name)
    _fsync_dir(ckpt_dir)
    for old in _step_files(ckpt_dir)[:-keep]:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def remove_stale_temp(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary files and directories of writes that never finished (a kill mid-save); returns
    them. One run writes a checkpoint directory at a time, so any temporary found here is debris (in a job
    of several processes, rank 0 alone calls this)."""
    stale = sorted(ckpt_dir.glob(TEMP_GLOB)) if ckpt_dir.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink(missing_ok=True)
    return stale


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint latest.pt links to, or None when ckpt_dir holds none yet. A latest.pt whose
    target is gone is an error, not a fresh start: resuming from scratch would discard the run."""
    latest = ckpt_dir / LATEST
    if not latest.is_symlink() and not latest.exists():
        return None
    if not latest.exists():
        raise CheckpointError(latest, f"links to {os.readlink(latest)!r}, which does not exist")
    return latest.resolve()


def check_checkpoint_file(path) -> None:
    """A cheap look at the file before any work: it exists and is a whole torch zip archive (a
    truncated file has lost its central directory), or a .dcp directory with DCP's index and a
    trainer.pt that is such an archive. load_checkpoint checks the contents."""
    path = Path(path)
    if path.is_dir():
        missing = [name for name in (DCP_METADATA, TRAINER_FILE) if not (path / name).is_file()]
        if missing:
            raise CheckpointError(path, f"a directory, but not a checkpoint of this project: no {', '.join(missing)}")
        return check_checkpoint_file(path / TRAINER_FILE)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, _not_a_checkpoint(path))
    with zipfile.ZipFile(path) as z:
        if not any(name.endswith("/data.pkl") for name in z.namelist()):
            raise CheckpointError(path, "a zip archive, but not one written by torch.save")


def load_checkpoint(path, keys: tuple[str, ...] = KEYS) -> dict:
    """A checkpoint's contents on the CPU; load_state_dict then moves each tensor to its device.
    keys: the entries the caller needs (a fine-tune needs only the weights).

    A .dcp directory: its trainer.pt, and with "model" in keys the whole weights, gathered from every
    rank's shards (no process group needed). Its optimizer state only has a meaning resharded to a
    live optimizer: load_state."""
    check_checkpoint_file(path)
    if Path(path).is_dir():
        if "optimizer" in keys:
            raise ValueError(f"{path}: a sharded checkpoint's optimizer state loads into an optimizer (load_state)")
        ckpt = load_checkpoint(Path(path) / TRAINER_FILE, keys=tuple(k for k in keys if k != "model"))
        return {**ckpt, "model": _whole_model(Path(path))} if "model" in keys else ckpt
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, KeyError ... on bad bytes
        raise CheckpointError(path, f"not a readable checkpoint: damaged or truncated "
                                    f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a checkpoint of this project")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(path, f"not a checkpoint of this project's train.py: no {', '.join(missing)}")
    return ckpt


def load_state(path, ckpt: dict, model, optimizer) -> None:
    """Weights and optimizer state of the checkpoint at path into this run's model and optimizer, at this
    run's world size, sharded (FSDP) or not. A .dcp directory: DCP reads each rank's part of every tensor
    from whatever shards hold it. A one-process .pt (ckpt: its load_checkpoint contents): its whole tensors,
    and its optimizer state, which torch keys by parameter index, renamed by parameter name.
    (A one-process run resuming from a .pt loads it with load_state_dict, as it always has.)"""
    if Path(path).is_dir():
        model_state, optim_state = get_state_dict(model, optimizer)   # the tensors to fill, this rank's shards
        try:
            _dcp_load({"model": model_state, "optimizer": optim_state}, path)
        except (CheckpointException, RuntimeError, OSError, KeyError) as e:
            raise CheckpointError(path, _unreadable(e)) from None
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
        return
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"],
                   optim_state_dict=_optimizer_state_by_name(ckpt["optimizer"], model, optimizer),
                   options=StateDictOptions(full_state_dict=True))


def _optimizer_state_by_name(state: dict, model, optimizer) -> dict:
    """optimizer.state_dict() of one process (state and param_groups by parameter index, in the order of
    the optimizer's groups) -> keyed by parameter name, the form set_state_dict takes. The index order is
    this optimizer's too: both were built by model.configure_optimizer from the same parameters."""
    names = {p: name for name, p in model.named_parameters()}
    order = [names[p] for group in optimizer.param_groups for p in group["params"]]
    return {"state": {order[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}


def _dcp_load(state: dict, path: Path, alone: bool = False) -> None:
    """dcp.load into state, by the whole process group, or by this process alone (alone, or without a group:
    it reads every shard itself, which DCP announces with a warning each time; that is the intent here)."""
    alone = alone or not dist.is_initialized()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=alone)


def _whole_model(path: Path) -> dict:
    """The model's weights of a .dcp directory as whole CPU tensors (shapes and dtypes from DCP's index),
    read by this process alone."""
    try:
        index = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in index.items()
                 if key.startswith("model.") and isinstance(meta, dcp.TensorStorageMetadata)}
        if not model:
            raise CheckpointError(path, "not a checkpoint of this project's train.py: no model weights")
        _dcp_load({"model": model}, path, alone=True)
    except (CheckpointException, RuntimeError, OSError, KeyError, EOFError) as e:
        raise CheckpointError(path, _unreadable(e)) from None
    return model


def _unreadable(e: BaseException) -> str:
    """One line for a .dcp directory DCP could not read: the first rank's own error, which DCP's exception
    (naming only the ranks that failed) carries."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    first = f": {str(e).splitlines()[0][:120]}" if str(e) else ""
    return f"not a readable checkpoint: a shard is damaged, truncated or missing ({type(e).__name__}{first})"


def _not_a_checkpoint(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return f"truncated or damaged ({size:,} bytes; the zip archive's end is missing)"
    return f"not a checkpoint of this project (not a torch zip archive; {size:,} bytes)"


def _write_failure(e: Exception, ckpt_dir: Path) -> str:
    """One line for a failed write. torch's zip writer turns the ENOSPC of a full disk into
    'unexpected pos', so the free space is looked at too."""
    free = shutil.disk_usage(ckpt_dir).free
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or free < 64 << 20
    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    if full:
        return (f"disk full, checkpoint not written ({free / 2**20:,.0f} MiB free; {first}); the earlier "
                "checkpoints are intact: free space, then resume with train.resume=latest")
    return f"checkpoint not written ({type(e).__name__}: {first}); the earlier checkpoints are intact"


def _step_files(ckpt_dir: Path) -> list[Path]:
    """step_*.pt files and step_*.dcp directories in the order they were written (not by step: a run
    resumed from an earlier checkpoint into the same directory writes lower steps after higher ones). A
    directory's mtime is that of its last entry, trainer.pt, written after every shard."""
    found = [*ckpt_dir.glob("step_*.pt"), *ckpt_dir.glob("step_*.dcp")]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


class _Recorded:
    """A file whose write errors are kept: torch.save replaces them by its own RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def _atomic_write(path: Path, write) -> None:
    """write(f) into a temporary file beside path, fsync, rename over path; an exception raised carries
    the file's own OSError, if any, as .write_error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recorded(raw)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if f is not None and f.error is not None:
            e.write_error = f.error
        raise


def _atomic_symlink(link: Path, target: str) -> None:
    """Point link at target (a name in the same directory) by renaming a fresh symlink over it."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _fsync_dir(directory: Path) -> None:
    """Make the renames themselves durable, not only the files' bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
