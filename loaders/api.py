"""make_loader() and the Loader every backend sits behind (contract: loaders/__init__.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Protocol

import torch

from loaders import sharding
from loaders.cache import NodePlan, Remote, ShardCache, default_folder, local_ranks
from loaders.common import DTYPES, ReadSpec
from loaders.mix import SetMix, as_sets, open_sets
from loaders.sharding import EpochPlan, num_batches, plan_epoch
from loaders.spec import Shard, is_url, open_shards


class Backend(Protocol):
    """Turns an epoch plan into batches. `epoch` seeds the augmentations."""

    name: str

    def batches(self, plan: EpochPlan, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def close(self) -> None: ...

    def set_image_size(self, size: int) -> None: ...


class Loader:
    """Batches of (images, labels) for one rank; see the package docstring for the contract."""

    def __init__(
        self,
        shards: list[Shard],
        manifest: dict | None,
        backend: Backend,
        *,
        cache: ShardCache | None = None,
        batch_size: int,
        train: bool,
        device: torch.device,
        rank: int,
        world_size: int,
        seed: int,
        drop_last: bool,
        mix: SetMix | None = None,
    ) -> None:
        self.shards, self.manifest, self.backend, self.cache = shards, manifest, backend, cache
        self.mix = mix  # several sets in one stream: their joint order and labels (loaders/mix.py)
        self._order = mix.order if mix is not None else None
        self.batch_size, self.train, self.device = batch_size, train, device
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.counts = [s.samples for s in shards]
        # in the whole split (a mix: its epoch), all ranks together
        self.num_samples = mix.epoch_size if mix is not None else sum(self.counts)
        self._len = num_batches(self.num_samples, batch_size=batch_size, world_size=world_size, drop_last=drop_last)
        if self._len == 0:
            plan_epoch(
                self.counts,
                batch_size=batch_size,
                rank=rank,
                world_size=world_size,
                seed=seed,
                epoch=0,
                drop_last=drop_last,
                order=self._order,
            )  # raises the explanatory error
        self.epoch = 0
        self._done = 0  # batches of self.epoch yielded (or skipped by a resume)
        self._cut = sharding.Position()  # an elastic resume's rest of self.epoch (segments None: the normal plan)

    # -- what the trainer reads -------------------------------------------------------------
    @property
    def classes(self) -> list[dict] | None:
        if self.mix is not None:
            return self.mix.classes
        return self.manifest["classes"] if self.manifest else None

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def __len__(self) -> int:
        if self._cut.segments is None:
            return self._len
        rest = sharding.segments_length(self._cut.segments)
        return self._cut.offset + sharding.rest_batches(rest, batch_size=self.batch_size, world_size=self.world_size)

    def plan(self, epoch: int | None = None, rank: int | None = None) -> EpochPlan:
        """This rank's rows for an epoch (default: the current one), from batch 0; `rank`: another
        rank's, as that rank's loader computes it (the cache's node plan needs every local rank's).

        After an elastic resume, the current epoch's plan is the rest of it, from batch `offset`.
        """
        epoch = self.epoch if epoch is None else epoch
        rank = self.rank if rank is None else rank
        common = dict(batch_size=self.batch_size, rank=rank, world_size=self.world_size, seed=self.seed, epoch=epoch)
        if self._cut.segments is not None and epoch == self.epoch:
            return sharding.plan_rest(self.counts, self._cut.segments, order=self._order, **common)
        return plan_epoch(self.counts, drop_last=self.drop_last, order=self._order, **common)

    def _node_plan(self, batch: int) -> NodePlan:
        """Every local rank's reading from `batch` of this epoch, and the next epoch (the cache's node plan)."""
        ranks = list(local_ranks(self.rank, self.world_size))
        this = [self.plan(rank=r).from_batch(batch) for r in ranks]
        after = [self.plan(self.epoch + 1, rank=r) for r in ranks]
        return NodePlan.of_ranks(this, after, ranks.index(self.rank))

    @property
    def num_valid(self) -> int:
        """Real (not padding) samples this rank yields in the current epoch."""
        return int(self.plan().valid.sum())

    # -- epochs and resume ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._done, self._cut = epoch, 0, sharding.Position()

    def set_image_size(self, size: int) -> None:
        """The side of the images from the next iteration on (progressive resizing: the trainer
        sets each epoch's). A pure setting, not loader state: the caller derives it from the epoch."""
        if size < 1:
            raise ValueError(f"image size must be positive, not {size}")
        self.backend.set_image_size(size)

    def state_dict(self) -> dict:
        """Where this loader stands (loaders/sharding.py's versioned format): plain ints and lists."""
        cut = self._cut
        return {
            "format": sharding.STATE_FORMAT,
            "version": sharding.STATE_VERSION,
            "epoch": self.epoch,
            "batches": self._done,
            "seed": self.seed,
            "world_size": self.world_size,
            "rank": self.rank,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "num_samples": self.num_samples,
            "segments": None if cut.segments is None else [list(s) for s in cut.segments],
            "offset": cut.offset,
            "epoch_samples": cut.epoch_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state taken on any rank, at any world size and per-rank batch size."""
        sharding.check_state(state)
        for k in ("seed", "num_samples"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(
                    f"loader state has {k}={state[k]} but this loader has {getattr(self, k)}: cannot resume"
                )
        cut = sharding.rebase(
            state,
            total=self.num_samples,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )
        self.epoch, self._cut = int(state["epoch"]), cut
        if not cut.offset <= cut.batches <= len(self):
            raise ValueError(f"loader state has batches={cut.batches}, outside {cut.offset}..{len(self)}")
        self._done = cut.batches

    @property
    def progress(self) -> float:
        """Share of the current epoch's samples read so far by all ranks together (0..1)."""
        here = sharding.Position(self._done, self._cut.segments, self._cut.offset, self._cut.epoch_samples)
        return sharding.fraction_read(
            here,
            total=self.num_samples,
            world_size=self.world_size,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
        )

    # -- iteration --------------------------------------------------------------------------------
    def with_valid(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iterating the loader, with a third element: a bool tensor [N], False on padding rows."""
        plan = self.plan().from_batch(self._done - self._cut.offset)
        if self.cache is not None:
            self.cache.announce(self._node_plan(self._done - self._cut.offset))
        valid = torch.from_numpy(plan.valid)
        start = self._done
        for b, (images, labels) in enumerate(self.backend.batches(plan, self.epoch)):
            self._done = start + b + 1
            rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
            if self.mix is not None:  # each set's labels -> the joint class list, the same for both backends
                labels = self.mix.joint_labels(labels, plan.shard[rows])
            mask = valid[rows].to(self.device, non_blocking=True)
            yield images, labels, mask
        if self._done >= len(self):
            # a finished epoch: iterating again (no set_epoch) repeats it, as a normal epoch
            self._done, self._cut = 0, sharding.Position()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.with_valid():
            yield images, labels

    def close(self) -> None:
        self.backend.close()
        if self.cache is not None:
            self.cache.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _pick_backend(backend: str) -> str:
    if backend != "auto":
        if backend not in ("dali", "pytorch"):
            raise ValueError(f"unknown backend {backend!r}: use dali, pytorch or auto")
        return backend
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return "pytorch"
    return "dali"


def make_loader(
    shards,
    *,
    batch_size: int,
    train: bool,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    workers: int | None = None,
    image_size: int = 224,
    dtype: str | torch.dtype = torch.float32,
    channels_last: bool = False,
    drop_last: bool | None = None,
    split: str | None = None,
    options: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    cache_limit: int | str | None = None,
    epoch_size: int | None = None,
) -> Loader:
    """Build a Loader over SPEC `shards` (brace pattern, list, folder with manifest.json, s3:// URLs).

    batch_size: per rank. train: augmentation (random-resized-crop + flip) vs eval (resize, center
    crop). backend: "dali", "pytorch" or "auto". device: where batches land ("cpu", "cuda",
    "cuda:N"); the dali backend decodes on the GPU (nvJPEG, hardware decoder) when it is a CUDA
    device. rank/world_size: this process's part (see the package docstring). seed: order and
    augmentation seed. workers: DALI CPU threads / DataLoader worker processes (default: from
    the machine). dtype: float32, float16 or bfloat16. channels_last: channels-last memory
    format. drop_last: default True for train, False for eval (pad and flag). split: which split
    of a folder-with-manifest SPEC (default "train" if train else "val"). options: backend knobs
    (loaders/dali.py DaliOptions, loaders/pytorch.py TorchOptions field names). cache_dir,
    cache_limit: where remote (non-local) shards are cached whole and how many bytes the folder
    may hold, as bytes or "200GB" (loaders/cache/: default ~/.cache/shardline/shards/<hash of the set's
    URL>, $SHARDLINE_CACHE_DIR replacing ~/.cache/shardline; default limit 80% of that disk's free space).
    One folder serves the node: the ranks sharing it are LOCAL_WORLD_SIZE consecutive ranks (as
    torchrun sets it), else all world_size ranks; their plans decide prefetch and eviction.
    Several sets in one stream: `shards` a mapping {SPEC: weight} or a list of set SPECs (folders;
    weights by size); epoch_size: samples an epoch (default: all the sets hold), each set giving
    its weight's share (loaders/mix.py).
    """
    dev = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype must be float32, float16 or bfloat16, not {dtype}")
    if batch_size < 1 or world_size < 1 or image_size < 1:
        raise ValueError("batch_size, world_size and image_size must be positive")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    split = split or ("train" if train else "val")
    sets = as_sets(shards)
    if sets is None and epoch_size is not None:
        sets = [(shards, 1.0)]  # one set, its epoch resized: a mix of one
    mix = None
    if sets is None:
        shard_list, manifest = open_shards(shards, split=split)
    else:
        shard_list, mix = open_sets(sets, split=split, seed=seed, epoch_size=epoch_size)
        manifest = None
    drop_last = train if drop_last is None else drop_last
    name = _pick_backend(backend)
    ranks = local_ranks(rank, world_size)
    cache = open_cache(
        shard_list, cache_dir, cache_limit, verbose=rank == ranks[0], local=len(ranks), manifest=manifest
    )
    spec = ReadSpec(
        shards=shard_list,
        batch_size=batch_size,
        train=train,
        device=dev,
        seed=seed,
        rank=rank,
        workers=workers,
        image_size=image_size,
        dtype=dtype,
        channels_last=channels_last,
        options=options or {},
        cache=cache,
    )
    try:
        if name == "dali":
            from loaders.dali import DaliBackend

            impl: Backend = DaliBackend(spec)
        else:
            from loaders.pytorch import TorchBackend

            impl = TorchBackend(spec)
    except BaseException:
        if cache is not None:
            cache.close()
        raise
    return Loader(
        shard_list,
        manifest,
        impl,
        cache=cache,
        batch_size=batch_size,
        train=train,
        device=dev,
        rank=rank,
        world_size=world_size,
        seed=seed,
        drop_last=drop_last,
        mix=mix,
    )


def open_cache(
    shards: list[Shard],
    folder: str | os.PathLike | None,
    limit: int | str | None,
    *,
    verbose: bool,
    local: int = 1,
    manifest: dict | None = None,
) -> ShardCache | None:
    """A shard cache for a remote set (None for local shards), shared by `local` ranks of this node;
    each shard's index then reads from it. A manifest that records an index's size and sha256
    (index_bytes, index_sha256) has the index checked against them."""
    if not any(is_url(s.url) for s in shards):
        return None  # local shards are read in place
    # the set's folder, without a query: a token there names no other set (and is no folder name)
    root = shards[0].url.partition("?")[0].rsplit("/", 1)[0]
    folder = os.fspath(folder) if folder is not None else default_folder(root)
    recorded = {e["name"]: e for sp in (manifest or {}).get("splits", {}).values() for e in sp["shards"]}
    index_facts = [recorded.get(s.name, {}) for s in shards]
    cache = ShardCache(
        [Remote(s.url, s.bytes, s.sha256) for s in shards],
        [
            Remote(s.index_url, e.get("index_bytes"), e.get("index_sha256"))
            for s, e in zip(shards, index_facts, strict=True)
        ],
        folder,
        limit,
        verbose=verbose,
        local_ranks=local,
    )
    try:
        for s, path in zip(shards, cache.fetch_indexes(), strict=True):
            s.index_url = path
    except BaseException:
        cache.close()
        raise
    return cache
