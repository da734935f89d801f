"""A tiny cifar-10-python.tar.gz with the official layout and pickle structure, for tests."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


def batch_images(batch: str, n: int) -> np.ndarray:
    """N x 3072 uint8 rows (R plane, G plane, B plane), distinct per batch and row."""
    rng = np.random.default_rng(sum(map(ord, batch)))
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def batch_labels(batch: str, n: int) -> list[int]:
    offset = sum(map(ord, batch))
    return [(offset + i) % 10 for i in range(n)]


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def make_cifar_tarball(path: Path, per_batch: int = 3, label_names: list[str] | None = None) -> Path:
    """Write a cifar-10-python.tar.gz at `path` with `per_batch` images in each of the six batches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"num_cases_per_batch": per_batch, "label_names": label_names or LABEL_NAMES, "num_vis": 3072}
    with tarfile.open(path, "w:gz") as tf:
        _add(tf, "batches.meta", pickle.dumps(meta, protocol=2))
        for b in [*TRAIN_BATCHES, "test_batch"]:
            d = {
                "batch_label": f"{b} of 6",
                "labels": batch_labels(b, per_batch),
                "data": batch_images(b, per_batch),
                "filenames": [f"{b}_img_{i}.png" for i in range(per_batch)],
            }
            _add(tf, b, pickle.dumps(d, protocol=2))
        _add(tf, "readme.html", b"<html></html>")
    return path
