"""Checkpoints written atomically: `<ckpt_dir>/step_<N>.pt`, and `latest.pt` linking the newest.

A checkpoint is first written to a temporary file in the same directory, fsynced, then renamed
over its real name (rename is atomic within a filesystem), so a crash or a full disk mid-save
never leaves a half-written file under a real name and never touches the previous checkpoints.
Checkpoints hold only tensors and plain containers, so they load with torch.load(weights_only=True).
"""
import os
import tempfile
from pathlib import Path

import torch

LATEST = "latest.pt"


def save_checkpoint(state: dict, ckpt_dir: Path, step: int, keep: int) -> Path:
    """Write state as step_<step>.pt, point latest.pt at it, then delete all but the newest `keep`."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"step_{step:07d}.pt"
    _atomic_write(path, lambda f: torch.save(state, f))
    _atomic_symlink(ckpt_dir / LATEST, path.name)
    _fsync_dir(ckpt_dir)
    for old in _step_files(ckpt_dir)[:-keep]:
        old.unlink()
    return path


def find_latest(ckpt_dir: Path) -> Path | None:
    """The checkpoint latest.pt links to, or None when ckpt_dir holds none yet."""
    latest = ckpt_dir / LATEST
    return latest.resolve() if latest.exists() else None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's contents on the CPU; load_state_dict then moves each tensor to its device."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _step_files(ckpt_dir: Path) -> list[Path]:
    """step_*.pt files in the order they were written (not by step: a run resumed from an earlier
    checkpoint into the same directory writes lower steps after higher ones)."""
    return sorted(ckpt_dir.glob("step_*.pt"), key=lambda p: p.stat().st_mtime_ns)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
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
