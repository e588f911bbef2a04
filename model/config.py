"""GPTConfig: every architectural choice of the model in one dataclass.

The Hydra presets in configs/model/*.yaml are plain dicts of these fields; the trainer fills
``vocab_size`` (from the tokenizer) and ``seq_len`` (from data.seq_len) and calls ``GPTConfig(**d)``.
Construction fills the ``None`` defaults (n_kv_head, d_ff) and validates, so an impossible
combination fails here, with the field's name and the fix, not deep inside a forward pass.
"""
import math
from dataclasses import dataclass

MLPS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("rope", "learned")
ROPE_SCALINGS = ("linear", "yarn")
ATTENTIONS = ("auto", "flash", "reference", "sdpa", "naive")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")


@dataclass
class GPTConfig:
    vocab_size: int
    seq_len: int                    # max training context; size of the learned position table
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None    # None -> n_head (plain MHA); fewer -> grouped-query attention
    d_model: int = 768
    mlp: str = "gelu"               # "gelu" (GPT-2) | "swiglu" (Llama)
    d_ff: int | None = None         # None -> 4*d_model (gelu) or 8/3*d_model rounded up to 64 (swiglu)
    norm: str = "layernorm"         # "layernorm" | "rmsnorm"
    pos: str = "rope"               # "rope" | "learned"
    rope_theta: float = 10000.0
    # Context extension by this factor; 1.0 = off. Only for pos="rope". How: rope_scaling.
    rope_scaling_factor: float = 1.0
    rope_scaling: str = "linear"    # "linear" (position interpolation) | "yarn" (model/rope.py)
    rope_original_seq_len: int | None = None  # yarn: the context the model was trained at
    tie_embeddings: bool = True     # lm_head shares the token embedding matrix
    bias: bool = False              # biases in Linear and LayerNorm (GPT-2 had them)
    dropout: float = 0.0            # embedding and residual dropout (attention probs: none, see attention.py)
    attention: str = "auto"         # "auto" (flash on CUDA, reference on CPU) | "flash" | "reference" | "sdpa" | "naive"
    sdpa_backend: str = "efficient"  # torch SDPA kernel for attention="sdpa": "flash" | "cudnn" | "efficient" | "math"
    doc_masking: bool = True        # with cu_seqlens, packed documents do not attend to each other
    window: int = -1                # sliding window: each query sees itself + `window` keys to its left; -1 = all
    # Our kernels' backward (attention "flash"/"reference" on the Triton path): False lets dQ be summed in fp32
    # by atomics / TMA reduce-add, faster where measured, run-to-run bit differences (flash-attn's default);
    # True: the deterministic dK/dV + dQ split
    deterministic_attention: bool = False

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            # SwiGLU has three matrices instead of two; 8/3 keeps the parameter count of a 4x MLP.
            self.d_ff = 4 * self.d_model if self.mlp == "gelu" else 64 * math.ceil(8 * self.d_model / 3 / 64)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def validate(self) -> None:
        """Raise ValueError naming the offending field and how to fix it."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"GPTConfig.{msg}")

        for name, options in (("mlp", MLPS), ("norm", NORMS), ("pos", POSITIONS), ("rope_scaling", ROPE_SCALINGS),
                              ("attention", ATTENTIONS), ("sdpa_backend", SDPA_BACKENDS)):
            value = getattr(self, name)
            need(value in options, f"{name}={value!r} is unknown; choose one of {options}")
        need(self.vocab_size is not None and self.vocab_size > 0,
             f"vocab_size={self.vocab_size!r}: set it to the tokenizer's vocab size (the trainer fills it)")
        need(self.seq_len is not None and self.seq_len > 0,
             f"seq_len={self.seq_len!r}: set it to the training context length (the trainer fills it from data.seq_len)")
        for name in ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff"):
            need(getattr(self, name) > 0, f"{name}={getattr(self, name)} must be a positive int")
        need(self.d_model % self.n_head == 0,
             f"d_model={self.d_model} must be divisible by n_head={self.n_head}; change d_model or n_head")
        need(self.n_head % self.n_kv_head == 0,
             f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head} (each kv head serves a group of query heads)")
        need(self.head_dim % 8 == 0,
             f"n_head={self.n_head} gives head_dim={self.head_dim}; the attention kernels need a multiple of 8 "
             f"(pick n_head so d_model/n_head is 8, 16, ..., 256)")
        need(self.head_dim <= 256, f"n_head={self.n_head} gives head_dim={self.head_dim} > 256; use more heads")
        need(self.rope_theta > 0, f"rope_theta={self.rope_theta} must be > 0")
        need(self.rope_scaling_factor > 0, f"rope_scaling_factor={self.rope_scaling_factor} must be > 0 (1.0 = off)")
        need(self.pos == "rope" or self.rope_scaling_factor == 1.0,
             f"rope_scaling_factor={self.rope_scaling_factor} only applies to pos='rope'; set it to 1.0")
        if self.rope_scaling == "yarn" and self.rope_scaling_factor != 1.0:
            need(isinstance(self.rope_original_seq_len, int) and self.rope_original_seq_len > 0,
                 f"rope_original_seq_len={self.rope_original_seq_len!r}: rope_scaling='yarn' needs the context "
                 "the model was trained at (e.g. 4096)")
            need(self.rope_scaling_factor > 1.0,
                 f"rope_scaling_factor={self.rope_scaling_factor}: yarn extends the context, so it must be > 1")
        need(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        need(isinstance(self.deterministic_attention, bool),
             f"deterministic_attention={self.deterministic_attention!r} must be true or false")
        need(isinstance(self.window, int) and self.window >= -1,
             f"window={self.window!r} must be an int >= -1 (-1 = unbounded)")
        # SDPA's flash kernel takes no attn_mask, and document masking / sliding windows need one.
        need(not (self.attention == "sdpa" and self.sdpa_backend == "flash" and (self.doc_masking or self.window >= 0)),
             "sdpa_backend='flash' cannot apply document masking or a sliding window (it takes no mask); "
             "use sdpa_backend='efficient'/'cudnn'/'math', attention='flash', or doc_masking=False and window=-1")
