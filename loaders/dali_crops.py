"""The DALI backend's random-resized-crop and flip, drawn per sample from (seed, epoch, sample).

Why not DALI's own random operators: their streams belong to the pipeline (one generator per
batch slot, seeded once), so a sample's crop depends on where in a rank's stream it lands. A
pipeline rebuilt for a resumed epoch, or a rank that reads another part of the epoch after a
change of world size, would crop every sample differently. DALI's pipeline checkpointing
(enable_checkpointing) restores those streams, but only for the same pipeline reading the same
stream on the same rank: it cannot follow a sample to another rank or batch size, and it would
tie the loader state to DALI's serialized blob.

So the randomness is a pure function of the sample instead, like the pytorch backend's: numpy
draws, per batch and vectorized, UNIFORMS uniforms for each row from a counter-based hash of
(seed, epoch, shard number, sample number) and turns them into torchvision's RandomResizedCrop
decision (area 0.08..1, log-uniform ratio 3/4..4/3, the first of 10 attempts that fits, else
the centered fallback) for every possible image aspect at once (`crop_tables`); an external
source hands that to the graph, where a few DALI operators pick the row for the aspect read
from the image header and fn.decoders.image_slice decodes that window (only that region, on
CPU). Python runs once per batch, never per sample. (Evaluating the 10 attempts in DALI
arithmetic instead costs about 300 operators per batch: 40% of CPU throughput.)

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
UNIFORMS = 2 * ATTEMPTS + 3  # per row: (area, log-ratio) per attempt, then the y and x anchors, the flip
INTERVALS = 2 * ATTEMPTS + 1  # aspect ratios cut at each attempt's two limits
ROW = 5  # per interval: crop height and width over sqrt(image area), found, y and x anchor shares
CENTER = 0.499999  # anchor share that floors (share * (d + 1)) to d // 2: the fallback's centered crop
PARAMS = 2 * ATTEMPTS + INTERVALS * ROW + 1  # what the graph receives per row: limits, table, flip

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


def crop_tables(u: np.ndarray) -> np.ndarray:
    """Per row, torchvision's RandomResizedCrop.get_params for every image aspect at once.

    Attempt k (area share s, ratio r) gives a crop of sqrt(s r) x sqrt(s / r) times sqrt(W H),
    which fits exactly when s r <= W / H <= r / s. So which attempt wins (the first that fits,
    or the fallback) depends on the image only through its aspect, and changes only at those
    2 x ATTEMPTS limits: numpy decides it here for each of the intervals between them, and
    the graph just finds the image's interval (one comparison, one sum) and reads its row.
    Returned per row: the sorted limits, then INTERVALS rows of ROW values, then the flip.
    """
    n = len(u)
    area = AREA[0] + (AREA[1] - AREA[0]) * u[:, 0 : 2 * ATTEMPTS : 2].astype(np.float64)
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = np.exp(log_lo + (log_hi - log_lo) * u[:, 1 : 2 * ATTEMPTS : 2].astype(np.float64))
    fw, fh = np.sqrt(area * ratio), np.sqrt(area / ratio)
    lo, hi = area * ratio, ratio / area  # attempt k fits images with lo[k] <= W / H <= hi[k]
    limits = np.sort(np.concatenate([lo, hi], axis=1), axis=1)
    mids = np.concatenate([limits[:, :1] / 2, (limits[:, 1:] + limits[:, :-1]) / 2, limits[:, -1:] * 2], axis=1)
    fits = (lo[:, None, :] <= mids[:, :, None]) & (mids[:, :, None] <= hi[:, None, :])  # [n, interval, attempt]
    first = fits.argmax(axis=2)
    found = fits.any(axis=2)
    table = np.zeros((n, INTERVALS, ROW))
    table[..., 0] = np.where(found, np.take_along_axis(fh, first, axis=1), 0.0)
    table[..., 1] = np.where(found, np.take_along_axis(fw, first, axis=1), 0.0)
    table[..., 2] = found
    anchors = u[:, 2 * ATTEMPTS : 2 * ATTEMPTS + 2].astype(np.float64)
    table[..., 3:5] = np.where(found[..., None], anchors[:, None, :], CENTER)
    flip = u[:, -1:]
    return np.concatenate([limits, table.reshape(n, -1), flip], axis=1).astype(np.float32)


class CropParams:
    """External-source callable: batch k of the pipeline -> the uniforms of the plan's rows of batch k."""

    def __init__(self, plan: EpochPlan, seed: int, epoch: int) -> None:
        self.values = crop_tables(sample_uniforms(seed, epoch, plan.shard, plan.sample, UNIFORMS))
        self.batch_size, self.batches = plan.batch_size, max(1, plan.batches)

    def __call__(self, iteration: int) -> np.ndarray:
        k = iteration % self.batches  # prefetching may ask past the end; those batches are never run
        return self.values[k * self.batch_size : (k + 1) * self.batch_size]


def crop_window(jpegs, params):
    """Per sample (anchor, shape) in pixels, (y, x) order: the row of the image's aspect interval.

    About 30 small operators per batch, independent of the number of attempts.
    """
    shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # H, W, C from the header, EXIF-oriented
    hw = shape[0:2]
    height, width = shape[0], shape[1]
    limits = params[0 : 2 * ATTEMPTS]
    interval = fn.reductions.sum(fn.cast(limits <= width / height, dtype=types.INT32))
    table = fn.reshape(params[2 * ATTEMPTS : 2 * ATTEMPTS + INTERVALS * ROW], shape=[INTERVALS, ROW])
    row = table[interval]
    found = row[2]
    crop = dmath.max(dmath.floor(dmath.sqrt(height * width) * row[0:2] + 0.5), 1.0)
    # torchvision's fallback: the whole image, narrowed to the nearest allowed ratio
    fallback = dmath.min(hw, dmath.floor(fn.stack(width, height) * RATIO[1] + 0.5))
    size = found * crop + (1.0 - found) * fallback
    anchor = dmath.floor(row[3:5] * (hw - size + 1.0))
    return anchor, size


def random_resized_crop(jpegs, params: CropParams, decoder: dict):
    """Decode each sample's crop window (only that region, where the decoder can); its flip as int32."""
    u = fn.external_source(source=params, batch=True, dtype=types.FLOAT, ndim=1)
    anchor, size = crop_window(jpegs, u)
    images = fn.decoders.image_slice(
        jpegs, anchor, size, axis_names="HW", normalized_anchor=False, normalized_shape=False, **decoder
    )
    mirror = fn.cast(u[PARAMS - 1] < 0.5, dtype=types.INT32)
    return images, mirror
