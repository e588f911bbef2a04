"""The launch policy: which kernel runs the forward and the backward of given inputs on a given machine, with
which tiles, and how the backward gets dQ. The one place that decides it.

``choose(machine, problem, overrides)`` is a pure function of its three arguments (all immutable and hashable)
and returns a ``Decision``. ``kernels/launch.py`` builds the arguments (the device queries, the Triton version
gate of ``kernels/dispatch.py``, the tensors' facts), calls ``choose`` once per new key and acts on the decision.
Nothing here queries a device, reads the environment or keeps state: tests call ``choose`` with any machine.

The rules are data: ``RULES`` lists every rule, ordered within its stage (the first that fires wins), each with the
kernel or tiles it picks, its condition in words and in code, and the measurement that chose it. The tile tables
below are the data the tile rules read. ``Decision.rules`` names the rules that fired.

Overrides (tests, benchmarks, sweeps) are an ``Overrides`` value passed to ``choose``; ``DEFAULT`` is none.
``kernels/launch.py``'s ``override_*`` helpers put one in force for a with-block.
"""
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int       # query rows per tile
    BLOCK_N: int       # key rows per tile
    num_warps: int
    num_stages: int
    counted: bool = False  # dK/dV pass only: its query loop as range(n_tiles) (flash_bwd.py says why)


def _frozen(table: dict) -> MappingProxyType:
    return MappingProxyType({k: _frozen(v) if isinstance(v, dict) else v for k, v in table.items()})


# ---------------------------------------------------------------------------------------------------------------
# Tile tables (read by the tile rules in RULES)
# ---------------------------------------------------------------------------------------------------------------

# Launch parameters per (pass, padded head dim) for Hopper, from `make bench ARGS=--sweep` on an H100
# (docs/perf-notes.md has the numbers). The backward dK/dV pass holds a BLOCK_N key tile and walks BLOCK_M query
# rows; the dQ pass holds BLOCK_M query rows and walks BLOCK_N keys. "dkdv_fused": the atomic-dQ variant of the
# dK/dV pass (it holds a dQ tile too), from the dK/dV pass's parameters; on the H100 the sweep at d128 16K kept
# them without the mask and chose 2 stages with it (docs/bench/h100-atomic-dq-2026-11-25.txt).
SM90 = _frozen({
    "fwd": {64: KernelConfig(128, 64, 8, 4), 128: KernelConfig(128, 64, 8, 4), 256: KernelConfig(64, 64, 8, 2)},
    "dkdv": {64: KernelConfig(64, 128, 8, 3, counted=True), 128: KernelConfig(64, 128, 8, 2, counted=True),
             256: KernelConfig(32, 64, 8, 1)},
    "dq": {64: KernelConfig(128, 64, 8, 3), 128: KernelConfig(128, 64, 8, 3), 256: KernelConfig(64, 32, 8, 1)},
    "dkdv_fused": {64: KernelConfig(64, 128, 8, 3), 128: KernelConfig(64, 128, 8, 2), 256: KernelConfig(32, 64, 8, 1)},
})
# Where the best parameters differ without the causal mask (same sweep): {(pass, padded head dim): config}.
SM90_NONCAUSAL = _frozen({("dkdv", 128): KernelConfig(64, 128, 8, 3, counted=True),
                          ("dkdv_fused", 128): KernelConfig(64, 128, 8, 3)})
# Up to a sequence length, beside the Gluon dK/dV kernel (the only path that asks with a length):
# {(pass, padded head dim, causal): (longest seqlen, config)}.
# d64 dQ with 64-row tiles and 4 warps, H200 fp16, fwd+bwd TFLOP/s against the 128-row entry
# (docs/bench/h200-d64-short-sweep-fp16-2026-11-30o.json): causal 1K 228 vs 220, 2K 280 vs 272, 4K 316 vs 303;
# full 1K 302 vs 293, 2K 330 vs 324, 4K 353 vs 342; at full 8K behind. Causal 8K and 16K with the dQ pass run
# first (session 17, h200-d64-dq-8k-sweep-fp16-2026-11-30q.txt): 341 vs 333, 362 vs 354.
SM90_SHORT = _frozen({("dq", 64, True): (16384, KernelConfig(64, 64, 4, 3)),
                      ("dq", 64, False): (4096, KernelConfig(64, 64, 4, 3))})
