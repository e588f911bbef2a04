"""Checkpoints written atomically: `<ckpt_dir>/step_<N>.pt`, and `latest.pt` linking the newest.

A checkpoint is first written to a temporary file in the same directory, fsynced, then renamed
over its real name (rename is atomic within a filesystem), so a crash or a full disk mid-save
never leaves a half-written file under a real name and never touches the previous checkpoints.
A temporary file left by a process killed mid-write is removed at the next save or start
(remove_stale_temp). Checkpoints hold only tensors and plain containers, so they load with
torch.load(weights_only=True). Whatever goes wrong reading or writing one is a CheckpointError: one
line naming the file and what is wrong with it.
"""
import errno
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

LATEST = "latest.pt"
TEMP_GLOB = ".*.tmp"   # _atomic_write's and _atomic_symlink's temporary names
# What train.py writes; a file without them was not written by this project's trainer.
KEYS = ("step", "model", "optimizer", "schedule", "loader", "rng", "model_config", "config", "tokenizer")


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
    _atomic_symlink(ckpt_dir / LATEST, path.name)
    _fsync_dir(ckpt_dir)
    for old in _step_files(ckpt_dir)[:-keep]:
        old.unlink()
    return path


def remove_stale_temp(ckpt_dir: Path) -> list[Path]:
    """Delete the temporary files of writes that never finished (a kill mid-save); returns them.
    One run writes a checkpoint directory at a time, so any temporary file found here is debris."""
    stale = sorted(ckpt_dir.glob(TEMP_GLOB)) if ckpt_dir.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
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
    truncated file has lost its central directory). load_checkpoint checks the contents."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(path, _not_a_checkpoint(path))
    with zipfile.ZipFile(path) as z:
        if not any(name.endswith("/data.pkl") for name in z.namelist()):
            raise CheckpointError(path, "a zip archive, but not one written by torch.save")


def load_checkpoint(path, keys: tuple[str, ...] = KEYS) -> dict:
    """A checkpoint's contents on the CPU; load_state_dict then moves each tensor to its device.
    keys: the entries the caller needs (a fine-tune needs only the weights)."""
    check_checkpoint_file(path)
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
    """step_*.pt files in the order they were written (not by step: a run resumed from an earlier
    checkpoint into the same directory writes lower steps after higher ones)."""
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: p.stat().st_mtime_ns)


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
