"""A procedurally drawn image-classification set: no download, reproducible from a seed.

Ten classes, six by shape (solid-filled) and four by texture (a patch of random outline filled
with a two-colour pattern), each drawn at a random position, scale, rotation and colour over
a cluttered background (colour gradient, blotches, distractor strokes under and over the
object, pixel noise), then stored as a JPEG. Colours, backgrounds and clutter are drawn from
the same distributions for every class, so nothing but the object's form tells the class: a
model must see shapes and textures to beat chance, which is what makes the set a useful
test of a label or augmentation path (a broken one shows up as chance accuracy).

Every image has its own RNG, seeded from (seed, split, index), so any worker can render any
item and the bytes are the same on every run and machine with the same numpy and Pillow.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw

from shards.types import ClassInfo, Item, Quarantined

CLASSES = ("checker", "circle", "cross", "dots", "ring", "square", "star", "stripes", "triangle", "waves")
SHAPES = ("circle", "cross", "ring", "square", "star", "triangle")  # solid fill; the others are textures
SPLITS = ("train", "val")
JPEG_QUALITY = 90
# The set's size when not told otherwise (the CLI's --train-per-class, --val-per-class, --demo-size).
TRAIN_PER_CLASS = 500
VAL_PER_CLASS = 100
SIZE = 96
_SS = 2  # masks are drawn at this supersampling factor, then reduced: cheap anti-aliasing


class DemoError(ValueError):
    """Options the demo set cannot be drawn with; the message is one line."""


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _outline(kind: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons on the unit scale (radius about 1), before rotation: the first is filled, the rest cut out."""
    if kind == "circle":
        p = _regular(48)
        return [p * [1.0, rng.uniform(0.8, 1.0)]]
    if kind == "ring":
        p = _regular(48)
        return [p, p * rng.uniform(0.45, 0.65)]
    if kind == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.82 * [1.0, rng.uniform(0.85, 1.0)]]
    if kind == "triangle":
        return [_regular(3, -math.pi / 2) + rng.uniform(-0.12, 0.12, (3, 2))]
    if kind == "star":
        n = int(rng.integers(5, 7))
        outer, inner = _regular(n, -math.pi / 2), _regular(n, -math.pi / 2 + math.pi / n) * rng.uniform(0.38, 0.5)
        return [np.stack([outer, inner], axis=1).reshape(-1, 2)]
    if kind == "cross":
        w = rng.uniform(0.26, 0.36)
        return [
            np.array(
                [
                    [-w, -1],
                    [w, -1],
                    [w, -w],
                    [1, -w],
                    [1, w],
                    [w, w],
                    [w, 1],
                    [-w, 1],
                    [-w, w],
                    [-1, w],
                    [-1, -w],
                    [-w, -w],
                ]
            )
        ]
    # Texture patches take an irregular blob outline, so their outline says nothing about the class.
    n = 12
    radii = np.clip(1.0 + rng.normal(0, 0.12, n), 0.7, 1.2)
    return [_regular(n, rng.uniform(0, 2 * math.pi)) * radii[:, None]]


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A pattern in [0, 1] of shape (size, size), at a random period and orientation."""
    yy, xx = _grid(size)
    a = rng.uniform(0, math.pi)
    u = xx * math.cos(a) + yy * math.sin(a)
    v = yy * math.cos(a) - xx * math.sin(a)
    period = rng.uniform(0.09, 0.14) * size
    w = 2 * math.pi / period
    if kind == "stripes":
        t = np.sin(u * w)
    elif kind == "checker":
        t = np.sin(u * w) * np.sin(v * w)
    elif kind == "waves":
        t = np.sin(u * w + 2.2 * np.sin(v * (w * 0.45)))
    else:  # dots: a lattice of disks
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        return ((du * du + dv * dv) < (period * 0.28) ** 2).astype(np.float32)
    return np.clip(t * 4 + 0.5, 0, 1)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _distant_colour(rng: np.random.Generator, other: np.ndarray, min_dist: float = 110.0) -> np.ndarray:
    """A random colour at least min_dist (RGB) from `other`, so the object is visible at all."""
    for _ in range(20):
        c = _colour(rng)
        if np.linalg.norm(c - other) >= min_dist:
            return c
    return 255 - other


def _smooth_field(coarse: np.ndarray, size: int) -> Image.Image:
    """A (k, k, 3) array of colours, upsampled smoothly to a size x size RGB image."""
    small = Image.fromarray(coarse.clip(0, 255).astype(np.uint8))
    return small.resize((size, size), Image.Resampling.BICUBIC)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A two-colour gradient in a random direction with low-frequency blotches over it."""
    c0, c1 = _colour(rng), _colour(rng)
    a = rng.uniform(0, 2 * math.pi)
    k = 5
    t = np.linspace(-0.5, 0.5, k, dtype=np.float32)
    g = (t[None, :] * math.cos(a) + t[:, None] * math.sin(a) + 0.5).clip(0, 1)[..., None]
    blotches = rng.normal(0, 35, (k, k, 1)).astype(np.float32) * rng.uniform(0.3, 1.0, 3).astype(np.float32)
    return _smooth_field(c0 * (1 - g) + c1 * g + blotches, size)


