"""Rotary position embeddings (RoPE), rotate-half layout (GPT-NeoX / Llama).

Each pair of channels (i, i + D/2) of q and k is rotated by angle ``position * theta^(-2i/D)``, so
q.k depends only on the distance between positions. Positions come from ``position_ids`` rather than
``arange(T)`` because the data loader restarts them at 0 in every packed document.

Context extension by a factor s (``scaling_factor``), two ways (``scaling``):
- "linear", position interpolation (Chen et al. 2023): every position p becomes p / s.
- "yarn" (Peng et al. 2023, "YaRN"): frequencies that turn many times within the original context
  (local, high-frequency pairs) are kept; those that turn less than once there are divided by s;
  a linear ramp between the two over the pair index, between the pairs that turn beta_fast and
  beta_slow times, rounded outwards, as the YaRN authors' code and transformers compute it (the paper's
  formula ramps linearly in rotations instead; the field's models, and so our Hugging Face export,
  use the index ramp). The logits are also scaled by (0.1 ln s + 1)^2: the cos/sin tables carry one
  factor each, for q and for k.
"""
import math

import torch

from .config import ROPE_SCALINGS
# YaRN's ramp ends, in rotations of a frequency over the original context: pairs turning fewer than
# YARN_BETA_SLOW times are interpolated (divided by s), more than YARN_BETA_FAST kept (the paper's
# alpha, beta for Llama).
YARN_BETA_SLOW, YARN_BETA_FAST = 1.0, 32.0


class RotaryEmbedding:
    """cos/sin table for positions [0, n), built lazily on the device of the positions.

    Deliberately not an nn.Module with buffers: ``model.to(torch.bfloat16)`` would cast buffers and
    lose the angle precision long contexts need, and the table is derived data that has no place in a
    checkpoint. The table is computed in float64 and stored in float32.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, scaling_factor: float = 1.0,
                 scaling: str = "linear", original_max_positions: int | None = None):
        if scaling not in ROPE_SCALINGS:
            raise ValueError(f"scaling={scaling!r} is unknown; choose one of {ROPE_SCALINGS}")
        if scaling == "yarn" and scaling_factor != 1.0 and not (original_max_positions or 0) > 0:
            raise ValueError("scaling='yarn' needs original_max_positions, the context the model was trained at")
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling_factor = scaling_factor         # 1.0 = no context extension
        self.scaling = scaling
        self.original_max_positions = original_max_positions
        self.cos = self.sin = None                   # (n, head_dim) float32

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        """The D/2 angular frequencies (radians per position) after context extension, float64."""
        freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        s = self.scaling_factor
        if s == 1.0:
            return freq
        if self.scaling == "linear":
            return freq / s
        # the (fractional) pair index whose frequency turns r times over the original context
        def pair(r: float) -> float:
            return (self.head_dim * math.log(self.original_max_positions / (r * 2 * math.pi))
                    / (2 * math.log(self.theta)))
        low = max(math.floor(pair(YARN_BETA_FAST)), 0)
        high = min(math.ceil(pair(YARN_BETA_SLOW)), self.head_dim - 1)
        high = high if high > low else low + 0.001
        index = torch.arange(len(freq), dtype=torch.float64, device=device)
        keep = 1.0 - ((index - low) / (high - low)).clamp(0.0, 1.0)      # 1: the pair turns fast enough to keep
        return freq / s * (1.0 - keep) + freq * keep

    @property
    def attention_scale(self) -> float:
        """The factor YaRN multiplies each of q and k by (so the logits by its square); 1 otherwise."""
        if self.scaling != "yarn" or self.scaling_factor <= 1.0:
            return 1.0
        return 0.1 * math.log(self.scaling_factor) + 1.0

    # Built outside torch.compile's graph: a table the graph created and left on this object would be a graph
    # output, whose memory CUDA graphs (compile_mode=reduce-overhead) hand to the next replay.
    @torch.compiler.disable
    def _build(self, n: int, device: torch.device) -> None:
        positions = torch.arange(n, dtype=torch.float64, device=device)
        angles = torch.outer(positions, self.inv_freq(device))       # (n, D/2)
        angles = torch.cat([angles, angles], dim=-1)                 # (n, D): both halves of each pair
        m = self.attention_scale
        self.cos, self.sin = (angles.cos() * m).float(), (angles.sin() * m).float()

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) int64 -> cos, sin each (B, T, head_dim) float32.

        The table covers max(max_positions, T) positions, which holds every position the model is
        given: the loader's positions restart per document inside a row (so < T), and generation
        never goes past max_positions. A longer T (evaluating beyond the training context) grows it.
        """
        self._ensure(position_ids.shape[-1], position_ids.device)
        return self.cos[position_ids], self.sin[position_ids]

    def prefix(self, batch: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..length-1 in each of `batch` rows, as __call__ gives for
        arange(length): views of the table, where indexing would copy it (0.5 GiB at 1M tokens, d 64)."""
        self._ensure(length, device)
        return (self.cos[:length].expand(batch, length, self.head_dim),
                self.sin[:length].expand(batch, length, self.head_dim))

    def _ensure(self, length: int, device: torch.device) -> None:
        n = max(self.max_positions, length)
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != device:
            self._build(n, device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B, T, D) float32 -> x rotated, in x's dtype (rotation done in fp32)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]                # broadcast over heads
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
