"""kernels/policy.py, the one place that decides which kernel runs: it reproduces the decisions the launchers made
before it (tests/data/launch_policy_decisions.json), each rule fires for its condition and not just outside it, and
overrides are scoped values passed to a pure choose().

The fixture was recorded on the tree before kernels/policy.py existed (commit 0a505e8), by driving that
kernels/launch.py's attn_fwd and attn_bwd with the stand-in tensors below (shape, strides, dtype, device, data
pointer), every launch replaced by a recorder and the device queries mocked (launch._capability, _num_sms,
_gluon_loaded, INTERPRET, triton.__version__ for kernels/dispatch.py's gate, HAS_TMA_REDUCE, TensorDescriptor,
and that tree's hopper._is_hopper / flash_fwd_tma._has_tma). Nothing ran on a GPU: what a GPU's queries return is
the fixture's `envs`. The fixture's `doc` says how to read it.
"""
import contextlib
import dataclasses
import itertools
import json
import types
import warnings
from pathlib import Path

import pytest
import torch
import triton

import kernels.launch as launch
from kernels import dispatch, flash_fwd_tma, hopper, policy
from kernels.policy import DEFAULT, KernelConfig, Machine, Overrides, Problem

FIXTURE = json.loads((Path(__file__).parent / "data" / "launch_policy_decisions.json").read_text())
DIGITS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.int32: 4}


def grid_points(grid):
    """(point, recorded (forward launches, backward launches)) in the grid's product order."""
    names, codes = list(grid["axes"]), grid["decisions"]
    for i, values in enumerate(itertools.product(*(grid["axes"][n] for n in names))):
        entry = FIXTURE["table"][DIGITS.index(codes[2 * i]) * 62 + DIGITS.index(codes[2 * i + 1])]
        yield dict(zip(names, values)), tuple(entry)


def all_points():
    for grid in FIXTURE["grids"]:
        yield from grid_points(grid)


# --- the fixture's points as choose()'s arguments -----------------------------------------------------------------

def machine_of(env) -> Machine:
    cuda = env["device"] == "cuda"
    running = dispatch.version(env["triton"])
    gluon = cuda and not env["interpret"] and running in dispatch.TESTED_TRITON["Gluon kernels"]
    return Machine(env["device"], major=env["capability"][0] if cuda else 0, num_sms=env["sms"],
                   interpret=env["interpret"], gluon=gluon,
                   tma_fwd_tested=cuda and running in dispatch.TESTED_TRITON["TMA forward by default"],
                   tma_reduce=gluon and env["tma_reduce"], tensor_descriptor=env["tma_descriptor"])


def problem_of(point, deterministic=None) -> Problem:
    B, H, Hk = point["heads"]
    nq = point["n"]
    varlen, layout = point["varlen"], point["layout"]
    return Problem(DTYPES[point["dtype"]], point["hd"], nq, nq if point["kv"] == "same" else 2 * nq, *point["mask"],
                   varlen, B, H, Hk, rows_ok=not varlen and layout in ("dense", "dout"),
                   dout_rows_ok=not varlen and layout != "dout",
                   deterministic=point["det"] if deterministic is None else deterministic,
                   softcap=point["mods"] == "softcap", alibi=point["mods"] == "alibi")


def overrides_of(spec) -> Overrides:
    """The override helpers a fixture point names, as the Overrides value they put in force."""
    o = DEFAULT
    for helper, args in spec:
        if helper == "override_gluon":
            o = o._replace(gluon_passes=frozenset(args))
        elif helper == "override_atomic_dq":
            o = o._replace(atomic_dq=args[0])
        elif helper == "override_one_launch":
            o = o._replace(one_launch=args[0])
        elif helper == "override_tma_fwd":
            o = o._replace(tma_fwd=args[0])
        elif helper == "override_configs":
            o = o.with_configs(**{p: KernelConfig(*c[:4], counted=bool(c[4])) for p, c in args.items()})
        elif helper == "fwd_hopper.override_launch":
            o = o._replace(gluon_fwd_launch=tuple(args))
        elif helper == "bwd_hopper.override_launch":
            o = o._replace(gluon_bwd_launch=tuple(args))
        else:
            raise AssertionError(helper)
    return o


