"""Rotary position embeddings (RoPE), rotate-half layout (GPT-NeoX / Llama).

Each pair of channels (i, i + D/2) of q and k is rotated by angle ``position * theta^(-2i/D)``, so
q.k depends only on the distance between positions. Positions come from ``position_ids`` rather than
``arange(T)`` because the data loader restarts them at 0 in every packed document.
"""
import torch


class RotaryEmbedding:
    """cos/sin table for positions [0, n), built lazily on the device of the positions.

    Deliberately not an nn.Module with buffers: ``model.to(torch.bfloat16)`` would cast buffers and
    lose the angle precision long contexts need, and the table is derived data that has no place in a
    checkpoint. The table is computed in float64 and stored in float32.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0, scaling_factor: float = 1.0):
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        # Linear position interpolation: position p is treated as p / factor, squeezing a longer
        # context into the range of angles seen in training.
        self.scaling_factor = scaling_factor
        self.cos = self.sin = None                   # (n, head_dim) float32

    def _build(self, n: int, device: torch.device) -> None:
        inv_freq = self.theta ** -(torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim)
        positions = torch.arange(n, dtype=torch.float64, device=device) / self.scaling_factor
        angles = torch.outer(positions, inv_freq)                    # (n, D/2)
        angles = torch.cat([angles, angles], dim=-1)                 # (n, D): both halves of each pair
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def __call__(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) int64 -> cos, sin each (B, T, head_dim) float32.

        The table covers max(max_positions, T) positions, which holds every position the model is
        given: the loader's positions restart per document inside a row (so < T), and generation
        never goes past max_positions. A longer T (evaluating beyond the training context) grows it.
        """
        n = max(self.max_positions, position_ids.shape[-1])
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != position_ids.device:
            self._build(n, position_ids.device)
        return self.cos[position_ids], self.sin[position_ids]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos, sin (B, T, D) float32 -> x rotated, in x's dtype (rotation done in fp32)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]                # broadcast over heads
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
