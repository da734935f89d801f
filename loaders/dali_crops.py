"""The DALI backend's random-resized-crop and flip, drawn per sample from (seed, epoch, sample).

Why not DALI's own random operators: their streams belong to the pipeline (one generator per
batch slot, seeded once), so a sample's crop depends on where in a rank's stream it lands. A
pipeline rebuilt for a resumed epoch, or a rank that reads another part of the epoch after a
change of world size, would crop every sample differently. DALI's pipeline checkpointing
(enable_checkpointing) restores those streams, but only for the same pipeline reading the same
stream on the same rank: it cannot follow a sample to another rank or batch size, and it would
tie the loader state to DALI's serialized blob.

So the randomness is a pure function of the sample instead, like the pytorch backend's: numpy
draws, per batch and vectorized, CROP_PARAMS uniforms for each row from a counter-based hash of
(seed, epoch, shard number, sample number); an external source hands them to the graph, and
DALI arithmetic turns them into torchvision's RandomResizedCrop window (area 0.08..1, log-uniform
ratio 3/4..4/3, up to 10 attempts, then the center-crop fallback) on the shape read from the
image header, which fn.decoders.image_slice then decodes (only that region, on CPU). Python
runs once per batch, never per sample.

What is the same where: a sample's crop rectangle and flip depend only on (seed, epoch, shard,
sample) and its header's size, so a resumed epoch, any world size or batch size, and CPU or GPU
placement all crop the same rectangle and flip the same way. The pixels of that rectangle are
bit-identical between runs on the same placement; between CPU (libjpeg-turbo, shardline's fused
resize) and GPU (nvJPEG or the hardware decoder, DALI's GPU resize) they agree only to the
decoders' and resamplers' rounding (a grey level or two), not bitwise. The pytorch backend draws
from torch's generator instead: the same distribution, other rectangles.
"""

from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, types
from nvidia.dali import math as dmath

from loaders.sharding import EpochPlan

ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 windows before its fallback
AREA = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
# Per row: (area share, log-ratio share) per attempt, then x and y anchors, then the flip.
CROP_PARAMS = 2 * ATTEMPTS + 3

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijective mix of uint64 (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, shard: np.ndarray, sample: np.ndarray, n: int) -> np.ndarray:
    """float32 [rows, n] in [0, 1): a row's values depend on (seed, epoch, shard, sample) only."""
    key = _splitmix64(np.full(len(shard), seed & 0xFFFFFFFFFFFFFFFF, np.uint64))
    for part in (np.full(len(shard), epoch, np.int64), shard.astype(np.int64), sample.astype(np.int64)):
        key = _splitmix64(key ^ part.astype(np.uint64))
    counters = key[:, None] ^ np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(0xD1B54A32D192ED03)
    bits = _splitmix64(counters) >> np.uint64(40)  # 24 bits: exact in float32, strictly below 1
    return (bits.astype(np.float32) / np.float32(1 << 24)).astype(np.float32)


class CropParams:
    """External-source callable: batch k of the pipeline -> the uniforms of the plan's rows of batch k."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int) -> None:
        self.values = sample_uniforms(seed, epoch, plan.shard, plan.sample, CROP_PARAMS)
        self.batch_size, self.batches = plan.batch_size, max(1, plan.batches)

    def __call__(self, iteration: int) -> np.ndarray:
        k = iteration % self.batches  # prefetching may ask past the end; those batches are never run
        return self.values[k * self.batch_size : (k + 1) * self.batch_size]


def _pick(cond, a, b):
    """cond ? a : b, per sample, in DALI arithmetic (cond is boolean)."""
    c = fn.cast(cond, dtype=types.FLOAT)
    return c * a + (1.0 - c) * b


def _round(x):
    return dmath.floor(x + 0.5)


def crop_window(jpegs, u):
    """torchvision RandomResizedCrop.get_params, per sample: (anchor [x, y], shape [w, h]) in pixels."""
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
    height, width = shape[0], shape[1]
    root_area = dmath.sqrt(height * width)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    # The fallback: the whole image, narrowed to the nearest allowed ratio.
    in_ratio = width / height
    w = _pick(in_ratio > RATIO[1], _round(height * RATIO[1]), width)
    h = _pick(in_ratio < RATIO[0], _round(width / RATIO[0]), height)
    found = fn.cast(in_ratio < 0.0, dtype=types.FLOAT)  # 0 for every sample
    for k in reversed(range(ATTEMPTS)):  # the first attempt that fits wins: fold from the last
        area = AREA[0] + (AREA[1] - AREA[0]) * u[2 * k]
        ratio = dmath.exp(log_lo + (log_hi - log_lo) * u[2 * k + 1])
        wk = _round(root_area * dmath.sqrt(area * ratio))
        hk = _round(root_area * dmath.sqrt(area / ratio))
        fits = (wk <= width) & (hk <= height) & (wk > 0.0) & (hk > 0.0)
        w, h = _pick(fits, wk, w), _pick(fits, hk, h)
        found = _pick(fits, 1.0, found)
    hit = found > 0.5
    x = _pick(hit, dmath.floor(u[2 * ATTEMPTS] * (width - w + 1.0)), dmath.floor((width - w) / 2.0))
    y = _pick(hit, dmath.floor(u[2 * ATTEMPTS + 1] * (height - h + 1.0)), dmath.floor((height - h) / 2.0))
    return fn.stack(x, y), fn.stack(w, h)


def random_resized_crop(jpegs, params: CropParams, decoder: dict):
    """Decode each sample's crop window; its flip as an int32 flag for the mirror argument."""
    u = fn.external_source(source=params, batch=True, dtype=types.FLOAT, ndim=1)
    anchor, shape = crop_window(jpegs, u)
    images = fn.decoders.image_slice(jpegs, anchor, shape, normalized_anchor=False, normalized_shape=False, **decoder)
    mirror = fn.cast(u[2 * ATTEMPTS + 2] < 0.5, dtype=types.INT32)
    return images, mirror