def _tiles(c: KernelConfig) -> str:
    return f"{c.BLOCK_M}x{c.BLOCK_N}w{c.num_warps}s{c.num_stages}"


def launches_of(d: policy.Decision) -> tuple[str, str]:
    """The launches kernels/launch.py makes on this decision, written as the fixture writes them."""
    fwd = {"tma": lambda: "M" + _tiles(d.fwd_tiles), "gluon": lambda: "G%ds%d" % d.fwd_gluon,
           "triton": lambda: "T" + _tiles(d.fwd_tiles)}[d.fwd]()
    gluon = d.bwd == "gluon"
    cfg, cfg_dq = d.dkdv_tiles, d.dq_tiles

    def triton_launch(programs, launch_cfg, flags=""):
        return (f"{programs}:{cfg.BLOCK_M}x{cfg.BLOCK_N}{'c' if cfg.counted else ''}/{cfg_dq.BLOCK_M}x{cfg_dq.BLOCK_N}"
                f"w{launch_cfg.num_warps}s{launch_cfg.num_stages}{flags}")
    if d.dq == "split":
        bwd = [triton_launch("dq", cfg_dq, "p" + ("l" if gluon else ""))]
        bwd.append("G%ds%d" % d.bwd_gluon if gluon else triton_launch("dkdv", cfg))
    else:
        fused = d.dq == "fused"
        bwd = [f"P{d.pre_block}" + ("z" if fused else "") + ("l" if gluon else "")]
        if fused:
            bwd.append("G%ds%dF" % d.bwd_gluon if gluon else triton_launch("dkdv", cfg, "F"))
        else:
            bwd.append(triton_launch("both", cfg))
    return fwd, "|".join(bwd)


def test_fixture_is_small_and_covers_the_grid():
    path = Path(__file__).parent / "data" / "launch_policy_decisions.json"
    assert path.stat().st_size < 300_000
    envs = {p["env"] for p, _ in all_points()}
    assert {"cpu", "sm80", "sm90", "sm100"} <= envs
    assert set(FIXTURE["overrides"]) == {p["override"] for p, _ in all_points()}
    assert sum(1 for _ in all_points()) > 100_000


def test_choose_reproduces_every_recorded_decision():
    # (a) every fixture point through policy.choose alone: its decision, acted on as kernels/launch.py acts on it,
    # gives the launches the pre-policy launchers made
    machines = {name: machine_of(env) for name, env in FIXTURE["envs"].items()}
    overrides = {name: overrides_of(spec) for name, spec in FIXTURE["overrides"].items()}
    wrong = []
    for point, (fwd, bwd) in all_points():
        m, o = machines[point["env"]], overrides[point["override"]]
        # the forward's launcher asks with deterministic=True and its own tensors; the backward's with its own
        got_fwd = launches_of(policy.choose(m, problem_of(point, deterministic=True), o))[0]
        got_bwd = launches_of(policy.choose(m, problem_of(point), o))[1]
        if (got_fwd, got_bwd) != (fwd, bwd):
            wrong.append((point, (fwd, bwd), (got_fwd, got_bwd)))
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:3]}"


def test_the_override_helpers_put_the_fixture_overrides_in_force():
    for name, spec in FIXTURE["overrides"].items():
        with override_context(spec):
            assert launch.active() == overrides_of(spec), name
        assert launch.active() == DEFAULT


# --- the launchers themselves on the fixture: stand-in tensors, mocked device queries, launches recorded ----------

