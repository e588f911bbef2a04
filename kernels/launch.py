"""Launchers for the Triton attention kernels: launch parameters, allocation, strides and grids.

Inputs arrive already checked (``kernels/validate.py``). Both layouts go through the same kernels:
batch (B, N, H, D) passes a batch stride; varlen (total, H, D) passes batch stride 0 and the
cu_seqlens pointers, and each program reads its document's bounds from them.
"""
import contextlib
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import triton

from .dispatch import Cached, tested
from .flash_bwd import _attn_bwd, _attn_bwd_preprocess
from . import flash_fwd_tma
from .flash_fwd import _attn_fwd

# Triton reads TRITON_INTERPRET when the kernels are decorated, i.e. at import: record it once.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The Gluon kernels are written against Triton 3.6's Gluon API, which is experimental and changes between
# releases. They load at the first launch on a GPU, with a Triton they were tested on (kernels/dispatch.py's
# TESTED_TRITON); elsewhere the Triton kernels run every pass.
flash_bwd_hopper = flash_fwd_hopper = None


@functools.lru_cache(maxsize=None)
def _gluon_loaded() -> bool:
    global flash_bwd_hopper, flash_fwd_hopper
    if not tested("Gluon kernels"):
        return False
    try:
        from . import flash_bwd_hopper, flash_fwd_hopper
    except (ImportError, AttributeError) as e:   # a tested Triton built without Gluon's Hopper modules
        warnings.warn(f"the Gluon kernels for Hopper do not load with Triton {triton.__version__} ({e}); "
                      "the Triton kernels run instead", stacklevel=2)
        return False
    return True
LOG2E = 1.4426950408889634

# The launches below go through kernels/dispatch.py's cache, keyed by `signature` of the caller's tensors plus
# the ints the other arguments derive from (Cached adds the constexprs). The tensors allocated here are
# contiguous, 16-byte aligned and shaped by the caller's, so they add nothing to the key.
_FWD, _BWD, _BWD_PRE = Cached(_attn_fwd), Cached(_attn_bwd), Cached(_attn_bwd_preprocess)
_FWD_TMA = Cached(flash_fwd_tma._attn_fwd_tma)