# Ampere / Ada and anything else before Hopper: less shared memory, so shallower pipelines.
GENERIC = _frozen({
    "fwd": {64: KernelConfig(128, 64, 4, 2), 128: KernelConfig(128, 32, 8, 2), 256: KernelConfig(64, 32, 8, 1)},
    "dkdv": {64: KernelConfig(32, 128, 8, 2), 128: KernelConfig(32, 64, 8, 2), 256: KernelConfig(16, 32, 8, 1)},
    "dq": {64: KernelConfig(64, 64, 8, 2), 128: KernelConfig(64, 32, 8, 2), 256: KernelConfig(32, 32, 8, 1)},
    "dkdv_fused": {64: KernelConfig(32, 128, 8, 2), 128: KernelConfig(32, 64, 8, 2), 256: KernelConfig(16, 32, 8, 1)},
})
# fp32 inputs use full-precision (non-tf32) dots: smaller tiles; padded head dims above 128 FP32_LARGE.
FP32 = _frozen({"fwd": KernelConfig(64, 32, 4, 2), "dkdv": KernelConfig(32, 64, 4, 2), "dq": KernelConfig(64, 32, 4, 2),
                "dkdv_fused": KernelConfig(32, 64, 4, 2)})
FP32_LARGE = KernelConfig(32, 32, 4, 1)
# The interpreter runs each program in numpy; small tiles exercise every masked / unmasked path on the short
# sequences the CPU tests can afford.
INTERPRETER = KernelConfig(32, 16, 1, 1)

# The forward with TMA loads for dense whole-tile inputs (kernels/flash_fwd_tma.py): on Hopper, bf16/fp16, at
# these (head dim, causal) up to the length given, with these tiles: {(head dim, causal): (longest seqlen, config)}.
TMA_FWD = _frozen({(64, True): (4096, KernelConfig(64, 64, 4, 2)), (64, False): (2048, KernelConfig(128, 64, 8, 3))})

# The Gluon kernels' launch parameters per head dim (kernels/flash_fwd_hopper.py, kernels/flash_bwd_hopper.py):
# forward (BLOCK_N, STAGES), key rows per tile and slots in the ring (H200, docs/perf-notes.md); dK/dV
# (BLOCK_M, STAGES), query rows per tile and ring slots (H200: 32-row tiles 5-9% slower, 3 slots level with 2 at
# d128; docs/perf-notes.md).
GLUON_FWD_LAUNCH = _frozen({64: (128, 3), 128: (128, 3)})
GLUON_BWD_LAUNCH = _frozen({64: (64, 3), 128: (64, 2)})

# What the Gluon kernels implement (kernels/hopper.py): bf16/fp16, these head dims, the batch layout with
# seqlen_q == seqlen_k a multiple of SEQ_MULTIPLE (two warpgroups of 64 rows), full or causal attention.
GLUON_HEAD_DIMS = (64, 128)
SEQ_MULTIPLE = 128
# The shortest sequence (causal or not) whose forward the Gluon kernel runs, per head dim.
GLUON_FWD_MIN_SEQLEN = _frozen({64: 4096, 128: 128})
# Causal sequences shorter than this run the Triton backward (the Gluon forward has its own rule above).
GLUON_BWD_MIN_CAUSAL_SEQLEN = 1024
# Head dims at which the Gluon backward takes dQ too when the caller allows a non-deterministic dQ.
FUSED_DQ_HEAD_DIMS = (64, 128)
# The fused dQ's fp32 accumulator (rows x heads x head dim x 4 bytes) at most this large per launch: past it the
# backward runs over groups of kv heads (rule bwd.head_groups), each with its own accumulator, writing into the
# caller's full dQ/dK/dV. GPT-2 124M at 1M tokens (12 heads of 64): 3 GiB in one launch, 0.5 GiB in 6 groups.
DQ_ACC_MAX_BYTES = 512 << 20
# The deterministic backward as one launch when its grid is at most this many waves of one program per SM.
ONE_LAUNCH_MAX_WAVES = 16
GLUON_PASSES = ("fwd", "dkdv")
TILE_PASSES = ("fwd", "dkdv", "dq", "dkdv_fused")


# ---------------------------------------------------------------------------------------------------------------
# The three arguments of choose()
# ---------------------------------------------------------------------------------------------------------------

class Machine(NamedTuple):
    """The device and the Triton installed, as the rules see them (kernels/launch.py fills it in)."""
    kind: str                  # "cuda", or "cpu" (CPU tensors: the Triton kernels in Triton's interpreter)
    major: int = 0             # compute capability's major number (0 on CPU)
    num_sms: int = 0
    interpret: bool = False    # TRITON_INTERPRET=1: the Gluon kernels never run (Gluon has no interpreter)
    gluon: bool = False        # the Gluon kernels load, with a Triton they were tested on (dispatch.TESTED_TRITON)
    tma_fwd_tested: bool = False   # this Triton is one "TMA forward by default" was tested on
    tma_reduce: bool = False   # Gluon builds the TMA reduce-add (kernels/hopper.py HAS_TMA_REDUCE)
    tensor_descriptor: bool = True  # triton.tools.tensor_descriptor exists (Triton >= 3.4)


