"""Checkpoints: what a resumed run needs to continue mid-epoch, published atomically.

OUTPUT/checkpoints/last.pt is written at every epoch end and every --checkpoint-minutes;
best.pt whenever val top-1 improves. A checkpoint is written to a temporary file in the same
folder, flushed, fsync'ed and renamed over the old one, so a kill -9 at any moment leaves the
previous checkpoint whole.

Damage and trust (issue 15): before last.pt is replaced, the new file is complete, fsync'ed and
read back; the one it replaces stays beside it as previous.pt, so a last.pt damaged later (a bad
disk, a partial copy) falls back to previous.pt with a warning (`load_latest`). Every load is
torch.load(weights_only=True): plain containers, tensors and numbers, plus the few numpy types an
older checkpoint's RNG state holds; a checkpoint that carries any other pickled object (a callable,
a class) is refused, never run. New checkpoints hold no numpy objects at all, so plain
`torch.load(path)` (weights_only by default) reads them, and torchvision models take ckpt["model"].

Layout (a plain dict, versioned by "format" and "format_version"):

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
    samples_seen, samples_before_epoch   samples trained on (all ranks) in all, and before this
                 epoch: the lr schedule's clock when the world size or batch changes (train/elastic.py)
    format, format_version   "shardline-checkpoint", FORMAT_VERSION (added by save_atomic)
    best_val_top1, config, arch, num_classes, classes, image_size, stem, world_size
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile

import numpy as np
import torch

LAST, BEST, PREVIOUS = "last.pt", "best.pt", "previous.pt"
FORMAT = "shardline-checkpoint"
FORMAT_VERSION = 2  # 1: before versions (numpy arrays in the RNG state, no "format_version")
# What torch.load(weights_only=True) may build beyond plain data: numpy's MT19937 state in
# version-1 checkpoints. Nothing that can be called.
_reconstruct = (getattr(np, "_core", None) or np.core).multiarray._reconstruct
ALLOWED_GLOBALS = [
    np.dtype,
    np.ndarray,
    type(np.dtype(np.uint32)),
    (_reconstruct, "numpy._core.multiarray._reconstruct"),  # as numpy 2 pickles it
    (_reconstruct, "numpy.core.multiarray._reconstruct"),  # as numpy 1 did
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which file and why, in one line."""


class DamagedCheckpoint(CheckpointError):
    """Truncated or otherwise unreadable: an older checkpoint may stand in for it."""


class UnsafeCheckpoint(CheckpointError):
    """Carries pickled objects beyond plain data (a callable, a class): refused, never unpickled."""


def save_atomic(payload: dict, path: str, *, keep_previous: bool = False) -> None:
    """Write `path` whole or not at all; keep_previous: the file it replaces becomes previous.pt beside it.

    The new file is written under a temporary name, fsync'ed and read back before it replaces
    anything, so neither a kill -9 nor a write that came out unreadable ever costs the last
    good checkpoint.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**payload, "format": FORMAT, "format_version": FORMAT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        _read(tmp, mmap=True)  # complete and loadable, or the old file stays as it is
        if keep_previous and os.path.exists(path):
            # Two renames, never a copy or a shared inode: a kill between them leaves previous.pt
            # and no last.pt, which load_latest reads as "fall back".
            os.replace(path, os.path.join(folder, PREVIOUS))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(folder)  # the renames themselves survive a power cut


def _fsync_dir(folder: str) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: str, mmap: bool = False) -> dict:
    """torch.load with weights_only=True and the allowlist; damage and foreign objects told apart."""
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = _foreign_globals(path)
        if unsafe:
            raise UnsafeCheckpoint(
                f"refusing to load checkpoint {path}: it carries pickled objects that could run code "
                f"({', '.join(unsafe[:3])}); only plain data, tensors and numbers are loaded"
            ) from None
        raise DamagedCheckpoint(f"cannot read checkpoint {path}: {type(e).__name__}: {_first_line(e)}") from None
    except Exception as e:  # truncated, not a zip, an I/O error: say which file, in one line
        raise DamagedCheckpoint(
            f"cannot read checkpoint {path} (truncated or damaged): {type(e).__name__}: {_first_line(e)}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a train checkpoint (no 'model' entry)")
    version = ckpt.get("format_version", 1)
    if ckpt.get("format", FORMAT) != FORMAT or version not in (1, FORMAT_VERSION):
        raise CheckpointError(
            f"checkpoint {path} has format {ckpt.get('format')!r} version {version!r}; this shardline reads "
            f"{FORMAT!r} versions 1..{FORMAT_VERSION} (a newer shardline wrote it: upgrade this one)"
        )
    return ckpt


def _foreign_globals(path: str) -> list[str]:
    allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in ALLOWED_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return []  # not even readable: damage, not a foreign object
    return [g for g in found if g not in allowed]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load(path: str) -> dict:
    """A checkpoint, read safely (see the module docstring); CheckpointError says what is wrong."""
    return _read(path)


def has_checkpoint(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (LAST, PREVIOUS))


def load_latest(folder: str) -> tuple[dict, str, str | None]:
    """(checkpoint, its path, a warning or None) from last.pt, or previous.pt when last.pt is damaged.

    Only damage (or a last.pt missing beside a previous.pt) falls back: a refused (unsafe) or
    too-new last.pt is an error, not skipped.
    """
    last, previous = os.path.join(folder, LAST), os.path.join(folder, PREVIOUS)
    try:
        if not os.path.exists(last) and os.path.exists(previous):
            raise DamagedCheckpoint(f"checkpoint {last} is missing (the run stopped while saving)")
        return _read(last), last, None
    except DamagedCheckpoint as e:
        if not os.path.exists(previous):
            raise
        ckpt = _read(previous)
        return ckpt, previous, f"warning: {e}; resuming from the previous checkpoint {previous} instead"


def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": _numpy_state_plain(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(_numpy_state_from(state["numpy"]))
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


def _numpy_state_plain() -> tuple:
    """numpy's global MT19937 state without numpy objects (weights_only loads it with no allowlist)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from(state: tuple) -> tuple:
    name, key, *rest = state
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (name, key.astype(np.uint32), *rest)
