"""The pytorch backend: index-based reads, decode + augment in DataLoader workers.

Why index-based reads and not a webdataset stream: the .idx gives each image's (offset, size),
so a map-style Dataset fetches exactly the rows of the epoch plan (loaders/sharding.py), which
is what makes equal per-rank epochs, per-epoch permutations and exact resume simple.

Decoding and augmenting: torchvision.io.decode_image (libjpeg-turbo / libpng) into uint8, the
crop drawn with torchvision's RandomResizedCrop.get_params (the semantics of
transforms.v2.RandomResizedCrop: area 0.08..1, ratio 3/4..4/3), then torch's antialiased
bilinear resize on channels-last uint8, which is vectorized and several times cheaper than the
float path that ToTensor + RandomResizedCrop take. Where the crop is at least twice
`image_size` a side (large photos), the JPEG is instead decoded at 1/2, 1/4 or 1/8 scale in
the DCT domain (PIL's draft()), which skips most of the decode.

Workers return uint8 HWC; the batch goes to `device` as uint8 (pinned, non_blocking: a
quarter of the float bytes) and is converted + normalized there in one batched op.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import RandomResizedCrop

from loaders import augment
from loaders.buffers import BufferPool
from loaders.cache import EpochReads
from loaders.common import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, DecodeError, ReadSpec, apply_options
from loaders.sharding import EpochPlan
from loaders.spec import Shard, is_url, open_binary


@dataclass
class TorchOptions:
    workers: int = 2
    prefetch_factor: int = 4  # batches in flight per worker
    draft: bool = True  # reduced-scale JPEG decoding when the crop allows
    pin_memory: bool = False
    auto_augment: str = "none"  # train: none, randaugment or trivialaugment (loaders/augment.py)
    random_erasing: float = 0.0  # train: probability of erasing a rectangle (loaders/augment.py)

    @classmethod
    def from_machine(cls, device: torch.device, workers: int | None, options: dict) -> TorchOptions:
        cores = len(os.sched_getaffinity(0))
        if device.type == "cuda":
            cores = max(1, cores // max(1, torch.cuda.device_count()))
        o = cls(workers=cores if workers is None else workers, pin_memory=device.type == "cuda")
        return apply_options(o, options, "pytorch")


# One row of the plan as the workers need it: no index lookups in the workers.
# (shard number, sample number, image offset, image size, label offset, augmentation seed)
Row = tuple[int, int, int, int, int, int]


class ShardRows(Dataset):
    """Map-style dataset: a Row -> (uint8 H x W x 3 tensor, label).

    `local`: the paths of a remote set's cached copies (loaders/cache/). Those are opened for
    each row and closed again, because the cache may evict and replace a file between epochs
    and a kept descriptor would hold the old one's disk space; `urls` name the shards in errors.
    """

    def __init__(
        self,
        urls: list[str],
        index_urls: list[str],
        train: bool,
        image_size: int,
        draft: bool,
        local: list[str] | None = None,
        extra=None,
    ) -> None:
        self.urls, self.index_urls, self.local = urls, index_urls, local
        self.extra = extra  # train: torchvision v2 auto-augment / erasing of uint8 3 x H x W, or None
        self.train, self.size, self.draft = train, image_size, draft
        self._files: dict[int, object] = {}  # per worker process: open shards (local sets)

    def __len__(self) -> int:  # rows come from the batch sampler; the length is not used
        return 0

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        if self.local is not None:
            fd = os.open(self.local[shard], os.O_RDONLY)
            try:
                return os.pread(fd, size, offset)
            finally:
                os.close(fd)
        f = self._files.get(shard)
        if f is None:
            url = self.urls[shard]
            f = open_binary(url) if is_url(url) else os.open(url.removeprefix("file://"), os.O_RDONLY)
            self._files[shard] = f
        if isinstance(f, int):
            return os.pread(f, size, offset)
        f.seek(offset)
        return f.read(size)

    def __getitem__(self, row: Row) -> tuple[torch.Tensor, int]:
        shard, sample, offset, size, label_offset, aug_seed = row
        label = int.from_bytes(self._read(shard, label_offset, 8), "little", signed=True)
        try:
            data = self._read(shard, offset, size)
            if self.train:
                # The crop and flip of a sample depend on (seed, epoch, sample) only, not on which
                # worker drew it or on what came before: a resumed epoch repeats them exactly.
                with torch.random.fork_rng(devices=[]):
                    # CPU generator only: torch.manual_seed would also queue a lazy CUDA seeding,
                    # which records a stack trace on every call (a quarter of the worker's time).
                    torch.default_generator.manual_seed(aug_seed)
                    image = self.augment(data)
            else:
                image = self.center(data)
        except Exception as e:
            key = Shard(self.urls[shard], self.index_urls[shard], 0).key(sample)
            raise DecodeError(self.urls[shard], key, f"{type(e).__name__}: {e}") from None
        return image, label

    @staticmethod
    def decode(data: bytes) -> torch.Tensor:
        """JPEG or PNG -> uint8 3 x H x W (channels-last strides, as libjpeg-turbo writes it)."""
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)

    def resize(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Antialiased bilinear resize of uint8 3 x h x w, returned as uint8 H x W x 3.

        On channels-last uint8, torch's antialiased bilinear kernel is vectorized and follows
        PIL's filter (to about one grey level): several times cheaper than float resizing.
        """
        x = image.unsqueeze(0).contiguous(memory_format=torch.channels_last)
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x[0].permute(1, 2, 0)

    def augment(self, data: bytes) -> torch.Tensor:
        head = Image.open(io.BytesIO(data))  # parses the header only
        top, left, h, w = RandomResizedCrop.get_params(head, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        k = min(w, h) / self.size  # largest reduction that keeps the crop >= size a side
        if self.draft and k >= 2 and head.format == "JPEG":
            out = self.draft_crop(head, (top, left, h, w), k)
        else:
            out = self.resize(self.decode(data)[:, top : top + h, left : left + w], (self.size, self.size))
        if torch.rand(1).item() < 0.5:
            out = out.flip(1)
        if self.extra is not None:  # drawn from the same per-sample generator as the crop
            out = self.extra(out.permute(2, 0, 1)).permute(1, 2, 0)
        return out.contiguous()

    def draft_crop(self, im: Image.Image, crop: tuple[int, int, int, int], k: float) -> torch.Tensor:
        """Decode at 1/2, 1/4 or 1/8 scale in the DCT domain (PIL draft), then crop + resize."""
        top, left, h, w = crop
        width, height = im.size
        im.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
        sx, sy = im.size[0] / width, im.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR, box=box)
        return torch.from_numpy(np.asarray(im).copy())

    def center(self, data: bytes) -> torch.Tensor:
        # torchvision Resize(int(size / 0.875)) + CenterCrop(size), to the pixel: no draft here,
        # so validation accuracy is comparable with torchvision's reference evaluation.
        image = self.decode(data)
        resize = int(self.size / EVAL_CROP_RATIO)
        _, height, width = image.shape
        w, h = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
        out = self.resize(image, (h, w))
        top, left = round((h - self.size) / 2.0), round((w - self.size) / 2.0)
        return out[top : top + self.size, left : left + self.size].contiguous()