class Problem(NamedTuple):
    """The inputs of one attention call, as the rules see them (kernels/launch.py fills it in)."""
    dtype: torch.dtype
    head_dim: int
    seqlen_q: int              # batch: N_q; varlen: max_seqlen_q
    seqlen_k: int
    left: int = -1             # window (kernels/mask.py): -1 unbounded; (-1, 0) causal
    right: int = -1
    varlen: bool = False
    batch: int = 1             # varlen: documents
    nheads: int = 1
    nheads_k: int = 1
    rows_ok: bool = True       # q, k, v each readable as a (B * N, H * D) row view (flash_fwd_tma.rows_view_ok)
    dout_rows_ok: bool = True  # dO too (the Gluon backward reads it by TMA)
    deterministic: bool = True
    softcap: bool = False      # softcap > 0
    alibi: bool = False        # alibi_slopes given
    rows: int = 0              # q's rows in all (batch: B * N_q; varlen: total); 0: not known (one head group)


class Overrides(NamedTuple):
    """Forced choices (tests, benchmarks, sweeps); DEFAULT forces nothing."""
    gluon_passes: frozenset = frozenset(GLUON_PASSES)   # passes the Gluon kernels may take
    tma_fwd: bool | None = None       # True: the TMA forward wherever it takes the inputs; False: never; None: rule
    atomic_dq: bool = False           # deterministic=False: the Triton atomic dQ where the Gluon kernel does not run
    one_launch: bool | None = None    # the Triton backward in one launch (True) or two (False); a request for it
    configs: tuple = ()               # ((pass, KernelConfig), ...): forced Triton tiles, passes in TILE_PASSES
    gluon_fwd_launch: tuple | None = None   # the Gluon forward's (BLOCK_N, STAGES) at every head dim
    gluon_bwd_launch: tuple | None = None   # the Gluon dK/dV kernel's (BLOCK_M, STAGES) at every head dim
    gluon_fwd_min_seqlen: tuple | None = None   # ((head dim, shortest seqlen), ...) instead of GLUON_FWD_MIN_SEQLEN
    dq_acc_max_bytes: int | None = None   # instead of DQ_ACC_MAX_BYTES (tests: a few bytes, to split any backward)

    def config(self, pass_name: str) -> KernelConfig | None:
        for name, cfg in self.configs:
            if name == pass_name:
                return cfg
        return None

    def with_configs(self, **configs: KernelConfig) -> "Overrides":
        """These passes' tiles forced on top of the ones already forced."""
        merged = dict(self.configs)
        merged.update(configs)
        return self._replace(configs=tuple(sorted(merged.items())))


DEFAULT = Overrides()


class Decision(NamedTuple):
    """What runs. fwd_tiles: the Triton or TMA forward's tiles (None beside the Gluon forward, whose launch is
    fwd_gluon). The backward: the dK/dV kernel (bwd), how dQ is computed (dq), the Triton kernel's tiles for its
    dK/dV and dQ programs (passed to every Triton backward launch, whichever programs it runs), the Gluon dK/dV
    kernel's launch, and the preprocess kernel's rows per program."""
    fwd: str                   # "tma" | "gluon" | "triton"
    fwd_tiles: KernelConfig | None
    fwd_gluon: tuple | None    # (BLOCK_N, STAGES)
    bwd: str                   # "gluon" | "triton"
    dq: str                    # "split": the dQ pass first, then dK/dV | "one_launch": both in one grid |
                               # "fused": summed in fp32 by the dK/dV kernel (Gluon: TMA reduce-add; Triton: atomics)
    dkdv_tiles: KernelConfig
    dq_tiles: KernelConfig
    bwd_gluon: tuple | None    # (BLOCK_M, STAGES)
    pre_block: int
    rules: tuple               # names of the rules in RULES that fired
    dq_groups: int = 1         # the backward over this many groups of kv heads, one launch set each (bwd.head_groups)


# ---------------------------------------------------------------------------------------------------------------
# The rules' conditions
# ---------------------------------------------------------------------------------------------------------------

HALF = (torch.float16, torch.bfloat16)


