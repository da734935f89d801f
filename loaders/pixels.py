"""A normalized batch back to pixels, and its picture: what `python -m loaders.show` and the
trainer's TensorBoard image draw, with the grid of `python -m shards show` (shards/grid.py)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from loaders.common import IMAGENET_MEAN, IMAGENET_STD
from shards.grid import image_grid


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """Normalized N x 3 x H x W (any float dtype, any device) -> N x H x W x 3 uint8, undoing the loader's normalization."""
    x = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def batch_grid(
    images: torch.Tensor,
    captions: list[str] | None = None,
    marked: list[bool] | None = None,
    columns: int = 8,
    cell: int | None = None,
) -> Image.Image:
    """The grid of a normalized batch: what the model sees (1:1 pixels unless `cell` enlarges them)."""
    return image_grid(list(to_pixels(images)), captions, marked, columns=columns, cell=cell)
