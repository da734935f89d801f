"""Training augmentations beyond crop and flip: RandAugment, TrivialAugment and random erasing,
with timm's semantics, declared once for both backends.

- RandAugment: timm's `rand-m9` (2 operations a sample, each at magnitude 9 on a 0..10 scale:
  RANDAUGMENT_BINS bins, bin RANDAUGMENT_MAGNITUDE), each op's sign random. TrivialAugment: the
  "wide" space, one operation a sample at a uniformly drawn bin of TRIVIAL_BINS (timm's
  `trivialaugment`, torchvision's TrivialAugmentWide). The operation suites are the backends'
  own (torchvision's v2 RandAugment / TrivialAugmentWide; nvidia.dali.auto_aug's suites):
  the same 14 operations, the same magnitude ranges up to the libraries' rounding.
- Random erasing: with probability P one rectangle of 2%..1/3 of the image area and aspect
  0.3..3.3 (log-uniform), up to 10 attempts (timm's RandomErasing, torchvision's RandomErasing),
  filled with the dataset mean (timm's mode "const": zero after normalization).
- What a shear, rotation or shift uncovers is filled with FILL, the grey of the mean's brightness
  (timm fills with the mean colour; DALI's warps take a single fill value, so both backends use one).

Order: crop, flip, auto-augment and erase on the uint8 pixels, then normalize (timm erases after
normalizing, with zeros: the mean colour here is the same to a grey level, and lets DALI erase
before its fused normalization). DALI flips at normalization, after the auto-augment: the same
distribution, as every operation's sign and the erased box's place are symmetric. Every draw
is seeded per sample, from (seed, epoch, sample) like the crops, so a resumed epoch repeats them.
"""

from __future__ import annotations

import math

import numpy as np

from loaders.common import IMAGENET_MEAN

AUTO_AUGMENT = ("none", "randaugment", "trivialaugment")
RANDAUGMENT_OPS = 2
RANDAUGMENT_BINS = 11  # timm's magnitudes 0..10
RANDAUGMENT_MAGNITUDE = 9
TRIVIAL_BINS = 31  # TrivialAugment's paper, torchvision and DALI
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)
ERASE_ATTEMPTS = 10
ERASE_UNIFORMS = 1 + 2 * ERASE_ATTEMPTS + 2  # apply?, (area, log-ratio) per attempt, the anchors
MEAN_PIXEL = [round(255 * m) for m in IMAGENET_MEAN]  # zero after normalization, to a grey level
FILL = round(sum(MEAN_PIXEL) / 3)


def check(auto_augment: str, random_erasing: float) -> None:
    """A bad value fails in one line, before any pipeline is built."""
    if auto_augment not in AUTO_AUGMENT:
        raise ValueError(f"unknown auto_augment {auto_augment!r}: use one of {', '.join(AUTO_AUGMENT)}")
    if not 0 <= random_erasing <= 1:
        raise ValueError(f"random_erasing is a probability in [0, 1], not {random_erasing}")


def erase_boxes(u: np.ndarray, size: int, p: float) -> np.ndarray:
    """int32 [rows, 4] (top, left, height, width) of each row's erased rectangle in a size x size
    image from its ERASE_UNIFORMS uniforms; (0, 0, 0, 0) where nothing is erased. timm's
    RandomErasing._erase with one rectangle, its random draws taken from u."""
    rows = len(u)
    out = np.zeros((rows, 4), np.int32)
    area = size * size
    log_lo, log_hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    for r in np.flatnonzero(u[:, 0] < p):
        for k in range(ERASE_ATTEMPTS):
            target = area * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * float(u[r, 1 + 2 * k]))
            ratio = math.exp(log_lo + (log_hi - log_lo) * float(u[r, 2 + 2 * k]))
            h, w = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < h < size and 0 < w < size:
                top = math.floor(float(u[r, -2]) * (size - h + 1))
                left = math.floor(float(u[r, -1]) * (size - w + 1))
                out[r] = (top, left, h, w)
                break
    return out


def torchvision_transform(auto_augment: str, random_erasing: float):
    """The pytorch backend's: a torchvision v2 transform of uint8 3 x H x W, or None for none of them.
    It draws from torch's default generator, which the backend seeds per sample."""
    from torchvision.transforms import v2

    steps = []
    if auto_augment == "randaugment":
        steps.append(
            v2.RandAugment(
                num_ops=RANDAUGMENT_OPS,
                magnitude=RANDAUGMENT_MAGNITUDE,
                num_magnitude_bins=RANDAUGMENT_BINS,
                fill=FILL,
            )
        )
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide(num_magnitude_bins=TRIVIAL_BINS, fill=FILL))
    if random_erasing > 0:
        steps.append(v2.RandomErasing(random_erasing, scale=ERASE_AREA, ratio=ERASE_RATIO, value=MEAN_PIXEL))
    return v2.Compose(steps) if steps else None
