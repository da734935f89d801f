"""RandAugment / TrivialAugment and random erasing on both backends: what they do (a grid of
each in the test's output folder), that they are seeded per sample (a resumed epoch repeats the
pixels), and that the trainer runs an epoch with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_photo_shards

from loaders import augment, batch_grid, make_loader

SIZE = 48


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=2, val_copies=1)
    return out


def test_erase_boxes_follow_timms_limits_and_probability():
    rng = np.random.default_rng(0)
    u = rng.random((2000, augment.ERASE_UNIFORMS)).astype(np.float32)
    assert not augment.erase_boxes(u, SIZE, 0.0).any()
    boxes = augment.erase_boxes(u, SIZE, 0.25)
    erased = boxes[:, 2] > 0
    assert 0.2 < erased.mean() < 0.3 and np.array_equal(erased, (u[:, 0] < 0.25) & erased)
    top, left, h, w = boxes[erased].T
    area = h * w / SIZE**2
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= SIZE).all() and (left + w <= SIZE).all()
    assert area.min() >= 0.01 and area.max() <= 0.36  # 2%..1/3, to the rounding of a side
    assert np.array_equal(boxes, augment.erase_boxes(u, SIZE, 0.25))
    with pytest.raises(ValueError, match="auto_augment"):
        augment.check("autoaugment", 0.0)
    with pytest.raises(ValueError, match="probability"):
        augment.check("none", 1.5)


def batch(photos: Path, backend: str, auto: str, erasing: float, epoch: int = 1):
    loader = make_loader(
        str(photos), batch_size=16, train=True, backend=backend, workers=1, image_size=SIZE, seed=5,
        options=dict(auto_augment=auto, random_erasing=erasing),
    )  # fmt: skip
    try:
        loader.set_epoch(epoch)
        return next(iter(loader))[0]
    finally:
        loader.close()


def mean_coloured(images: torch.Tensor) -> torch.Tensor:
    """Per image, the share of pixels at the dataset mean colour (what erasing fills with)."""
    return (images.abs() < 0.02).all(dim=1).float().mean(dim=(1, 2))


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_augmentations_agree_in_kind_and_their_grids(photos, tmp_path, backend):
    plain = batch(photos, backend, "none", 0.0)
    batch_grid(plain, cell=96).save(tmp_path / f"{backend}-none.png")
    for auto in ("randaugment", "trivialaugment"):
        images = batch(photos, backend, auto, 0.0)
        batch_grid(images, cell=96).save(tmp_path / f"{backend}-{auto}.png")
        changed = (images - plain).abs().mean(dim=(1, 2, 3)) > 0.01  # the same crops: only the op differs
        assert changed.float().mean() >= 0.5, (backend, auto, changed)
    erased = batch(photos, backend, "none", 1.0)
    batch_grid(erased, cell=96).save(tmp_path / f"{backend}-erasing.png")
    share = mean_coloured(erased) - mean_coloured(plain)
    assert ((share > 0.015) & (share < 0.4)).float().mean() >= 0.9, share  # one 2%..1/3 box each
    print(f"grids in {tmp_path}")


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_a_resumed_epoch_repeats_the_augmented_pixels(photos, backend):
    kw = dict(batch_size=4, train=True, backend=backend, workers=1, image_size=32, seed=2)
    kw["options"] = dict(auto_augment="trivialaugment", random_erasing=0.5)
    loader = make_loader(str(photos), **kw)
    try:
        loader.set_epoch(3)
        it = iter(loader)
        next(it)
        state = loader.state_dict()
        rest = [x for x, _ in it]
    finally:
        loader.close()
    again = make_loader(str(photos), **kw)
    try:
        again.load_state_dict(state)
        again.set_epoch(3)
        resumed = [x for x, _ in again]
    finally:
        again.close()
    assert len(resumed) == len(rest) and all(torch.equal(a, b) for a, b in zip(resumed, rest, strict=True))


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_the_trainer_runs_an_epoch_with_trivialaugment_and_erasing(photos, tmp_path, capsys, backend):
    from train.run import main

    args = [
        *("--data", str(photos), "--arch", "train.nets:NarrowResNet", "--image-size", "32", "--batch-size", "8"),
        *("--workers", "1", "--backend", backend, "--epochs", "1", "--warmup-epochs", "0", "--progress", "never"),
        *("--auto-augment", "trivialaugment", "--random-erasing", "0.25", "--output", str(tmp_path / "run")),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "summary.json").exists()


def test_show_draws_the_augmented_batch(photos, tmp_path, capsys):
    from loaders.show import main

    out = tmp_path / "grid.png"
    args = [str(photos), "--train", "--auto-augment", "randaugment", "--random-erasing", "0.5", "--count", "8"]
    assert main([*args, "--backend", "pytorch", "--image-size", "32", "--output", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main([str(photos), "--auto-augment", "randaugment", "--output", str(out)]) == 2
    assert "add --train" in capsys.readouterr().err
