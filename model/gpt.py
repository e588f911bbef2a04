"""A GPT-style decoder, nanoGPT-plain: token embedding (+ learned positions or RoPE), pre-norm blocks
of attention and MLP, a final norm and an lm_head tied to the embedding by default.

The same class covers GPT-2 (gelu, layernorm, learned positions, tied) and Llama-style models
(swiglu, rmsnorm, RoPE, grouped-query attention, untied) through GPTConfig. Attention itself,
with its backends and document masking, lives in attention.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import CausalSelfAttention, KVCache
from .config import GPTConfig
from .loss import chunked_cross_entropy
from .rope import RotaryEmbedding


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=1e-5)
    return nn.LayerNorm(config.d_model, bias=config.bias)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        # SwiGLU's gate and up projections are fused into one matmul of twice the width.
        self.fc = nn.Linear(config.d_model, (2 if self.swiglu else 1) * config.d_ff, bias=config.bias)
        self.proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)

    def forward(self, x):                                            # (B, T, d_model)
        h = self.fc(x)                                               # (B, T, d_ff or 2*d_ff)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")                        # GPT-2's gelu
        return self.proj(h)                                          # (B, T, d_model)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp = MLP(config)
        self.drop = nn.Dropout(config.dropout)

    # Tokens per tile of the token-wise work (norms, projections, MLP) when > 0; set from outside
    # by training.memory.apply_memory_plan. 0 runs each whole-sequence op at once.
    seq_chunk: int = 0

    def forward(self, x, rope=None, cu_seqlens=None, cache=None):
        if self.seq_chunk and cache is None:
            return self._tiled_forward(x, rope, cu_seqlens)
        x = x + self.drop(self.attn(self.norm1(x), rope, cu_seqlens, cache))
        return x + self.drop(self.mlp(self.norm2(x)))

    def _tiled_forward(self, x, rope, cu_seqlens):
        """The same block with everything but attention run in tiles of seq_chunk tokens, each tile
        recomputed in backward: no (B, T, d_ff) or (B, T, 3 * d_model) intermediate exists at once
        beyond q, k, v themselves. Exactly the math of forward()."""
        tiles = self.tiles(x.shape[1])
        qkv = [checkpoint(self.project_tile, x[:, t], *(r[:, t] for r in (rope or ())), use_reentrant=False)
               for t in tiles]
        q, k, v = (torch.cat(parts, dim=1) for parts in zip(*qkv))
        y = self.attn.attend(q, k, v, cu_seqlens)
        return torch.cat([checkpoint(self.finish_tile, x[:, t], y[:, t], use_reentrant=False) for t in tiles], dim=1)

    # The token-wise halves of the block, for tiled execution here and in training/memory.py.
    def tiles(self, T: int) -> list[slice]:
        chunk = self.seq_chunk or T
        return [slice(s, s + chunk) for s in range(0, T, chunk)]

    def project_tile(self, x_t, *rope_t):
        """Before attention: q, k, v of these tokens (RoPE applied)."""
        return self.attn.project(self.norm1(x_t), rope_t or None)

    def finish_tile(self, x_t, y_t):
        """After attention: the block's output for these tokens from its input and attention output."""
        x_t = x_t + self.drop(self.attn.proj(y_t))
        return x_t + self.drop(self.mlp(self.norm2(x_t)))


