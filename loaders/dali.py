"""The DALI backend: samples -> decoders -> resize -> crop_mirror_normalize.

One graph, two placements: on a CUDA device the decoder runs "mixed" (nvJPEG, and the
hardware JPEG decoder for `hw_decoder_load` of the images where the GPU has one) and every
later operator on the GPU; without one the same operators run on CPU threads
(pipeline device_id=None), which is also what CI exercises. One exception, CPU train only:
resize + crop_mirror_normalize become shardline's one-pass fused operator (loaders/dali_plugin.py),
because DALI's CPU resize alone costs as much as decoding; `fused_resize=False` runs the GPU graph as is.

One graph, two input stages (image_pipeline's `source`), both giving the plan's rows in plan
order as (JPEG bytes, int64 label), so everything after them is the same code:

- Local disk: fn.readers.webdataset, with no Python in the per-sample path. The reader's own
  sharding (shard_id/num_shards) hands each rank a contiguous slice of unequal size and its
  shuffling is a local buffer, so neither equal per-rank epochs, nor a (seed, epoch) order, nor
  an exact mid-epoch resume come from it. Instead, before each epoch, the plan
  (loaders/sharding.py) is turned into per-epoch sub-indexes: for each run of rows that read
  the same shard, a v1.2 index file listing exactly those samples, in plan order (padding rows
  are simply listed again), with the offsets copied from the index written beside the tar.
  The reader then reads (index_paths = those files, random_shuffle=False) precisely this
  rank's rows for the epoch.
- A remote set (spec.cache): DALI's reader opens every file it is given when the pipeline is
  built, so it cannot read a cache that is still filling. An fn.external_source (CachedInput)
  feeds the same decoders instead: per batch, one thread reading a few batches ahead waits
  until the batch's shards are in the cache (EpochReads.need), reads each row's image and label
  member from the cached tar at the offsets of the shard's index (one pread each), and releases
  the shards whose last batch that was (EpochReads.finished). external_source copies the arrays
  it is handed before the callback returns (no_copy=False), so no file is read by DALI itself
  and none needs to stay pinned for batches in DALI's prefetch queue. One pipeline an epoch, as
  on local disk, that starts as soon as its first batch's shards have landed.

Decoding, augmentation and the label all stay in DALI's C++ threads. A resume starts the
sub-indexes, or the external source, at the resumed batch, so skipped samples are never read or
decoded; crops are drawn per sample (loaders/dali_crops.py), so they do not depend on where a
pipeline starts. The train pipeline is rebuilt each epoch (milliseconds on CPU) and the old one
released, so host memory stays flat; an eval pipeline whose plan has not changed since its last
complete pass (the same every time: epoch 0, from batch 0) is kept and reused, from local disk
or from a remote set. `DaliBackend.builds` records the seconds of every pipeline build.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import nvidia.dali
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from loaders import augment, dali_augment, dali_crops, dali_plugin
from loaders.buffers import BufferPool
from loaders.cache import EpochReads
from loaders.common import (
    EVAL_CROP_RATIO,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ReadSpec,
    apply_options,
    find_undecodable,
    read_image_bytes,
)
from loaders.sharding import EpochPlan
from loaders.spec import IMAGE_EXTS, Shard
from shards import dali_index
from shards.manifest import LABEL_DTYPE, LABEL_EXT

# The oldest DALI this backend runs on: the floor pyproject.toml declares, and what is tested.
# (Pipeline.outputs(cuda_stream), which _run needs, arrived in 1.44; 2.0 is the tested floor.)
MIN_DALI = (2, 0)
READER = "reader"
LABEL_SIZE = np.dtype(LABEL_DTYPE).itemsize
log = logging.getLogger(__name__)


def check_dali_version(version: str) -> None:
    """Refuse a DALI older than MIN_DALI in one line, naming both versions; an unparsable
    version (a source build) is let through."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m[1]), int(m[2])) < MIN_DALI:
        need = ".".join(map(str, MIN_DALI))
        raise ImportError(
            f"shardline's DALI backend needs nvidia-dali {need} or newer, but {version} is installed: "
            "upgrade the nvidia-dali-cuda1x0 wheel, or use backend='pytorch'"
        )


check_dali_version(nvidia.dali.__version__)


