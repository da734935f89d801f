"""What every part of loaders/ shares: the normalization constants, the dtypes, the read spec
handed to a backend, and DecodeError. A leaf: it imports no other loaders module but spec.py
and sharding.py, so api.py and the backends all import it and nothing imports back."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from loaders.sharding import EpochPlan
from loaders.spec import Shard, open_binary
from shards.redact import redact_text, redact_url

if TYPE_CHECKING:
    from loaders.cache import ShardCache

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # eval: resize shorter side to image_size / 0.875, center crop image_size
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ReadSpec:
    """What a backend is asked to read and how: the one object make_loader hands to either backend."""

    shards: list[Shard]
    batch_size: int
    train: bool
    device: torch.device
    seed: int
    rank: int
    workers: int | None
    image_size: int
    dtype: torch.dtype
    channels_last: bool
    options: dict
    cache: ShardCache | None = None  # remote shards: read local copies through it (loaders/cache/)


def apply_options(defaults, options: dict, backend: str):
    """Set `options` (field name -> value) on a backend's options dataclass; unknown names fail."""
    unknown = set(options) - {f.name for f in fields(defaults)}
    if unknown:
        raise ValueError(f"unknown {backend} backend options {sorted(unknown)}")
    for k, v in options.items():
        setattr(defaults, k, v)
    return defaults


class DecodeError(RuntimeError):
    """An image in a shard could not be decoded; the message names the shard and the key."""

    def __init__(self, shard: str, key: str | None = None, reason: str | None = None) -> None:
        # One-argument form: DataLoader re-raises a worker's exception as type(e)(message).
        # The shard is named redacted: its URL may carry a token (a SPEC's query).
        shard = redact_url(shard) if key is not None else redact_text(shard)
        msg = shard if key is None else f"cannot decode sample {key!r} in shard {shard}: {redact_text(str(reason))}"
        super().__init__(msg)
        self.shard, self.key, self.reason = shard, key, reason


def read_image_bytes(shard: Shard, sample: int, path: str | None = None) -> bytes:
    """One image's bytes, from `path` (a cached local copy) or else the shard's own URL."""
    idx = shard.index()
    with open_binary(path or shard.url) as f:
        f.seek(int(idx.image_offset[sample]))
        return f.read(int(idx.image_size[sample]))


def find_undecodable(
    shards: list[Shard], plan: EpochPlan, path_of: Callable[[int], str | None] = lambda s: None
) -> DecodeError | None:
    """Decode the plan's rows with PIL until one fails (used to name the sample after a DALI error)."""
    from PIL import Image

    seen = set()
    for s, i in zip(plan.shard.tolist(), plan.sample.tolist(), strict=True):
        if (s, i) in seen:
            continue
        seen.add((s, i))
        try:
            with Image.open(io.BytesIO(read_image_bytes(shards[s], i, path_of(s)))) as im:
                im.load()
        except Exception as e:
            return DecodeError(shards[s].url, shards[s].key(i), f"{type(e).__name__}: {e}")
    return None