def signature(*tensors):
    """What a launch's specialization can depend on in these tensors (None allowed): shape, strides, dtype and
    16-byte alignment. With the launch's int arguments' sources it is a kernels/dispatch.py key."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int       # query rows per tile
    BLOCK_N: int       # key rows per tile
    num_warps: int
    num_stages: int
    counted: bool = False  # dK/dV pass only: its query loop as range(n_tiles) (flash_bwd.py says why)


# Launch parameters per (pass, padded head dim) for Hopper, from `make bench ARGS=--sweep` on an
# H100 (docs/perf-notes.md has the numbers). The backward dK/dV pass holds a BLOCK_N key tile and
# walks BLOCK_M query rows; the dQ pass holds BLOCK_M query rows and walks BLOCK_N keys.
_SM90 = {
    "fwd": {64: KernelConfig(128, 64, 8, 4), 128: KernelConfig(128, 64, 8, 4),
            256: KernelConfig(64, 64, 8, 2)},
    "dkdv": {64: KernelConfig(64, 128, 8, 3, counted=True), 128: KernelConfig(64, 128, 8, 2, counted=True),
             256: KernelConfig(32, 64, 8, 1)},
    "dq": {64: KernelConfig(128, 64, 8, 3), 128: KernelConfig(128, 64, 8, 3),
           256: KernelConfig(64, 32, 8, 1)},
}
# Where the best parameters differ without the causal mask: {(pass, head dim): config}.
_SM90_NONCAUSAL: dict[tuple[str, int], KernelConfig] = {("dkdv", 128): KernelConfig(64, 128, 8, 3, counted=True)}
# Up to a sequence length, where other parameters measured faster beside the Gluon dK/dV kernel (the only
# path that asks for them, kernels/flash_bwd_hopper.py): {(pass, head dim, causal): (longest seqlen, config)}.
# d64 dQ with 64-row tiles and 4 warps, H200 fp16, fwd+bwd TFLOP/s against the 128-row entry
# (docs/bench/h200-d64-short-sweep-fp16-2026-11-30o.json): causal 1K 228 vs 220, 2K 280 vs 272, 4K 316 vs 303;
# full 1K 302 vs 293, 2K 330 vs 324, 4K 353 vs 342; at full 8K behind. Causal 8K and 16K with the dQ pass run
# first (session 17, h200-d64-dq-8k-sweep-fp16-2026-11-30q.txt): 341 vs 333, 362 vs 354.
_SM90_SHORT: dict[tuple[str, int, bool], tuple[int, KernelConfig]] = {
    ("dq", 64, True): (16384, KernelConfig(64, 64, 4, 3)), ("dq", 64, False): (4096, KernelConfig(64, 64, 4, 3))}
# Ampere / Ada and anything else: less shared memory, so shallower pipelines.
_GENERIC = {
    "fwd": {64: KernelConfig(128, 64, 4, 2), 128: KernelConfig(128, 32, 8, 2),
            256: KernelConfig(64, 32, 8, 1)},
    "dkdv": {64: KernelConfig(32, 128, 8, 2), 128: KernelConfig(32, 64, 8, 2),
             256: KernelConfig(16, 32, 8, 1)},
    "dq": {64: KernelConfig(64, 64, 8, 2), 128: KernelConfig(64, 32, 8, 2),
           256: KernelConfig(32, 32, 8, 1)},
}
# fp32 inputs use full-precision (non-tf32) dots: smaller tiles.
_FP32 = {"fwd": KernelConfig(64, 32, 4, 2), "dkdv": KernelConfig(32, 64, 4, 2),
         "dq": KernelConfig(64, 32, 4, 2)}
# The interpreter runs each program in numpy; small tiles exercise every masked / unmasked path on
# the short sequences the CPU tests can afford.
_INTERPRETER = KernelConfig(32, 16, 1, 1)

# The atomic-dQ variant of the dK/dV pass (deterministic=False) holds a dQ tile too; it starts from
# the dK/dV pass's parameters. On the H100 the sweep at d128 16K kept them without the mask and chose
# 2 stages with it (docs/bench/h100-atomic-dq-2026-11-25.txt); even tuned, it is slower than the
# deterministic split (fwd+bwd d128 causal 16K: 354 vs 400 TFLOP/s).
for _table in (_SM90, _GENERIC, _FP32):
    _table["dkdv_fused"] = dict(_table["dkdv"]) if isinstance(_table["dkdv"], dict) else _table["dkdv"]
_SM90["dkdv_fused"][64] = KernelConfig(64, 128, 8, 3)
_SM90["dkdv_fused"][128] = KernelConfig(64, 128, 8, 2)
_SM90_NONCAUSAL[("dkdv_fused", 128)] = KernelConfig(64, 128, 8, 3)

_overrides: dict[str, KernelConfig] = {}

# deterministic=False allows a non-deterministic dQ; it runs one only where that was measured faster than the
# deterministic split: the Gluon kernel at the head dims it fuses (flash_bwd_hopper.FUSED_DQ_HEAD_DIMS). The
# Triton kernel's atomic dQ was slower everywhere it was measured (H100 d128 causal 16K fwd+bwd 354 vs 400
# TFLOP/s; H200 GPT-2's shape, d64 causal 8K: backward 0.95 vs 0.90 ms, docs/perf-notes.md), so without the
# Gluon kernel deterministic=False runs the split unless override_atomic_dq(True) asks for it (tests, bench).
_atomic_dq_triton: list[bool] = [False]


@contextlib.contextmanager
def _setting(cell: list, value):
    """cell[0] = value for the duration of the block (the override_* switches below)."""
    old = cell[0]
    cell[0] = value
    try:
        yield
    finally:
        cell[0] = old


# The forward with TMA loads for dense whole-tile inputs (kernels/flash_fwd_tma.py): on Hopper, bf16/fp16, at
# these (head dim, causal) up to the length given, with these tiles, before the Gluon forward (which runs d64
# from 4K) and instead of the pointer-load one. H200 fp16 d64, same runs (docs/perf-notes.md, session 17):
# causal 1K / 2K 303 / 344 vs pointer-load 262 / 307, causal 4K level with the Gluon forward (364 vs 360,
# 359 vs 353); no mask 1K / 2K 376 / 393 vs 360 / 386, behind the Gluon forward from 4K. Not at d128, where the
# Gluon forward runs from 128 tokens and this kernel was not measured against it.
_SM90_TMA_FWD = {(64, True): (4096, KernelConfig(64, 64, 4, 2)), (64, False): (2048, KernelConfig(128, 64, 8, 3))}
_tma_fwd: list[bool | None] = [None]


def override_tma_fwd(flag: bool | None):
    """True: the forward takes kernels/flash_fwd_tma.py's kernel wherever that supports the inputs, with the
    launch table's (or override_configs') forward tiles; False: never; None: _SM90_TMA_FWD's rule."""
    return _setting(_tma_fwd, flag)


