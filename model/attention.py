"""Causal self-attention with grouped-query heads, RoPE, document masking and a KV cache.

All backends compute the same function: causal attention (optionally a sliding window of
``window`` keys to the left) where, given ``cu_seqlens``, a token only sees earlier tokens of its own
document. They differ in how:

- "flash" / "reference": our kernels package (``kernels.flash_attn_func`` / ``flash_attn_varlen_func``).
  On CUDA it runs the Triton kernels; on CPU it runs Triton's interpreter when TRITON_INTERPRET=1,
  otherwise the blockwise PyTorch reference. "flash" insists on the Triton path; "reference" is the
  name for the CPU path. Documents go through the varlen API, so masking costs nothing.
- "sdpa": torch.nn.functional.scaled_dot_product_attention with the chosen kernel; documents and
  windows become an explicit (B, 1, T, T) boolean mask.
- "naive": the nanoGPT baseline that materializes the (B, H, T, T) scores.
- "auto": "flash" on CUDA, "reference" elsewhere.

No backend applies dropout to the attention probabilities (the kernels do not implement it), so the
backends stay interchangeable; ``config.dropout`` acts on the residual stream only.
"""
import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import GPTConfig
from .rope import apply_rope

_SDPA_KERNELS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
# enable_gqa arrived in torch 2.5, and only SDPA's flash and math kernels accept it on every
# version we support; the others get k/v with their heads repeated.
_SDPA_GQA = ("flash", "math") if tuple(map(int, torch.__version__.split(".")[:2])) >= (2, 5) else ()


@dataclass
class KVCache:
    """Keys and values of every token seen so far by one layer, for generation: (B, S, Hk, D)."""
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


