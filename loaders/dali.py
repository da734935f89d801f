"""The DALI backend: fn.readers.webdataset -> decoders -> resize -> crop_mirror_normalize.

One graph, two placements: on a CUDA device the decoder runs "mixed" (nvJPEG, and the
hardware JPEG decoder for `hw_decoder_load` of the images where the GPU has one) and every
later operator on the GPU; without one the same operators run on CPU threads
(pipeline device_id=None), which is also what CI exercises. One exception, CPU train only:
resize + crop_mirror_normalize become shardline's one-pass fused operator (loaders/dali_plugin.py),
because DALI's CPU resize alone costs as much as decoding; `fused_resize=False` runs the GPU graph as is.

How the contract's sample order gets into DALI without Python in the per-sample path: the
reader's own sharding (shard_id/num_shards) hands each rank a contiguous slice of unequal
size and its shuffling is a local buffer, so neither equal per-rank epochs, nor a
(seed, epoch) order, nor an exact mid-epoch resume come from it. Instead, before each epoch,
the plan (loaders/sharding.py) is turned into per-epoch sub-indexes: for each run of rows
that read the same shard, a v1.2 index file listing exactly those samples, in plan order
(padding rows are simply listed again), with the offsets copied from the index written
beside the tar. fn.readers.webdataset then reads (paths = the tars of the runs, index_paths =
those files, random_shuffle=False) precisely this rank's rows for the epoch; decoding,
augmentation and the binary int64 label all stay in DALI's C++ threads. A resume writes the
sub-indexes from the resumed batch on, so skipped samples are never read or decoded. The
train pipeline is rebuilt each epoch (milliseconds on CPU) and the old one released, so host
memory stays flat; the eval pipeline of a local set, whose plan never changes, is built once
and kept. A remote set runs each epoch as a chain of pipelines over the shards the cache holds
(DaliBackend._cached_batches).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.plugin.pytorch import feed_ndarray

from loaders import dali_crops, dali_plugin
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
from loaders.spec import IMAGE_EXTS, Shard, is_url
from shards import dali_index
from shards.manifest import LABEL_DTYPE, LABEL_EXT

READER = "reader"
SEGMENT_BYTES = 256 << 20  # remote sets: bytes of shards one pipeline reads before the next takes over
log = logging.getLogger(__name__)


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
    # nvJPEG / pinned buffer hints: avoid reallocations on big images. None (issue 14, item 3):
    # scaled to the data by gpu_decoder_hints(), at most NVIDIA's ResNet-50 recipe values below,
    # which preallocate about 1.6 GB of device and 2.1 GB of pinned memory at 8 threads.
    device_memory_padding: int | None = None
    host_memory_padding: int | None = None
    preallocate_width_hint: int | None = None
    preallocate_height_hint: int | None = None

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


def gpu_decoder_hints(shards: list[Shard], opts: DaliOptions, remote: bool = False) -> dict:
    """The mixed decoder's memory hints, scaled to the data (issue 14, item 3).

    The data's size comes from the header of the largest image (in bytes) of the first shard,
    one read: a good estimate for a shuffled set, and only a hint (a larger image makes nvJPEG
    reallocate once, it does not fail). Paddings scale with the pixel count, never above the
    ImageNet recipe's; options set explicitly win. A remote set keeps the recipe's values: no
    request may bypass the shard cache, and its first shard may not be here yet.
    """
    from PIL import Image

    if remote:
        w, h = IMAGENET_HINTS["preallocate_width_hint"], IMAGENET_HINTS["preallocate_height_hint"]
    else:
        idx = shards[0].index()
        with Image.open(io.BytesIO(read_image_bytes(shards[0], int(np.argmax(idx.image_size))))) as im:
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


@pipeline_def
def image_pipeline(
    paths, index_paths, *, train, image_size, gpu, out_dtype, layout, opts: DaliOptions, crops=None, hints=None
):
    jpegs, labels = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=[";".join(IMAGE_EXTS), "label"],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        random_shuffle=False,  # the order is the plan's
        name=READER,
    )
    decoder = dict(device="mixed" if gpu else "cpu", output_type=types.RGB)
    if gpu:
        decoder.update(hw_decoder_load=opts.hw_decoder_load, **(hints or {}))
        if not train:
            # Issue 14, item 2: the mixed decoder's default chroma upsampling differs from libjpeg's
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
        if self.gpu or not self.train:
            self.opts.fused_resize = False  # GPU: DALI's own kernels; eval: antialiased, PIL-exact resize
        elif self.opts.fused_resize is None:
            self.opts.fused_resize = dali_plugin.load()
        elif self.opts.fused_resize and not dali_plugin.load():
            raise RuntimeError("fused_resize=True, but shardline's DALI plugin could not be built (see the log)")
        self._tmp = tempfile.mkdtemp(prefix="shardline-dali-")
        self.pool = BufferPool()
        # Issue 14, item 3: evaluation of a local set reads the same plan every time (epoch 0, from
        # batch 0), so its pipeline is built once and kept: a GPU build re-creates the decoders, and
        # DALI's memory pools never shrink. _kept = (plan key, pipeline), reused after a complete pass.
        self._kept: tuple[bytes, object] | None = None
        self.hints = gpu_decoder_hints(self.shards, self.opts, remote=spec.cache is not None) if self.gpu else {}
        self.builds: list[float] = []  # seconds each pipeline build took

    def write_subindexes(
        self, plan: EpochPlan, epoch: int, local: dict[int, str] | None = None
    ) -> tuple[list[str], list[str]]:
        """One v1.2 index per run of same-shard rows, listing those samples in plan order.

        `local`: shard number -> the path of its cached copy (remote sets); else the shard's own path.
        """
        for name in os.listdir(self._tmp):
            os.remove(os.path.join(self._tmp, name))
        paths, index_paths = [], []
        cut = np.flatnonzero(np.diff(plan.shard)) + 1
        for j, (shard_rows, sample_rows) in enumerate(
            zip(np.split(plan.shard, cut), np.split(plan.sample, cut), strict=True)
        ):
            s = int(shard_rows[0])
            shard = self.shards[s]
            path = os.path.join(self._tmp, f"e{epoch}-{j:05d}.idx")
            with open(path, "w") as f:
                f.write(
                    dali_index.subset_text(
                        shard.index(), sample_rows.tolist(), IMAGE_EXTS, LABEL_EXT, np.dtype(LABEL_DTYPE).itemsize
                    )
                )
            if local is not None:
                paths.append(local[s])
            else:
                paths.append(shard.url if is_url(shard.url) else shard.url.removeprefix("file://"))
            index_paths.append(path)
        return paths, index_paths

    def build(self, plan: EpochPlan, epoch: int, local: dict[int, str] | None = None, seed_key: tuple = ()):
        paths, index_paths = self.write_subindexes(plan, epoch, local)
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
            batch_size=self.batch_size,
            num_threads=self.opts.num_threads,
            device_id=self.device_id if self.gpu else None,
            prefetch_queue_depth=self.opts.prefetch_queue_depth,
            seed=hash((self.spec.seed, epoch, self.spec.rank, *seed_key)) & 0x7FFFFFFF,
        )
        t = time.perf_counter()
        pipe.build()
        self.builds.append(time.perf_counter() - t)
        log.info(
            "built the DALI %s pipeline (%s) in %.2f s", "train" if self.train else "eval", self.device, self.builds[-1]
        )
        return pipe

    def batches(self, plan: EpochPlan, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if plan.batches == 0:
            return
        if self.spec.cache is not None:
            yield from self._cached_batches(plan, epoch, self.spec.cache)
            return
        pipe, key = self._local_pipeline(plan, epoch)
        yield from self._run(pipe, plan)
        if key is not None:  # reached only after a complete pass (an early stop ends at a yield)
            self._kept = (key, pipe)

    def _local_pipeline(self, plan: EpochPlan, epoch: int) -> tuple[object, bytes | None]:
        """(a started pipeline positioned at the plan's first row, the key to keep it under; None for train)."""
        if self.train:
            return self._start(plan, epoch), None
        key = b"".join(a.tobytes() for a in (plan.shard, plan.sample, np.int64([epoch])))
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == key:
            # The reader's epoch is exactly this plan and _run scheduled exactly plan.batches, so the
            # reader stands at its first row again (random_shuffle=False: the same order). Queue
            # as many batches as a fresh pipeline's first schedule_run does.
            for _ in range(self.opts.prefetch_queue_depth):
                kept[1].schedule_run()
            return kept[1], key
        del kept
        return self._start(plan, epoch), key

    def _cached_batches(self, plan: EpochPlan, epoch: int, cache) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A remote set: DALI's reader opens every file of a pipeline when it is built, so the epoch
        runs as a chain of pipelines over a few shards each, which the cache holds (pinned) meanwhile.
        The next one is built and started in a thread as soon as its shards are here, so switching
        costs no idle time."""
        reads = EpochReads(cache, plan)
        biggest = max(t.size for t in cache.tars)
        # About SEGMENT_BYTES a pipeline (its build is then a small cost), and never more than half
        # the limit: this pipeline's shards and the next one's are held at once.
        runs = min(math.ceil(SEGMENT_BYTES / max(1, biggest)), cache.limit // max(1, 2 * biggest))
        segments = reads.segments(plan.batches, max(1, runs))

        def prepare(k: int):
            b0, b1 = segments[k]
            local = reads.need(b1 - 1)
            rows = slice(b0 * self.batch_size, b1 * self.batch_size)
            part = EpochPlan(plan.shard[rows], plan.sample[rows], plan.valid[rows], self.batch_size)
            return self._start(part, epoch, local, seed_key=(b0,) if b0 else ()), part, local

        builder = ThreadPoolExecutor(1, thread_name_prefix="dali-next")
        ahead = builder.submit(prepare, 0)
        try:
            for k, (_, b1) in enumerate(segments):
                pipe, part, local = ahead.result()
                ahead = builder.submit(prepare, k + 1) if k + 1 < len(segments) else None
                yield from self._run(pipe, part, local)
                del pipe
                reads.finished(b1 - 1)
        finally:
            reads.close()  # first: a next pipeline still waiting for its shards then gives up
            if ahead is not None:
                with contextlib.suppress(Exception):
                    ahead.result()  # an early stop: the next pipeline, built or not, goes with the epoch
            builder.shutdown(wait=True)

    def _start(self, plan: EpochPlan, epoch: int, local: dict[int, str] | None = None, seed_key: tuple = ()):
        """A built pipeline with its prefetch queue already filling (the first schedule_run queues
        prefetch_queue_depth batches)."""
        pipe = self.build(plan, epoch, local, seed_key)
        pipe.schedule_run()
        return pipe

    def _run(
        self, pipe, plan: EpochPlan, local: dict[int, str] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # schedule_run/outputs rather than run(): run() always queues one batch past the last,
        # which the reader would read and decode for nothing.
        scheduled = self.opts.prefetch_queue_depth
        # Issue 14, item 4: outputs on torch's current stream, not host-synchronous, so the CPU
        # can run ahead of the GPU (to_torch copies on the same stream).
        stream = torch.cuda.current_stream(self.device) if self.gpu else None
        try:
            for b in range(plan.batches):
                try:
                    images, labels = pipe.outputs(stream)
                except RuntimeError as e:
                    raise self._explain(e, plan.from_batch(b), local) from e
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

    def _explain(self, e: RuntimeError, ahead: EpochPlan, local: dict[int, str] | None) -> Exception:
        """DALI names neither sample nor key: find it among the batches in flight."""
        n = (self.opts.prefetch_queue_depth + 1) * self.batch_size
        ahead = EpochPlan(ahead.shard[:n], ahead.sample[:n], ahead.valid[:n], self.batch_size)
        err = find_undecodable(self.shards, ahead, (local or {}).get)
        if err is not None:
            return err
        names = sorted({self.shards[s].url for s in ahead.shard.tolist()})
        return RuntimeError(f"DALI failed on a batch read from {', '.join(names)}: {e}")

    def close(self) -> None:
        self._kept = None
        with contextlib.suppress(OSError):
            shutil.rmtree(self._tmp)