@dataclass
class DaliOptions:
    num_threads: int = 2  # CPU worker threads of the pipeline
    prefetch_queue_depth: int = 2  # batches prepared ahead
    hw_decoder_load: float = 0.65  # share of JPEGs sent to the hardware decoder (A100/H100)
    use_fast_idct: bool = True  # train, CPU: libjpeg-turbo's fast integer IDCT (up to 14% faster)
    antialias: bool = False  # train resize: crops are already near the output size; eval always antialiases
    # CPU train: shardline's one-pass resize + flip + normalize (loaders/dali_plugin.py) in place of
    # fn.resize + fn.crop_mirror_normalize; None: when the plugin builds here.
    fused_resize: bool | None = None
    # nvJPEG / pinned buffer hints: avoid reallocations on big images. None:
    # scaled to the data by gpu_decoder_hints(), at most NVIDIA's ResNet-50 recipe values below,
    # which preallocate about 1.6 GB of device and 2.1 GB of pinned memory at 8 threads.
    device_memory_padding: int | None = None
    host_memory_padding: int | None = None
    preallocate_width_hint: int | None = None
    preallocate_height_hint: int | None = None
    auto_augment: str = "none"  # train: none, randaugment or trivialaugment (loaders/augment.py)
    random_erasing: float = 0.0  # train: probability of erasing a rectangle (loaders/augment.py)

    @classmethod
    def from_machine(cls, device: torch.device, workers: int | None, options: dict) -> DaliOptions:
        cores = len(os.sched_getaffinity(0))
        if device.type == "cuda":
            # GPU decoding leaves the CPU threads little to do; share the cores between local GPUs.
            threads = max(2, min(8, cores // max(1, torch.cuda.device_count())))
            o = cls(num_threads=threads, prefetch_queue_depth=3)
        else:
            o = cls(num_threads=cores, prefetch_queue_depth=2)
        if workers is not None:
            o.num_threads = workers
        return apply_options(o, options, "dali")


# NVIDIA's ResNet-50 DALI recipe: hints for ImageNet's largest photo (5980 x 6430).
IMAGENET_HINTS = {
    "device_memory_padding": 211025920,
    "host_memory_padding": 140544512,
    "preallocate_width_hint": 5980,
    "preallocate_height_hint": 6430,
}
MIN_PADDING = 8 << 20  # nvJPEG's own defaults are 16 MB (device) and 8 MB (host)


def gpu_decoder_hints(shards: list[Shard], opts: DaliOptions, image: bytes | None = None) -> dict:
    """The mixed decoder's memory hints, scaled to the data.

    The data's size comes from one image header: `image` when given (a remote set: the largest
    JPEG of the first batch, read from the shard cache, so no request bypasses it), else the
    largest image (in bytes) of the first shard, one read. A good estimate for a shuffled set,
    and only a hint: a larger image makes nvJPEG reallocate once, it does not fail. Paddings
    scale with the pixel count, never above the ImageNet recipe's; options set explicitly win.
    """
    from PIL import Image

    if image is None:
        idx = shards[0].index()
        image = read_image_bytes(shards[0], int(np.argmax(idx.image_size)))
    with Image.open(io.BytesIO(image)) as im:
        w, h = im.size
    ref_w, ref_h = IMAGENET_HINTS["preallocate_width_hint"], IMAGENET_HINTS["preallocate_height_hint"]
    share = min(1.0, (w * h) / (ref_w * ref_h))
    hints = {
        "preallocate_width_hint": min(w, ref_w) if share < 1 else ref_w,
        "preallocate_height_hint": min(h, ref_h) if share < 1 else ref_h,
        "device_memory_padding": max(MIN_PADDING, int(IMAGENET_HINTS["device_memory_padding"] * share)),
        "host_memory_padding": max(MIN_PADDING, int(IMAGENET_HINTS["host_memory_padding"] * share)),
    }
    return {k: getattr(opts, k) if getattr(opts, k) is not None else v for k, v in hints.items()}


def eval_resize(jpegs, images, image_size: int):
    """torchvision's Resize(int(size / 0.875)) + CenterCrop(size) sizes and offsets, to the pixel.

    resize_shorter alone rounds the longer side and DALI's center crop rounds half-pixel
    offsets differently from torchvision, shifting eval images by a pixel; so the sizes and
    crop anchors are computed per sample from the JPEG header (CPU, before decoding).
    """
    r = int(image_size / EVAL_CROP_RATIO)
    shape = fn.peek_image_shape(jpegs, dtype=types.INT32)
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = (r * h) // short, (r * w) // short  # shorter side -> r, longer -> int(r * long / short)
    as_float = dict(dtype=types.FLOAT)
    images = fn.resize(
        images,
        resize_x=fn.cast(new_w, **as_float),
        resize_y=fn.cast(new_h, **as_float),
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )

    def pos(extent):  # torchvision: anchor = int(round(diff / 2)), Python's round half to even
        diff = extent - image_size
        k = diff // 2
        anchor = k + (diff - 2 * k) * (k - 2 * (k // 2))
        return (anchor + 0.25) / dmath.max(diff, 1)  # +0.25: DALI's own rounding lands on `anchor`

    return images, {"crop_pos_x": pos(new_w), "crop_pos_y": pos(new_h)}


def read_samples(paths: list[str], index_paths: list[str], source=None):
    """The input stage: (JPEG bytes, int64 label [1]) per row, in plan order. From the tars at
    `paths` through per-epoch sub-indexes (local disk), or from `source`, a CachedInput (a remote set)."""
    if source is not None:
        return fn.external_source(
            source=source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64], ndim=[1, 1]
        )
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=[";".join(IMAGE_EXTS), LABEL_EXT],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        random_shuffle=False,  # the order is the plan's
        name=READER,
    )


@pipeline_def
def image_pipeline(
    paths,
    index_paths,
    *,
    train,
    image_size,
    gpu,
    out_dtype,
    layout,
    opts: DaliOptions,
    crops=None,
    hints=None,
    source=None,
    augment=None,
):
    jpegs, labels = read_samples(paths, index_paths, source)
    decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
    if gpu:
        decoder.update(hw_decoder_load=opts.hw_decoder_load, **(hints or {}))
        if not train:
            # The mixed decoder's default chroma upsampling differs from libjpeg's
            # (CPU decoder, PIL) on 4:2:0 JPEGs; eval promises reference pixels, so it upsamples as they
            # do. Train keeps nvJPEG's default (and the hardware decoder's speed): a random crop resized
            # and flipped is no reference to match.
            decoder.update(jpeg_fancy_upsampling=True)
    elif train:
        decoder.update(use_fast_idct=opts.use_fast_idct)  # eval keeps the accurate IDCT: reference pixels
    crop_pos = {}
    normalize = dict(mean=[m * 255 for m in IMAGENET_MEAN], std=[s * 255 for s in IMAGENET_STD])
    if train:
        # Crop and flip from (seed, epoch, sample): loaders/dali_crops.py. On CPU only the crop's
        # region of the JPEG is decoded.
        images, mirror = dali_crops.random_resized_crop(jpegs, crops, decoder)
        if opts.fused_resize and not gpu:
            images = fn.shardline_resize_normalize(
                images, size=[image_size, image_size], dtype=out_dtype, output_layout=layout, mirror=mirror, **normalize
            )
            return images, labels
        images = fn.resize(
            images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=opts.antialias
        )
        if augment is not None:  # on the uint8 pixels, before normalization (loaders/dali_augment.py)
            images = dali_augment.apply(images, augment)
    else:
        images = fn.decoders.image(jpegs, **decoder)
        images, crop_pos = eval_resize(jpegs, images, image_size)
        mirror = 0
    images = fn.crop_mirror_normalize(
        images,
        dtype=out_dtype,
        output_layout=layout,
        crop=(image_size, image_size),
        **crop_pos,
        **normalize,
        mirror=mirror,
    )
    if gpu:
        labels = labels.gpu()
    return images, labels


TORCH_OF = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64}


def to_torch(tensor_list, device: torch.device, pool: BufferPool | None = None) -> torch.Tensor:
    """Copy a DALI batch into a torch tensor the consumer owns (DALI reuses its buffers)."""
    t = tensor_list.as_tensor()
    shape, dtype = tuple(t.shape()), TORCH_OF[t.dtype]
    out = pool.empty(shape, dtype, device) if pool else torch.empty(shape, dtype=dtype, device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(t, out, cuda_stream=stream)
    return out


Batch = tuple[list[np.ndarray], list[np.ndarray]]  # per row: JPEG bytes (uint8), label (int64 [1])


class CachedInput:
    """fn.external_source's callable for a remote set: batch after batch of the plan, as
    (JPEG bytes, label) per row, read from the shard cache's copies of the tars.

    One thread reads `ahead` batches ahead of DALI: it waits for a batch's shards
    (EpochReads.need), preads each row's image and label member at the offsets of its shard's
    index, then releases the shards whose last batch that was (EpochReads.finished). Nothing
    needs them afterwards: external_source copies the arrays when the callable returns
    (no_copy=False), so the batches in DALI's prefetch queue hold no file. The pipeline calls
    this once an iteration, in order, from the thread calling schedule_run; a call past the
    plan's end (a short plan's first prefetch, never output) gets the last batch again.
    """

    def __init__(self, shards: list[Shard], ahead: int = 2) -> None:
        self.shards, self.ahead = shards, ahead
        self.plan: EpochPlan | None = None
        self.reads: EpochReads | None = None
        self.paths: dict[int, str] = {}  # shard -> local path, of the last batch read (for error messages)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._next = 0  # the next batch to hand to the reading thread
        self._last: Batch | None = None

    def begin(self, plan: EpochPlan, reads: EpochReads) -> None:
        """Start reading `plan` (its batch 0 first) through `reads`; the first shards' downloads
        then overlap the pipeline's build."""
        self.end()
        self.plan, self.reads, self._next = plan, reads, 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dali-cached-input")
        self._fill()

    def first(self) -> Batch:
        """The plan's first batch, waiting for it (before the pipeline asked for any)."""
        return self._pending[0].result()

    def __call__(self, iteration: int) -> Batch:
        if not self._pending:
            if self._last is None:
                raise RuntimeError("the DALI pipeline asked for a batch with no plan begun")
            return self._last
        batch = self._pending.popleft().result()
        self._fill()
        self._last = batch
        return batch

    def end(self) -> None:
        """Stop: release the epoch's shards (a read still waiting for one gives up) and the thread."""
        if self.reads is not None:
            self.reads.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._pending:
            with contextlib.suppress(BaseException):
                f.result(timeout=0)  # an early stop: a read cut short by close() goes with the epoch
        self._pending.clear()
        self.plan, self.reads, self._pool, self._last = None, None, None, None

    def _fill(self) -> None:
        while len(self._pending) < self.ahead and self._next < self.plan.batches:
            self._pending.append(self._pool.submit(self._read, self._next))
            self._next += 1

    def _read(self, b: int) -> Batch:
        paths = self.reads.need(b)
        self.paths = paths
        rows = slice(b * self.plan.batch_size, (b + 1) * self.plan.batch_size)
        fds: dict[int, int] = {}
        jpegs, labels = [], []
        try:
            for s, i in zip(self.plan.shard[rows].tolist(), self.plan.sample[rows].tolist(), strict=True):
                if s not in fds:
                    fds[s] = os.open(paths[s], os.O_RDONLY)
                idx = self.shards[s].index()
                image = _pread(fds[s], int(idx.image_size[i]), int(idx.image_offset[i]), paths[s])
                label = _pread(fds[s], LABEL_SIZE, int(idx.label_offset[i]), paths[s])
                jpegs.append(np.frombuffer(image, np.uint8))
                labels.append(np.frombuffer(label, LABEL_DTYPE).astype(np.int64))
        finally:
            for fd in fds.values():
                os.close(fd)
        self.reads.finished(b)
        return jpegs, labels


def _pread(fd: int, size: int, offset: int, path: str) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"{path}: {size} bytes expected at offset {offset}, {len(data)} read (a truncated copy)")
    return data


class DaliBackend:
    name = "dali"

    def __init__(self, spec: ReadSpec) -> None:
        self.spec, self.shards, self.batch_size = spec, spec.shards, spec.batch_size
        self.train, self.device, self.dtype = spec.train, spec.device, spec.dtype
        self.gpu = self.device.type == "cuda"
        if self.gpu:
            self.device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self.device = torch.device("cuda", self.device_id)
        self.opts = DaliOptions.from_machine(self.device, spec.workers, spec.options)
        augment.check(self.opts.auto_augment, self.opts.random_erasing)
        self.augmenting = self.train and (self.opts.auto_augment != "none" or self.opts.random_erasing > 0)
        if self.gpu or not self.train or self.augmenting:
            # GPU: DALI's own kernels; eval: antialiased, PIL-exact resize; auto-augment and erasing
            # work on the resized uint8 pixels, between the resize and the normalization
            self.opts.fused_resize = False
        elif self.opts.fused_resize is None:
            self.opts.fused_resize = dali_plugin.load()
        elif self.opts.fused_resize and not dali_plugin.load():
            raise RuntimeError("fused_resize=True, but shardline's DALI plugin could not be built (see the log)")
        self._tmp = tempfile.mkdtemp(prefix="shardline-dali-")
        self.pool = BufferPool()
        # Evaluation reads the same plan every time (epoch 0, from batch 0), so
        # its pipeline is built once and kept: a GPU build re-creates the decoders, and DALI's
        # memory pools never shrink. _kept = (plan key, pipeline, its CachedInput or None),
        # reused after a complete pass.
        self._kept: tuple[bytes, object, CachedInput | None] | None = None
        self.remote = spec.cache is not None
        self._inputs: set[CachedInput] = set()  # a remote set's epochs being read (close() stops them)
        # A remote set's hints wait for its first batch (gpu_decoder_hints): its shards may not be here yet.
        self.hints: dict | None = gpu_decoder_hints(self.shards, self.opts) if self.gpu and not self.remote else None
        self.builds: list[float] = []  # seconds each pipeline build took, from its sub-indexes to pipe.build()

    def augment_params(self, plan: EpochPlan, epoch: int) -> dali_augment.AugmentParams | None:
        if not self.augmenting:
            return None
        o = self.opts
        return dali_augment.AugmentParams(
            plan, self.spec.seed, epoch, o.auto_augment, o.random_erasing, self.spec.image_size
        )

    def set_image_size(self, size: int) -> None:
        """A new output size. The train pipeline is built per epoch anyway (its sub-indexes are the
        epoch's plan), so it just takes the size; a kept eval pipeline of another size goes."""
        if size != self.spec.image_size:
            self.spec.image_size, self._kept = size, None

    def write_subindexes(self, plan: EpochPlan, epoch: int) -> tuple[list[str], list[str]]:
        """One v1.2 index per run of same-shard rows, listing those samples in plan order."""
        for name in os.listdir(self._tmp):
            os.remove(os.path.join(self._tmp, name))
        paths, index_paths = [], []
        cut = np.flatnonzero(np.diff(plan.shard)) + 1
        for j, (shard_rows, sample_rows) in enumerate(
            zip(np.split(plan.shard, cut), np.split(plan.sample, cut), strict=True)
        ):
            shard = self.shards[int(shard_rows[0])]
            path = os.path.join(self._tmp, f"e{epoch}-{j:05d}.idx")
            with open(path, "w") as f:
                f.write(
                    dali_index.subset_text(
                        shard.index(), sample_rows.tolist(), IMAGE_EXTS, LABEL_EXT, np.dtype(LABEL_DTYPE).itemsize
                    )
                )
            paths.append(shard.url.removeprefix("file://"))
            index_paths.append(path)
        return paths, index_paths

    def build(self, plan: EpochPlan, epoch: int, source: CachedInput | None = None):
        """A pipeline over `plan`: through per-epoch sub-indexes, or fed by `source` (a remote set)."""
        t = time.perf_counter()
        if source is None:
            paths, index_paths = self.write_subindexes(plan, epoch)
        else:
            paths, index_paths = [], []
            if self.gpu and self.hints is None:
                jpegs, _ = source.first()
                self.hints = gpu_decoder_hints(self.shards, self.opts, max(jpegs, key=len).tobytes())
        half = self.dtype == torch.float16
        pipe = image_pipeline(
            paths,
            index_paths,
            train=self.train,
            image_size=self.spec.image_size,
            gpu=self.gpu,
            out_dtype=types.FLOAT16 if half else types.FLOAT,
            layout="HWC" if self.spec.channels_last else "CHW",
            opts=self.opts,
            crops=dali_crops.CropParams(plan, self.spec.seed, epoch) if self.train else None,
            hints=self.hints,
            source=source,
            augment=self.augment_params(plan, epoch),
            enable_conditionals=self.augmenting,  # auto_aug's select splits the batch by operation
            batch_size=self.batch_size,
            num_threads=self.opts.num_threads,
            device_id=self.device_id if self.gpu else None,
            prefetch_queue_depth=self.opts.prefetch_queue_depth,
            seed=hash((self.spec.seed, epoch, self.spec.rank)) & 0x7FFFFFFF,
        )
        pipe.build()
        self.builds.append(time.perf_counter() - t)
        log.info(
            "built the DALI %s pipeline (%s) in %.2f s", "train" if self.train else "eval", self.device, self.builds[-1]
        )
        return pipe

    def batches(self, plan: EpochPlan, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if plan.batches == 0:
            return
        key = None if self.train else b"".join(a.tobytes() for a in (plan.shard, plan.sample, np.int64([epoch])))
        kept, self._kept = self._kept, None
        if kept is not None and (kept[0] != key or plan.batches < self.opts.prefetch_queue_depth):
            kept = None  # another plan, or a short one whose last pass left batches queued
        source = kept[2] if kept is not None else CachedInput(self.shards) if self.remote else None
        for other in list(self._inputs):  # an epoch stopped but not collected: the cache reads one at a time
            other.end()
            self._inputs.discard(other)
        if source is not None:
            # Before the build: the first shards' downloads overlap it.
            source.begin(plan, EpochReads(self.spec.cache, plan))
            self._inputs.add(source)
        try:
            pipe = self._start(plan, epoch, source) if kept is None else self._restart(kept[1])
            del kept
            yield from self._run(pipe, plan, source)
            if key is not None:  # reached only after a complete pass (an early stop ends at a yield)
                self._kept = (key, pipe, source)
        finally:
            if source is not None:
                source.end()
                self._inputs.discard(source)

    def _restart(self, pipe):
        """A kept pipeline, for the same plan again. Its last pass consumed every batch it
        scheduled (_run schedules exactly plan.batches, at least the queue depth), so its input
        stands at the plan's first row: the reader (random_shuffle=False) in the same order, or
        the CachedInput begun on this plan. Queue as many batches as a fresh pipeline's first
        schedule_run does."""
        for _ in range(self.opts.prefetch_queue_depth):
            pipe.schedule_run()
        return pipe

    def _start(self, plan: EpochPlan, epoch: int, source: CachedInput | None):
        """A built pipeline with its prefetch queue already filling (the first schedule_run queues
        prefetch_queue_depth batches)."""
        with dali_augment.quiet():  # the graph is traced in there, auto_aug's suites included
            pipe = self.build(plan, epoch, source)
        pipe.schedule_run()
        return pipe

    def _run(self, pipe, plan: EpochPlan, source: CachedInput | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # schedule_run/outputs rather than run(): run() always queues one batch past the last,
        # which the reader would read and decode for nothing.
        scheduled = self.opts.prefetch_queue_depth
        # Outputs on torch's current stream, not host-synchronous, so the CPU
        # can run ahead of the GPU (to_torch copies on the same stream).
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        try:
            for b in range(plan.batches):
                try:
                    images, labels = pipe.outputs(stream)
                except RuntimeError as e:
                    raise self._explain(e, plan.from_batch(b), source) from e
                x = to_torch(images, self.device, self.pool)
                y = to_torch(labels, self.device).view(-1)
                if scheduled < plan.batches:
                    pipe.schedule_run()
                    scheduled += 1
                if self.spec.channels_last:
                    x = x.permute(0, 3, 1, 2)  # NHWC storage seen as NCHW: channels-last memory format
                if self.dtype == torch.bfloat16:
                    x = x.to(torch.bfloat16)
                yield x, y
        finally:
            del pipe

    def _explain(self, e: RuntimeError, ahead: EpochPlan, source: CachedInput | None) -> Exception:
        """DALI names neither sample nor key: find it among the batches in flight (a remote set:
        in the cached copies still there, else at the shard's URL)."""
        n = (self.opts.prefetch_queue_depth + 1) * self.batch_size
        ahead = EpochPlan(ahead.shard[:n], ahead.sample[:n], ahead.valid[:n], self.batch_size)
        local = dict(source.paths) if source is not None else {}
        err = find_undecodable(self.shards, ahead, lambda s: local[s] if os.path.exists(local.get(s, "")) else None)
        if err is not None:
            return err
        names = sorted({self.shards[s].url for s in ahead.shard.tolist()})
        return RuntimeError(f"DALI failed on a batch read from {', '.join(names)}: {e}")

    def close(self) -> None:
        self._kept = None
        for source in list(self._inputs):  # an epoch stopped but not yet collected
            source.end()
        self._inputs.clear()
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmp)