class FT:
    """A stand-in tensor: shape, strides, dtype, device and a data pointer; nothing else."""

    def __init__(self, shape, dtype, device, strides=None, ptr=0):
        self.shape, self.dtype, self.device, self._ptr = tuple(shape), dtype, device, ptr
        self.is_cuda = device.type == "cuda"
        if strides is None:
            strides, acc = [], 1
            for n in reversed(self.shape):
                strides.append(acc)
                acc *= max(n, 1)
            strides = tuple(reversed(strides))
        self._strides = tuple(strides)

    def stride(self, i=None):
        return self._strides if i is None else self._strides[i]

    def data_ptr(self):
        return self._ptr

    def element_size(self):
        return SIZE[self.dtype]

    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def contiguous(self, memory_format=None):
        return FT(self.shape, self.dtype, self.device)

    def to(self, dtype):
        return FT(self.shape, dtype, self.device)

    def expand(self, *shape):
        return FT(shape, self.dtype, self.device)

    def clone(self, memory_format=None):
        return FT(self.shape, self.dtype, self.device)

    def copy_(self, other):
        return self


def _like(t, memory_format=None, dtype=None):
    return FT(t.shape, dtype or t.dtype, t.device)


# what kernels/launch.py calls of torch while it launches, for stand-in tensors
TORCH_SHIM = types.SimpleNamespace(
    zeros_like=_like, empty_like=_like, full=lambda shape, value, device=None, dtype=None: FT(shape, dtype, device),
    empty=lambda shape, dtype=None, device=None: FT(shape, dtype, device), mul=lambda a, s, out=None: out,
    float32=torch.float32, float16=torch.float16, bfloat16=torch.bfloat16, contiguous_format=torch.contiguous_format,
    device=torch.device, Tensor=torch.Tensor, cuda=torch.cuda)


def make_inputs(point, device):
    """(q, k, v, dout, cu_q, cu_k, max_q, max_k, alibi, softcap) stand-ins for a fixture point."""
    B, H, Hk = point["heads"]
    D, nq = point["hd"], point["n"]
    nk = nq if point["kv"] == "same" else 2 * nq
    dtype, layout = DTYPES[point["dtype"]], point["layout"]
    if point["varlen"]:
        q, dout = FT((B * nq, H, D), dtype, device), FT((B * nq, H, D), dtype, device)
        k, v = FT((B * nk, Hk, D), dtype, device), FT((B * nk, Hk, D), dtype, device)
        cu_q, cu_k, mq, mk = FT((B + 1,), torch.int32, device), FT((B + 1,), torch.int32, device), nq, nk
    else:
        def t(n, h):
            if layout == "heads":        # heads not adjacent: a (B, N, H, D) view of a (B, N, H, 2D) buffer
                return FT((B, n, h, D), dtype, device, strides=(n * h * 2 * D, h * 2 * D, 2 * D, 1))
            if layout == "misaligned":   # a data pointer off 16 bytes
                return FT((B, n, h, D), dtype, device, ptr=SIZE[dtype])
            return FT((B, n, h, D), dtype, device)
        q, k, v = t(nq, H), t(nk, Hk), t(nk, Hk)
        dout = (FT((B, nq, H, D), dtype, device, strides=(nq * H * 2 * D, H * 2 * D, 2 * D, 1))
                if layout == "dout" else FT((B, nq, H, D), dtype, device))
        cu_q = cu_k = mq = mk = None
    alibi = FT((H,), torch.float32, device) if point["mods"] == "alibi" else None
    return q, k, v, dout, cu_q, cu_k, mq, mk, alibi, 30.0 if point["mods"] == "softcap" else 0.0


class Recorder:
    """The launch spies: each appends what it would launch, as the fixture writes it."""

    def __init__(self):
        self.log = []

    def fwd(self, key, grid, *args, **kw):
        self.log.append(f"T{kw['BLOCK_M']}x{kw['BLOCK_N']}w{kw['num_warps']}s{kw['num_stages']}")

    def bwd_pre(self, key, grid, *args, **kw):
        self.log.append(f"P{kw['BLOCK_M']}" + ("z" if kw["ZERO_DQ"] else "") + ("l" if kw["WRITE_LSE2"] else ""))

    def bwd(self, key, grid, *args, **kw):
        self.log.append(
            f"{kw['PROGRAMS']}:{kw['BLOCK_M1']}x{kw['BLOCK_N1']}{'c' if kw['COUNTED'] else ''}/"
            f"{kw['BLOCK_M2']}x{kw['BLOCK_N2']}w{kw['num_warps']}s{kw['num_stages']}"
            + ("F" if kw["FUSED_DQ"] else "") + ("p" if kw["PREPROCESS"] else "") + ("l" if kw["WRITE_LSE2"] else ""))

    def tma(self, launcher, key, q, k, v, out, lse, scale, causal, cfg, precision):
        self.log.append("M" + _tiles(cfg))

    def gluon_fwd(self, q, k, v, out, lse, scale, causal, key, launch=None):
        self.log.append("G%ds%d" % launch)

    def gluon_bwd(self, q, k, v, dout, lse2, delta, dk, dv, scale, causal, key, dq_acc=None, launch=None):
        self.log.append("G%ds%d" % launch + ("F" if dq_acc is not None else ""))


