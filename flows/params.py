"""The build-shards parameters: parsing and checking, shared by the CLI and the flow.

No Prefect here, so the CLI can reject a bad option in one line before it imports Prefect
or starts a server, and the flow (reached through a deployment, with no CLI in front of it)
runs the very same checks before doing any work.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from shards.sources import DATASETS
from shards.storage import is_url
from shards.types import Options

VERIFY_MODES = ("none", "header", "decode")
RUNNERS = ("local", "dask")
IMAGE_EXTS = ("jpg", "png")
DEFAULT_SHARD_SIZE = "1GB"

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
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


def default_cache_dir() -> str:
    """Where downloads of a URL --source go unless --cache-dir says: the XDG cache folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardline")


@dataclass
class BuildParams:
    """Every build-shards parameter, as the flow and the CLI take them (see the CLI's --help)."""

    dataset: str
    output: str
    source: str | None = None
    splits: list[str] | str | None = None
    shard_size: str | int | None = None  # default DEFAULT_SHARD_SIZE; excludes shard_samples
    shard_samples: int | None = None
    seed: int = 0
    verify: str = "decode"
    max_side: int | None = None
    workers: int | None = None  # default: CPU count
    md5: dict[str, str] | None = None
    check_md5: bool = False
    val_fraction: float | None = None
    image_ext: str | None = None  # default: png for cifar10, else jpg
    jpeg_quality: int = 95
    train_per_class: int | None = None  # demo only
    val_per_class: int | None = None  # demo only
    demo_size: int | None = None  # demo only
    cache_dir: str | None = None  # downloads of a URL --source; default: default_cache_dir()
    runner: str = "local"  # local: threads + a process pool; dask: tasks on a dask.distributed cluster
    dask_address: str | None = None  # scheduler address; none: a LocalCluster of `workers` processes

    def check(self) -> BuildParams:
        """Raise ParamError (one line) for the first bad parameter; no I/O beyond a stat."""
        if self.dataset not in DATASETS:
            raise ParamError(f"--dataset {self.dataset!r}: unknown; choose one of {', '.join(DATASETS)}")
        if self.dataset != "demo" and not self.source:
            raise ParamError(f"--source is required for --dataset {self.dataset} (a folder or URL)")
        if self.source and not is_url(self.source) and not os.path.exists(self.source.removeprefix("file://")):
            raise ParamError(f"--source {self.source}: no such file or folder")
        if not self.output:
            raise ParamError("--output is required (a folder or URL)")
        parse_splits(self.splits)
        if self.shard_samples is not None and self.shard_size is not None:
            raise ParamError("--shard-size and --shard-samples exclude each other: give one")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ParamError(f"--shard-samples {self.shard_samples}: must be at least 1")
        parse_size(self.shard_size if self.shard_size is not None else DEFAULT_SHARD_SIZE)
        if self.verify not in VERIFY_MODES:
            raise ParamError(f"--verify {self.verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        if self.max_side is not None and self.max_side < 16:
            raise ParamError(f"--max-side {self.max_side}: must be at least 16 pixels")
        if self.workers is not None and self.workers < 1:
            raise ParamError(f"--workers {self.workers}: must be at least 1")
        for name, digest in (self.md5 or {}).items():
            if not _MD5.match(str(digest)):
                raise ParamError(f"--md5 {name}={digest}: not a 32-digit hex MD5")
        if self.val_fraction is not None and not 0 < self.val_fraction < 1:
            raise ParamError(f"--val-fraction {self.val_fraction}: must be between 0 and 1")
        if self.image_ext is not None and self.image_ext not in IMAGE_EXTS:
            raise ParamError(f"--image-ext {self.image_ext!r}: choose one of {', '.join(IMAGE_EXTS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ParamError(f"--jpeg-quality {self.jpeg_quality}: must be 1..100")
        for name in ("train_per_class", "val_per_class", "demo_size"):
            if getattr(self, name) is not None and self.dataset != "demo":
                raise ParamError(f"--{name.replace('_', '-')} applies to --dataset demo only")
        if self.runner not in RUNNERS:
            raise ParamError(f"--runner {self.runner!r}: choose one of {', '.join(RUNNERS)}")
        if self.dask_address and self.runner != "dask":
            raise ParamError("--dask-address needs --runner dask")
        if self.cache_dir is not None and is_url(self.cache_dir):
            raise ParamError(f"--cache-dir {self.cache_dir}: must be a local folder, not a URL")
        return self

    @property
    def ext(self) -> str:
        """CIFAR-10 is lossless at the source, so it keeps PNG unless told otherwise."""
        return self.image_ext or ("png" if self.dataset == "cifar10" else "jpg")

    def cache_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_dir()

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def split_list(self) -> list[str] | None:
        return parse_splits(self.splits)

    def source_kwargs(self) -> dict:
        """The keyword arguments open_source() takes for this dataset kind (unset ones left out)."""
        if self.dataset == "imagenet":
            return {"check_md5": self.check_md5, "md5": self.md5 or {}}
        if self.dataset == "imagefolder":
            return {"seed": self.seed} | ({"val_fraction": self.val_fraction} if self.val_fraction is not None else {})
        if self.dataset == "cifar10":
            return {"image_ext": self.ext, "jpeg_quality": self.jpeg_quality}
        kw = {"seed": self.seed, "train_per_class": self.train_per_class, "val_per_class": self.val_per_class}
        return {k: v for k, v in (kw | {"size": self.demo_size}).items() if v is not None}

    def options(self) -> Options:
        """Options for shards/. Source options that change which images or bytes are written
        are recorded in the manifest params too, so a rerun with other values is never taken
        for a finished set; options that only check (md5, check_md5) are not."""
        skip = ("seed", "md5", "check_md5", "image_ext", "jpeg_quality")
        extra = {"image_ext": self.ext} | {k: v for k, v in self.source_kwargs().items() if k not in skip}
        return Options(
            seed=self.seed,
            shard_bytes=parse_size(self.shard_size if self.shard_size is not None else DEFAULT_SHARD_SIZE),
            shard_samples=self.shard_samples,
            verify=self.verify,
            max_side=self.max_side,
            image_ext=self.ext,
            jpeg_quality=self.jpeg_quality,
            extra=extra,
        )
