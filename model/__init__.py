"""The model: GPTConfig (every architectural choice) and GPT (the nn.Module). No Hydra, no wandb."""
from .attention import CausalSelfAttention, KVCache, attention
from .config import GPTConfig
from .gpt import GPT

__all__ = ["GPT", "GPTConfig", "CausalSelfAttention", "KVCache", "attention"]
