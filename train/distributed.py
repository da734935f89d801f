"""One process or many under torchrun: rank, device, process group, and the few collectives.

torchrun (single node or multi-node through its c10d rendezvous) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them this is a world of one and no process
group is created. NCCL on GPUs, gloo on CPU. Metrics are summed across ranks as float64
tensors (sums, never averages of averages), so they are exact whatever the per-rank counts.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


class TooManyRanks(RuntimeError):
    """More ranks on this machine than GPUs it shows them: NCCL would fail later, obscurely."""


def pick_gpu(local_rank: int, local_world: int, device_count: int, one_per_process: bool) -> int:
    """This rank's GPU index, or TooManyRanks.

    torchrun gives each local rank the GPU of its number. A launcher that binds one GPU to
    each process (CUDA_VISIBLE_DEVICES holding one device) leaves each rank GPU 0. Anything
    else (local_rank % device_count, as before) puts two ranks on one GPU, which NCCL only
    reports at the first collective as "Duplicate GPU detected".
    """
    if local_rank < device_count:
        return local_rank
    if device_count == 1 and one_per_process:
        return 0
    raise TooManyRanks(
        f"local rank {local_rank} of {local_world} but this process sees {device_count} GPU(s): "
        f"run at most {device_count} processes per machine (torchrun --nproc_per_node={device_count})"
    )


def setup(timeout_minutes: float = 30.0) -> Dist:
    """Read torchrun's environment, pick the device, and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        one_per_process = bool(visible) and "," not in visible
        torch.cuda.set_device(pick_gpu(local_rank, local_world, torch.cuda.device_count(), one_per_process))
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        # CPU ranks on one machine share its cores: don't oversubscribe them.
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        kw = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=dt.timedelta(minutes=timeout_minutes), **kw)
    return Dist(rank, world, local_rank, local_world, device)


def wrap_model(model: torch.nn.Module, d: Dist, *, compile: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model the trainer steps, the model evaluation runs), from the plain model.

    DDP wraps first and torch.compile goes over it: compiling DDP lets dynamo split the graph
    at DDP's bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward
    pass; DDP around a compiled module sees one opaque backward and all-reduces after it.
    gradient_as_bucket_view: the gradients are views into DDP's buckets, no copy in and out.
    Evaluation needs no DDP (no gradients), so it runs the plain model, compiled on its own.
    """
    train_model = model
    if d.enabled:
        kw = {"device_ids": [d.device.index]} if d.device.type == "cuda" else {}
        train_model = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, **kw)
    if not compile:
        return train_model, model
    compiled = torch.compile(train_model)
    return compiled, (torch.compile(model) if d.enabled else compiled)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], d: Dist) -> list[float]:
    """Sum a few numbers over ranks (float64: counts of 1.28M images stay exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def any_ranks(flags: list[bool | torch.Tensor], d: Dist, *, read: bool = True) -> list[bool] | torch.Tensor:
    """For each flag: true on every rank when it is true on any rank, in one small collective.

    Keeps decisions (stop on a non-finite loss, write a checkpoint now) in lockstep, so no
    rank ever waits at a collective the others have left. read=False returns the int32
    tensor without waiting for it (the trainer reads it a step later); Python flags become
    device tensors through a fill kernel, not a blocking host-to-device copy.
    """
    parts = [
        f.detach().reshape(()).to(d.device, torch.int32)
        if isinstance(f, torch.Tensor)
        else torch.full((), int(f), dtype=torch.int32, device=d.device)
        for f in flags
    ]
    t = torch.stack(parts)
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()] if read else t


def average_buffers(model: torch.nn.Module, d: Dist) -> None:
    """Average floating-point buffers (BatchNorm running stats) over ranks, in place.

    Each rank updates its running statistics from its own batches, so after an epoch they
    differ; evaluating or saving without this would make rank 0's checkpoint disagree with
    what the other ranks evaluated (timm's distribute_bn does the same).
    """
    if not d.enabled:
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    for b in bufs:
        dist.all_reduce(b, op=dist.ReduceOp.SUM)
        b.div_(d.world_size)


def gather_objects(obj: object, d: Dist) -> list:
    """Every rank's obj, in rank order, on every rank (small objects: RNG and loader states)."""
    if not d.enabled:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
