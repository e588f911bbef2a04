"""Launchers for the attention kernels: allocation, strides and grids, and the kernels and launch parameters that
kernels/policy.py chooses (``policy.choose``, once per launch key; the override helpers below).

Inputs arrive already checked (``kernels/validate.py``). Both layouts go through the same kernels:
batch (B, N, H, D) passes a batch stride; varlen (total, H, D) passes batch stride 0 and the
cu_seqlens pointers, and each program reads its document's bounds from them.
"""
import contextlib
import functools
import os
import warnings

import torch
import triton

from .dispatch import Cached, tested
from .flash_bwd import _attn_bwd, _attn_bwd_preprocess
from . import flash_fwd_tma, policy
from .flash_fwd import _attn_fwd
# ONE_LAUNCH_MAX_WAVES and KernelConfig keep their old import path (tests, scripts/bench_attention.py)
from .policy import DEFAULT, GLUON_PASSES, ONE_LAUNCH_MAX_WAVES, KernelConfig, Machine, Overrides, Problem  # noqa: F401

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


# Which kernel runs, with which tiles, is kernels/policy.py's: attn_fwd and attn_bwd ask policy.choose once per new
# key (the launch key plus the machine, the overrides and softcap / ALiBi being on) and act on its Decision.

# The overrides in force for calls not given any (attn_fwd / attn_bwd's `overrides`): one immutable
# policy.Overrides, replaced (never mutated) by `overriding` and the override_* helpers for the duration of a
# with-block, the fields the block changed restored after it. Process-wide rather than a ContextVar: the ops reach
# attn_fwd / attn_bwd through torch.library with no argument for it, and a GPU backward runs on autograd's device
# thread. policy.choose itself reads no state: it gets the value as an argument.
_active: Overrides = DEFAULT


def active() -> Overrides:
    """The overrides in force (policy.DEFAULT outside every override block)."""
    return _active


@contextlib.contextmanager
def overriding(**fields):
    """These policy.Overrides fields forced for the block, e.g. ``overriding(atomic_dq=True)``; the override_*
    helpers below are named shortcuts."""
    global _active
    unknown = set(fields) - set(Overrides._fields)
    if unknown:
        raise ValueError(f"overriding: unknown fields {sorted(unknown)}; expected some of {Overrides._fields}")
    old = {name: getattr(_active, name) for name in fields}
    _active = _active._replace(**fields)
    try:
        yield _active
    finally:
        _active = _active._replace(**old)


def override_tma_fwd(flag: bool | None):
    """True: the forward takes kernels/flash_fwd_tma.py's kernel wherever that supports the inputs, with the
    launch table's (or override_configs') forward tiles; False: never; None: policy.TMA_FWD's rule."""
    return overriding(tma_fwd=flag)


def override_atomic_dq(flag: bool):
    """Whether deterministic=False takes the Triton kernel's atomic dQ where the Gluon kernel does not run."""
    return overriding(atomic_dq=flag)


def override_one_launch(flag: bool):
    """Force the backward into one launch (True) or two (False): tests and benchmarks."""
    return overriding(one_launch=flag)


def override_gluon(*passes: str):
    """Use the Gluon kernels only for these passes ("fwd", "dkdv"); none given: the Triton kernels only."""
    unknown = set(passes) - set(GLUON_PASSES)
    if unknown:
        raise ValueError(f"override_gluon: unknown passes {sorted(unknown)}; expected some of {GLUON_PASSES}")
    return overriding(gluon_passes=frozenset(passes))


@contextlib.contextmanager
def override_configs(**configs: KernelConfig):
    """Force launch parameters, e.g. ``override_configs(fwd=KernelConfig(...))``: tests and sweeps."""
    with overriding(configs=_active.with_configs(**configs).configs):
        yield


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


# --- the machine as the policy sees it: device queries (asked once per device) and the Triton version gates ---

@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _major(device: torch.device) -> int:
    return _capability(_index(device))[0]


