"""What holds the GPU memory at the peak of a run: measured from the CUDA caching allocator's event
trace (torch.cuda.memory._record_memory_history), not estimated.

    with PeakBreakdown() as pb:         # CUDA only; start it before the model is built
        ...build the model, train a step...
    pb.result.table()                   # bytes live at the peak, by where they were allocated

Every allocation is attributed to the innermost frame of this repository on its Python stack
("model/gpt.py:finish_tile", "kernels/launch.py:attn_bwd", ...); allocations made by the autograd
engine with no Python frame (parameter gradients, most activation gradients) and by torch.optim form
their own groups. The peak is replayed from the trace: the instant the live bytes were highest, and
which allocations were live then.
"""
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_FRAME = "autograd engine (no Python frame: gradients)"
GIB = 2**30


def origin(frames: list[dict], root: Path = ROOT) -> str:
    """Group name of an allocation from its stack (innermost frame first, as the allocator records it)."""
    if not frames:
        return NO_FRAME
    root_s = str(root) + "/"
    for f in frames:
        name = f.get("filename", "")
        if name.startswith(root_s) and "/site-packages/" not in name and "/.venv/" not in name:
            return f"{name[len(root_s):]}:{f.get('name', '?')}"
    for f in frames:
        if "/torch/optim/" in f.get("filename", ""):
            return "torch.optim (optimizer state)"
    f = frames[0]
    return f"other: {Path(f.get('filename', '?')).name}:{f.get('name', '?')}"


@dataclass
class Breakdown:
    peak_bytes: int                                     # live bytes at the peak, as replayed
    by_origin: dict[str, int] = field(default_factory=dict)

    def table(self, top: int = 12) -> str:
        """Markdown: the `top` largest groups live at the peak, the rest summed."""
        items = sorted(self.by_origin.items(), key=lambda kv: -kv[1])
        rest = sum(v for _, v in items[top:])
        rows = [f"| `{k}` | {v / GIB:.2f} |" for k, v in items[:top]]
        if rest:
            rows.append(f"| {len(items) - top} other sites | {rest / GIB:.2f} |")
        return "\n".join(["| allocated at | GiB at peak |", "|---|---|", *rows,
                          f"| **total** | **{self.peak_bytes / GIB:.2f}** |"])


def peak_breakdown(trace: list[dict], group=origin) -> Breakdown:
    """Replay alloc / free events; the live allocations at the highest point, summed by group(frames).

    A free counts at "free_requested" (when the tensor dies; the allocator's later "free_completed"
    only waits for streams). Events for addresses allocated before recording began are skipped, so
    the trace must start before what it should explain (the model, the optimizer) is allocated.
    """
    live: dict[int, int] = {}
    total = peak = peak_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            total += e["size"]
            if total > peak:
                peak, peak_at = total, i
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])
    # second pass up to the peak: which allocations were live there, and where they came from
    live_at: dict[int, tuple[int, str]] = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live_at[e["addr"]] = (e["size"], group(e.get("frames") or []))
        elif e["action"] == "free_requested":
            live_at.pop(e["addr"], None)
    by = defaultdict(int)
    for size, name in live_at.values():
        by[name] += size
    return Breakdown(peak_bytes=peak, by_origin=dict(by))


class PeakBreakdown:
    """Records the allocator's history inside the block; .result is the Breakdown of its peak."""

    def __init__(self, max_entries: int = 2_000_000):
        self.max_entries = max_entries
        self.result: Breakdown | None = None

    def __enter__(self):
        if not torch.cuda.is_available():
            raise RuntimeError("PeakBreakdown reads the CUDA caching allocator: it needs a CUDA device")
        torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=self.max_entries,
                                              clear_history=True)
        return self

    def __exit__(self, exc_type, *exc):
        # also after an out-of-memory error: the peak is then what filled the device
        try:
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        trace = snapshot["device_traces"][torch.cuda.current_device()]
        if len(trace) >= self.max_entries:   # the ring buffer wrapped: early allocations are lost
            if exc_type is None:
                raise RuntimeError(f"the allocator trace filled its {self.max_entries} entries; raise max_entries")
            return False
        self.result = peak_breakdown(trace)
        return False
