"""Looking at the data: `python -m shards show` (stored samples) and `python -m loaders.show` (a batch).

A small set built through the real build: solid-colour JPEGs of two classes, one of them a
CMYK JPEG that the build repairs, so the grid's cells can be checked pixel by pixel (colour in
the cell, red frame on the repaired one) and not only for "a PNG was written".
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from loaders import make_loader
from loaders.pixels import to_pixels
from loaders.show import first_batch, main
from shards.build import build
from shards.grid import MARK
from shards.show import pick, show
from shards.types import ClassInfo, Item, Options, Quarantined

ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}


def jpeg(colour: tuple[int, int, int], mode: str = "RGB", size: int = 40) -> bytes:
    img = Image.new("RGB", (size, size), colour)
    buf = io.BytesIO()
    (img.convert("CMYK") if mode == "CMYK" else img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


class ColourSource:
    """Six solid images per split, alternating red (class 0) and blue (class 1); train item 3 is CMYK."""

    dataset = "colours"

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, name, f"{name} things") for i, name in enumerate(COLOURS)]

    def splits(self) -> list[str]:
        return ["train", "val"]

    def items(self, split: str) -> list[Item]:
        names = list(COLOURS)
        return [Item(f"{split}_{i}", i % 2, names[i % 2], f"{split}/{i}.jpg", (split, i), 1000) for i in range(6)]

    def read(self, item: Item) -> bytes:
        split, i = item.locator
        return jpeg(list(COLOURS.values())[i % 2], "CMYK" if (split, i) == ("train", 3) else "RGB")

    def quarantined(self, split: str) -> list[Quarantined]:
        return []


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("show") / "colours"
    build(ColourSource(), str(out), Options(seed=2, shard_samples=4), workers=1)
    return out


def cell(grid: Image.Image, i: int, side: int, caption_h: int, columns: int = 8, pad: int = 2) -> np.ndarray:
    x0, y0 = pad + (i % columns) * (side + pad), pad + (i // columns) * (side + caption_h + pad)
    return np.asarray(grid)[y0 : y0 + side, x0 : x0 + side]


def test_shards_show_draws_each_sample_in_its_cell_and_marks_the_repaired_one(colours):
    grid, samples = show(str(colours), split="train", count=6, seed=0, cell=40)
    assert sorted(s.key for s in samples) == [f"train_{i}" for i in range(6)]
    repaired = [s.key for s in samples if s.meta.get("repaired")]
    assert repaired == ["train_3"]
    caption_h = (grid.height - 2) - 40 - 2  # one row of cells: the rest is caption
    for i, s in enumerate(samples):
        px = cell(grid, i, 40, caption_h)
        want = COLOURS[list(COLOURS)[s.label]]
        assert np.abs(px[20, 20].astype(int) - want).max() < 30, (s.key, px[20, 20])
        framed = tuple(px[0, 20]) == MARK
        assert framed == (s.key == "train_3")
        assert s.label == int(s.key.split("_")[1]) % 2  # the label that was written


def test_shards_show_pick_is_seeded_and_spans_the_split(colours):
    from shards.manifest import read_manifest

    m = read_manifest(str(colours))
    assert pick(m, "train", 3, seed=5) == pick(m, "train", 3, seed=5)
    picks = {tuple(pick(m, "train", 3, seed=s)) for s in range(6)}
    assert len(picks) > 1
    assert len(pick(m, "train", 100, seed=0)) == 6  # more than there is: every sample once
    assert all(0 <= i < m["splits"]["train"]["shards"][p]["samples"] for p, i in pick(m, "train", 6, 1))


def test_shards_show_cli_writes_a_png_and_fails_in_one_line(colours, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "grid.png"
    ok = subprocess.run(
        [sys.executable, "-m", "shards", "show", str(colours), "--split", "val", "--count", "4", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "4 samples of val, 0 marked" in ok.stdout
    assert Image.open(out).format == "PNG"
    bad = subprocess.run(
        [sys.executable, "-m", "shards", "show", str(colours), "--split", "test", "--output", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"Error: {colours}: no split 'test' (has ['train', 'val'])"]


def test_to_pixels_undoes_the_loader_normalization():
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    normalized = ((pixels.float() / 255 - mean) / std).permute(0, 3, 1, 2)
    assert np.array_equal(to_pixels(normalized), pixels.numpy())


def test_loaders_show_draws_the_batch_the_trainer_gets(colours, tmp_path, capsys):
    out = tmp_path / "batch.png"
    args = [str(colours), "--train", "--count", "4", "--image-size", "24", "--cell", "24", "--backend", "pytorch"]
    assert main([*args, "--workers", "0", "--output", str(out)]) == 0
    assert "training batch of 4 at 24 px from the pytorch backend" in capsys.readouterr().out
    loader = make_loader(str(colours), batch_size=4, train=True, backend="pytorch", workers=0, image_size=24)
    images, labels, _, keys = first_batch(loader)
    drawn = np.asarray(Image.open(out).convert("RGB"))
    caption_h = drawn.shape[0] - 2 - 24 - 2
    for i in range(4):
        assert np.array_equal(cell(Image.fromarray(drawn), i, 24, caption_h), to_pixels(images)[i])
        assert labels[i].item() == int(keys[i].split("_")[1]) % 2