def _patch(stack, obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    stack.callback(setattr, obj, name, old)


@contextlib.contextmanager
def environment(env, rec):
    """kernels/launch.py as it runs on this env's machine, its launches going to `rec`."""
    from kernels import flash_bwd_hopper, flash_fwd_hopper
    cap = tuple(env["capability"]) if env["capability"] else (0, 0)
    with contextlib.ExitStack() as stack, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj, name, value in [
                (launch, "torch", TORCH_SHIM), (launch, "INTERPRET", env["interpret"]),
                (launch, "_capability", lambda index: cap), (launch, "_num_sms", lambda index: env["sms"]),
                (triton, "__version__", env["triton"]), (dispatch, "_said_untested", [True]),
                (launch, "_gluon_loaded", lambda: dispatch.tested("Gluon kernels")),
                (launch, "flash_fwd_hopper", flash_fwd_hopper), (launch, "flash_bwd_hopper", flash_bwd_hopper),
                (hopper, "HAS_TMA_REDUCE", env["tma_reduce"]), (flash_bwd_hopper, "HAS_TMA_REDUCE", env["tma_reduce"]),
                (flash_fwd_tma, "TensorDescriptor", flash_fwd_tma.TensorDescriptor if env["tma_descriptor"] else None),
                (launch, "_FWD", rec.fwd), (launch, "_BWD", rec.bwd), (launch, "_BWD_PRE", rec.bwd_pre),
                (flash_fwd_tma, "attn_fwd", rec.tma), (flash_fwd_hopper, "attn_fwd", rec.gluon_fwd),
                (flash_bwd_hopper, "attn_bwd", rec.gluon_bwd)]:
            _patch(stack, obj, name, value)
        launch._clear_caches()
        stack.callback(launch._clear_caches)
        yield


def override_context(spec):
    """The override helpers a fixture point names, entered in order."""
    from kernels import flash_bwd_hopper, flash_fwd_hopper
    stack = contextlib.ExitStack()
    for helper, args in spec:
        if helper == "fwd_hopper.override_launch":
            stack.enter_context(flash_fwd_hopper.override_launch(*args))
        elif helper == "bwd_hopper.override_launch":
            stack.enter_context(flash_bwd_hopper.override_launch(*args))
        elif helper == "override_configs":
            stack.enter_context(launch.override_configs(
                **{p: KernelConfig(*c[:4], counted=bool(c[4])) for p, c in args.items()}))
        else:
            stack.enter_context(getattr(launch, helper)(*args))
    return stack


def run_point(point, env, rec):
    """What attn_fwd and attn_bwd launch for this point: (forward launches, backward launches)."""
    device = torch.device("cuda", 0) if env["device"] == "cuda" else torch.device("cpu")
    q, k, v, dout, cu_q, cu_k, mq, mk, alibi, softcap = make_inputs(point, device)
    left, right = point["mask"]
    rec.log.clear()
    launch.attn_fwd(q, k, v, 0.125, left, right, cu_q, cu_k, mq, mk, softcap, alibi)
    fwd = "|".join(rec.log)
    rec.log.clear()
    lse = FT((point["heads"][1], q.shape[0]) if point["varlen"] else (q.shape[0], q.shape[2], q.shape[1]),
             torch.float32, device)
    # the fixture predates rule bwd.head_groups (its largest points would take it): replayed with the cap off
    with launch.overriding(dq_acc_max_bytes=1 << 62):
        launch.attn_bwd(dout, None, q, k, v, _like(q), lse, 0.125, left, right, cu_q, cu_k, mq, mk, point["det"],
                        softcap, alibi)
    return fwd, "|".join(rec.log)


def test_the_launchers_make_every_recorded_launch():
    # the same points through kernels/launch.py's attn_fwd and attn_bwd (policy.choose inside, the overrides by
    # the helpers): the same kernels with the same tiles as before the policy existed
    rec, wrong, current, stack = Recorder(), [], None, None
    try:
        for point, recorded in all_points():
            if (point["env"], point["override"]) != current:   # env and override are each grid's first axes
                if stack is not None:
                    stack.close()
                current = (point["env"], point["override"])
                env = FIXTURE["envs"][point["env"]]
                stack = contextlib.ExitStack()
                stack.enter_context(environment(env, rec))
                stack.enter_context(override_context(FIXTURE["overrides"][point["override"]]))
            got = run_point(point, env, rec)
            if got != recorded:
                wrong.append((point, recorded, got))
    finally:
        if stack is not None:
            stack.close()
    assert not wrong, f"{len(wrong)} differ, e.g. {wrong[:3]}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors in the interpreter's path")