def machine(device: torch.device, gluon: bool = True) -> Machine:
    """policy.Machine for this device, asked now. gluon=False: the Gluon kernels are not even loaded (no pass may
    take them). On a GPU the version gates ask kernels/dispatch.py's `tested` (one warning per process where a
    path is off)."""
    descriptor = flash_fwd_tma.TensorDescriptor is not None
    if device.type != "cuda":
        return Machine("cpu", interpret=INTERPRET, tensor_descriptor=descriptor)
    gluon = not INTERPRET and gluon and _gluon_loaded()
    return Machine("cuda", major=_major(device), num_sms=_num_sms(_index(device)), interpret=INTERPRET, gluon=gluon,
                   tma_fwd_tested=tested("TMA forward by default"),
                   tma_reduce=gluon and bool(flash_bwd_hopper.HAS_TMA_REDUCE), tensor_descriptor=descriptor)


# Per call: the machine of the tensors' device (per device and whether any Gluon pass is allowed) and the
# decision per key, both looked up in a dict; policy.choose runs on a new key only.
_MACHINES: dict = {}
_DECISIONS: dict = {}
MAX_DECISIONS = 4096   # kept decisions (many shapes: varlen batches' longest documents): start over past it


def _clear_caches():
    """Forget the machines and decisions (after a test changes what the device queries or version gates say)."""
    _MACHINES.clear()
    _DECISIONS.clear()


def _decision(device, overrides, key, mods, *problem):
    """policy.choose's Decision for this launch key; `problem`: _problem's arguments, built on a new key only."""
    o = _active if overrides is None else overrides
    mkey = (device.type, device.index, bool(o.gluon_passes))
    m = _MACHINES.get(mkey)
    if m is None:
        m = _MACHINES[mkey] = machine(device, gluon=mkey[2])
    dkey = (m, o, key, mods)
    decision = _DECISIONS.get(dkey)
    if decision is None:
        if len(_DECISIONS) >= MAX_DECISIONS:
            _DECISIONS.clear()
        decision = _DECISIONS[dkey] = policy.choose(m, _problem(*problem), o)
    return decision


def _problem(q, k, v, dout, left, right, varlen, batch, seqlen_q, seqlen_k, deterministic, softcap, alibi_slopes):
    rows_ok = not varlen and all(map(flash_fwd_tma.rows_view_ok, (q, k, v)))
    return Problem(q.dtype, q.shape[-1], seqlen_q, seqlen_k, left, right, varlen, batch, q.shape[-2], k.shape[-2],
                   rows_ok, dout is None or (not varlen and flash_fwd_tma.rows_view_ok(dout)), deterministic,
                   softcap > 0, alibi_slopes is not None, q.shape[0] if varlen else q.shape[0] * q.shape[1])


# --- the policy's pieces one at a time, for tests, benchmarks and scripts (the overrides in force; each asks the
# device only what its answer needs) ---

def get_config(pass_name: str, head_dim_pad: int, dtype: torch.dtype, device: torch.device,
               causal: bool, seqlen: int | None = None) -> KernelConfig:
    """Launch parameters of one pass (policy.TILE_RULES); seqlen (given only beside the Gluon dK/dV kernel) picks
    policy.SM90_SHORT's entries on Hopper."""
    o = _active
    if device.type != "cuda":
        m = Machine("cpu")
    else:   # forced tiles and fp32 are decided before the capability is read
        m = Machine("cuda", major=_major(device) if o.config(pass_name) is None and dtype != torch.float32 else 0)
    return policy.tiles(m, o, pass_name, head_dim_pad, dtype, causal, seqlen)[0]


def hopper_config(pass_name: str, head_dim_pad: int, causal: bool, seqlen: int | None = None) -> KernelConfig:
    """The Hopper (sm_90) launch-table entry for bf16/fp16; head_dim_pad 64, 128 or 256 (no override)."""
    return policy.tiles(Machine("cuda", major=9), DEFAULT, pass_name, head_dim_pad, torch.bfloat16, causal, seqlen)[0]


def tma_fwd_config(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool,
                   seqlen: int) -> KernelConfig | None:
    """The TMA forward's tiles for such inputs, or None where it does not run (policy.tma_shapes has the last word
    on the inputs)."""
    o = _active
    cuda = device.type == "cuda"
    needs_major = cuda and o.tma_fwd is None and o.config("fwd") is None and dtype != torch.float32
    m = Machine(device.type, major=_major(device) if needs_major else 0, tma_fwd_tested=True)
    cfg, why = policy.tma_tiles(m, o, Problem(dtype, head_dim, seqlen, seqlen, right=0 if causal else -1))
    if why == "fwd.tma" and not tested("TMA forward by default"):   # the gate asked last, as where it runs
        return None
    return cfg