def tma_fwd_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool,
                   seqlen: int) -> KernelConfig | None:
    """The TMA forward's tiles for such inputs, or None where it does not run (flash_fwd_tma.supported has the
    last word on the inputs)."""
    if _tma_fwd[0] is not None:
        return get_config("fwd", _head_dim_pad(head_dim), dtype, device, causal) if _tma_fwd[0] else None
    # forced forward tiles (override_configs(fwd=...)) name the pointer-load kernel's
    if "fwd" in _overrides or device.type != "cuda" or dtype == torch.float32 or _major(device) != 9:
        return None
    rule = _SM90_TMA_FWD.get((head_dim, causal))
    return rule[1] if rule is not None and seqlen <= rule[0] and tested("TMA forward by default") else None


def override_atomic_dq(flag: bool):
    """Whether deterministic=False takes the Triton kernel's atomic dQ where the Gluon kernel does not run."""
    return _setting(_atomic_dq_triton, flag)


def parse_launch_spec(text: str) -> tuple[str, KernelConfig]:
    """'dkdv=64,128,8,3[,counted]' -> ('dkdv', KernelConfig(64, 128, 8, 3, counted=True)): benchmark and
    compiler-report arguments."""
    pass_name, _, values = text.partition("=")
    parts = values.split(",")
    if not pass_name or len(parts) not in (4, 5) or (len(parts) == 5 and parts[4] != "counted"):
        raise ValueError(f"{text!r}: expected PASS=BLOCK_M,BLOCK_N,WARPS,STAGES[,counted]")
    try:
        return pass_name, KernelConfig(*map(int, parts[:4]), counted=len(parts) == 5)
    except ValueError:
        raise ValueError(f"{text!r}: BLOCK_M, BLOCK_N, WARPS and STAGES must be integers") from None


# The deterministic backward runs as one launch (dK/dV and dQ programs in one grid) on Hopper when its
# grid is at most this many waves of one program per SM, so that the two kinds fill each other's
# tails, and the two passes' entries agree on warps and stages (one launch has one of each). On the
# H100, GPT-2 small's attention at 8K (B 1, H 12, d64 causal: 1536 programs, 11.6 waves) went from
# 282 to 300 TFLOP/s fwd+bwd; the benchmark grid's points (31 waves) were level within noise
# (docs/perf-notes.md).
ONE_LAUNCH_MAX_WAVES = 16
_one_launch_override: list[bool | None] = [None]


def override_one_launch(flag: bool):
    """Force the backward into one launch (True) or two (False): tests and benchmarks."""
    return _setting(_one_launch_override, flag)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _major(device: torch.device) -> int:
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0]


def use_one_launch(dkdv: KernelConfig, dq: KernelConfig, programs: int, dtype: torch.dtype,
                   device: torch.device) -> bool:
    if _one_launch_override[0] is not None:
        return _one_launch_override[0]
    if (device.type != "cuda" or dtype == torch.float32 or _major(device) < 9
            or (dkdv.num_warps, dkdv.num_stages) != (dq.num_warps, dq.num_stages)):
        return False
    return programs <= ONE_LAUNCH_MAX_WAVES * _num_sms(device.index if device.index is not None
                                                        else torch.cuda.current_device())


# The forward and the deterministic backward's dK/dV pass run the warp-specialized Gluon kernels
# (flash_fwd_hopper.py, flash_bwd_hopper.py) where those support the inputs (kernels/hopper.py), for the
# passes named here (tests and benchmarks compare them with the Triton kernels); the TMA forward's rule
# (_SM90_TMA_FWD) comes before the Gluon forward's.
GLUON_PASSES = ("fwd", "dkdv")
_gluon_passes: list[frozenset] = [frozenset(GLUON_PASSES)]


