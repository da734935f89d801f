"""The pytorch backend: index-based reads, decode + augment in DataLoader workers.

Why index-based reads and not a webdataset stream: the .idx gives each image's (offset, size),
so a map-style Dataset fetches exactly the rows of the epoch plan (loaders/sharding.py), which
is what makes equal per-rank epochs, per-epoch permutations and exact resume simple.

Why PIL and not a tensor decode: PIL's JPEG `draft()` decodes at 1/2, 1/4 or 1/8 scale in the
DCT domain. The crop is drawn first (torchvision's RandomResizedCrop.get_params, same
semantics as transforms.v2.RandomResizedCrop) and the image is decoded at the smallest scale
that still leaves the crop at least `image_size` pixels a side, then cropped + resized with
antialiased bilinear in one PIL call. That decode saving is what puts this backend ahead of
the plain ImageFolder pipeline. PNG has no draft mode and is decoded whole.

Workers return uint8 HWC; the batch goes to `device` as uint8 (pinned, non_blocking: a
quarter of the float bytes) and is converted + normalized there in one batched op.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import RandomResizedCrop

from loaders.api import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, DecodeError
from loaders.sharding import EpochPlan
from loaders.spec import Shard, is_url, open_binary


@dataclass
class TorchOptions:
    workers: int = 2
    prefetch_factor: int = 4  # batches in flight per worker
    draft: bool = True  # reduced-scale JPEG decoding when the crop allows
    pin_memory: bool = False

    @classmethod
    def from_machine(cls, device: torch.device, workers: int | None, options: dict) -> TorchOptions:
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown pytorch backend options {sorted(unknown)}")
        cores = len(os.sched_getaffinity(0))
        if device.type == "cuda":
            cores = max(1, cores // max(1, torch.cuda.device_count()))
        o = cls(workers=cores if workers is None else workers, pin_memory=device.type == "cuda")
        for k, v in options.items():
            setattr(o, k, v)
        return o


# One row of the plan as the workers need it: no index lookups in the workers.
# (shard number, sample number, image offset, image size, label offset)
Row = tuple[int, int, int, int, int]


class ShardRows(Dataset):
    """Map-style dataset: a Row -> (uint8 H x W x 3 tensor, label)."""

    def __init__(self, urls: list[str], index_urls: list[str], train: bool, image_size: int, draft: bool) -> None:
        self.urls, self.index_urls = urls, index_urls
        self.train, self.size, self.draft = train, image_size, draft
        self._files: dict[int, object] = {}  # per worker process: open shards

    def __len__(self) -> int:  # rows come from the batch sampler; the length is not used
        return 0

    def _read(self, shard: int, offset: int, size: int) -> bytes:
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
        shard, sample, offset, size, label_offset = row
        label = int.from_bytes(self._read(shard, label_offset, 8), "little", signed=True)
        try:
            im = Image.open(io.BytesIO(self._read(shard, offset, size)))
            im = self.augment(im) if self.train else self.center(im)
            arr = np.asarray(im)
        except Exception as e:
            key = Shard(self.urls[shard], self.index_urls[shard], 0).key(sample)
            raise DecodeError(self.urls[shard], key, f"{type(e).__name__}: {e}") from None
        return torch.from_numpy(arr.copy()), label

    def augment(self, im: Image.Image) -> Image.Image:
        top, left, h, w = RandomResizedCrop.get_params(im, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
        width, height = im.size
        if self.draft and im.format == "JPEG":
            k = min(w, h) / self.size  # largest reduction that keeps the crop >= size a side
            if k >= 2:
                im.draft("RGB", (math.ceil(width / k), math.ceil(height / k)))
        sx, sy = im.size[0] / width, im.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR, box=box)
        if torch.rand(1).item() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return im

    def center(self, im: Image.Image) -> Image.Image:
        # torchvision Resize(int(size / 0.875)) + CenterCrop(size), on PIL, to the pixel: no draft
        # here, so validation accuracy is comparable with torchvision's reference evaluation.
        resize = int(self.size / EVAL_CROP_RATIO)
        width, height = im.size
        w, h = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
        im = im.convert("RGB").resize((w, h), Image.BILINEAR)
        top, left = round((h - self.size) / 2.0), round((w - self.size) / 2.0)
        return im.crop((left, top, left + self.size, top + self.size))


class PlanBatches:
    """Batch sampler over the current epoch plan (swapped in by the backend before each epoch)."""

    def __init__(self) -> None:
        self.rows: list[list[Row]] = []

    def __iter__(self) -> Iterator[list[Row]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def normalize(batch: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalized N x 3 x H x W in `dtype`, one batched op on the batch's device."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device) * 255
    inv_std = 1 / (torch.tensor(IMAGENET_STD, device=batch.device) * 255)
    out = ((batch.float() - mean) * inv_std).to(dtype).permute(0, 3, 1, 2)  # a channels-last view
    return out if channels_last else out.contiguous()


class TorchBackend:
    name = "pytorch"

    def __init__(
        self,
        *,
        shards: list[Shard],
        batch_size: int,
        train: bool,
        device: torch.device,
        seed: int,
        rank: int,
        workers: int | None,
        image_size: int,
        dtype: torch.dtype,
        channels_last: bool,
        options: dict,
    ) -> None:
        self.shards, self.batch_size, self.device = shards, batch_size, device
        self.seed, self.rank, self.dtype, self.channels_last = seed, rank, dtype, channels_last
        self.opts = TorchOptions.from_machine(device, workers, options)
        self.dataset = ShardRows(
            [s.url for s in shards], [s.index_url for s in shards], train, image_size, self.opts.draft
        )
        self.sampler = PlanBatches()
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
                generator=torch.Generator().manual_seed(self.seed * 1000003 + self.rank),
            )
        return self._loader

    def _rows(self, plan: EpochPlan) -> list[list[Row]]:
        rows: list[Row] = []
        for s, i in zip(plan.shard.tolist(), plan.sample.tolist(), strict=True):
            idx = self.shards[s].index()
            rows.append((s, i, int(idx.image_offset[i]), int(idx.image_size[i]), int(idx.label_offset[i])))
        b = self.batch_size
        return [rows[k : k + b] for k in range(0, len(rows), b)]

    def batches(self, plan: EpochPlan, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(hash((self.seed, epoch, self.rank)) & 0x7FFFFFFF)  # augmentations in-process (workers=0)
        self.sampler.rows = self._rows(plan)
        non_blocking = self.device.type == "cuda"
        for images, labels in self._dataloader():
            images = images.to(self.device, non_blocking=non_blocking)
            labels = labels.to(self.device, non_blocking=non_blocking)
            yield normalize(images, self.dtype, self.channels_last), labels

    def close(self) -> None:
        self._loader = None  # persistent workers exit with their DataLoader