def _mask(Tq: int, Tk: int, device, window: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B or 1, 1, Tq, Tk), True where query i may see key j.

    The causal diagonal is aligned bottom-right: the Tq queries are the last Tq of the Tk positions,
    which is what decoding with a KV cache needs (and the kernels' convention).
    doc_ids (B, T): document index of each token, only when Tq == Tk.
    """
    q_pos = torch.arange(Tk - Tq, Tk, device=device)[:, None]        # (Tq, 1)
    k_pos = torch.arange(Tk, device=device)[None, :]                 # (1, Tk)
    mask = k_pos <= q_pos
    if window >= 0:
        mask = mask & (q_pos - k_pos <= window)
    if doc_ids is not None:
        mask = mask & (doc_ids[:, :, None] == doc_ids[:, None, :])   # (B, T, T)
    return mask.view(-1, 1, Tq, Tk)


def _flash_args(q, k, v, cu_seqlens, window, deterministic=True):
    """(q, k, v, kwargs) for the kernels' functions computing our causal attention: the batch layout as
    is, or with documents the varlen layout (flattened tokens and boundaries)."""
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    kw = dict(causal=True, window_size=(window, 0) if window >= 0 else (-1, -1), deterministic=deterministic)
    if cu_seqlens is None:
        return q, k, v, kw
    # Rows are independent sequences (as in the sdpa/naive mask): add every row start as a
    # boundary so no document runs across rows. Duplicate boundaries are empty documents, which
    # the kernels skip, and no document is longer than T, so T bounds max_seqlen without
    # reading the offsets back to the host.
    cu = _with_row_starts(cu_seqlens, B, Tq)
    kw.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=Tq, max_seqlen_k=Tk)
    return q.reshape(B * Tq, H, D), k.reshape(B * Tk, Hk, D), v.reshape(B * Tk, Hk, D), kw


_row_starts_memo = None   # (weakref to the caller's cu_seqlens, its version, B, T, the merged offsets)


def _with_row_starts(cu_seqlens, B: int, T: int) -> torch.Tensor:
    """cu_seqlens with every row start added (sorted). Every layer gets the same cu_seqlens tensor from
    GPT.forward, so the merge is made once per forward and every layer, and the backward, pass the kernels
    one tensor: the kernels' check then reads it back (a host-device sync) once a step, not once a layer."""
    global _row_starts_memo
    memo = _row_starts_memo
    if (memo is not None and memo[0]() is cu_seqlens and memo[1:4] == (cu_seqlens._version, B, T)
            and not torch.compiler.is_compiling()):
        return memo[4]
    row_starts = torch.arange(0, B * T + 1, T, device=cu_seqlens.device, dtype=torch.int32)
    cu = torch.cat([cu_seqlens, row_starts]).sort().values
    if not torch.compiler.is_compiling():
        _row_starts_memo = (weakref.ref(cu_seqlens), cu_seqlens._version, B, T, cu)
    return cu


def _kernels_backward(backend: str, q) -> bool:
    """Whether this backend runs our Triton kernels here, whose backward can start from a kept output."""
    if backend == "auto":
        backend = "flash" if q.is_cuda else "reference"
    return backend in ("flash", "reference") and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def attention_keep(q, k, v, backend: str, **kw):
    """attention() without an autograd graph, for callers that keep its output through backward
    (training/memory.py) -> (out, lse). lse is None when the backend cannot start its backward from a
    kept output; attention_backward then recomputes the forward."""
    with torch.no_grad():
        if not _kernels_backward(backend, q):
            return attention(q, k, v, backend, **kw), None
        from kernels import flash_attn_func, flash_attn_varlen_func
        q_, k_, v_, fkw = _flash_args(q, k, v, kw.get("cu_seqlens"), kw.get("window", -1),
                                      kw.get("deterministic", True))
        fn = flash_attn_varlen_func if "cu_seqlens_q" in fkw else flash_attn_func
        out, lse = fn(q_, k_, v_, return_lse=True, **fkw)
        return out.view(q.shape), lse


def attention_backward(dout, q, k, v, out, lse, backend: str, **kw):
    """Gradients (dq, dk, dv) of attention(q, k, v, backend, **kw) given dout, from attention_keep's
    (out, lse): the kernels' backward alone, or (lse None) the forward recomputed under autograd."""
    if lse is not None:
        from kernels import flash_attn_backward
        q_, k_, v_, fkw = _flash_args(q, k, v, kw.get("cu_seqlens"), kw.get("window", -1),
                                      kw.get("deterministic", True))
        dq, dk, dv = flash_attn_backward(dout.reshape(q_.shape), q_, k_, v_, out.reshape(q_.shape), lse, **fkw)
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        return torch.autograd.grad(attention(q, k, v, backend, **kw), (q, k, v), dout)


def attention(q, k, v, backend: str, *, cu_seqlens=None, window: int = -1, sdpa_backend: str = "math",
              deterministic: bool = True):
    """Causal attention. q (B, Tq, H, D); k, v (B, Tk, Hk, D) with H % Hk == 0 -> (B, Tq, H, D).

    cu_seqlens: int32 (n_docs + 1,) document boundaries over the flattened B*T tokens (needs
    Tq == Tk), or None for one sequence per row. Query head h uses kv head h // (H // Hk).
    deterministic: our kernels' backward (flash_attn_func's argument); the other backends ignore it.
    """
    B, Tq, H, D = q.shape
    Tk, Hk = k.shape[1], k.shape[2]
    if backend == "auto":
        backend = "flash" if q.is_cuda else "reference"

    if backend in ("flash", "reference"):
        if backend == "flash" and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("attention='flash' runs Triton kernels: it needs a CUDA device, or TRITON_INTERPRET=1 "
                             "on CPU; use attention='reference' (or 'auto') on CPU")
        # Imported here so the sdpa/naive baselines work on machines without Triton.
        from kernels import flash_attn_func, flash_attn_varlen_func
        q_, k_, v_, kw = _flash_args(q, k, v, cu_seqlens, window, deterministic)
        fn = flash_attn_varlen_func if "cu_seqlens_q" in kw else flash_attn_func
        return fn(q_, k_, v_, **kw).view(B, Tq, H, D)

    if backend in ("sdpa", "naive"):
        doc_ids = None
        if cu_seqlens is not None:
            # document index of every token: how many boundaries lie at or before it
            tokens = torch.arange(B * Tq, device=q.device, dtype=cu_seqlens.dtype)
            doc_ids = torch.searchsorted(cu_seqlens, tokens, right=True).view(B, Tq)
        plain_causal = doc_ids is None and window < 0 and Tq == Tk
        mask = None if plain_causal and backend == "sdpa" else _mask(Tq, Tk, q.device, window, doc_ids)

        if backend == "sdpa":
            gqa = {}
            if H != Hk:
                if sdpa_backend in _SDPA_GQA:
                    gqa = {"enable_gqa": True}
                else:
                    k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
            with sdpa_kernel(_SDPA_KERNELS[sdpa_backend]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     attn_mask=mask, is_causal=mask is None, **gqa)
            return out.transpose(1, 2)                                       # (B, Tq, H, D)

        # naive: scores in the input dtype, softmax in fp32, as plain PyTorch attention is written.
        k, v = k.repeat_interleave(H // Hk, dim=2), v.repeat_interleave(H // Hk, dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5        # (B, H, Tq, Tk)
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        return torch.einsum("bhqk,bkhd->bqhd", probs, v)                  # (B, Tq, H, D)

    raise ValueError(f"unknown attention backend {backend!r}; expected 'auto', 'flash', 'reference', 'sdpa' or 'naive'")


class CausalSelfAttention(nn.Module):
    # The functions attend / attend_keep / attend_backward call, with the signatures of attention,
    # attention_keep and attention_backward above. A system applied from outside sets its own on the
    # instance (context parallelism: training/context_parallel.py); the model knows only these.
    attention_fn = staticmethod(attention)
    attention_keep_fn = staticmethod(attention_keep)
    attention_backward_fn = staticmethod(attention_backward)

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.backend, self.sdpa_backend, self.window = config.attention, config.sdpa_backend, config.window
        self.deterministic = config.deterministic_attention
        # One fused projection for q (n_head heads) and k, v (n_kv_head heads each).
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.bias)
        self.proj = nn.Linear(self.n_head * self.head_dim, config.d_model, bias=config.bias)

    def forward(self, x, rope=None, cu_seqlens=None, cache: KVCache | None = None):
        """x (B, T, d_model); rope: (cos, sin) each (B, T, head_dim) or None -> (B, T, d_model).

        With a cache, this call's keys/values are appended to it and the queries attend to all of
        them (decoding); cu_seqlens must then be None.
        """
        B, T, _ = x.shape
        q, k, v = self.project(x, rope)
        backend = self.backend
        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
                # A decoding step's one query row against the cached keys: plain attention is cheap
                # here, and _mask aligns its causal diagonal bottom-right (SDPA's is_causal would
                # align it top-left and hide the cache from the new token).
                backend = "naive"
            cache.k, cache.v = k, v
        return self.proj(self.attend(q, k, v, cu_seqlens, backend))

    def project(self, x, rope=None):
        """Token-wise part: x (B, T, d_model) -> q (B, T, n_head, hd), k, v (B, T, n_kv_head, hd), RoPE applied."""
        B, T, _ = x.shape
        qkv = self.qkv(x)
        if rope is not None and qkv.is_cuda and qkv.dtype != torch.float64:
            # the split and both rotations in one Triton kernel each way (kernels/rope.py; apply_rope is its
            # oracle and the CPU path); the kernel computes in fp32
            from kernels.rope import rope_qkv
            return rope_qkv(qkv, *rope, self.n_head, self.n_kv_head)
        q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                             self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def attend(self, q, k, v, cu_seqlens=None, backend=None):
        """Mixing across tokens: -> (B, Tq, n_head * hd), before the output projection."""
        y = self.attention_fn(q, k, v, backend or self.backend, **self._options(cu_seqlens))
        return y.reshape(q.shape[0], q.shape[1], self.n_head * self.head_dim)

    def attend_keep(self, q, k, v, cu_seqlens=None):
        """attend() without a graph -> (y (B, T, n_head * hd), lse or None), for attend_backward."""
        y, lse = self.attention_keep_fn(q, k, v, self.backend, **self._options(cu_seqlens))
        return y.reshape(q.shape[0], q.shape[1], self.n_head * self.head_dim), lse

    def attend_backward(self, dy, q, k, v, y, lse, cu_seqlens=None):
        """(dq, dk, dv) of attend() from attend_keep's (y, lse) and the gradient dy of y."""
        return self.attention_backward_fn(dy.view(q.shape), q, k, v, y.view(q.shape), lse, self.backend,
                                          **self._options(cu_seqlens))

    def _options(self, cu_seqlens):
        return dict(cu_seqlens=cu_seqlens, window=self.window, sdpa_backend=self.sdpa_backend,
                    deterministic=self.deterministic)