def override_gluon(*passes: str):
    """Use the Gluon kernels only for these passes ("fwd", "dkdv"); none given: the Triton kernels only."""
    unknown = set(passes) - set(GLUON_PASSES)
    if unknown:
        raise ValueError(f"override_gluon: unknown passes {sorted(unknown)}; expected some of {GLUON_PASSES}")
    return _setting(_gluon_passes, frozenset(passes))


def _gluon(pass_name: str, device: torch.device) -> bool:
    return (device.type == "cuda" and not INTERPRET and pass_name in _gluon_passes[0] and pass_name not in _overrides
            and _gluon_loaded())


@contextlib.contextmanager
def override_configs(**configs: KernelConfig):
    """Force launch parameters, e.g. ``override_configs(fwd=KernelConfig(...))``: tests and sweeps."""
    old = dict(_overrides)
    _overrides.update(configs)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(old)


def get_config(pass_name: str, head_dim_pad: int, dtype: torch.dtype, device: torch.device,
               causal: bool, seqlen: int | None = None) -> KernelConfig:
    """Launch parameters of one pass; seqlen (given only beside the Gluon dK/dV kernel) picks _SM90_SHORT's
    entries on Hopper."""
    if pass_name in _overrides:
        return _overrides[pass_name]
    if device.type != "cuda":
        return _INTERPRETER
    if dtype == torch.float32:
        cfg = _FP32[pass_name]
        return cfg if head_dim_pad <= 128 else KernelConfig(32, 32, 4, 1)
    d = max(64, head_dim_pad)
    if _major(device) < 9:
        return _GENERIC[pass_name][d]
    return hopper_config(pass_name, d, causal, seqlen)


def hopper_config(pass_name: str, head_dim_pad: int, causal: bool, seqlen: int | None = None) -> KernelConfig:
    """The Hopper (sm_90) launch-table entry for bf16/fp16; head_dim_pad 64, 128 or 256."""
    short = _SM90_SHORT.get((pass_name, head_dim_pad, causal))
    if seqlen is not None and short is not None and seqlen <= short[0]:
        return short[1]
    return (not causal and _SM90_NONCAUSAL.get((pass_name, head_dim_pad))) or _SM90[pass_name][head_dim_pad]


def _head_dim_pad(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _seq_strides(t: torch.Tensor, varlen: bool):
    """(batch, row, head) strides; varlen tensors have no batch axis (stride 0)."""
    s = t.stride()
    return (0, s[0], s[1]) if varlen else s[:3]


def _precision(dtype):
    # tf32 would cost fp32 inputs ~3 decimal digits; fp16/bf16 products are exact in fp32 anyway.
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if INTERPRET and dtype == torch.bfloat16 else "tf32"


def _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k):
    varlen = cu_seqlens_q is not None
    if varlen:
        return varlen, cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    return varlen, q.shape[0], q.shape[1], k.shape[1]


def _lse_strides(lse, varlen):
    # batch: (B, H, Nq); varlen: (H, total_q)
    s = lse.stride()
    return (0, s[0]) if varlen else s[:2]


def _contig_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _alibi_table(alibi_slopes, batch, nheads):
    """ALiBi slopes ((nheads,) or (batch, nheads) fp32) as the Triton kernels read them: a fresh contiguous
    (batch, nheads) fp32 tensor (aligned, so like the other tensors allocated here it adds nothing to the key)."""
    if alibi_slopes is None:
        return None
    return alibi_slopes.to(torch.float32).expand(batch, nheads).clone(memory_format=torch.contiguous_format)


