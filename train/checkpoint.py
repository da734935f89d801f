"""Checkpoints: what a resumed run needs to continue mid-epoch, published atomically.

OUTPUT/checkpoints/last.pt is written at every epoch end and every --checkpoint-minutes;
best.pt whenever val top-1 improves. A checkpoint is written to a temporary file in the same
folder, flushed, fsync'ed and renamed over the old one, so a kill -9 at any moment leaves the
previous checkpoint whole.

Damage and trust: before last.pt is replaced, the new file is complete, fsync'ed and
read back; the one it replaces stays beside it as previous.pt, so a last.pt damaged later (a bad
disk, a partial copy) falls back to previous.pt with a warning (`load_latest`). Every load is
torch.load(weights_only=True): plain containers, tensors and numbers, plus the few numpy types an
older checkpoint's RNG state holds; a checkpoint that carries any other pickled object (a callable,
a class) is refused, never run. New checkpoints hold no numpy objects at all, so plain
`torch.load(path)` (weights_only by default) reads them, and torchvision models take ckpt["model"].

Layout (a plain dict, versioned by "format" and "format_version"), built by `payload` and read
back by `restore`, `restore_weights`, `progress_of` and `saved` (the Saved view other modules
decide with): this module is the only one that knows it; best.pt is the payload just written as
last.pt, written again (never last.pt read back):

    model        state_dict of the unwrapped model (no "module." / "_orig_mod." prefixes), so
                 torchvision.models.resnet50(num_classes=C).load_state_dict(ckpt["model"]) works
    ema          EMA weights (same keys) or None;  ema_updates
    optimizer    optimizer state;  scaler: fp16 GradScaler state or None
    epoch        the epoch in progress (or just finished: then batches == batches_per_epoch)
    batches      micro-batches of that epoch already trained on
    global_step  optimizer steps so far (the lr schedule is a function of it)
    ranks        per rank: loader state_dict, RNG states (torch, this rank's GPU, numpy,
                 python, mixup), the epoch's running sums (engine.EPOCH_SUMS) and lr
    history      the metrics.jsonl lines of finished epochs (rewritten from here on resume)
    samples_seen, samples_before_epoch   samples trained on (all ranks) in all, and before this
                 epoch: the lr schedule's clock when the world size or batch changes (train/elastic.py)
    format, format_version   "shardline-checkpoint", FORMAT_VERSION (added by save_atomic)
    seconds      wall time of the run so far
    best_val_top1, config, arch, num_classes, classes, image_size, stem, world_size
"""

from __future__ import annotations

import os
import pickle
import random
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from loaders import redact_values
from train.distributed import Dist, gather_objects
from train.engine import EPOCH_SUMS, EpochState
from train.recipe import MixupCutmix, ModelEma

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


def rng_state(device: torch.device | None = None) -> dict:
    """RNG states of this process: torch CPU, this rank's GPU only (None on CPU), numpy, python.

    Only this rank's GPU: the other visible GPUs' generators are never drawn
    from by this rank, and a resume in a process that sees fewer GPUs must not index past them.
    device None: the current CUDA device where there is one.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": _numpy_state_plain(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # older checkpoints saved every visible GPU's state
        index = device.index or 0
        cuda = cuda[index] if device.type == "cuda" and index < len(cuda) else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    np.random.set_state(_numpy_state_from(state["numpy"]))
    random.setstate(state["python"])


def _numpy_state_plain() -> tuple:
    """numpy's global MT19937 state without numpy objects (weights_only loads it with no allowlist)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _numpy_state_from(state: tuple) -> tuple:
    name, key, *rest = state
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    return (name, key.astype(np.uint32), *rest)


# -- the payload: built and read here only ------------------------------------------------------------


@dataclass
class Stateful:
    """The live objects a checkpoint saves and restores."""

    model: nn.Module  # unwrapped
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    mixing: MixupCutmix
    loader: object  # loaders.Loader: state_dict / load_state_dict


@dataclass
class RunProgress:
    """What the run has learnt so far, beside the epoch state."""

    history: list[dict] = field(default_factory=list)
    best: float = float("-inf")
    seconds: float = 0.0  # run time before this process started (a resumed run)
    samples_base: int = 0  # samples trained on in the epochs before the current one (all ranks): the schedule's clock


def rank_state(state: EpochState, parts: Stateful, device: torch.device) -> dict:
    """This rank's share of a checkpoint (gathered from every rank by the caller)."""
    return {
        "loader": parts.loader.state_dict(),
        "rng": rng_state(device),
        "mixing": parts.mixing.state_dict(),
        **state.sums(),
        "lr": state.lr,
    }


def payload(parts: Stateful, state: EpochState, ranks: list[dict], progress: RunProgress, meta: dict) -> dict:
    """The whole checkpoint. meta: seconds, config, arch, stem, image_size, num_classes, classes, world_size."""
    ema = parts.ema
    return {
        "samples_seen": progress.samples_base + sum(r["seen"] for r in ranks),
        "samples_before_epoch": progress.samples_base,
        "model": parts.model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "epoch": state.epoch,
        "batches": state.batches,
        "global_step": state.global_step,
        "ranks": ranks,
        "history": progress.history,
        "best_val_top1": progress.best,
        **meta,
    }


def restore_weights(ck: dict, parts: Stateful) -> None:
    """Model, optimizer, grad scaler and EMA: what carries over whatever the new shape."""
    parts.model.load_state_dict(ck["model"])
    parts.optimizer.load_state_dict(ck["optimizer"])
    if parts.scaler is not None and ck.get("scaler"):
        parts.scaler.load_state_dict(ck["scaler"])
    if parts.ema is not None and ck.get("ema") is not None:
        parts.ema.load_state_dict(ck["ema"], ck.get("ema_updates", 0))


