"""The DALI backend's per-sample crop windows: torchvision's RandomResizedCrop.get_params, decided per sample."""

from __future__ import annotations

import math

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from loaders import dali_crops

# (width, height): common photo shapes, and strips thin enough that no attempt fits (the fallback)
SHAPES = [(400, 300), (300, 400), (500, 500), (640, 427), (1000, 60), (60, 1000), (33, 17), (7, 9)]


def reference(u: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision.transforms.RandomResizedCrop.get_params, with its random draws taken from u."""
    area = height * width
    for k in range(dali_crops.ATTEMPTS):
        target = area * (0.08 + 0.92 * float(u[2 * k]))
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * float(u[2 * k + 1]))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            y = math.floor(float(u[2 * dali_crops.ATTEMPTS]) * (height - h + 1))
            x = math.floor(float(u[2 * dali_crops.ATTEMPTS + 1]) * (width - w + 1))
            return y, x, h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        w, h = round(height * 4 / 3), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_crop_windows_follow_torchvision_and_depend_on_the_sample_only(tmp_path):
    files = []
    for i, (w, h) in enumerate(SHAPES):
        files.append(str(tmp_path / f"{i}.jpg"))
        Image.new("RGB", (w, h), (i * 20, 100, 50)).save(files[-1])
    rows = 40  # each shape under 5 different draws
    shard, sample = np.zeros(rows, np.int32), np.arange(rows, dtype=np.int32)
    u = dali_crops.sample_uniforms(7, 3, shard, sample, dali_crops.UNIFORMS)
    tables = dali_crops.crop_tables(u)
    batch = len(SHAPES)

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def windows():
        jpegs, _ = fn.readers.file(files=files)
        params = fn.external_source(source=lambda i: tables[i * batch : (i + 1) * batch], batch=True, ndim=1)
        anchor, size = dali_crops.crop_window(jpegs, fn.cast(params, dtype=types.FLOAT))
        return anchor, size

    pipe = windows()
    pipe.build()
    exact = 0
    for it in range(rows // batch):
        anchor, size = (np.stack([np.array(t) for t in out]) for out in pipe.run())
        for j, (w, h) in enumerate(SHAPES):
            y, x, ch, cw = (int(v) for v in (*anchor[j], *size[j]))
            assert ch > 0 and cw > 0 and 0 <= y <= h - ch and 0 <= x <= w - cw  # always inside the image
            exact += (y, x, ch, cw) == reference(u[it * batch + j], h, w)
    # Off only where a window sits within half a pixel of the image's edge (fit tested before rounding).
    assert exact >= rows - 2, exact
    # The draws are a function of (seed, epoch, shard, sample) alone: any subset, any order, the same rows.
    again = dali_crops.sample_uniforms(7, 3, shard[::-3], sample[::-3], dali_crops.UNIFORMS)
    assert np.array_equal(again, u[::-3])
    assert not np.array_equal(dali_crops.sample_uniforms(7, 4, shard, sample, dali_crops.UNIFORMS), u)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(float(u.mean()) - 0.5) < 0.05
