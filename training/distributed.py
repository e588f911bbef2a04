"""Training over the processes of a torchrun job: the process group and (dp, cp) mesh, FSDP2, and what keeps
the job one run: each rank's share of the global batch, the loss weighted to the global mean, metrics reduced.

    torchrun --nproc_per_node=8 train.py parallel.cp=2      # FSDP over 8 ranks, 4 data-parallel groups of 2

Layout: a 2-D DeviceMesh ("dp", "cp") over the world, rank = dp_rank * cp + cp_rank, so the ranks of one
context-parallel ring are neighbours (on one node: NVLink). FSDP shards parameters, gradients and optimizer
state over the flattened dp x cp mesh, i.e. the whole world in rank order (torchtitan's `dp_shard_cp`): the cp
ranks of a dp group train the same rows, and would otherwise each hold the same replica.

Data: data.batch_size is the global batch. dp rank d takes rows [d B/dp, (d+1) B/dp) of the batch the one
process would draw (data/loader.py: take_rows), so a run at any dp is the one-process run, split; the cp ranks
of that group take the same rows, and each keeps its head-tail chunks (training/context_parallel.py).

Loss: FSDP averages gradients over the world, so rank r backpropagates loss_r * n_r * world / n (n_r: its
targets != -100, n: all ranks'), whose average is the gradient of the mean over every valid target of the
global batch, as one process computes it, however unevenly targets fall on ranks (a cp chunk may hold none).

One process without torchrun gets `Parallel()`: no process group, and every method here leaves the loop as it
was (the batch as drawn, the loss and metrics as computed).
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from data.loader import IGNORE_INDEX, take_rows


def world_size() -> int:
    """Processes in this job: the process group's when one exists, else torchrun's WORLD_SIZE (1 without)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def degrees(dp_shard: int, cp: int, world: int) -> tuple[int, int]:
    """(dp, cp) of the parallel config at this world size; dp_shard -1 is world / cp. validate() checks
    first that they multiply to the world."""
    return (world // cp if dp_shard == -1 else dp_shard), cp


@dataclass(frozen=True)
class Parallel:
    """Where this process sits in the job. The defaults are one process: rank 0 of a world of 1."""
    dp: int = 1
    cp: int = 1
    rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None        # ("dp", "cp")
    owns_group: bool = False              # the process group was made here, so it is destroyed here

    @property
    def world(self) -> int:
        return self.dp * self.cp

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only one that logs, prints and renames checkpoints."""
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp

    def cp_group(self):
        return self.mesh["cp"].get_group()

    def fsdp_mesh(self) -> DeviceMesh:
        """The flattened dp x cp mesh: every rank, in rank order. A 1-D mesh of the whole world runs on the
        default process group, so it is built with the public init_device_mesh instead of DeviceMesh._flatten."""
        return init_device_mesh(self.device.type, (self.world,), mesh_dim_names=("dp_cp",))

    def local_batch(self, batch: dict, pad: bool = False) -> dict:
        """This rank's part of a global loader batch: its dp group's rows, then its cp chunks of them.
        pad: the loader pads cu_seqlens to bucket lengths (its bucket_boundaries), so the rows' are too."""
        if not self.distributed:
            return batch
        rows = batch["input_ids"].shape[0] // self.dp
        local = take_rows(batch, self.dp_rank * rows, (self.dp_rank + 1) * rows, pad)
        if self.cp == 1:
            return local
        # imported here: context_parallel imports the kernels (Triton, fixing TRITON_INTERPRET at import);
        # validate() imports this module, and only a cp > 1 job needs them
        from .context_parallel import shard_batch
        return shard_batch(local, self.cp_rank, self.cp)

    def count_targets(self, targets: torch.Tensor) -> torch.Tensor | None:
        """The valid targets of the whole job's micro-batch (all-reduced on the device: no host sync), or None
        for one process. Known from the batch alone, so it is asked for before the forward."""
        if not self.distributed:
            return None
        n = (targets != IGNORE_INDEX).sum()
        dist.all_reduce(n)
        return n

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """value summed over the ranks (in place, and returned); one process: value."""
        if self.distributed:
            dist.all_reduce(value)
        return value

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """value summed over the ranks, divided by the world (share_of_loss's terms -> the global mean)."""
        return self.sum(value) / self.world if self.distributed else value

    def max(self, value: float) -> float:
        """The largest value over the ranks (peak memory: the job needs what its fullest rank needs)."""
        if not self.distributed:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def all(self, flag: bool) -> bool:
        """Whether flag holds on every rank: decisions that must be the same everywhere (skip a step, refuse a
        checkpoint), or the ranks would go separate ways and wait on each other forever."""
        if not self.distributed:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def broadcast(self, obj):
        """Rank 0's obj on every rank (a picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextlib.contextmanager
    def rank_zero_first(self):
        """Rank 0 runs the body, then the others do: a cache rank 0 fills (tokenizer, packed tokens) and the
        others then read, instead of every rank building it at once. The wait is a barrier, under the process
        group's timeout (by default 10 minutes under NCCL, 30 under gloo): a first data preparation longer than
        that is run once without torchrun. Rank 0 reaches the barrier even when its body fails, so the others
        do not wait forever."""
        if not self.main:
            self.barrier()
        try:
            yield
        finally:
            if self.main:
                self.barrier()


def init_distributed(dp_shard: int, cp: int, device: torch.device) -> Parallel:
    """This process's place in the job, its process group and mesh started; validate() has checked the degrees.

    Without torchrun (WORLD_SIZE unset or 1) and no process group: Parallel() on `device`, nothing started.
    Under torchrun: NCCL on cuda:LOCAL_RANK when `device` is CUDA, gloo on the CPU. A process group that exists
    already (a caller's: a test, a notebook) is used as it is, and left for that caller to destroy."""
    world = world_size()
    if world == 1:
        return Parallel(device=device)
    if device.type == "cuda":   # torchrun's LOCAL_RANK; a caller's group without it: one GPU per rank in order
        local = os.environ.get("LOCAL_RANK") or dist.get_rank() % torch.cuda.device_count()
        device = torch.device("cuda", int(local))
        torch.cuda.set_device(device)
    owns_group = not dist.is_initialized()
    if owns_group:
        # NVLink SHARP (NVLS) and symmetric-memory multicast need fabric setup that many hosts (VMs, MIG, some
        # drivers) lack, and fail at the first collective there: off unless the user asks for them
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    dp, cp = degrees(dp_shard, cp, world)
    mesh = init_device_mesh(device.type, (dp, cp), mesh_dim_names=("dp", "cp"))
    return Parallel(dp=dp, cp=cp, rank=dist.get_rank(), device=device, mesh=mesh, owns_group=owns_group)


def shutdown(par: Parallel) -> None:
    """Destroy the process group init_distributed started (none for one process, or a caller's group)."""
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_dtypes(precision: str, device: torch.device) -> tuple[torch.dtype | None, torch.dtype | None]:
    """(param_dtype, reduce_dtype) for apply_fsdp. bf16 or auto on CUDA: bf16 parameters in forward and
    backward, gradients reduced and kept in fp32 (FSDP's mixed precision, which replaces autocast); otherwise
    (None, None): the parameters' own fp32, with autocast as one process runs it."""
    if device.type == "cuda" and precision in ("bf16", "auto"):
        return torch.bfloat16, torch.float32
    return None, None


def apply_fsdp(model, mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype | None = None):
    """Shard ``model`` (a model.GPT, its memory plan, context parallelism and compile applied) with FSDP2 over
    ``mesh``; returns it, still the same nn.Module.

    Each block is one all-gather / reduce-scatter group, bottom-up, then the root takes the rest: the
    embedding, final norm and lm_head. A tied lm_head is the embedding's Parameter, so it lands in the root's
    group once and both attributes keep naming the one sharded parameter. The blocks do not cast their inputs:
    FSDP would turn the fp32 RoPE tables into bf16, and apply_rope rotates in fp32 (the hidden states arrive in
    the parameters' dtype anyway). The last block keeps its parameters gathered after forward: backward starts
    with it (torchtitan's choice)."""
    block_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for i, block in enumerate(model.blocks):
        fully_shard(block, mesh=mesh, mp_policy=block_policy, reshard_after_forward=i < len(model.blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype))
    return model


def share_of_loss(loss: torch.Tensor, targets: torch.Tensor, n_global: torch.Tensor | None, world: int) -> torch.Tensor:
    """What this rank backpropagates: loss (the mean over its own targets) * n_local * world / n_global.

    FSDP's gradient average over the world makes that the gradient of the global mean over every valid target
    (module docstring); summed over the ranks and divided by world it is the global mean itself. A rank with no
    valid target (its mean is 0/0 = NaN) adds 0, and its backward is zero. One process (n_global None): loss."""
    if n_global is None:
        return loss
    n_local = (targets != IGNORE_INDEX).sum()
    return torch.where(n_local > 0, loss, 0.0) * (n_local * world / n_global)


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, the total norm as a plain tensor: over FSDP's sharded gradients it is a
    DTensor (already reduced over the ranks), whose full value every rank needs for the same decision."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (a DTensor), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(model):
    """The root's own parameters (embedding, final norm, lm_head) all-gathered for the duration: generation
    calls model.generate, which reaches them without model.forward, hence without the hook that gathers them.
    The blocks gather their own through their forward hooks. A model not sharded: nothing to do."""
    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()