def _strokes(img: Image.Image, rng: np.random.Generator, count: int) -> None:
    draw = ImageDraw.Draw(img)
    s = img.width
    for _ in range(count):
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        width = int(rng.integers(1, max(2, s // 32)))
        if rng.random() < 0.5:
            pts = rng.uniform(-0.1, 1.1, (int(rng.integers(2, 4)), 2)) * s
            draw.line([tuple(p) for p in pts], fill=fill, width=width)
        else:
            x, y = rng.uniform(0, s, 2)
            r = rng.uniform(0.1, 0.4) * s
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(40, 160), fill=fill, width=width)


def render(seed: int, split: str, index: int, label: int, size: int = SIZE) -> Image.Image:
    """Draw one image of class CLASSES[label]; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    kind = CLASSES[label]
    img = _background(rng, size)
    _strokes(img, rng, int(rng.integers(1, 5)))

    # The object's mask, drawn supersampled.
    radius = rng.uniform(0.24, 0.38) * size
    centre = rng.uniform(radius * 0.9, size - radius * 0.9, 2)
    angle = rng.uniform(0, 2 * math.pi)
    mask_big = Image.new("L", (size * _SS, size * _SS), 0)
    draw = ImageDraw.Draw(mask_big)
    for i, poly in enumerate(_outline(kind, rng)):
        pts = (_rotate(poly, angle) * radius + centre) * _SS
        draw.polygon([tuple(p) for p in pts], fill=255 if i == 0 else 0)
    mask = mask_big.reduce(_SS)

    # Fill colours are chosen against the background under the object, never per class.
    under = np.asarray(img.resize((1, 1), Image.Resampling.BOX, box=_box(centre, radius, size)), np.float32)[0, 0]
    c_a = _distant_colour(rng, under)
    if kind in SHAPES:
        # A mild shading ramp in a random direction, so a solid fill is not perfectly flat.
        a = rng.uniform(0, 2 * math.pi)
        t = np.array([-1.0, 1.0], np.float32)
        ramp = (t[None, :] * math.cos(a) + t[:, None] * math.sin(a))[..., None]
        fill = _smooth_field(c_a + ramp * rng.uniform(0, 30), size)
    else:
        c_b = _distant_colour(rng, c_a, 90.0)
        t = _texture(kind, rng, size)[..., None]
        fill = Image.fromarray((c_a * t + c_b * (1 - t)).astype(np.uint8))
    img = Image.composite(fill, img, mask)

    _strokes(img, rng, int(rng.integers(0, 2)))  # a stroke may cross the object too
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(4, 14)
    return Image.fromarray((np.asarray(img, np.float32) + noise).clip(0, 255).astype(np.uint8))


def _box(centre: np.ndarray, radius: float, size: int) -> tuple[float, float, float, float]:
    x, y = centre
    return (max(0.0, x - radius), max(0.0, y - radius), min(size, x + radius), min(size, y + radius))


def encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class DemoSource:
    """The demo set as a Source (shards/types.py); items are (split, index), rendered on read."""

    dataset = "demo"

    def __init__(
        self,
        seed: int = 0,
        train_per_class: int = TRAIN_PER_CLASS,
        val_per_class: int = VAL_PER_CLASS,
        size: int = SIZE,
    ) -> None:
        if train_per_class < 1 or val_per_class < 1:
            raise DemoError(
                f"demo: train_per_class and val_per_class must be >= 1, not {train_per_class}, {val_per_class}"
            )
        if size < 16:
            raise DemoError(f"demo: size must be at least 16 px, not {size}")
        self.seed, self.size = seed, size
        self.per_class = {"train": train_per_class, "val": val_per_class}

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, c, c) for i, c in enumerate(CLASSES)]

    def splits(self) -> list[str]:
        return list(SPLITS)

    def items(self, split: str) -> list[Item]:
        n = self.per_class[split] * len(CLASSES)
        approx = self.size * self.size // 2  # JPEG bytes at quality 90, roughly; only for planning
        # Classes interleave (index % 10) so every prefix of the split is balanced.
        return [
            Item(
                f"demo_{split}_{i:06d}",
                i % len(CLASSES),
                CLASSES[i % len(CLASSES)],
                f"demo/{split}/{CLASSES[i % len(CLASSES)]}/{i:06d}.jpg",
                (split, i),
                approx,
            )
            for i in range(n)
        ]

    def read(self, item: Item) -> bytes:
        split, index = item.locator
        return encode(render(self.seed, split, index, index % len(CLASSES), self.size))

    def quarantined(self, split: str) -> list[Quarantined]:
        return []
