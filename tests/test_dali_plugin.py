"""shardline's DALI plugin: fn.shardline_resize_normalize against a NumPy reference and DALI's own
resize + crop_mirror_normalize, its bad inputs, and the loader's fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_photo_shards

from loaders import dali_plugin

pytestmark = pytest.mark.skipif(
    not dali_plugin.cuda_include_dirs(),
    reason="no CUDA toolkit headers here: DALI's plugin headers include them, so the plugin cannot be compiled",
)

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


@pytest.fixture(scope="module")
def fn_types():
    assert dali_plugin.load(), "the plugin should build where CUDA headers and a compiler exist"
    from nvidia.dali import fn, types

    return fn, types


def reference(image: np.ndarray, out_h: int, out_w: int, mirror: bool) -> np.ndarray:
    """Pixel-centre bilinear resize with clamped edges, flip, normalize: float32 H x W x 3."""

    def taps(n_in: int, n_out: int):
        f = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(f).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), (f - i0).astype(np.float32)

    y0, y1, wy = taps(image.shape[0], out_h)
    x0, x1, wx = taps(image.shape[1], out_w)
    img = image.astype(np.float32)
    rows = img[y0] + wy[:, None, None] * (img[y1] - img[y0])
    out = rows[:, x0] + wx[None, :, None] * (rows[:, x1] - rows[:, x0])
    if mirror:
        out = out[:, ::-1]
    return (out - MEAN) / STD


def run_op(fn_types, images: list[np.ndarray], mirrors: list[int], **kw) -> list[np.ndarray]:
    fn, _ = fn_types
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        m = fn.external_source(source=lambda: [np.int32(v) for v in mirrors], batch=True)
        return fn.shardline_resize_normalize(x, mean=MEAN.tolist(), std=STD.tolist(), mirror=m, **kw)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(t) for t in out]


def random_images(shapes) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


SHAPES = [(375, 500), (224, 224), (100, 150), (1, 1), (3, 700), (480, 240)]


@pytest.mark.parametrize("layout", ["CHW", "HWC"])
def test_matches_numpy_reference_down_and_up_with_and_without_flip(fn_types, layout):
    images = random_images(SHAPES)
    mirrors = [0, 1, 1, 0, 1, 0]
    outs = run_op(fn_types, images, mirrors, size=[224, 160], output_layout=layout)
    for img, m, out in zip(images, mirrors, outs, strict=True):
        ref = reference(img, 224, 160, bool(m))
        if layout == "CHW":
            assert out.shape == (3, 224, 160)
            out = out.transpose(1, 2, 0)
        assert out.shape == (224, 160, 3) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, atol=1e-4)


def test_float16_output(fn_types):
    _, types = fn_types
    images = random_images([(300, 260)])
    (out,) = run_op(fn_types, images, [1], size=[224, 224], dtype=types.FLOAT16)
    assert out.dtype == np.float16
    np.testing.assert_allclose(
        out.astype(np.float32).transpose(1, 2, 0), reference(images[0], 224, 224, True), atol=1e-2
    )


def test_close_to_dalis_own_resize_and_crop_mirror_normalize(fn_types):
    """The fused op replaces fn.resize(linear, no antialias) + fn.crop_mirror_normalize in the CPU
    train graph; DALI rounds its resized image to uint8, so the two agree to half a grey level."""
    fn, types = fn_types
    from nvidia.dali import pipeline_def

    images = random_images([(375, 500), (333, 250), (120, 180)])

    @pipeline_def(batch_size=len(images), num_threads=2, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        fused = fn.shardline_resize_normalize(x, size=[224, 224], mean=MEAN.tolist(), std=STD.tolist(), mirror=1)
        r = fn.resize(x, resize_x=224, resize_y=224, interp_type=types.INTERP_LINEAR, antialias=False)
        dali = fn.crop_mirror_normalize(r, crop=(224, 224), mean=MEAN.tolist(), std=STD.tolist(), mirror=1)
        return fused, dali

    p = pipe()
    p.build()
    fused, dali = p.run()
    for a, b in zip(fused, dali, strict=True):
        diff = np.abs(np.array(a) - np.array(b)) * STD[:, None, None]  # back to grey levels
        assert diff.max() <= 0.51 and diff.mean() < 0.3


@pytest.mark.parametrize(
    ("kw", "shape", "message"),
    [
        ({"size": [224, 224]}, (50, 50), "expected an RGB HWC image"),  # a grey 2-D image
        ({"size": [0, 224]}, (50, 50, 3), "size must be [height, width], both > 0"),
        ({"size": [224, 224], "output_layout": "NCHW"}, (50, 50, 3), 'output_layout must be "CHW" or "HWC"'),
    ],
)
def test_bad_input_fails_with_a_clear_message(fn_types, kw, shape, message):
    images = [np.zeros(shape, np.uint8)]
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        fn, _ = fn_types
        from nvidia.dali import pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def pipe():
            x = fn.external_source(source=lambda: images, batch=True)
            return fn.shardline_resize_normalize(x, mean=MEAN.tolist(), std=STD.tolist(), **kw)

        p = pipe()
        p.build()
        p.run()


def test_build_is_cached_and_reused(fn_types):
    # fn_types built (or found) the library in the default cache; a fresh compile into an empty
    # cache is covered by the damaged-library case below, so this file compiles at most twice.
    lib = dali_plugin.build()
    assert lib.is_file() and dali_plugin.cache_root() in lib.parents
    stamp = lib.stat().st_mtime_ns
    assert dali_plugin.build() == lib and lib.stat().st_mtime_ns == stamp  # not compiled again


LOADER_SCRIPT = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.WARNING)
    from loaders import make_loader
    ld = make_loader(sys.argv[1], batch_size=4, train=True, backend="dali", image_size=64,
                     options={"fused_resize": None if sys.argv[2] == "auto" else sys.argv[2] == "on"})
    x, y = next(iter(ld))
    print("FUSED", ld.backend.opts.fused_resize, tuple(x.shape))
    """
)