def restore(ck: dict, parts: Stateful, rank: int, device: torch.device) -> EpochState:
    """A checkpoint of the same shape (train/elastic.py: same_shape): everything, this rank's part included.

    The loader position and running sums mid-epoch, the RNG streams and the mixup generator, so
    the resumed run repeats the uninterrupted one exactly.
    """
    restore_weights(ck, parts)
    state = EpochState(ck["epoch"], ck["batches"], ck["global_step"])
    mine = ck["ranks"][rank]
    if state.batches > 0:
        state.set_sums(mine)
        state.lr = mine["lr"]
        parts.loader.load_state_dict(mine["loader"])
    set_rng_state(mine["rng"], device)
    parts.mixing.load_state_dict(mine["mixing"])
    return state


def progress_of(ck: dict) -> RunProgress:
    return RunProgress(
        list(ck.get("history", [])),
        ck.get("best_val_top1", float("-inf")),
        ck.get("seconds", 0.0),
        saved(ck).samples_before_epoch,
    )


@dataclass(frozen=True)
class Saved:
    """What a checkpoint says about the run that wrote it, for the modules that decide with it
    (train/elastic.py: resuming under another shape; train/run.py: compatibility, --evaluate),
    so that only this module reads the layout."""

    epoch: int
    batches: int  # micro-batches of that epoch already trained on
    world_size: int
    batch_size: int  # per process, as configured
    base_lr: float  # --lr, before the linear scaling rule
    micro_batch: int | None  # rank 0's loader batch (None: not recorded)
    loader: dict | None  # rank 0's loader state (every rank's agrees at a batch boundary)
    rank_sums: list[dict]  # per rank that wrote it: the epoch's running sums (EPOCH_SUMS) and lr
    samples_seen: int  # samples trained on (all ranks) in all
    samples_before_epoch: int  # ... before the checkpoint's epoch
    arch: str | None
    stem: str | None
    image_size: int | None
    num_classes: int | None
    zero_init_residual: bool
    model: dict  # state_dict of the unwrapped model
    ema: dict | None  # EMA weights, or None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size


def saved(ck: dict) -> Saved:
    """The Saved view of a loaded checkpoint. Older checkpoints without samples_seen count
    steps x global batch."""
    config, ranks = ck.get("config", {}), ck.get("ranks") or []
    world, batch = int(ck.get("world_size", 1)), int(config.get("batch_size", 0))
    loader = (ranks[0] or {}).get("loader") if ranks else None
    seen = int(ck["samples_seen"]) if "samples_seen" in ck else int(ck.get("global_step", 0)) * batch * world
    before = ck.get("samples_before_epoch")
    if before is None:
        mid_epoch = ck.get("batches", 0) > 0
        before = seen - sum(int(r.get("seen", 0)) for r in ranks) if mid_epoch else seen
    return Saved(
        epoch=int(ck.get("epoch", 0)),
        batches=int(ck.get("batches", 0)),
        world_size=world,
        batch_size=batch,
        base_lr=float(config.get("lr", 0.0)),
        micro_batch=(loader or {}).get("batch_size"),
        loader=loader,
        rank_sums=[{k: r[k] for k in (*EPOCH_SUMS, "lr")} for r in ranks if r],
        samples_seen=seen,
        samples_before_epoch=int(before),
        arch=ck.get("arch"),
        stem=ck.get("stem"),
        image_size=ck.get("image_size"),
        num_classes=ck.get("num_classes"),
        zero_init_residual=config.get("zero_init_residual", True),
        model=ck.get("model", {}),
        ema=ck.get("ema"),
    )


class Checkpointer:
    """Writes OUTPUT/checkpoints/last.pt (every rank takes part: their states are gathered) and best.pt."""

    def __init__(self, folder: str, parts: Stateful, dist: Dist, meta: dict, minutes: float, t_start: float) -> None:
        self.last_path, self.best_path = os.path.join(folder, LAST), os.path.join(folder, BEST)
        # a checkpoint travels (copied, shared, uploaded): its recorded config has no URL's credentials
        meta = {**meta, "config": redact_values(meta["config"])} if "config" in meta else meta
        self.parts, self.dist, self.meta, self.minutes = parts, dist, meta, minutes
        self.t_start = t_start  # time.time() at the start of this process, less a resumed run's seconds
        self._saved_at = time.monotonic()

    def due(self) -> bool:
        """Rank 0's clock: --checkpoint-minutes passed since the last save (the trainer shares the decision)."""
        return self.dist.is_main and self.minutes > 0 and time.monotonic() - self._saved_at >= self.minutes * 60

    def save_last(self, state: EpochState, progress: RunProgress) -> dict | None:
        """Gather every rank's state, write last.pt on rank 0 (the one it replaces kept as previous.pt);
        the payload written (None on other ranks)."""
        ranks = gather_objects(rank_state(state, self.parts, self.dist.device), self.dist)
        written = None
        if self.dist.is_main:
            meta = {**self.meta, "seconds": time.time() - self.t_start}
            written = payload(self.parts, state, ranks, progress, meta)
            save_atomic(written, self.last_path, keep_previous=True)
        self._saved_at = time.monotonic()
        return written

    def save_best(self, written: dict | None) -> None:
        """best.pt: the payload just written as last.pt, written again (not reloaded from disk)."""
        if written is not None:
            save_atomic(written, self.best_path)