class PlanBatches:
    """Batch sampler over the current epoch plan (swapped in by the backend before each epoch).

    With a shard cache (`reads`), batch k is handed to the workers only once every shard it
    reads is local: the DataLoader asks for it in the main process, ahead of consumption.
    """

    def __init__(self) -> None:
        self.rows: list[list[Row]] = []
        self.reads: EpochReads | None = None

    def __iter__(self) -> Iterator[list[Row]]:
        if self.reads is None:
            return iter(self.rows)
        return self._cached(self.reads)

    def _cached(self, reads: EpochReads) -> Iterator[list[Row]]:
        for k, rows in enumerate(self.rows):
            reads.need(k)
            yield rows

    def __len__(self) -> int:
        return len(self.rows)


# One (mean, 1/std) pair per device, made once: made per batch, they were two small
# blocking host-to-device copies.
_MEAN_INV_STD: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_inv_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _MEAN_INV_STD:
        mean = (torch.tensor(IMAGENET_MEAN, device=device) * 255).view(1, 3, 1, 1)
        inv_std = (1 / (torch.tensor(IMAGENET_STD, device=device) * 255)).view(1, 3, 1, 1)
        _MEAN_INV_STD[device] = mean, inv_std
    return _MEAN_INV_STD[device]


def normalize(
    batch: torch.Tensor, dtype: torch.dtype, channels_last: bool, pool: BufferPool | None = None
) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalized N x 3 x H x W in `dtype`, on the batch's device.

    One converting copy, then in-place arithmetic: about 4x less CPU than the naive
    `((x.float() - mean) / std).permute(...).contiguous()`, which matters when device="cpu".
    """
    n, h, w, _ = batch.shape
    mean, inv_std = _mean_inv_std(batch.device)
    shape = (n, h, w, 3) if channels_last else (n, 3, h, w)
    out = pool.empty(shape, torch.float32, batch.device) if pool else torch.empty(shape, device=batch.device)
    if channels_last:
        out = out.permute(0, 3, 1, 2)  # N x 3 x H x W with channels-last strides
    out.copy_(batch.permute(0, 3, 1, 2))
    out.sub_(mean).mul_(inv_std)
    return out if dtype == torch.float32 else out.to(dtype)


class TorchBackend:
    name = "pytorch"

    def __init__(self, spec: ReadSpec) -> None:
        self.spec, self.shards, self.batch_size, self.device = spec, spec.shards, spec.batch_size, spec.device
        self.opts = TorchOptions.from_machine(self.device, spec.workers, spec.options)
        augment.check(self.opts.auto_augment, self.opts.random_erasing)
        local = [spec.cache.local_path(s) for s in range(len(self.shards))] if spec.cache else None
        self.dataset = ShardRows(
            [s.url for s in self.shards],
            [s.index_url for s in self.shards],
            spec.train,
            spec.image_size,
            self.opts.draft,
            local,
            augment.torchvision_transform(self.opts.auto_augment, self.opts.random_erasing) if spec.train else None,
        )
        self.sampler = PlanBatches()
        self.pool = BufferPool()
        self._loader: DataLoader | None = None

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            w = self.opts.workers
            self._loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                num_workers=w,
                pin_memory=self.opts.pin_memory,
                persistent_workers=w > 0,  # no re-fork per epoch; memory stays flat
                prefetch_factor=self.opts.prefetch_factor if w > 0 else None,
                generator=torch.Generator().manual_seed(self.spec.seed * 1000003 + self.spec.rank),
            )
        return self._loader

    def _rows(self, plan: EpochPlan, epoch: int) -> list[list[Row]]:
        rows: list[Row] = []
        for s, i in zip(plan.shard.tolist(), plan.sample.tolist(), strict=True):
            idx = self.shards[s].index()
            aug_seed = hash((self.spec.seed, epoch, s, i)) & 0x7FFFFFFFFFFF  # ints hash the same in every process
            rows.append((s, i, int(idx.image_offset[i]), int(idx.image_size[i]), int(idx.label_offset[i]), aug_seed))
        b = self.batch_size
        return [rows[k : k + b] for k in range(0, len(rows), b)]

    def batches(self, plan: EpochPlan, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.rows = self._rows(plan, epoch)
        reads = self.sampler.reads = EpochReads(self.spec.cache, plan) if self.spec.cache else None
        non_blocking = self.device.type == "cuda"
        dtype, channels_last = self.spec.dtype, self.spec.channels_last
        try:
            for k, (images, labels) in enumerate(self._dataloader()):
                if reads is not None:
                    reads.finished(k)
                images = images.to(self.device, non_blocking=non_blocking)
                labels = labels.to(self.device, non_blocking=non_blocking)
                yield normalize(images, dtype, channels_last, self.pool), labels
        finally:
            if reads is not None:
                reads.close()

    def set_image_size(self, size: int) -> None:
        """A new output size: the persistent workers hold a copy of the dataset, so they are
        stopped and the next epoch forks new ones (once per size change, not per epoch)."""
        if size != self.dataset.size:
            self.close()
            self.dataset.size = size

    def close(self) -> None:
        """Stop the persistent workers now, rather than leave them to the garbage collector (which,
        at interpreter exit, tears them down in an order that reports them as exited unexpectedly)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
