"""Optimizer and learning-rate schedule: AdamW, linear warmup, cosine decay to min_lr."""
import math

import torch
from omegaconf import DictConfig
from torch.optim.lr_scheduler import LambdaLR


def build_optimizer(model, train: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW from the model, which knows which parameters get weight decay; fused on CUDA."""
    return model.configure_optimizer(weight_decay=train.weight_decay, lr=train.lr, betas=tuple(train.betas),
                                     device_type=device.type)


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based): linear warmup over
    warmup_steps steps, then a half cosine from 1 down to min_ratio = min_lr / lr at max_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps(train: DictConfig) -> int:
    """train.warmup_steps, at most train.max_steps: `train.max_steps=2` is a quick try, not an error."""
    return min(train.warmup_steps, train.max_steps)


def build_schedule(optimizer: torch.optim.Optimizer, train: DictConfig) -> LambdaLR:
    """A LambdaLR stepped once per optimizer step. Its state_dict holds the step count (the lambda
    is rebuilt from the config), so a resumed run continues the same curve. A warmup longer than the
    run is clamped to the run (warmup_steps)."""
    warmup, max_steps, min_ratio = warmup_steps(train), train.max_steps, train.min_lr / train.lr
    return LambdaLR(optimizer, lambda step: lr_factor(step, warmup, max_steps, min_ratio))
