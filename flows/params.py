"""The build-shards parameters: parsing and checking, shared by the CLI and the flow.

No Prefect here, so the CLI can reject a bad option in one line before it imports Prefect
or starts a server, and the flow (reached through a deployment, with no CLI in front of it)
runs the very same checks before doing any work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from shards.sources import DATASETS
from shards.storage import is_url
from shards.types import Options

VERIFY_MODES = ("none", "header", "decode")
IMAGE_EXTS = ("jpg", "png")
DEFAULT_SHARD_SIZE = "1GB"

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_MD5 = re.compile(r"^[0-9a-fA-F]{32}$")


class ParamError(ValueError):
    """A bad build parameter; the message is one line naming the option."""


def parse_size(value: str | int) -> int:
    """'1GB' -> 10**9, '500MB', '64MiB', '1.5GB', 12345 -> bytes (decimal units, as disks count)."""
    if isinstance(value, bool):
        raise ParamError(f"--shard-size {value!r}: not a size")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ParamError(f"--shard-size {value!r}: not a size (examples: 1GB, 500MB, 64MiB, 1000000)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ParamError(f"--shard-size {value!r}: must be more than 0 bytes")
    return n


def parse_md5(entries: Iterable[str]) -> dict[str, str]:
    """['ILSVRC2012_img_val.tar=29b2...'] -> {name: lowercase hex}."""
    out = {}
    for e in entries:
        name, sep, digest = e.partition("=")
        if not sep or not name.strip() or not _MD5.match(digest.strip()):
            raise ParamError(f"--md5 {e!r}: expected NAME=HEX with a 32-digit hex MD5")
        out[name.strip()] = digest.strip().lower()
    return out


def parse_splits(value: str | Iterable[str] | None) -> list[str] | None:
    """'train,val' or ['train', 'val'] -> ['train', 'val']; None or '' -> None (all splits)."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    splits = [p.strip() for p in parts if p and p.strip()]
    if len(set(splits)) != len(splits):
        raise ParamError(f"--splits {value!r}: a split is named twice")
    return splits or None


def check_params(
    dataset: str,
    source: str | None,
    output: str,
    shard_size: str | int | None,
    shard_samples: int | None,
    verify: str,
    max_side: int | None,
    workers: int | None,
    md5: dict[str, str] | None,
    val_fraction: float | None,
    image_ext: str | None,
    jpeg_quality: int,
) -> None:
    """Raise ParamError (one line) for the first bad parameter; does no I/O beyond a stat."""
    if dataset not in DATASETS:
        raise ParamError(f"--dataset {dataset!r}: unknown; choose one of {', '.join(DATASETS)}")
    if dataset != "demo" and not source:
        raise ParamError(f"--source is required for --dataset {dataset} (a folder or URL)")
    if source and not is_url(source) and not os.path.exists(source.removeprefix("file://")):
        raise ParamError(f"--source {source}: no such file or folder")
    if not output:
        raise ParamError("--output is required (a folder or URL)")
    if shard_samples is not None and shard_size is not None:
        raise ParamError("--shard-size and --shard-samples exclude each other: give one")
    if shard_samples is not None and shard_samples < 1:
        raise ParamError(f"--shard-samples {shard_samples}: must be at least 1")
    if shard_samples is None:
        parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE)
    if verify not in VERIFY_MODES:
        raise ParamError(f"--verify {verify!r}: choose one of {', '.join(VERIFY_MODES)}")
    if max_side is not None and max_side < 16:
        raise ParamError(f"--max-side {max_side}: must be at least 16 pixels")
    if workers is not None and workers < 1:
        raise ParamError(f"--workers {workers}: must be at least 1")
    for name, digest in (md5 or {}).items():
        if not _MD5.match(str(digest)):
            raise ParamError(f"--md5 {name}={digest}: not a 32-digit hex MD5")
    if val_fraction is not None and not 0 < val_fraction < 1:
        raise ParamError(f"--val-fraction {val_fraction}: must be between 0 and 1")
    if image_ext is not None and image_ext not in IMAGE_EXTS:
        raise ParamError(f"--image-ext {image_ext!r}: choose one of {', '.join(IMAGE_EXTS)}")
    if not 1 <= jpeg_quality <= 100:
        raise ParamError(f"--jpeg-quality {jpeg_quality}: must be 1..100")


def default_image_ext(dataset: str, image_ext: str | None) -> str:
    """CIFAR-10 is lossless at the source, so it keeps PNG unless told otherwise."""
    return image_ext or ("png" if dataset == "cifar10" else "jpg")


def source_kwargs(
    dataset: str,
    *,
    seed: int,
    md5: dict[str, str] | None,
    check_md5: bool,
    val_fraction: float | None,
    image_ext: str,
    jpeg_quality: int,
    train_per_class: int | None,
    val_per_class: int | None,
    demo_size: int | None,
) -> dict:
    """The keyword arguments open_source() takes for this dataset kind (unset ones left out)."""
    if dataset == "imagenet":
        return {"check_md5": check_md5, "md5": md5 or {}}
    if dataset == "imagefolder":
        return {"seed": seed} | ({"val_fraction": val_fraction} if val_fraction is not None else {})
    if dataset == "cifar10":
        return {"image_ext": image_ext, "jpeg_quality": jpeg_quality}
    if dataset == "demo":
        kw = {"seed": seed, "train_per_class": train_per_class, "val_per_class": val_per_class, "size": demo_size}
        return {k: v for k, v in kw.items() if v is not None}
    return {}


def make_options(
    dataset: str,
    *,
    seed: int,
    shard_size: str | int | None,
    shard_samples: int | None,
    verify: str,
    max_side: int | None,
    image_ext: str,
    jpeg_quality: int,
    source_kw: dict,
) -> Options:
    """Options for shards/. Source options that change which images or bytes are written are
    recorded in the manifest params too, so a rerun with other values is never taken for a
    finished set; options that only check (md5, check_md5) are not."""
    extra = {"image_ext": image_ext}
    extra |= {k: v for k, v in source_kw.items() if k not in ("seed", "md5", "check_md5", "image_ext", "jpeg_quality")}
    return Options(
        seed=seed,
        shard_bytes=parse_size(shard_size if shard_size is not None else DEFAULT_SHARD_SIZE),
        shard_samples=shard_samples,
        verify=verify,
        max_side=max_side,
        image_ext=image_ext,
        jpeg_quality=jpeg_quality,
        extra=extra,
    )