def use_one_launch(dkdv: KernelConfig, dq: KernelConfig, programs: int, dtype: torch.dtype,
                   device: torch.device) -> bool:
    """policy.one_launch for these tiles and programs."""
    o = _active
    m = Machine(device.type)
    if o.one_launch is None and device.type == "cuda" and dtype != torch.float32:
        major = _major(device)
        m = Machine("cuda", major=major, num_sms=_num_sms(_index(device)) if major >= 9 else 0)
    return policy.one_launch(m, o, dtype, dkdv, dq, programs)


def _gluon(pass_name: str, device: torch.device) -> bool:
    """Whether the Gluon kernel may take this pass here (policy.gluon_allowed), loading it if so."""
    m = Machine(device.type, interpret=INTERPRET, gluon=True)
    return policy.gluon_allowed(m, _active, pass_name) and _gluon_loaded()


def _head_dim_pad(head_dim: int) -> int:
    return policy.head_dim_pad(head_dim)


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
             max_seqlen_q=None, max_seqlen_k=None, softcap=0.0, alibi_slopes=None, overrides=None):
    """Returns ``out`` like q and ``lse`` fp32 ((B, H, Nq) or (H, total_q)). The kernel is policy.choose's (softcap
    > 0 / alibi_slopes: the Triton kernel, flash_fwd.py, the only one that has them); overrides: a policy.Overrides
    for this call instead of the ones in force (`active()`)."""
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
    decision = _decision(q.device, overrides, key, (softcap > 0, alibi_slopes is not None),
                         q, k, v, None, left, right, varlen, batch, seqlen_q, seqlen_k, True, softcap, alibi_slopes)
    if decision.fwd == "tma":
        flash_fwd_tma.attn_fwd(_FWD_TMA, key, q, k, v, out, lse, scale, right == 0, decision.fwd_tiles,
                               _precision(q.dtype))
        return out, lse
    if decision.fwd == "gluon":
        flash_fwd_hopper.attn_fwd(q, k, v, out, lse, scale, causal=right == 0, key=key, launch=decision.fwd_gluon)
        return out, lse
    cfg = decision.fwd_tiles
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


