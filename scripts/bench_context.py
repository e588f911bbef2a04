"""Context sweep: how long a sequence each attention backend / memory plan can train on one device.

    make bench-context                                 # GPT-2 124M, every configuration below
    make bench-context ARGS="--configs flash+plan --start 262144 --max 1048576"
    make bench-context ARGS="--model tiny --configs flash naive --start 64 --max 512 --device cpu --wandb none"
    make bench-context ARGS="--configs flash sdpa_cudnn --start 8192 --max 8192 --steps 10 --compile"
    make bench-context ARGS="... --compile reduce-overhead"   # compiled with CUDA graphs
    make bench-context ARGS="--configs flash+plan sdpa_cudnn+bp flash+plan+docs flex+bp+docs"   # ours vs the baselines

For each configuration, context lengths double from --start until the first out-of-memory (a
result, recorded, not a crash: the sweep goes on with the next configuration), --max, or a step
slower than --max-step-seconds. Each point runs full training steps (forward, backward, AdamW) on
batch 1 of random tokens (bf16 autocast on CUDA, fp32 on CPU) and records the step time (steps after
the first run back to back, as in training; the median gap between consecutive steps' ends), tokens/s,
MFU (where the device's peak FLOP/s is known) and memory: parameters (+ RoPE table), AdamW state,
what the forward pass keeps for backward, and the peak (CUDA only). Writes context.json /
context.csv / context_{memory,speed}.png to --out. Each configuration is a wandb run, the sweep's
runs one group (context-<model>-<time>), with a metrics.jsonl in --out/<config>/.
scripts/experiment.py e1_scaling runs this sweep and writes it up as a report.

Baselines measured beside ours in the same run (CONFIGS):
- sdpa_cudnn+bp: PyTorch's best practice for a long context: SDPA with the cuDNN kernel, activation
  checkpointing of every block (torch.utils.checkpoint), the loss in 16K-token tiles (no N x vocab logits).
- flex+docs, flex+bp+docs: the document-masked baseline: compiled FlexAttention with a block mask built
  by (compiled) create_block_mask from the packed rows' document ids, against ours through the varlen
  API (flash+docs, flash+plan+docs). +docs rows pack random documents of mean --doc-len tokens.
"""
import argparse
import contextlib
import csv
import functools
import json
import os
import statistics
import sys
import time
import warnings
import weakref
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import GPT, GPTConfig  # noqa: E402
from training.device import autocast, peak_flops, resolve_device  # noqa: E402
from training.logger import RunLogger  # noqa: E402
from training.memory import apply_memory_plan, warm_host_memory  # noqa: E402
from training.memory_breakdown import Breakdown, PeakBreakdown  # noqa: E402
from training.validate import COMPILE_MODES, CUDAGRAPH_MODES  # noqa: E402

GIB = 2**30
PLAN = ("offload", 65536, 16384)  # apply_memory_plan's (activation_checkpointing, seq_chunk, loss_chunk)
NO_PLAN = ("none", 0, 0)
# PyTorch's best practice for a long context (the baseline issue 4 quotes: 72.2 GiB, 232 s at 1M on an H100):
# checkpoint every block (keep its input, recompute the whole block in backward: train.activation_checkpointing=
# block), the cross-entropy in 16K-token tiles (train.loss_chunk=16384), no sequence tiling (train.seq_chunk=0).
BEST_PRACTICE = ("block", 0, 16384)


class Config(NamedTuple):
    """One row family of the sweep: the model's attention and SDPA kernel, the memory plan, and whether the
    row is packed documents (document-masked attention) or one sequence."""
    attention: str        # model.attention, or "flex": FlexAttention installed on every layer (install_flex)
    sdpa_backend: str     # model.sdpa_backend (attention="sdpa" only)
    plan: tuple           # (activation_checkpointing, seq_chunk, loss_chunk), as train.*
    docs: bool = False    # packed documents of mean doc_len tokens (packed_documents), masked per document