def run_loader(spec: str, fused: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", LOADER_SCRIPT, spec, fused],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=300,
    )


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("plugin-shards")
    build_photo_shards(out, shard_samples=16)
    return str(out)


def test_loader_uses_the_plugin_rebuilds_a_damaged_one_and_falls_back_when_it_cannot_build(
    fn_types, small_shards, tmp_path
):
    ok = run_loader(small_shards, "auto", {})  # the default cache, where fn_types built it
    assert ok.returncode == 0, ok.stderr
    assert "FUSED True (4, 3, 64, 64)" in ok.stdout

    broken = {"SHARDLINE_CACHE_DIR": str(tmp_path / "broken"), "CXX": str(tmp_path / "no-such-compiler")}
    fallback = run_loader(small_shards, "auto", broken)
    assert fallback.returncode == 0, fallback.stderr
    assert "FUSED False (4, 3, 64, 64)" in fallback.stdout  # DALI's resize instead, same output
    assert "shardline DALI plugin unavailable" in fallback.stderr

    damaged = dali_plugin.library_path()  # as seen from this process: same sources, DALI and flags
    damaged = tmp_path / "damaged" / damaged.relative_to(dali_plugin.cache_root())
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a shared library")
    rebuilt = run_loader(small_shards, "auto", {"SHARDLINE_CACHE_DIR": str(tmp_path / "damaged")})
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "does not load" in rebuilt.stderr and "FUSED True" in rebuilt.stdout
    assert damaged.stat().st_size > 10_000  # replaced by a real build
    assert [p.name for p in damaged.parent.iterdir() if p.name.startswith(".build-")] == []  # no half-written file

    required = run_loader(small_shards, "on", broken)
    assert required.returncode != 0
    assert "fused_resize=True, but shardline's DALI plugin could not be built" in required.stderr


def test_train_loader_fused_and_plain_graphs_give_the_same_images(fn_types, small_shards):
    """Same seed, same crops and flips: only the resize differs (uint8 rounding in DALI's)."""
    from loaders import make_loader

    def first_batches(fused: bool):
        ld = make_loader(
            small_shards,
            batch_size=8,
            train=True,
            backend="dali",
            image_size=96,
            seed=3,
            options={"fused_resize": fused},
        )
        ld.set_epoch(1)
        assert ld.backend.opts.fused_resize is fused
        out = [(x.clone(), y.clone()) for x, y in ld]
        ld.close()
        return out

    fused, plain = first_batches(True), first_batches(False)
    assert len(fused) == len(plain) > 1
    for (xf, yf), (xp, yp) in zip(fused, plain, strict=True):
        assert xf.shape == xp.shape == (8, 3, 96, 96)
        assert torch.equal(yf, yp)
        grey = (xf - xp).abs() * torch.tensor(STD).view(1, 3, 1, 1)
        assert grey.max() <= 0.51 and grey.mean() < 0.3  # DALI rounds its resized uint8 image: <= half a level