def head_dim_pad(head_dim: int) -> int:
    """The kernels' padded head dim: the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _mods(p: Problem) -> bool:
    return p.softcap or p.alibi


def gluon_allowed(m: Machine, o: Overrides, pass_name: str) -> bool:
    """The Gluon kernel may take this pass here: a GPU, not the interpreter, the pass not turned off nor its Triton
    tiles forced, the Gluon kernels loaded with a tested Triton."""
    return (m.kind == "cuda" and not m.interpret and pass_name in o.gluon_passes and o.config(pass_name) is None
            and m.gluon)


def gluon_shapes(p: Problem, min_causal: int | None = None, with_dout: bool = False) -> bool:
    """The inputs the Gluon kernels take, the device aside (kernels/hopper.py): causal ones from min_causal tokens
    (None: GLUON_BWD_MIN_CAUSAL_SEQLEN, the backward's rule)."""
    if min_causal is None:
        min_causal = GLUON_BWD_MIN_CAUSAL_SEQLEN
    return (not p.varlen and p.dtype in HALF and p.head_dim in GLUON_HEAD_DIMS and p.seqlen_q == p.seqlen_k
            and p.seqlen_q % SEQ_MULTIPLE == 0 and p.left < 0
            and (p.right == -1 or (p.right == 0 and p.seqlen_q >= min_causal))
            and p.rows_ok and (not with_dout or p.dout_rows_ok))


def gluon_fwd_length_ok(head_dim: int, seqlen: int, o: Overrides = DEFAULT) -> bool:
    """The Gluon forward's own length rule (GLUON_FWD_MIN_SEQLEN, or the override's)."""
    table = GLUON_FWD_MIN_SEQLEN if o.gluon_fwd_min_seqlen is None else dict(o.gluon_fwd_min_seqlen)
    shortest = table.get(head_dim)
    return shortest is not None and seqlen >= shortest


def gluon_fwd_launch(head_dim: int, o: Overrides = DEFAULT) -> tuple:
    return o.gluon_fwd_launch or GLUON_FWD_LAUNCH[head_dim]


def gluon_bwd_launch(head_dim: int, o: Overrides = DEFAULT) -> tuple:
    return o.gluon_bwd_launch or GLUON_BWD_LAUNCH[head_dim]


def fuses_dq(head_dim: int, tma_reduce: bool, o: Overrides = DEFAULT) -> bool:
    """The Gluon backward computes dQ too at this head dim: the dQ product needs 64-row tiles, the TMA reduce-add a
    Triton that builds it."""
    return tma_reduce and head_dim in FUSED_DQ_HEAD_DIMS and gluon_bwd_launch(head_dim, o)[0] >= 64


def tma_shapes(m: Machine, p: Problem, block_m: int, block_n: int) -> bool:
    """The inputs the TMA forward takes with these tiles (kernels/flash_fwd_tma.py): dense whole-tile batch inputs,
    no window but the causal one, on a GPU with TMA (Hopper on) or in the interpreter."""
    n = p.seqlen_q
    return (m.tensor_descriptor and not p.varlen and p.left < 0 and p.right in (-1, 0)
            and (m.kind != "cuda" or m.major >= 9) and p.dtype in HALF and p.head_dim in GLUON_HEAD_DIMS
            and p.seqlen_k == n and n % block_m == 0 and n % block_n == 0 and block_m % block_n == 0 and p.rows_ok)


def tiles(m: Machine, o: Overrides, pass_name: str, d_pad: int, dtype: torch.dtype, causal: bool,
          seqlen: int | None = None) -> tuple:
    """(config, rule name): the Triton tiles of one pass, from the first tile rule in RULES that fires. seqlen is
    given only beside the Gluon dK/dV kernel (SM90_SHORT)."""
    ask = (pass_name, d_pad, dtype, causal, seqlen)
    for rule in TILE_RULES:
        if rule.applies(m, o, ask):
            return rule.pick(m, o, ask), rule.name
    raise AssertionError("tiles.sm90 always applies")


def tma_tiles(m: Machine, o: Overrides, p: Problem) -> tuple:
    """(tiles, rule name) of the TMA forward where a rule picks it (its scope aside), else (None, None)."""
    causal = p.right == 0
    if o.tma_fwd is not None:
        if not o.tma_fwd:
            return None, None
        return tiles(m, o, "fwd", head_dim_pad(p.head_dim), p.dtype, causal)[0], "fwd.tma_forced"
    if o.config("fwd") is not None or m.kind != "cuda" or p.dtype == torch.float32 or m.major != 9:
        return None, None   # forced forward tiles name the pointer-load kernel's
    rule = TMA_FWD.get((p.head_dim, causal))
    if rule is not None and p.seqlen_q <= rule[0] and m.tma_fwd_tested:
        return rule[1], "fwd.tma"
    return None, None


def one_launch(m: Machine, o: Overrides, dtype: torch.dtype, dkdv: KernelConfig, dq: KernelConfig,
               programs: int) -> bool:
    """Rule dq.one_launch's test on these tiles and programs (the override, else sm_90 on, not fp32, warps and
    stages agreeing, at most ONE_LAUNCH_MAX_WAVES waves); the backward's other rules come first (choose)."""
    if o.one_launch is not None:
        return o.one_launch
    if (m.kind != "cuda" or dtype == torch.float32 or m.major < 9
            or (dkdv.num_warps, dkdv.num_stages) != (dq.num_warps, dq.num_stages)):
        return False
    return programs <= ONE_LAUNCH_MAX_WAVES * m.num_sms


def _fwd_tma(name):
    def applies(m, o, p):
        if _mods(p):
            return False
        cfg, why = tma_tiles(m, o, p)
        return why == name and tma_shapes(m, p, cfg.BLOCK_M, cfg.BLOCK_N)
    return applies


def _fwd_gluon(m, o, p):
    return (not _mods(p) and gluon_allowed(m, o, "fwd") and gluon_fwd_length_ok(p.head_dim, p.seqlen_q, o)
            and m.kind == "cuda" and m.major == 9 and gluon_shapes(p, min_causal=0))


def _bwd_gluon(m, o, p):
    return (not _mods(p) and gluon_allowed(m, o, "dkdv") and o.one_launch is None
            and m.kind == "cuda" and m.major == 9 and gluon_shapes(p, with_dout=True))


def _dq_fused_gluon(m, o, p):
    return not p.deterministic and _bwd_gluon(m, o, p) and fuses_dq(p.head_dim, m.tma_reduce, o)


def _dq_fused_triton(m, o, p):
    return not p.deterministic and not _bwd_gluon(m, o, p) and o.atomic_dq


def _dq_one_launch(m, o, p):
    if _dq_fused_gluon(m, o, p) or _dq_fused_triton(m, o, p) or _bwd_gluon(m, o, p):
        return False
    d_pad, causal = head_dim_pad(p.head_dim), p.right >= 0
    dkdv, _ = tiles(m, o, "dkdv", d_pad, p.dtype, causal)
    dq, _ = tiles(m, o, "dq", d_pad, p.dtype, causal)
    programs = (-(-p.seqlen_k // dkdv.BLOCK_N) * p.batch * p.nheads_k
                + -(-p.seqlen_q // dq.BLOCK_M) * p.batch * p.nheads)
    return one_launch(m, o, p.dtype, dkdv, dq, programs)


def dq_acc_bytes(p: Problem) -> int:
    """The fused dQ's fp32 accumulator for all of q's heads."""
    return p.rows * p.nheads * p.head_dim * 4


def dq_head_groups(p: Problem, o: Overrides = DEFAULT) -> int:
    """Rule bwd.head_groups's count: the fewest groups of kv heads (a divisor of nheads_k, so a query head's kv
    head is in its group) whose accumulator is at most the cap; nheads_k where none is."""
    cap = DQ_ACC_MAX_BYTES if o.dq_acc_max_bytes is None else o.dq_acc_max_bytes
    acc = dq_acc_bytes(p)
    return next((g for g in range(1, p.nheads_k + 1) if p.nheads_k % g == 0 and acc <= cap * g), p.nheads_k)


def _head_groups(m, o, p):
    return (_dq_fused_gluon(m, o, p) or _dq_fused_triton(m, o, p)) and dq_head_groups(p, o) > 1


def _always(*_):
    return True


# tile rules: conditions on (machine, overrides, (pass, padded head dim, dtype, causal, seqlen or None))
def _t_forced(m, o, a):
    return o.config(a[0]) is not None


def _t_interpreter(m, o, a):
    return m.kind != "cuda"


def _t_fp32(m, o, a):
    return a[2] == torch.float32


def _t_generic(m, o, a):
    return m.major < 9


def _t_short(m, o, a):
    short = SM90_SHORT.get((a[0], max(64, a[1]), a[3]))
    return a[4] is not None and short is not None and a[4] <= short[0]


def _t_noncausal(m, o, a):
    return not a[3] and (a[0], max(64, a[1])) in SM90_NONCAUSAL


class Rule(NamedTuple):
    name: str
    picks: str                 # the kernel (or tiles, or dQ mode) it picks
    when: str                  # its condition, in words
    measured: str              # the measurement that chose it
    applies: Callable          # its condition, in code
    pick: Callable | None = None   # tile rules: the tiles


FORWARD_RULES = (
    Rule("fwd.tma_forced", "the TMA forward (kernels/flash_fwd_tma.py) with the launch table's forward tiles "
         "(or override_configs' fwd)",
         "override_tma_fwd(True); no softcap/ALiBi; tma_shapes holds with those tiles (a GPU with TMA, sm_90 on, or "
         "the interpreter)", "an override (tests, make bench's ours_tma)", _fwd_tma("fwd.tma_forced")),
    Rule("fwd.tma", "the TMA forward with TMA_FWD's tiles, before the Gluon forward and instead of the pointer-load "
         "one",
         "sm_90, fp16/bf16, no softcap/ALiBi, no forced forward tiles, (head dim, causal) in TMA_FWD up to its "
         "length (d64: causal to 4K, full to 2K), a Triton tested for it (TESTED_TRITON 'TMA forward by "
         "default'), tma_shapes holds",
         "H200 fp16 d64, same runs (docs/perf-notes.md, session 17): causal 1K / 2K 303 / 344 vs pointer-load "
         "262 / 307, causal 4K level with the Gluon forward (364 vs 360, 359 vs 353); no mask 1K / 2K 376 / 393 "
         "vs 360 / 386, behind the Gluon forward from 4K. Not at d128, where the Gluon forward runs from 128 "
         "tokens and this kernel was not measured against it", _fwd_tma("fwd.tma")),
    Rule("fwd.gluon", "the warp-specialized Gluon forward (kernels/flash_fwd_hopper.py), GLUON_FWD_LAUNCH",
         "sm_90, not the interpreter, Gluon loaded with a tested Triton, 'fwd' in the Gluon passes, no forced "
         "forward tiles, no softcap/ALiBi, gluon_shapes (causal from any length), from GLUON_FWD_MIN_SEQLEN "
         "tokens (d64 4K, d128 128)",
         "H200, same run (docs/bench/h200-fwd-short-2026-11-29n.json): d128 this kernel is ahead from 1K on "
         "(causal 1K 345 vs 270 TFLOP/s, full 475 vs 382); d64 the Triton one is ahead at 1K-2K (causal 2K 329 "
         "vs 312, full 1K 380 vs 339) and level or behind from 4K on (causal 4K 363 vs 373, full 16K 409 vs 441)",
         _fwd_gluon),
    Rule("fwd.triton", "the portable Triton forward (kernels/flash_fwd.py)", "everything else",
         "the kernel with every feature (varlen, windows, softcap, ALiBi, any head dim and dtype)", _always),
)
BACKWARD_RULES = (
    Rule("bwd.gluon", "the warp-specialized Gluon dK/dV kernel (kernels/flash_bwd_hopper.py), GLUON_BWD_LAUNCH; "
         "dQ by the Triton dQ pass run first, or fused (dq.fused_gluon)",
         "sm_90, not the interpreter, Gluon loaded with a tested Triton, 'dkdv' in the Gluon passes, no forced "
         "dK/dV tiles, no forced launch shape (override_one_launch), no softcap/ALiBi, gluon_shapes with dO, "
         "causal from GLUON_BWD_MIN_CAUSAL_SEQLEN (1K) tokens",
         "faster than the Triton dK/dV kernel (its pipeline syncs all warps twice per query tile: ncu, "
         "docs/perf-notes.md); at causal 1K too (H200, B 16, GPU time per fwd+bwd: d128 0.851 vs 0.944 ms, d64 "
         "1.080 vs 1.162 ms; docs/bench/h200-1k-candidates-2026-11-30l.txt). Shorter causal lengths not measured",
         _bwd_gluon),
    Rule("bwd.triton", "the Triton backward kernel (kernels/flash_bwd.py)", "everything else",
         "the kernel with every feature", _always),
)
DQ_RULES = (
    Rule("dq.fused_gluon", "dQ summed in fp32 inside the Gluon dK/dV kernel by TMA reduce-add (five products per "
         "tile), no dQ pass",
         "bwd.gluon, deterministic=False, head dim in FUSED_DQ_HEAD_DIMS, the Gluon kernel's BLOCK_M >= 64, a "
         "Triton that builds the TMA reduce-add",
         "H200, fwd+bwd against the dK/dV kernel plus the Triton dQ pass, same run: d64 full 16K 450 vs 371 "
         "TFLOP/s, causal 421 vs 367; d128 full 16K 526 vs 490, causal 16K 514 vs 478, causal 4K 439 vs 408 "
         "(docs/perf-notes.md, session 13)", _dq_fused_gluon),
    Rule("dq.fused_triton", "the Triton dK/dV pass's atomic fp32 dQ (FUSED_DQ), tiles 'dkdv_fused'",
         "override_atomic_dq(True), deterministic=False, not bwd.gluon",
         "off by default: slower than the deterministic split wherever measured (H100 d128 causal 16K fwd+bwd "
         "354 vs 400 TFLOP/s, docs/bench/h100-atomic-dq-2026-11-25.txt; H200 GPT-2's shape, d64 causal 8K: "
         "backward 0.95 vs 0.90 ms, docs/perf-notes.md)", _dq_fused_triton),
    Rule("dq.one_launch", "the Triton backward's dK/dV and dQ programs in one grid (PROGRAMS='both', the dK/dV "
         "tiles' warps and stages), after the preprocess",
         "not fused, not bwd.gluon; override_one_launch's value if set, else sm_90 on, not fp32, the two passes' "
         "tiles agree on warps and stages, at most ONE_LAUNCH_MAX_WAVES (16) waves of one program per SM",
         "H100, GPT-2 small's attention at 8K (B 1, H 12, d64 causal: 1536 programs, 11.6 waves) from 282 to 300 "
         "TFLOP/s fwd+bwd; the benchmark grid's points (31 waves) level within noise (docs/perf-notes.md)",
         _dq_one_launch),
    Rule("dq.split", "the deterministic split: the dQ pass first (doing the preprocess's work for its rows), then "
         "the dK/dV pass", "everything else",
         "one launch and one read of dO fewer than a preprocess launch first (docs/perf-notes.md, session 17)",
         _always),
)
GROUP_RULES = (
    Rule("bwd.head_groups", "the backward over dq_head_groups(problem) groups of kv heads (with their query heads), "
         "each launch set with its own fp32 dQ accumulator, into the caller's full dQ, dK, dV",
         "dQ fused (dq.fused_gluon or dq.fused_triton) and its accumulator for all heads larger than "
         "DQ_ACC_MAX_BYTES (512 MiB; GPT-2 124M from ~170K tokens)",
         "memory, not speed: E1 on the H200 (2026-12-04, docs/bench/h200-e1-2026-12-04), GPT-2 124M flash+plan at "
         "1M: the attention backward held 7.59 GiB at the step's peak (the 3 GiB fp32 accumulator and the bf16 dQ "
         "made from it, with dK, dV) against 4.55 GiB with the split dQ on the H100 (reports/e1_scaling), and "
         "the peak was 24.6 GiB against 21.8. 6 groups hold 0.5 GiB of accumulator: ~2.5 GiB less. Each group's "
         "grid at 1M is still 16K programs; the step time in groups is not measured yet", _head_groups),
    Rule("bwd.all_heads", "one launch set for all heads", "everything else", "the default", _always),
)
TILE_RULES = (
    Rule("tiles.forced", "override_configs' tiles for the pass", "the pass's tiles forced", "an override (tests, "
         "sweeps)", _t_forced, lambda m, o, a: o.config(a[0])),
    Rule("tiles.interpreter", "INTERPRETER (32x16, 1 warp, 1 stage)", "CPU tensors (Triton's interpreter)",
         "none: small tiles exercise every masked / unmasked path on the short sequences CPU tests can afford",
         _t_interpreter, lambda m, o, a: INTERPRETER),
    Rule("tiles.fp32", "FP32[pass] (padded head dim <= 128) or FP32_LARGE", "fp32 inputs on a GPU",
         "none: full-precision (non-tf32) dots need smaller tiles", _t_fp32,
         lambda m, o, a: FP32[a[0]] if a[1] <= 128 else FP32_LARGE),
    Rule("tiles.generic", "GENERIC[pass][max(64, padded head dim)]", "fp16/bf16 before sm_90 (Ampere, Ada)",
         "none: less shared memory than Hopper, so shallower pipelines", _t_generic,
         lambda m, o, a: GENERIC[a[0]][max(64, a[1])]),
    Rule("tiles.sm90_short", "SM90_SHORT's entry (d64 dQ: 64x64 tiles, 4 warps, 3 stages)",
         "sm_90 on, fp16/bf16, beside the Gluon dK/dV kernel (asked with a length), up to the entry's length "
         "(causal 16K, full 4K)",
         "H200 fp16 fwd+bwd (docs/bench/h200-d64-short-sweep-fp16-2026-11-30o.json): causal 1K 228 vs 220, 2K "
         "280 vs 272, 4K 316 vs 303; full 1K 302 vs 293, 2K 330 vs 324, 4K 353 vs 342; at full 8K behind. Causal "
         "8K and 16K with the dQ pass first (h200-d64-dq-8k-sweep-fp16-2026-11-30q.txt): 341 vs 333, 362 vs 354",
         _t_short, lambda m, o, a: SM90_SHORT[(a[0], max(64, a[1]), a[3])][1]),
    Rule("tiles.sm90_noncausal", "SM90_NONCAUSAL's entry (d128 dK/dV: 3 stages)", "sm_90 on, fp16/bf16, no causal "
         "mask (right < 0), an entry for the pass and head dim",
         "`make bench ARGS=--sweep` on an H100 (docs/perf-notes.md); dkdv_fused: "
         "docs/bench/h100-atomic-dq-2026-11-25.txt", _t_noncausal,
         lambda m, o, a: SM90_NONCAUSAL[(a[0], max(64, a[1]))]),
    Rule("tiles.sm90", "SM90[pass][max(64, padded head dim)]", "sm_90 on, fp16/bf16",
         "`make bench ARGS=--sweep` on an H100 (docs/perf-notes.md); dkdv_fused: "
         "docs/bench/h100-atomic-dq-2026-11-25.txt", _always, lambda m, o, a: SM90[a[0]][max(64, a[1])]),
)
RULES = FORWARD_RULES + BACKWARD_RULES + DQ_RULES + GROUP_RULES + TILE_RULES
RULE_NAMES = tuple(rule.name for rule in RULES)


_DQ_MODE = MappingProxyType({"dq.fused_gluon": "fused", "dq.fused_triton": "fused", "dq.one_launch": "one_launch",
                             "dq.split": "split"})


def _first(rules, m, o, p) -> Rule:
    for rule in rules:
        if rule.applies(m, o, p):
            return rule
    raise AssertionError("the last rule of each stage always applies")


def choose(machine: Machine, problem: Problem, overrides: Overrides = DEFAULT) -> Decision:
    """What runs the forward and the backward of `problem` on `machine` (module docstring). Pure."""
    m, p, o = machine, problem, overrides
    d_pad = head_dim_pad(p.head_dim)
    fired = []

    fwd_rule = _first(FORWARD_RULES, m, o, p)
    fired.append(fwd_rule.name)
    fwd_tiles = fwd_gluon = None
    if fwd_rule.name.startswith("fwd.tma"):
        fwd, (fwd_tiles, _) = "tma", tma_tiles(m, o, p)
    elif fwd_rule.name == "fwd.gluon":
        fwd, fwd_gluon = "gluon", gluon_fwd_launch(p.head_dim, o)
    else:   # the pointer-load forward's tiles take any window to the right as "causal" (no SM90 entry tells apart)
        fwd = "triton"
        fwd_tiles, why = tiles(m, o, "fwd", d_pad, p.dtype, p.right >= 0)
        fired.append("fwd:" + why)

    bwd_rule, dq_rule, group_rule = (_first(BACKWARD_RULES, m, o, p), _first(DQ_RULES, m, o, p),
                                     _first(GROUP_RULES, m, o, p))
    fired += [bwd_rule.name, dq_rule.name, group_rule.name]
    gluon = bwd_rule.name == "bwd.gluon"
    fused = dq_rule.name.startswith("dq.fused")
    dkdv_tiles, why = tiles(m, o, "dkdv_fused" if fused else "dkdv", d_pad, p.dtype, p.right >= 0)
    fired.append("dkdv:" + why)
    if fused:
        dq_tiles = dkdv_tiles
    else:
        dq_tiles, why = tiles(m, o, "dq", d_pad, p.dtype, p.right >= 0, max(p.seqlen_q, p.seqlen_k) if gluon else None)
        fired.append("dq:" + why)
    return Decision(fwd=fwd, fwd_tiles=fwd_tiles, fwd_gluon=fwd_gluon, bwd="gluon" if gluon else "triton",
                    dq=_DQ_MODE[dq_rule.name], dkdv_tiles=dkdv_tiles, dq_tiles=dq_tiles,
                    bwd_gluon=gluon_bwd_launch(p.head_dim, o) if gluon else None,
                    pre_block=64 if m.kind == "cuda" else 32, rules=tuple(fired),
                    dq_groups=dq_head_groups(p, o) if group_rule.name == "bwd.head_groups" else 1)