CONFIGS = {
    "flash+plan": Config("flash", "efficient", PLAN),
    "flash": Config("flash", "efficient", NO_PLAN),
    "sdpa_cudnn+plan": Config("sdpa", "cudnn", PLAN),
    "sdpa_cudnn": Config("sdpa", "cudnn", NO_PLAN),
    "sdpa_cudnn+bp": Config("sdpa", "cudnn", BEST_PRACTICE),     # the PyTorch best-practice baseline
    "sdpa_flash+plan": Config("sdpa", "flash", PLAN),
    "sdpa_flash": Config("sdpa", "flash", NO_PLAN),
    "naive": Config("naive", "efficient", NO_PLAN),
    # ours with the Triton kernels only, where the Gluon ones would run (kernels/launch.py: override_gluon)
    "flash_triton": Config("flash", "efficient", NO_PLAN),
    # ours with model.deterministic_attention=true (the dK/dV + dQ split instead of a reduce-added dQ)
    "flash_det": Config("flash", "efficient", NO_PLAN),
    # packed documents: ours through the varlen API, against the document-masked baseline, FlexAttention
    # with a document block mask (never SDPA with a dense (T, T) mask)
    "flash+plan+docs": Config("flash", "efficient", PLAN, docs=True),
    "flash+docs": Config("flash", "efficient", NO_PLAN, docs=True),
    "flex+bp+docs": Config("flex", "math", BEST_PRACTICE, docs=True),
    "flex+docs": Config("flex", "math", NO_PLAN, docs=True),
}
DOC_LEN = 8192   # +docs rows: mean document length in tokens (lengths uniform in 1..2*DOC_LEN-1)
# GPTConfig fields besides seq_len; RoPE instead of a position table. vocab 50304 = GPT-2's, padded.
MODELS = {
    "tiny": dict(vocab_size=512, n_layer=2, n_head=2, d_model=64),  # CPU smoke runs
    "gpt2_small": dict(vocab_size=50304, n_layer=12, n_head=12, d_model=768),
    "gpt2_medium": dict(vocab_size=50304, n_layer=24, n_head=16, d_model=1024),
    "llama_1b": dict(vocab_size=50304, n_layer=16, n_head=32, n_kv_head=8, d_model=2048, mlp="swiglu", d_ff=8192,
                     norm="rmsnorm", rope_theta=500000.0, tie_embeddings=False, bias=False),  # configs/model/llama_1b
}
WANDB_PROJECT = "longctx"  # as configs/logger/wandb.yaml
WANDB_KEYS = ("seq_len", "peak_gib", "tokens_per_s", "step_s", "mfu", "status")  # logged per point
# markdown_table's columns: row key -> header
COLUMNS = {"config": "config", "seq_len": "context", "step_s": "step s", "tokens_per_s": "tokens/s", "mfu": "MFU",
           "peak_gib": "peak GiB", "saved_for_backward_gib": "kept for backward GiB",
           "model_gib": "params + RoPE GiB", "optimizer_state_gib": "AdamW state GiB", "status": "status"}


def check_configs(names) -> None:
    """Raise ValueError, one line listing the valid names, if any name is not in CONFIGS."""
    if unknown := [n for n in names if n not in CONFIGS]:
        raise ValueError(f"unknown configuration {', '.join(map(repr, unknown))}; valid: {', '.join(CONFIGS)}")


def backend(name: str, device: torch.device) -> Config:
    """A configuration as it runs on this device. Our kernels are "flash" on CUDA and "reference" on CPU
    (their CPU path: the Triton interpreter under TRITON_INTERPRET=1, otherwise the blockwise PyTorch
    reference); SDPA's cuDNN and efficient kernels exist on CUDA only, so on a CPU SDPA runs its CPU flash
    kernel (math where a mask is needed). This is the one place the sweep maps them."""
    check_configs([name])
    c = CONFIGS[name]
    if device.type != "cuda":
        if c.attention == "flash":
            c = c._replace(attention="reference")
        if c.attention == "sdpa" and c.sdpa_backend in ("cudnn", "efficient"):
            c = c._replace(sdpa_backend="math" if c.docs else "flash")
    return c