def test_stand_in_tensors_decide_as_real_ones():
    # the stand-ins carry what the decision reads of a tensor: real CPU tensors of the same layouts (views with heads
    # apart, a data pointer off 16 bytes, a strided dO) give the same launches through the same launchers
    rec = Recorder()

    def real(t):
        if t is None:
            return None
        if t.dtype == torch.int32:
            return torch.zeros(t.shape, dtype=torch.int32)
        if t.stride() != FT(t.shape, t.dtype, t.device).stride():
            return torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)[..., :t.shape[3]]
        if t.data_ptr():
            return torch.empty(t.numel() + 8, dtype=t.dtype)[1:1 + t.numel()].view(t.shape)
        return torch.empty(t.shape, dtype=t.dtype)
    checked = 0
    for i, (point, recorded) in enumerate(all_points()):
        if point["env"] != "cpu" or point["n"] > 1024 or i % 11:
            continue
        q, k, v, dout, cu_q, cu_k, mq, mk, alibi, softcap = make_inputs(point, torch.device("cpu"))
        q, k, v, dout, cu_q, cu_k, alibi = map(real, (q, k, v, dout, cu_q, cu_k, alibi))
        left, right = point["mask"]
        with contextlib.ExitStack() as stack:
            for obj, name, value in [(launch, "_FWD", rec.fwd), (launch, "_BWD", rec.bwd),
                                     (launch, "_BWD_PRE", rec.bwd_pre), (flash_fwd_tma, "attn_fwd", rec.tma)]:
                _patch(stack, obj, name, value)
            stack.enter_context(override_context(FIXTURE["overrides"][point["override"]]))
            rec.log.clear()
            out, lse = launch.attn_fwd(q, k, v, 0.125, left, right, cu_q, cu_k, mq, mk, softcap, alibi)
            fwd = "|".join(rec.log)
            rec.log.clear()
            launch.attn_bwd(dout, None, q, k, v, out, lse, 0.125, left, right, cu_q, cu_k, mq, mk, point["det"],
                            softcap, alibi)
        assert (fwd, "|".join(rec.log)) == recorded, point
        checked += 1
    assert checked > 500


# --- (b) each rule fires for its condition, and not just outside it ------------------------------------------------

H100 = Machine("cuda", major=9, num_sms=132, gluon=True, tma_fwd_tested=True, tma_reduce=True)
A100 = Machine("cuda", major=8, num_sms=108, gluon=True, tma_fwd_tested=True, tma_reduce=True)
CPU = Machine("cpu", interpret=True)
BF16 = torch.bfloat16


def prob(head_dim=64, n=4096, causal=True, **kw):
    return Problem(BF16, head_dim, n, n, -1, 0 if causal else -1, nheads=8, nheads_k=8, **kw)