class GPT(nn.Module):
    # Tokens per tile of the cross-entropy when > 0 (training.memory.apply_memory_plan): forward then
    # returns logits=None with the loss.
    loss_chunk: int = 0

    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()                      # the fields are mutable; catch edits made after construction
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model) if config.pos == "learned" else None
        self.rope = (RotaryEmbedding(config.head_dim, config.seq_len, config.rope_theta, config.rope_scaling_factor,
                                     config.rope_scaling, config.rope_original_seq_len)
                     if config.pos == "rope" else None)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self):
        """GPT-2 init: N(0, 0.02) everywhere, zero biases, and the projections that write into the
        residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth
        (two such writes per block)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(self, input_ids, targets=None, position_ids=None, cu_seqlens=None):
        """input_ids, targets, position_ids: int64 (B, T); cu_seqlens: int32 (n_docs + 1,).

        Returns (logits (B, T, vocab_size), loss): loss is the fp32 mean cross-entropy over targets
        != -100, or None without targets; logits is None when loss_chunk tiles the loss. position_ids defaults to 0..T-1 in every row; the loader's
        restart at 0 in each document. cu_seqlens holds document boundaries over the flattened B*T
        tokens; with config.doc_masking the documents do not attend to each other (rows never do).
        """
        hidden = self._hidden(input_ids, position_ids, cu_seqlens)
        if targets is not None and self.loss_chunk:
            # tiled loss: no (B, T, vocab) logits in forward or backward, so none are returned
            return None, chunked_cross_entropy(hidden, self.lm_head.weight, targets, self.loss_chunk)
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-100)
        return logits, loss

    def _logits(self, input_ids, position_ids=None, cu_seqlens=None, caches=None):
        return self.lm_head(self._hidden(input_ids, position_ids, cu_seqlens, caches))

    def _hidden(self, input_ids, position_ids=None, cu_seqlens=None, caches=None):
        """The forward pass up to the final norm; caches: one KVCache per block when generating."""
        B, T = input_ids.shape
        rope = None
        if position_ids is None and self.rope is not None:   # rows start at 0: the table's rows, no gathered copy
            rope = self.rope.prefix(B, T, input_ids.device)
        elif position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        if self.pos_emb is not None and T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the learned position table (seq_len={self.config.seq_len})")
        if cu_seqlens is not None:
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int32) if self.config.doc_masking else None

        x = self.tok_emb(input_ids)                                  # (B, T, d_model)
        if self.pos_emb is not None:
            x = x + self.pos_emb(position_ids)
        x = self.drop(x)
        if rope is None and self.rope is not None:
            rope = self.rope(position_ids)                           # shared by every layer
        for i, block in enumerate(self.blocks):
            x = block(x, rope, cu_seqlens, caches[i] if caches is not None else None)
        return self.norm_f(x)                                        # (B, T, d_model)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of distinct parameters (a tied matrix counts once).

        non_embedding=True leaves out the tables that are only looked up, costing no FLOPs: the
        learned position table, and the token table unless it is tied (then it is lm_head's matmul
        weight, which does cost FLOPs). This is the N of flops_per_token.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs (forward + backward) per token at context seq_len, PaLM appendix B style:

            6 * N                                  every weight: 2 FLOPs per multiply-add forward, 4 backward
          + 6 * n_layer * d_model * seq_len        attention scores QK^T and AV: 2 * 2 * seq_len * d_model
                                                   per layer forward, x3 with backward = 12 * n_layer * d_model
                                                   * seq_len, halved because a causal token sees on average
                                                   half the context.

        N = num_params(non_embedding=True); d_model = n_head * head_dim (GQA shrinks k/v, not the
        scores). Recomputation in the flash backward is not counted (the MFU convention), and
        documents shorter than seq_len or a sliding window make the true attention term smaller.
        """
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 6 * c.n_layer * c.d_model * seq_len

    def configure_optimizer(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str):
        """AdamW with weight decay on matrices and embeddings (>= 2-D) only, not on biases and norm gains."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True):
        """Extend input_ids (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        temperature=0 is greedy decoding. Call model.eval() first (dropout). The model sees at most
        the last seq_len tokens, as in training. With use_cache, each step feeds only the newest
        token and attends to per-layer cached keys/values; once the context slides past seq_len
        the positions of the window shift, so every later step recomputes it (the cache is rebuilt),
        giving exactly the tokens of use_cache=False.
        """
        caches = None
        for _ in range(max_new_tokens):
            if caches is not None and len(caches[0]) < self.config.seq_len:
                # decode: the new token's position is the number of tokens already cached
                position_ids = torch.full_like(input_ids[:, -1:], len(caches[0]))
                logits = self._logits(input_ids[:, -1:], position_ids, caches=caches)
            else:
                # prefill (first step, or the window slid): the last seq_len tokens at positions 0..
                caches = [KVCache() for _ in self.blocks] if use_cache else None
                logits = self._logits(input_ids[:, -self.config.seq_len:], caches=caches)
            logits = logits[:, -1, :].float()                        # (B, vocab_size)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            input_ids = torch.cat([input_ids, next_id], dim=1)
        return input_ids