def gpt_config(name: str, model_name: str, seq_len: int, device: torch.device) -> GPTConfig:
    """The GPTConfig a configuration's points build (GPTConfig validates it). FlexAttention is no model
    backend: flex configurations build an SDPA model whose every layer install_flex then rewires."""
    c = backend(name, device)
    return GPTConfig(seq_len=seq_len, attention="sdpa" if c.attention == "flex" else c.attention,
                     sdpa_backend=c.sdpa_backend, doc_masking=c.docs, deterministic_attention=name == "flash_det",
                     **MODELS[model_name])


def train_overrides(name: str) -> list[str] | None:
    """The configuration as train.py settings (Hydra overrides), or None where train.py has none (flex:
    no model backend). The sweep's model is built from the same fields (test_bench_context checks)."""
    c = CONFIGS[name]
    if c.attention == "flex":
        return None
    checkpointing, seq_chunk, loss_chunk = c.plan
    sdpa = [f"model.sdpa_backend={c.sdpa_backend}"] if c.attention == "sdpa" else []
    return [f"model.attention={c.attention}", *sdpa,
            f"data.doc_masking={str(c.docs).lower()}",
            *(["model.deterministic_attention=true"] if name == "flash_det" else []),
            f"train.activation_checkpointing={checkpointing}", f"train.seq_chunk={seq_chunk}",
            f"train.loss_chunk={loss_chunk}"]


def build(name: str, model_name: str, seq_len: int, device: torch.device) -> GPT:
    """The model of one point, on the CPU (run_point moves it): GPT(gpt_config(...)) with the configuration's
    memory plan applied as train.py applies train.activation_checkpointing / seq_chunk / loss_chunk, and for
    flex configurations FlexAttention installed on every layer (compiled where it will run on CUDA)."""
    c = backend(name, device)
    model = apply_memory_plan(GPT(gpt_config(name, model_name, seq_len, device)), *c.plan)
    if c.attention == "flex":
        install_flex(model, compiled=device.type == "cuda")
    return model


def unavailable(name: str, device: torch.device) -> str | None:
    """Why a configuration cannot train on this device (the sweep skips it with this line), or None."""
    if backend(name, device).attention == "flex" and (why := flex_training_unsupported(device)):
        return why
    return None


@functools.cache
def flex_training_unsupported(device: torch.device) -> str | None:
    """Whether FlexAttention can run a backward on this device type, by trying a tiny one (torch 2.13 on
    a CPU: "FlexAttention does not support backward on CPU"); the reason, or None."""
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.zeros(1, 1, 16, 16, device=device, requires_grad=True)
    try:
        with warnings.catch_warnings():   # eager flex_attention warns that it is not compiled
            warnings.simplefilter("ignore")
            flex_attention(q, q, q).sum().backward()
    except Exception as e:  # noqa: BLE001 - any refusal is the answer
        return f"FlexAttention cannot train on {device.type} with torch {torch.__version__} ({str(e).split('. ')[0]})"
    return None


# --- FlexAttention with a document block mask: the document-masked baseline ----------------------------