# rule -> ((machine, problem, overrides) where it fires, the nearest case where it does not)
RULE_CASES = {
    "fwd.tma_forced": ((CPU, prob(n=128), Overrides(tma_fwd=True)),          # the interpreter's 32x16 tiles
                       (CPU, prob(n=144), Overrides(tma_fwd=True))),         # not whole 32-row tiles
    "fwd.tma": ((H100, prob(n=4096), DEFAULT), (H100, prob(n=4224), DEFAULT)),   # causal d64 up to 4K
    "fwd.gluon": ((H100, prob(n=4096, causal=False), DEFAULT),               # d64 from 4K (TMA: full up to 2K)
                  (H100, prob(n=3968, causal=False), DEFAULT)),
    "fwd.triton": ((H100, prob(n=3968, causal=False), DEFAULT), (H100, prob(n=4096, causal=False), DEFAULT)),
    "bwd.gluon": ((H100, prob(128, n=1024), DEFAULT), (H100, prob(128, n=896), DEFAULT)),   # causal from 1K
    "bwd.triton": ((H100, prob(128, n=896), DEFAULT), (H100, prob(128, n=1024), DEFAULT)),
    "dq.fused_gluon": ((H100, prob(n=1024, deterministic=False), DEFAULT),
                       (H100, prob(n=1024, deterministic=False), Overrides(gluon_bwd_launch=(32, 4)))),
    "dq.fused_triton": ((A100, prob(n=1024, deterministic=False), Overrides(atomic_dq=True)),
                        (A100, prob(n=1024, deterministic=True), Overrides(atomic_dq=True))),
    # d32 (the d64 tables, no Gluon kernel), B 1, H 8: 16 * ceil(N / 128) programs against 16 waves of 132 SMs
    "dq.one_launch": ((H100, prob(32, n=16896), DEFAULT), (H100, prob(32, n=16897), DEFAULT)),
    "dq.split": ((H100, prob(32, n=16897), DEFAULT), (H100, prob(32, n=16896), DEFAULT)),
    # the fused dQ's accumulator for all heads: 4096 rows x 8 heads x 64 x 4 bytes = 8 MiB, against the cap
    "bwd.head_groups": ((H100, prob(n=4096, deterministic=False, rows=4096), Overrides(dq_acc_max_bytes=(8 << 20) - 1)),
                        (H100, prob(n=4096, deterministic=False, rows=4096), Overrides(dq_acc_max_bytes=8 << 20))),
    "bwd.all_heads": ((H100, prob(n=4096, deterministic=True, rows=4096), Overrides(dq_acc_max_bytes=1)),
                      (H100, prob(n=4096, deterministic=False, rows=4096), Overrides(dq_acc_max_bytes=1))),
    "tiles.forced": ((A100, prob(), Overrides().with_configs(fwd=KernelConfig(64, 32, 4, 2))), (A100, prob(), DEFAULT)),
    "tiles.interpreter": ((CPU, prob(), DEFAULT), (A100, prob(), DEFAULT)),
    "tiles.fp32": ((A100, prob()._replace(dtype=torch.float32), DEFAULT), (A100, prob(), DEFAULT)),
    "tiles.generic": ((A100, prob(), DEFAULT), (H100._replace(gluon=False), prob(), DEFAULT)),
    "tiles.sm90_short": ((H100, prob(n=16384), DEFAULT), (H100, prob(n=16512), DEFAULT)),   # d64 dQ, causal to 16K
    "tiles.sm90_noncausal": ((H100, prob(128, n=1000, causal=False), DEFAULT), (H100, prob(128, n=1000), DEFAULT)),
    "tiles.sm90": ((H100._replace(gluon=False), prob(256), DEFAULT), (A100, prob(256), DEFAULT)),
}


def fired(decision, name):
    return any(r == name or r.endswith(":" + name) for r in decision.rules)


def test_every_rule_has_a_case_and_cites_what_chose_it():
    assert set(RULE_CASES) == set(policy.RULE_NAMES)
    for rule in policy.RULES:
        assert rule.picks and rule.when and rule.measured and callable(rule.applies)