def dq_accumulator(shape, device) -> torch.Tensor:
    """The fused dQ's fp32 accumulator (its own function: tests count what it allocates)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def attn_bwd(dout, dlse, q, k, v, out, lse, scale, left, right, cu_seqlens_q=None, cu_seqlens_k=None,
             max_seqlen_q=None, max_seqlen_k=None, deterministic=True, softcap=0.0, alibi_slopes=None, overrides=None,
             grads=None):
    """Gradients (dq, dk, dv) of ``out`` (and of ``lse`` when ``dlse`` is given). deterministic=False lets
    the dK/dV pass sum dQ in fp32 (five products per tile pair instead of seven) where policy.choose takes that.
    softcap > 0 / alibi_slopes: the Triton kernel (flash_bwd.py) only. overrides: as attn_fwd's.
    grads: (dq, dk, dv) to write into (views of a caller's, zeros for varlen; the head groups' calls below)."""
    dout = _contig_last(dout)
    q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
    # delta is allocated like lse and both are indexed with lse's strides: a caller's strided view of a
    # larger lse (a kept forward's, sliced) would not fit the allocation
    lse = lse.contiguous()
    varlen, batch, seqlen_q, seqlen_k = _layout(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    nheads, nheads_k, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    d_pad = _head_dim_pad(head_dim)
    alloc = torch.zeros_like if varlen else torch.empty_like
    if dlse is not None:
        dlse = dlse.contiguous()
    key = (signature(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k), left, right, seqlen_q, seqlen_k,
           deterministic)
    decision = _decision(q.device, overrides, key, (softcap > 0, alibi_slopes is not None),
                         q, k, v, dout, left, right, varlen, batch, seqlen_q, seqlen_k, deterministic, softcap,
                         alibi_slopes)
    if grads is None:
        grads = (alloc(q, memory_format=torch.contiguous_format), alloc(k, memory_format=torch.contiguous_format),
                 alloc(v, memory_format=torch.contiguous_format))
    if decision.dq_groups > 1:   # rule bwd.head_groups: kv heads in groups, each with its query heads
        return _attn_bwd_groups(decision.dq_groups, grads, dout, dlse, q, k, v, out, lse, scale, left, right,
                                cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, deterministic, softcap,
                                alibi_slopes, overrides, varlen)
    gluon = decision.bwd == "gluon"
    # dQ summed in fp32 by the dK/dV pass (decision.dq "fused"): by TMA reduce-add in the Gluon kernel, or by the
    # Triton kernel's atomics, into zeros the preprocess writes (rows no key block visits stay 0)
    fused = decision.dq == "fused"
    dq = dq_accumulator(q.shape, q.device) if fused else grads[0]
    dk, dv = grads[1], grads[2]
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse) if gluon else None   # the Gluon kernel's base-2 LSE, from the preprocess or dQ pass
    lse_strides = _lse_strides(lse, varlen)
    cfg, cfg_dq = decision.dkdv_tiles, decision.dq_tiles
    num_n = triton.cdiv(seqlen_k, cfg.BLOCK_N)
    num_m = triton.cdiv(seqlen_q, cfg_dq.BLOCK_M)
    n_dkdv, n_dq = num_n * batch * nheads_k, num_m * batch * nheads
    one_launch = decision.dq == "one_launch"
    # a split backward runs its dQ pass first, which does the preprocess's work for its rows on the way (Delta,
    # Lse2) for the dK/dV pass after it: one launch and one read of dO fewer (docs/perf-notes.md, session 17)
    dq_first = decision.dq == "split"
    rows = q.shape[0] if varlen else seqlen_q
    pre_block = decision.pre_block
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
        if gluon:   # dQ (unscaled) reduce-added by TMA inside the dK/dV kernel
            flash_bwd_hopper.attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale, causal=right == 0, key=key, dq_acc=dq,
                                      launch=decision.bwd_gluon)
            return torch.mul(dq, scale, out=grads[0]), dk, dv
        launch("dkdv", n_dkdv, cfg)
        return grads[0].copy_(dq), dk, dv
    if one_launch:
        launch("both", n_dkdv + n_dq, cfg)   # the dK/dV parameters' warps and stages for both kinds
        return dq, dk, dv
    launch("dq", n_dq, cfg_dq, preprocess=True)
    if gluon:
        flash_bwd_hopper.attn_bwd(q, k, v, dout, lse2, delta, dk, dv, scale, causal=right == 0, key=key,
                                  launch=decision.bwd_gluon)
    else:
        launch("dkdv", n_dkdv, cfg)
    return dq, dk, dv


def _attn_bwd_groups(groups, grads, dout, dlse, q, k, v, out, lse, scale, left, right, cu_seqlens_q, cu_seqlens_k,
                     max_seqlen_q, max_seqlen_k, deterministic, softcap, alibi_slopes, overrides, varlen):
    """attn_bwd over `groups` groups of kv heads, each with its query heads: head-sliced views of every input
    (rows_view_ok holds for them, so the Gluon kernels still take them) and of the caller's gradients, which
    each group's launches write into; the group's own allocations (the fp32 dQ accumulator, delta, its LSE) are
    1/groups of the whole."""
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    hk = nheads_k // groups
    hq = hk * (nheads // nheads_k)
    dq, dk, dv = grads
    # the LSE's heads: (B, H, N) batch, (H, total) varlen; (..., H, D) tensors; ALiBi slopes (H,) or (B, H)
    lse_heads = (lambda t, s: t[s]) if varlen else (lambda t, s: t[:, s])
    heads = lambda t, s: t[..., s, :]   # noqa: E731
    for g in range(groups):
        sq, sk = slice(g * hq, (g + 1) * hq), slice(g * hk, (g + 1) * hk)
        attn_bwd(heads(dout, sq), None if dlse is None else lse_heads(dlse, sq), heads(q, sq), heads(k, sk),
                 heads(v, sk), heads(out, sq), lse_heads(lse, sq), scale, left, right, cu_seqlens_q, cu_seqlens_k,
                 max_seqlen_q, max_seqlen_k, deterministic, softcap,
                 None if alibi_slopes is None else alibi_slopes[..., sq], overrides,
                 grads=(heads(dq, sq), heads(dk, sk), heads(dv, sk)))
    return dq, dk, dv
