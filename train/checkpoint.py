"""Checkpoints: what a resumed run needs to continue mid-epoch, published atomically.

OUTPUT/checkpoints/last.pt is written at every epoch end and every --checkpoint-minutes;
best.pt whenever val top-1 improves. A checkpoint is written to a temporary file in the same
folder, flushed, fsync'ed and renamed over the old one, so a kill -9 at any moment leaves the
previous checkpoint whole.

Layout (a plain dict; torch.load(path, weights_only=False)):

    model        state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes), so
                 torchvision.models.resnet50(num_classes=C).load_state_dict(ckpt["model"]) works
    ema          EMA weights (same keys) or None;  ema_updates
    optimizer    optimizer state;  scaler: fp16 GradScaler state or None
    epoch        the epoch in progress (or just finished: then batches == batches_per_epoch)
    batches      micro-batches of that epoch already trained on
    global_step  optimizer steps so far (the lr schedule is a function of it)
    ranks        per rank: loader state_dict, RNG states (torch, cuda, numpy, python,
                 mixup), and the epoch's running sums (loss, count, seconds)
    history      the metrics.jsonl lines of finished epochs (rewritten from here on resume)
    best_val_top1, config, arch, num_classes, classes, image_size, stem, world_size
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

LAST, BEST = "last.pt", "best.pt"


def save_atomic(payload: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def load(path: str) -> dict:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which, in one line
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not a train checkpoint (no 'model' entry)")
    return ckpt


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def strip_prefixes(state_dict: dict) -> dict:
    """Belt and braces for state dicts saved from wrapped models elsewhere."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out