@pytest.mark.parametrize("name", policy.RULE_NAMES)
def test_rule_fires_for_its_condition_only(name):
    inside, outside = RULE_CASES[name]
    assert fired(policy.choose(*inside), name), policy.choose(*inside).rules
    assert not fired(policy.choose(*outside), name), policy.choose(*outside).rules


def test_decisions_of_the_rules():
    # what the rules pick, in the decision's fields
    d = policy.choose(H100, prob(n=1024), DEFAULT)
    assert (d.fwd, d.fwd_tiles) == ("tma", KernelConfig(64, 64, 4, 2))
    assert (d.bwd, d.dq, d.bwd_gluon, d.dq_tiles) == ("gluon", "split", (64, 3), KernelConfig(64, 64, 4, 3))
    d = policy.choose(H100, prob(n=8192, deterministic=False), DEFAULT)
    assert (d.fwd, d.fwd_gluon, d.bwd, d.dq, d.pre_block) == ("gluon", (128, 3), "gluon", "fused", 64)
    d = policy.choose(CPU, prob(n=100, softcap=True), Overrides(tma_fwd=True, atomic_dq=True))
    assert (d.fwd, d.fwd_tiles, d.bwd, d.dq, d.pre_block) == ("triton", policy.INTERPRETER, "triton", "split", 32)
    d = policy.choose(CPU, prob(n=100, deterministic=False), Overrides(atomic_dq=True))
    assert d.dq == "fused" and d.dkdv_tiles == d.dq_tiles == policy.INTERPRETER


