"""Small shared test helpers: a source over the real photos in tests/data, a shard builder, and
killing a training run at a mid-epoch checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from shards.build import build
from shards.types import ClassInfo, Item, Options, Quarantined

PHOTOS = sorted((Path(__file__).parent / "data" / "photos").glob("*.JPEG"))


class PhotoSource:
    """The test photos, repeated `copies` times, labelled round-robin into `num_classes` classes.

    Splits: train and val. A plain Source (shards/types.py), so shards built from it go
    through the real writer, index and manifest code.
    """

    dataset = "photos"

    def __init__(self, num_classes: int = 4, copies: int = 2, val_copies: int = 1) -> None:
        self.num_classes, self.copies, self.val_copies = num_classes, copies, val_copies

    def classes(self) -> list[ClassInfo]:
        return [ClassInfo(i, f"c{i}", f"class {i}") for i in range(self.num_classes)]

    def splits(self) -> list[str]:
        return ["train", "val"]

    def items(self, split: str) -> list[Item]:
        copies = self.copies if split == "train" else self.val_copies
        out = []
        for c in range(copies):
            for i, p in enumerate(PHOTOS):
                label = i % self.num_classes
                out.append(Item(f"{split}_{c}_{p.stem}", label, f"c{label}", p.name, (str(p),), p.stat().st_size))
        return out

    def read(self, item: Item) -> bytes:
        return Path(item.locator[0]).read_bytes()

    def quarantined(self, split: str) -> list[Quarantined]:
        return []


def build_photo_shards(out: Path, shard_samples: int = 7, **kw) -> dict:
    """Build uneven shards (shard_samples does not divide the count) from the test photos."""
    source = PhotoSource(**kw)
    return build(source, str(out), Options(seed=1, shard_samples=shard_samples), workers=1)


def kill_9_at_checkpoint(
    proc: subprocess.Popen,
    last: Path,
    epoch: int,
    min_batches: int = 1,
    timeout: float = 240,
    kill: Callable[[int], None] = lambda pid: os.kill(pid, signal.SIGKILL),
) -> dict:
    """Wait until `last` (a run's last.pt) is a checkpoint inside `epoch` with at least
    `min_batches` batches done, kill -9 the run with `kill(pid)`, and return that checkpoint.
    The process is always reaped; a run that ends first fails with its stderr when it was piped."""
    from train import checkpoint as ckpt_io

    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if last.exists():
                try:
                    ck = ckpt_io.load(str(last))
                except ckpt_io.CheckpointError:
                    ck = {}  # caught between the writer's renames: look again
                if ck.get("epoch") == epoch and ck.get("batches", 0) >= min_batches:
                    kill(proc.pid)
                    return ck
            if proc.poll() is not None:
                err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
                raise AssertionError(f"the run ended before it could be killed:\n{err}")
            time.sleep(0.05)
        raise AssertionError("no mid-epoch checkpoint appeared")
    finally:
        if proc.poll() is None:
            kill(proc.pid)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