def attn_fwd(q, k, v, scale, left, right, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, softcap=0.0, alibi_slopes=None):
    """Returns ``out`` like q and ``lse`` fp32 ((B, H, Nq) or (H, total_q)). softcap > 0 / alibi_slopes run the
    Triton kernel (flash_fwd.py), the only one that has them."""
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    varlen, batch, seqlen_q, seqlen_k = _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    nheads, nheads_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    d_pad = _head_dim_pad(head_dim)
    if varlen:   # rows outside every document are never visited: start them at 0 / -inf
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        lse = torch.full((nheads, q.shape[0]), float("-inf"), device=q.device, dtype=torch.float32)
    else:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty((batch, nheads, seqlen_q), device=q.device, dtype=torch.float32)
    key = (signature(q, k, v, cu_seqlens_q, cu_seqlens_k), left, right, seqlen_q, seqlen_k)
    mods = softcap > 0 or alibi_slopes is not None
    tma = None if mods else tma_fwd_config(q.device, q.dtype, head_dim, right == 0, seqlen_q)
    if tma is not None and flash_fwd_tma.supported(q, k, v, left, right, varlen, tma.BLOCK_M, tma.BLOCK_N):
        flash_fwd_tma.attn_fwd(_FWD_TMA, key, q, k, v, out, lse, scale, right == 0, tma, _precision(q.dtype))
        return out, lse
    if not mods and _gluon("fwd", q.device) and flash_fwd_hopper.supported(q, k, v, left, right, varlen):
        flash_fwd_hopper.attn_fwd(q, k, v, out, lse, scale, causal=right == 0, key=key)
        return out, lse
    cfg = get_config("fwd", d_pad, q.dtype, q.device, right >= 0)
    num_m = triton.cdiv(seqlen_q, cfg.BLOCK_M)
    grid = (num_m * batch * nheads,)
    if grid[0] == 0:
        return out, lse
    _FWD(
        key, grid, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, _alibi_table(alibi_slopes, batch, nheads),
        scale * LOG2E, seqlen_q, seqlen_k, left, right, num_m,
        *_seq_strides(q, varlen), *_seq_strides(k, varlen), *_seq_strides(v, varlen),
        *_seq_strides(out, varlen), *_lse_strides(lse, varlen),
        NUM_HEADS=nheads, GROUP=nheads // nheads_k, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, IS_VARLEN=varlen,
        HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, PRECISION=_precision(q.dtype),
        SOFTCAP=float(softcap), ALIBI=alibi_slopes is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


def attn_bwd(dout, dlse, q, k, v, out, lse, scale, left, right, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, deterministic=True, softcap=0.0, alibi_slopes=None):
    """Gradients (dq, dk, dv) of ``out`` (and of ``lse`` when ``dlse`` is given). deterministic=False lets
    the dK/dV pass sum dQ in fp32 (five products per tile pair instead of seven) where that is faster.
    softcap > 0 / alibi_slopes: the Triton kernel (flash_bwd.py) only."""
    dout = _contig_last(dout)
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    # delta is allocated like lse and both are indexed with lse's strides: a caller's strided view of a
    # larger lse (a kept forward's, sliced) would not fit the allocation
    lse = lse.contiguous()
    varlen, batch, seqlen_q, seqlen_k = _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    nheads, nheads_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    d_pad = _head_dim_pad(head_dim)
    alloc = torch.zeros_like if varlen else torch.empty_like
    # a forced launch shape (override_one_launch) is a request for the Triton backward kernel
    mods = softcap > 0 or alibi_slopes is not None
    gluon = (not mods and _gluon("dkdv", q.device) and _one_launch_override[0] is None
             and flash_bwd_hopper.supported(q, k, v, dout, left, right, varlen))
    # deterministic=False: dQ accumulated in fp32 by the dK/dV pass where that is faster (see _atomic_dq_triton):
    # by TMA reduce-add in the Gluon kernel, or (forced) by the Triton kernel's atomics
    gluon_dq = gluon and not deterministic and flash_bwd_hopper.fuses_dq(head_dim)
    fused = gluon_dq or (not deterministic and not gluon and _atomic_dq_triton[0])
    # the atomic path accumulates in fp32 into zeros the preprocess writes (rows no key block visits stay 0)
    dq = (torch.empty(q.shape, dtype=torch.float32, device=q.device) if fused
          else alloc(q, memory_format=torch.contiguous_format))
    dk = alloc(k, memory_format=torch.contiguous_format)
    dv = alloc(v, memory_format=torch.contiguous_format)
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse) if gluon else None   # the Gluon kernel's base-2 LSE, from the preprocess or dQ pass
    lse_strides = _lse_strides(lse, varlen)
    if dlse is not None:
        dlse = dlse.contiguous()

    key = (signature(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k), left, right, seqlen_q, seqlen_k,
           deterministic)
    cfg = get_config("dkdv_fused" if fused else "dkdv", d_pad, q.dtype, q.device, right >= 0)
    cfg_dq = cfg if fused else get_config("dq", d_pad, q.dtype, q.device, right >= 0,
                                          max(seqlen_q, seqlen_k) if gluon else None)
    num_n = triton.cdiv(seqlen_k, cfg.BLOCK_N)
    num_m = triton.cdiv(seqlen_q, cfg_dq.BLOCK_M)
    n_dkdv, n_dq = num_n * batch * nheads_k, num_m * batch * nheads
    one_launch = not fused and not gluon and use_one_launch(cfg, cfg_dq, n_dkdv + n_dq, q.dtype, q.device)
    # a split backward runs its dQ pass first, which does the preprocess's work for its rows on the way (Delta,
    # Lse2) for the dK/dV pass after it: one launch and one read of dO fewer (docs/perf-notes.md, session 17)
    dq_first = not fused and not one_launch
    rows = q.shape[0] if varlen else seqlen_q
    pre_block = 64 if q.device.type == "cuda" else 32
    pre_grid = (triton.cdiv(rows, pre_block), (1 if varlen else batch) * nheads)
    if pre_grid[0] * pre_grid[1] > 0 and not dq_first:
        _BWD_PRE(
            key, pre_grid, out, dout, dlse, delta, lse, lse2, dq, rows,
            *_seq_strides(out, varlen), *_seq_strides(dout, varlen), *_seq_strides(dq, varlen), *lse_strides,
            NUM_HEADS=nheads, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_M=pre_block,
            HAS_DLSE=dlse is not None, WRITE_LSE2=lse2 is not None, ZERO_DQ=fused)

    alibi = _alibi_table(alibi_slopes, batch, nheads)

    def launch(programs, grid, launch_cfg, preprocess=False):
        if grid > 0:
            _BWD(
                key, (grid,), q, k, v, dout, lse, delta, dk, dv, dq, out, dlse, lse2, cu_seqlens_q, cu_seqlens_k,
                alibi, scale, scale * LOG2E, seqlen_q, seqlen_k, left, right, num_n, num_m, n_dkdv,
                *_seq_strides(q, varlen), *_seq_strides(k, varlen), *_seq_strides(v, varlen),
                *_seq_strides(dout, varlen), *_seq_strides(dk, varlen), *_seq_strides(dv, varlen),
                *_seq_strides(dq, varlen), *_seq_strides(out, varlen), *lse_strides,
                NUM_HEADS=nheads, GROUP=nheads // nheads_k,
                HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_M1=cfg.BLOCK_M, BLOCK_N1=cfg.BLOCK_N,
                BLOCK_M2=cfg_dq.BLOCK_M, BLOCK_N2=cfg_dq.BLOCK_N, IS_VARLEN=varlen,
                HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, PRECISION=_precision(q.dtype),
                FUSED_DQ=fused, COUNTED=cfg.counted, PROGRAMS=programs, PREPROCESS=preprocess,
                HAS_DLSE=preprocess and dlse is not None, WRITE_LSE2=preprocess and lse2 is not None,
                SOFTCAP=float(softcap), ALIBI=alibi is not None,
                num_warps=launch_cfg.num_warps, num_stages=launch_cfg.num_stages)

    if fused:
        if gluon_dq:   # dQ (unscaled) reduce-added by TMA inside the dK/dV kernel
            flash_bwd_hopper.attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale, causal=right == 0, key=key, dq_acc=dq)
            return torch.mul(dq, scale, out=torch.empty_like(q, memory_format=torch.contiguous_format)), dk, dv
        launch("dkdv", n_dkdv, cfg)
        return dq.to(q.dtype), dk, dv
    if one_launch:
        launch("both", n_dkdv + n_dq, cfg)   # the dK/dV parameters' warps and stages for both kinds
        return dq, dk, dv
    launch("dq", n_dq, cfg_dq, preprocess=True)
    if gluon:
        flash_bwd_hopper.attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale, causal=right == 0, key=key)
    else:
        launch("dkdv", n_dkdv, cfg)
    return dq, dk, dv