def test_head_groups_keep_each_accumulator_under_the_cap():
    # GPT-2 124M at 1M tokens: 12 heads of 64, 3 GiB of fp32 accumulator -> 6 groups of 2 heads, 0.5 GiB each
    gpt2 = Problem(BF16, 64, 1 << 20, 1 << 20, -1, 0, nheads=12, nheads_k=12, deterministic=False, rows=1 << 20)
    d = policy.choose(H100, gpt2)
    assert d.dq == "fused" and d.dq_groups == 6 and "bwd.head_groups" in d.rules
    assert policy.dq_acc_bytes(gpt2) / d.dq_groups <= policy.DQ_ACC_MAX_BYTES
    assert policy.choose(H100, gpt2._replace(deterministic=True)).dq_groups == 1   # no accumulator: one set
    assert policy.choose(H100, gpt2._replace(rows=1 << 17)).dq_groups == 1         # 128K: 384 MiB, under the cap
    # GQA: groups of whole kv heads (4 kv heads: 1, 2 or 4 groups), and no cap is ever below one kv head's share
    gqa = gpt2._replace(nheads=32, nheads_k=4, head_dim=128)
    assert policy.dq_head_groups(gqa, Overrides(dq_acc_max_bytes=policy.dq_acc_bytes(gqa) // 3)) == 4
    assert policy.dq_head_groups(gqa, Overrides(dq_acc_max_bytes=1)) == 4
    assert policy.dq_head_groups(gqa, Overrides(dq_acc_max_bytes=policy.dq_acc_bytes(gqa) // 2)) == 2


# --- (c) overrides are scoped values; choose() reads no state ---------------------------------------------------

def test_an_override_holds_for_its_block_only():
    p, cpu = prob(n=128), torch.device("cpu")
    assert launch.active() == DEFAULT
    with launch.override_tma_fwd(True):
        assert launch.active().tma_fwd is True
        assert launch.tma_fwd_config(cpu, BF16, 64, True, 128) == policy.INTERPRETER
        with launch.override_gluon(), launch.override_configs(fwd=KernelConfig(64, 32, 4, 2)):
            assert launch.active() == Overrides(tma_fwd=True, gluon_passes=frozenset()).with_configs(
                fwd=KernelConfig(64, 32, 4, 2))
        assert launch.active() == Overrides(tma_fwd=True)
    assert launch.active() == DEFAULT and launch.tma_fwd_config(cpu, BF16, 64, True, 128) is None
    # choose() is given the overrides: the ones in force do not reach it
    outside = policy.choose(CPU, p)
    with launch.override_tma_fwd(True), launch.override_atomic_dq(True), launch.override_one_launch(True):
        assert policy.choose(CPU, p) == outside
        assert policy.choose(CPU, p, launch.active()) != outside
    # an exception inside the block restores it too
    with pytest.raises(RuntimeError), launch.override_one_launch(False):
        raise RuntimeError
    assert launch.active() == DEFAULT
    with pytest.raises(ValueError, match="unknown fields"):
        with launch.overriding(gluon=False):
            pass


def test_the_launchers_take_overrides_per_call_and_from_the_block(monkeypatch):
    # on CPU (interpreter): the TMA forward under an override, the Triton one after the block; an explicit
    # overrides argument wins over the block's; each new key asks policy.choose once, a repeated one not at all
    rec, asked = Recorder(), []
    real_choose = policy.choose
    monkeypatch.setattr(policy, "choose", lambda *args: asked.append(args) or real_choose(*args))
    for obj, name, value in [(launch, "_FWD", rec.fwd), (flash_fwd_tma, "attn_fwd", rec.tma)]:
        monkeypatch.setattr(obj, name, value)
    launch._clear_caches()
    q = torch.empty(1, 128, 2, 64, dtype=BF16)

    def forward(**kw):
        rec.log.clear()
        launch.attn_fwd(q, q, q, 0.125, -1, 0, **kw)
        return rec.log[0][0]
    assert forward() == "T"
    with launch.override_tma_fwd(True):
        assert forward() == "M" and forward() == "M"
        assert forward(overrides=DEFAULT) == "T"
    assert forward() == "T"
    assert forward(overrides=Overrides(tma_fwd=True)) == "M"
    assert len(asked) == 2   # one per (machine, overrides, key): DEFAULT and tma_fwd=True
    launch._clear_caches()


def test_no_module_level_switch_is_left():
    # the old switches are gone; what module state is left is the decision caches (keyed by everything choose
    # reads, the overrides included) and launch.py's one value of the overrides in force
    for name in ("_overrides", "_tma_fwd", "_atomic_dq_triton", "_one_launch_override", "_gluon_passes", "_setting"):
        assert not hasattr(launch, name), name
    assert not hasattr(hopper, "LaunchChoice")
    from kernels import flash_bwd_hopper, flash_fwd_hopper
    for module in (flash_fwd_hopper, flash_bwd_hopper):
        assert isinstance(module.launch_config, types.FunctionType)
    mutable = (list, dict, set, bytearray)

    def mutable_globals(module):
        return {n for n, v in vars(module).items() if isinstance(v, mutable) and not n.startswith("__")}
    assert mutable_globals(policy) == set()
    for value in vars(policy).values():   # the tables are read-only
        if isinstance(value, types.MappingProxyType):
            with pytest.raises(TypeError):
                value["x"] = 1
    assert mutable_globals(launch) == {"_MACHINES", "_DECISIONS"}
    assert isinstance(launch.active(), Overrides)
    assert dataclasses.is_dataclass(KernelConfig) and KernelConfig.__dataclass_params__.frozen


def test_choose_is_pure():
    # the same arguments give the same decision whatever the process's state: overrides in force, caches, a
    # different Triton version string, CUDA queries that would fail
    cases = [case for pair in RULE_CASES.values() for case in pair]
    first = [policy.choose(*case) for case in cases]
    with contextlib.ExitStack() as stack:
        stack.enter_context(launch.override_gluon())
        stack.enter_context(launch.override_configs(fwd=KernelConfig(16, 16, 1, 1)))
        mp = stack.enter_context(pytest.MonkeyPatch.context())
        mp.setattr(triton, "__version__", "0.0.0")
        mp.setattr(torch.cuda, "get_device_capability", lambda *a: (_ for _ in ()).throw(RuntimeError("no GPU")))
        assert [policy.choose(*case) for case in cases] == first
    hash(tuple(cases))   # every argument is hashable (the launchers key their cache by them)
