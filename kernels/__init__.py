"""Attention ops: our Triton FlashAttention (forward, recomputation backward) behind a flash-attn API.

Read in this order: ``reference.py`` (PyTorch oracle and CPU path) -> ``mask.py`` (who sees whom)
-> ``flash_fwd.py`` / ``flash_bwd.py`` (Triton kernels; ``flash_fwd_tma.py``: the forward for dense
whole-tile inputs with TMA loads, which launch.py runs at head dim 64 up to 4K on Hopper)
-> ``launch.py`` (launch parameters, grids) -> ``flash_attn.py`` (autograd Function, public functions).
``rope.py``: RoPE applied to the fused QKV projection, one Triton kernel each way (the model's CUDA path;
``model/rope.py`` is its reference).
"""
from .flash_attn import (flash_attn_backward, flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                         flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_backward"]
