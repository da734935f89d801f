"""The DALI backend's RandAugment / TrivialAugment and random erasing (loaders/augment.py's
semantics), inside the graph: nvidia.dali.auto_aug's operation suites, on the GPU when the
pipeline is, on CPU threads in DALI's CPU mode.

DALI's own apply_rand_augment / apply_trivial_augment draw the operation, its magnitude and
sign from the pipeline's random streams, which (as for the crops, loaders/dali_crops.py)
depend on where a sample lands in a rank's stream: a resumed epoch would augment it otherwise.
So those draws come per sample from (seed, epoch, shard, sample) through an external source,
as the crops' do, and nvidia.dali.auto_aug.core.select applies the chosen operation (DALI's
conditional execution: the pipeline is built with enable_conditionals). The erased rectangle is
decided in numpy too (loaders/augment.py: erase_boxes) and cut out by fn.erase.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.auto_aug import rand_augment, trivial_augment
from nvidia.dali.auto_aug.core import select, signed_bin

from loaders import augment
from loaders.dali_crops import sample_uniforms
from loaders.sharding import EpochPlan

SALT = 0x5EED_A116  # a stream of each sample's uniforms other than its crop's
PER_OP = 3  # operation index, magnitude bin, sign
BOX = 4  # erased rectangle: top, left, height, width


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Leave out DALI's notices that its own suites call deprecated fn.experimental names. DALI
    forces them on (simplefilter("default") inside its own catch_warnings), so they are dropped
    where they are shown rather than filtered."""
    shown = warnings.showwarning

    def show(message, category, *args, **kwargs) -> None:
        if not (issubclass(category, DeprecationWarning) and "fn.experimental" in str(message)):
            shown(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def suite(kind: str) -> list:
    """DALI's operations for `kind`; translations relative to the image's side, as torchvision's."""
    if kind == "randaugment":
        return rand_augment.get_rand_augment_suite(use_shape=True)
    return trivial_augment.get_trivial_augment_wide_suite(use_shape=True)


def operations(kind: str) -> int:
    return {"randaugment": augment.RANDAUGMENT_OPS, "trivialaugment": 1}.get(kind, 0)


class AugmentParams:
    """External-source callable: batch k -> int32 [rows, PER_OP x operations + BOX]."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int, kind: str, erasing: float, size: int) -> None:
        self.kind, self.erasing, self.size = kind, erasing, size
        ops = operations(kind)
        u = sample_uniforms(seed ^ SALT, epoch, plan.shard, plan.sample, PER_OP * ops + augment.ERASE_UNIFORMS)
        count = len(suite(kind)) if ops else 1
        bins = augment.RANDAUGMENT_BINS if kind == "randaugment" else augment.TRIVIAL_BINS
        cols = []
        for k in range(ops):
            op = np.minimum((u[:, PER_OP * k] * count).astype(np.int32), count - 1)
            if kind == "randaugment":
                level = np.full(len(u), augment.RANDAUGMENT_MAGNITUDE, np.int32)
            else:
                level = np.minimum((u[:, PER_OP * k + 1] * bins).astype(np.int32), bins - 1)
            cols += [op, level, (u[:, PER_OP * k + 2] < 0.5).astype(np.int32)]
        box = augment.erase_boxes(u[:, PER_OP * ops :], size, erasing)
        self.values = np.concatenate([np.stack(cols, axis=1), box], axis=1) if cols else box
        self.bins = bins
        self.batch_size, self.batches = plan.batch_size, max(1, plan.batches)

    def __call__(self, iteration: int) -> np.ndarray:
        k = iteration % self.batches  # prefetching may ask past the end; those batches are never run
        return self.values[k * self.batch_size : (k + 1) * self.batch_size]


def apply(images, params: AugmentParams):
    """uint8 HWC size x size images -> the same, auto-augmented and erased per sample."""
    p = fn.external_source(source=params, batch=True, dtype=types.INT32, ndim=1)
    ops = suite(params.kind)
    shape = np.array([params.size, params.size], np.float32)  # every image is size x size here
    for k in range(operations(params.kind)):
        level = signed_bin(p[PER_OP * k + 1], p[PER_OP * k + 2])
        images = select(
            ops,
            p[PER_OP * k],
            data=images,
            magnitude_bin=level,
            num_magnitude_bins=params.bins,
            shape=shape,
            fill_value=augment.FILL,  # where a shear, rotation or shift uncovers the canvas
        )
    if params.erasing > 0:
        box = fn.cast(p[PER_OP * operations(params.kind) :], dtype=types.FLOAT)
        images = fn.erase(images, anchor=box[0:2], shape=box[2:4], axis_names="HW", fill_value=augment.MEAN_PIXEL)
    return images
