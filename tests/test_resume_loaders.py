"""Elastic and exact resume of make_loader, on real shards, in real gloo process groups.

The train split gives every sample its own label (48 samples, 48 classes), so a label names one
sample and "each sample exactly once" is checked on labels. Both backends, with train-time
augmentation on: the crop and flip of a sample must not depend on which rank, batch size or
resumed pipeline read it, so every image is compared with an uninterrupted single-rank epoch.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
from pathlib import Path

import pytest
import torch
from helpers import PhotoSource

from loaders import make_loader
from shards.build import build
from shards.types import Item, Options

EPOCH = 2
SIZE = 16


class UniqueLabels(PhotoSource):
    """The test photos `copies` times over; in train, sample n has label n."""

    def __init__(self, copies: int = 2) -> None:
        super().__init__(num_classes=24 * copies, copies=copies, val_copies=1)

    def items(self, split: str) -> list[Item]:
        out = super().items(split)
        if split == "train":
            out = [Item(it.key, n, f"c{n}", it.source, it.locator, it.size) for n, it in enumerate(out)]
        return out


@pytest.fixture(scope="module")
def unique_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unique")
    build(UniqueLabels(), str(out), Options(seed=1, shard_samples=7, max_side=48), workers=1)  # tiny images: fast
    return out


def open_loader(spec: str, backend: str, *, rank: int, world: int, batch: int):
    return make_loader(
        spec,
        batch_size=batch,
        train=True,
        drop_last=False,  # every sample of the epoch, so each one's once-ness shows
        backend=backend,
        rank=rank,
        world_size=world,
        image_size=SIZE,
        workers=0 if backend == "pytorch" else 1,
        seed=3,
    )


def read(ld, batches: int | None, sync=None) -> list[tuple[int, torch.Tensor]]:
    """(label, image) of the valid rows of the next `batches` batches (None: to the end of the epoch)."""
    out = []
    for n, (images, labels, valid) in enumerate(ld.with_valid()):
        if sync is not None:
            sync()  # a collective per batch: a rank with fewer batches than the others would hang here
        out += [(int(y), x.clone()) for x, y, v in zip(images, labels, valid, strict=True) if v]
        if batches is not None and n + 1 == batches:
            break
    return out


def _rank(rank: int, port: int, spec: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    result = {}
    for backend in ("dali", "pytorch"):
        got, lens = [], {}
        # 2 ranks read 3 batches of 3; rank 1's state goes to everyone.
        state = None
        if rank < 2:
            ld = open_loader(spec, backend, rank=rank, world=2, batch=3)
            ld.set_epoch(EPOCH)
            got += read(ld, 3)
            state = ld.state_dict()
        box = [state]
        dist.broadcast_object_list(box, src=1)
        # 3 ranks of batch 2 take it, read 2 batches; rank 2's state goes to rank 0.
        ld = open_loader(spec, backend, rank=rank, world=3, batch=2)
        ld.load_state_dict(box[0])
        ld.set_epoch(EPOCH)  # what the trainer's loop does: keeps the position
        lens["three"] = (len(ld), ld.state_dict()["batches"])
        got += read(ld, 2, sync=lambda: dist.all_reduce(torch.ones(1)))
        box = [ld.state_dict()]
        dist.broadcast_object_list(box, src=2)
        if rank == 0:
            # 1 rank of batch 5 reads the rest; then the next epoch is the normal plan.
            ld = open_loader(spec, backend, rank=0, world=1, batch=5)
            ld.load_state_dict(box[0])
            lens["progress"] = ld.progress
            got += read(ld, None)
            ld.set_epoch(EPOCH + 1)
            lens["next"] = (len(ld), sorted(y for y, _ in read(ld, None)))
        parts = [None] * 3
        dist.all_gather_object(parts, (got, lens))
        result[backend] = parts
    if rank == 0:  # numpy through the queue: a tensor would travel as a handle to this process's memory
        for parts in result.values():
            for got, _ in parts:
                got[:] = [(y, x.numpy()) for y, x in got]
        queue.put(result)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_to_three_to_one_reads_every_sample_once_with_the_same_crops(unique_shards):
    # forkserver: one fresh process imports torch, torchvision and DALI once, and forks the ranks
    # from it (spawn would import them in each rank: most of this test's time on a small machine).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torchvision", "nvidia.dali", "loaders.dali", "loaders.pytorch", __name__])
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, str(unique_shards), queue)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=240)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]

    for backend, parts in result.items():
        # The uninterrupted epoch on one rank: the reference image of every sample.
        ref = dict(read(_reference_loader(unique_shards, backend), None))
        assert sorted(ref) == list(range(48))
        rows = [row for got, _ in parts for row in got]
        labels = sorted(y for y, _ in rows)
        assert labels == list(range(48)), (backend, labels)  # every sample of the epoch exactly once
        for y, x in rows:
            assert torch.equal(torch.from_numpy(x), ref[y]), (backend, y)  # the same crop, flip and pixels
        # 18 read on 2 ranks; 30 left on 3 ranks of batch 2: 5 batches each, 18 // 6 = 3 counted as done.
        assert {lens["three"] for _, lens in parts} == {(3 + 5, 3)}
        main = parts[0][1]
        assert main["progress"] == pytest.approx((18 + 12) / 48)
        assert main["next"] == (10, list(range(48)))  # the normal plan of one rank: ceil(48 / 5) batches


def _reference_loader(spec: Path, backend: str):
    ld = open_loader(str(spec), backend, rank=0, world=1, batch=4)
    ld.set_epoch(EPOCH)
    return ld