def document_ids(cu_seqlens: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """(B, T) document index of every token from boundaries over the flattened B*T tokens, as the model's
    SDPA path computes it (how many boundaries lie at or before the token)."""
    tokens = torch.arange(B * T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens, tokens, right=True).view(B, T)


def document_mask_mod(doc_ids: torch.Tensor | None, window: int = -1):
    """FlexAttention mask_mod of our attention: causal, within the query's own document (doc_ids (B, T);
    None: one sequence per row), within `window` keys to the left when >= 0."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = q_idx >= kv_idx
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        if window >= 0:
            keep = keep & (q_idx - kv_idx <= window)
        return keep
    return mask_mod


class FlexDocumentAttention:
    """FlexAttention (torch.nn.attention.flex_attention) in place of a CausalSelfAttention's attention
    functions (attention_fn / attention_keep_fn / attention_backward_fn, the hooks the model offers systems
    applied from outside), computing the model's attention: causal within each document. The block mask is
    made once per forward (every layer, and a checkpointed block's recompute, get the same cu_seqlens tensor)
    by create_block_mask from the document ids; compiled=True compiles flex_attention and create_block_mask,
    as PyTorch recommends (eager flex_attention materializes the scores; eager create_block_mask a B x T x T
    boolean mask). Not a model backend: see the note at install_flex."""

    def __init__(self, compiled: bool):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        self.flex, self.create_block_mask = flex_attention, create_block_mask
        if compiled:
            # one compilation per shape (and grad mode): past dynamo's default limit of 8 recompiles it
            # silently falls back to the unfused path, as in scripts/bench_attention.py
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 1024)
            self.flex = torch.compile(flex_attention, dynamic=False)
            self.create_block_mask = torch.compile(create_block_mask, dynamic=False)
        self._memo = None   # (weakref to cu_seqlens or None, its version, B, T, window, block mask)

    def block_mask(self, cu_seqlens: torch.Tensor | None, B: int, T: int, window: int, device):
        """The BlockMask of these boundaries (128 x 128-token blocks: those of other documents skipped, those
        wholly inside one document's causal part marked full, the rest evaluated by the mask_mod), made at
        the first call with this cu_seqlens tensor and reused while it is the one passed (memoized outside
        torch.compile only, as model/attention.py's row starts)."""
        key = (cu_seqlens._version if cu_seqlens is not None else None, B, T, window)
        memo, compiling = self._memo, torch.compiler.is_compiling()
        if (not compiling and memo is not None and (memo[0]() if memo[0] else None) is cu_seqlens
                and memo[1:5] == key):
            return memo[5]
        doc_ids = document_ids(cu_seqlens, B, T) if cu_seqlens is not None else None
        mask = self.create_block_mask(document_mask_mod(doc_ids, window), B if doc_ids is not None else None,
                                      None, T, T, device=device)
        if not compiling:
            self._memo = (weakref.ref(cu_seqlens) if cu_seqlens is not None else None, *key, mask)
        return mask

    def __call__(self, q, k, v, backend=None, *, cu_seqlens=None, window: int = -1, **_):
        """attention()'s signature: q (B, T, H, D), k, v (B, T, Hk, D) -> (B, T, H, D); `backend`,
        sdpa_backend and deterministic do not apply."""
        B, T, H, _ = q.shape
        if k.shape[1] != T:
            raise ValueError("FlexDocumentAttention is for training: queries and keys of the same length")
        out = self.flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=self.block_mask(cu_seqlens, B, T, window, q.device), enable_gqa=k.shape[2] != H)
        return out.transpose(1, 2)

    def keep(self, q, k, v, backend=None, **kw):
        """attention_keep: no kept LSE, so the plan's backward recomputes this forward (as for SDPA)."""
        with torch.no_grad():
            return self(q, k, v, **kw), None

    def backward(self, dout, q, k, v, out, lse, backend=None, **kw):
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(self(q, k, v, **kw), (q, k, v), dout)


def install_flex(model: GPT, compiled: bool) -> FlexDocumentAttention:
    """Every layer of `model` attends through one FlexDocumentAttention (one block mask per forward).
    The model has no "flex" backend; one in model/attention.py would be attention()'s branch
    `if backend == "flex": return FlexDocumentAttention's body` with "flex" in config.ATTENTIONS."""
    flex = FlexDocumentAttention(compiled)
    for block in model.blocks:
        block.attn.attention_fn, block.attn.attention_keep_fn = flex, flex.keep
        block.attn.attention_backward_fn = flex.backward
    return flex


def packed_documents(seq_len: int, doc_len: int):
    """One packed row of random documents, lengths uniform in 1..2*doc_len-1 (the last cut to fit; seeded
    by the length, so every configuration sees the same documents at a context) -> (cu_seqlens int32
    (n_docs + 1,), position_ids int64 (1, seq_len) restarting at 0 in each document as the loader's do,
    the lengths)."""
    g = torch.Generator().manual_seed(seq_len)
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(torch.randint(1, 2 * doc_len, (), generator=g)))
    lengths[-1] -= sum(lengths) - seq_len
    cu = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).view(1, seq_len)
    return cu, position_ids, lengths


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages autograd saves for backward inside this context, parameters
    excluded (they exist anyway). The CPU's measure of what the forward keeps; tensors the memory plan's
    `offload` parks outside autograd (in host memory, which on a CPU is the same memory) are not seen."""

    def __init__(self, params):
        skip = {p.untyped_storage().data_ptr() for p in params}
        self.storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in skip:
                self.storages[storage.data_ptr()] = storage.nbytes()
            return t

        super().__init__(pack, lambda t: t)

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())


def clock(cuda: bool):
    """A point in time: a CUDA event recorded on the current stream, or the host clock (CPU work is synchronous)."""
    if not cuda:
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds(a, b) -> float:
    """Seconds from clock() a to clock() b (events: after the device has passed both)."""
    return a.elapsed_time(b) / 1e3 if isinstance(a, torch.cuda.Event) else b - a


def pass_context(name: str):
    """What a configuration's forward and backward passes each run under (a context manager factory):
    flash_triton keeps our kernels off the Gluon ones (kernels/launch.py override_gluon); the rest, nothing."""
    if name == "flash_triton":   # imported here, as the model imports the kernels: the SDPA configs need no Triton
        from kernels.launch import override_gluon
        return override_gluon
    return contextlib.nullcontext


def run_point(name: str, model_name: str, seq_len: int, steps: int, device: torch.device,
              compile: bool | str = False, doc_len: int = DOC_LEN) -> dict:
    """`steps` training steps at seq_len; raises torch.OutOfMemoryError when it does not fit.
    compile: torch.compile the model (as train.compile=true; a string: with that mode, as
    train.compile_mode); its first step compiles and is not timed. +docs configurations train on one
    row of packed documents (packed_documents(seq_len, doc_len)), flex ones at least 2 steps: the first
    compiles FlexAttention and create_block_mask at this length."""
    c = backend(name, device)
    plan = c.plan
    cuda = device.type == "cuda"
    model = build(name, model_name, seq_len, device).to(device)
    cfg = model.config
    if c.attention == "flex":
        steps = max(steps, 2)
    if cuda and plan[0] == "offload":   # pinned host buffers allocated outside the timed steps
        warm_host_memory(model, 1, seq_len, torch.bfloat16)
    opt = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device.type)
    mode = "default" if compile is True else compile
    step_model = torch.compile(model, mode=mode) if compile else model
    cudagraphs = cuda and mode in CUDAGRAPH_MODES   # as train.py: every step a new generation of graph outputs
    kernels = pass_context(name)   # entered per pass
    x = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    y = torch.randint(0, cfg.vocab_size, (1, seq_len), device=device)
    docs, attended = {}, seq_len   # attended: keys per query as flops_per_token counts them (causal: seq_len)
    if c.docs:
        cu, position_ids, lengths = packed_documents(seq_len, doc_len)
        docs = dict(position_ids=position_ids.to(device), cu_seqlens=cu.to(device))
        attended = sum(n * n for n in lengths) / seq_len
    sync = torch.cuda.synchronize if cuda else lambda: None
    # Steps after the first run back to back, as in train.py (which waits for the device only to log): a
    # step's time is the gap between its end and the previous step's end, on the device's clock (CUDA events).
    # The first step (compilation, allocations, autotuning) is synchronized on both sides and not timed.
    ends = []
    for i in range(steps):
        if i == 0:
            sync()
        if cuda and (i == 0 or not cudagraphs):   # replayed graphs allocate nothing: their peak is the recording's
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()   # the allocator's count is kept on the host: no sync needed
        # on the CPU, where allocated memory cannot be read, hooks count what autograd saves (in the
        # first step only: they cost a Python call per saved tensor)
        saved = SavedForBackward(model.parameters()) if i == 0 and not cuda else contextlib.nullcontext()
        if i == 0:
            start = clock(cuda)
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if docs:   # a new boundaries tensor each step, as a loader's batch: the block mask and the kernels'
            # offsets check are made once per step, as in training
            docs["cu_seqlens"] = docs["cu_seqlens"].clone()
        with autocast("auto", device), saved, kernels():
            _, loss = step_model(x, targets=y, **docs)
        if i == 0:
            kept = torch.cuda.memory_allocated() - before if cuda else saved.nbytes
        with kernels():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            sync()
        ends.append(clock(cuda))
    sync()
    times = [seconds(a, b) for a, b in zip([start, *ends], ends)]
    step_s = statistics.median(times[1:] or times)  # the first step (allocations, autotuning) is not timed
    tok_s = seq_len / step_s
    dev_peak = peak_flops(device)
    rope = [t for t in (model.rope.cos, model.rope.sin) if t is not None] if model.rope else []
    return dict(saved_for_backward_gib=kept / GIB,
                model_gib=sum(t.nbytes for t in [*model.parameters(), *rope]) / GIB,
                optimizer_state_gib=sum(t.nbytes for s in opt.state.values() for t in s.values()
                                        if torch.is_tensor(t)) / GIB,
                peak_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
                step_s=step_s, tokens_per_s=tok_s,
                mfu=model.flops_per_token(attended) * tok_s / dev_peak if dev_peak else None,
                **(dict(documents=len(lengths)) if c.docs else {}))


def label(name: str, compile: bool | str) -> str:
    """A row's and a wandb run's name: the configuration, +compile when torch.compile'd (+MODE when
    compiled in a mode other than the default)."""
    if not compile:
        return name
    return name + ("+compile" if compile in (True, "default") else f"+{compile}")


def point(name: str, model_name: str, seq_len: int, steps: int, device: torch.device, breakdown: bool = False,
          compile: bool | str = False, doc_len: int = DOC_LEN) -> dict:
    """One row: run_point's measurements and status "ok", or only the status ("OOM", "error: ...").
    breakdown (CUDA): also what held the memory at the peak (training/memory_breakdown.py), from
    before the model is built, so parameters and AdamW state are attributed too; after an
    out-of-memory error, what filled the device."""
    row = dict(config=label(name, compile), seq_len=seq_len, status="ok")
    recorder = PeakBreakdown() if breakdown and device.type == "cuda" else contextlib.nullcontext()
    try:
        try:
            with recorder:
                row |= run_point(name, model_name, seq_len, steps, device, compile, doc_len=doc_len)
        finally:
            if getattr(recorder, "result", None) is not None:
                b = recorder.result
                row["peak_breakdown"] = dict(peak_gib=b.peak_bytes / GIB, by_origin_gib={
                    k: v / GIB for k, v in sorted(b.by_origin.items(), key=lambda kv: -kv[1])})
    except torch.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as e:  # noqa: BLE001 - a backend refusing a length is a result too
        row["status"] = f"error: {type(e).__name__}: {str(e)[:120]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()  # after the except blocks, which hold the failed point's tensors
    return row


def sweep(configs: list[str], model_name: str, start: int, max_len: int, steps: int, long_steps: int,
          long_from: int, max_step_seconds: float, device: torch.device, out: Path, wandb: str = "none",
          project: str = WANDB_PROJECT, log=lambda row: None, max_by_config: dict | None = None,
          breakdown_at: tuple[int, ...] = (), compile: bool | str = False, doc_len: int = DOC_LEN,
          warn=lambda line: print(line, file=sys.stderr, flush=True), group: str | None = None) -> list[dict]:
    """For each configuration, double the context from `start` until the first point that is not ok,
    `max_len` (or max_by_config[config], a lower cap for slow baselines), or a step slower than
    `max_step_seconds`; at the contexts in `breakdown_at` also what holds the memory at the peak; `long_steps` steps per point from `long_from`
    tokens on, else `steps`. Returns the rows in order, each also passed to `log`. Each configuration
    logs to out/<config>/metrics.jsonl and to a wandb run (mode `wandb`, as logger.mode: best effort).
    compile: every model torch.compile'd (a string: in that mode); rows and runs are named <config>+compile
    (<config>+MODE). doc_len: mean document length of the +docs configurations' packed rows. group: the wandb
    group of the runs (default: one new group per call).
    Every configuration is checked before the first point (ValueError: an unknown name, listing the valid
    ones; or a model setting GPTConfig refuses); one that cannot train on this device (FlexAttention on a
    CPU) gets a single row with status "skipped: <why>", and `warn` that line."""
    check_configs(configs)
    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; valid: {', '.join(MODELS)}")
    if not isinstance(doc_len, int) or doc_len < 1:
        raise ValueError(f"doc_len must be an int >= 1 (mean tokens per packed document), got {doc_len!r}")
    for name in configs:
        try:
            gpt_config(name, model_name, start, device)
        except ValueError as e:
            raise ValueError(f"configuration {name!r}: {e}") from None
    # Tensors of GiBs that change size with every point fragment the caching allocator's fixed
    # segments; growable segments keep the peak close to what is allocated. Read at the first CUDA
    # allocation, so this only applies if nothing was allocated before (set it yourself otherwise).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    group = group or f"context-{model_name}-{datetime.now():%Y%m%d-%H%M%S}"
    rows = []
    for name in configs:
        c = backend(name, device)
        checkpointing, seq_chunk, loss_chunk = c.plan
        run_name = label(name, compile)
        if why := unavailable(name, device):
            warn(f"bench_context: skipping {run_name}: {why}")
            r = dict(config=run_name, seq_len=start, status=f"skipped: {why}")
            rows.append(r)
            log(r)
            continue
        logger = RunLogger(OmegaConf.create(dict(mode=wandb, project=project, group=group, name=run_name, dir=str(out))),
                           out / run_name, dict(config=run_name, model=model_name, compile=compile, **MODELS[model_name],
                                                attention=c.attention, sdpa_backend=c.sdpa_backend,
                                                activation_checkpointing=checkpointing, seq_chunk=seq_chunk,
                                                loss_chunk=loss_chunk, documents=c.docs,
                                                doc_len=doc_len if c.docs else None, device=str(device)))
        n, longest, status = start, None, "no point"
        while n <= min(max_len, (max_by_config or {}).get(name, max_len)):
            r = point(name, model_name, n, long_steps if n >= long_from else steps, device, n in breakdown_at, compile,
                      doc_len=doc_len)
            rows.append(r)
            log(r)
            # the context is the step: wandb plots each metric against it
            logger.log({k: r[k] for k in WANDB_KEYS if r.get(k) is not None}, step=n)
            status = r["status"]
            if status != "ok":
                break
            longest = n
            if r["step_s"] > max_step_seconds:
                break
            n *= 2
        logger.finish({"status": "finished", "longest_context": longest, "last_status": status})
    return rows


def breakdown_table(row: dict) -> str:
    """A row's peak_breakdown as a markdown table (largest allocation sites first)."""
    b = row["peak_breakdown"]
    return Breakdown(int(b["peak_gib"] * GIB), {k: int(v * GIB) for k, v in b["by_origin_gib"].items()}).table()


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table of COLUMNS; "-" where a value is missing or not measured."""
    def cell(key, v):
        if v is None:
            return "-"
        if key == "tokens_per_s":
            return f"{v:,.0f}"
        return f"{v:.3g}" if isinstance(v, float) else str(v).replace("|", "\\|")
    return "\n".join(["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS),
                      *["| " + " | ".join(cell(k, r.get(k)) for k in COLUMNS) + " |" for r in rows]])


def plot(rows: list[dict], env: dict, out: Path) -> list[tuple[str, str]]:
    """context_memory.png and context_speed.png in out, one line per configuration, x at the context
    that ran out of memory; returns their (file name, description). Memory is the peak where measured
    (CUDA), otherwise what the forward keeps for backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    memory = ("peak_gib", "peak GPU memory (GiB)") if any(r.get("peak_gib") is not None for r in rows) \
        else ("saved_for_backward_gib", "kept for backward (GiB)")
    files = []
    for (key, label), fname in ((memory, "context_memory.png"),
                                (("tokens_per_s", "training tokens/s"), "context_speed.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["config"] for r in rows):
            pts = [(r["seq_len"], r[key]) for r in rows if r["config"] == name and r["status"] == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
            oom = [r["seq_len"] for r in rows if r["config"] == name and r["status"] == "OOM"]
            if oom and pts:
                ax.scatter(oom, [pts[-1][1]], marker="x", color="red")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens, batch 1)")
        ax.set_ylabel(label)
        ax.set_title(f"{env['model']} on {env['device']} (x = out of memory)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        files.append((fname, f"{label} vs context"))
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--model", default="gpt2_small", choices=list(MODELS))
    ap.add_argument("--start", type=int, default=8192)
    ap.add_argument("--max", type=int, default=1 << 20)
    ap.add_argument("--steps", type=int, default=3, help="steps per point (the first is not timed unless it is the only one)")
    ap.add_argument("--long-steps", type=int, default=1, help="steps per point from --long-from tokens on")
    ap.add_argument("--long-from", type=int, default=262144)
    ap.add_argument("--max-step-seconds", type=float, default=400.0, help="stop doubling past this step time")
    ap.add_argument("--breakdown-at", type=int, nargs="*", default=[],
                    help="contexts at which to record what holds the memory at the peak (CUDA)")
    ap.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES,
                    help="torch.compile each model (train.compile=true), optionally in a mode (train.compile_mode; "
                         "reduce-overhead: CUDA graphs); use --steps >= 3: the first step compiles")
    ap.add_argument("--doc-len", type=int, default=DOC_LEN,
                    help="+docs configurations: mean tokens per packed document (lengths uniform in 1..2*DOC_LEN-1)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    ap.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "none"),
                    help="auto: online when logged in, otherwise offline (runs under --out/wandb)")
    ap.add_argument("--out", default=os.environ.get("OUT", "context-out"))
    args = ap.parse_args()
    device = resolve_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
           "torch": torch.__version__, "model": args.model}
    print(json.dumps(env), flush=True)
    rows = sweep(args.configs, args.model, args.start, args.max, args.steps, args.long_steps, args.long_from,
                 args.max_step_seconds, device, out, wandb=args.wandb, log=lambda r: print(json.dumps(r), flush=True),
                 breakdown_at=tuple(args.breakdown_at), compile=args.compile, doc_len=args.doc_len)
    (out / "context.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "peak_breakdown"))   # nested: JSON only
    with open(out / "context.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"\n{env['device']}, {args.model}, batch 1, {precision}, full step incl. AdamW")
    print(markdown_table(rows))
    for r in rows:
        if "peak_breakdown" in r:
            print(f"\nWhat holds the memory at the peak, {r['config']} at {r['seq_len']} tokens:\n{breakdown_table(r)}")
    plot(rows, env, out)


if __name__ == "__main__":
    main()
