"""The build-shards parameters: parsing and checking, shared by the CLI and the flow.

No Prefect here, so the CLI can reject a bad option in one line before it imports Prefect
or starts a server, and the flow (reached through a deployment, with no CLI in front of it)
runs the very same checks before doing any work.
"""

from __future__ import annotations

import inspect
import os
import typing
from collections.abc import Iterable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from shards import sizes
from shards.build_request import BuildRequest
from shards.cache_root import cache_root
from shards.checksums import ChecksumError, parse_md5
from shards.images import VERIFY_LEVELS
from shards.manifest import IMAGE_EXTS
from shards.redact import redact_values
from shards.sources import DATASETS, demo
from shards.storage import is_url
from shards.types import Options

VERIFY_MODES = VERIFY_LEVELS
RUNNERS = ("local", "dask")
DEFAULT_SHARD_SIZE = Options.shard_bytes


class ParamError(ValueError):
    """A bad build parameter; the message is one line naming the option."""


def shard_size_bytes(value: str | int) -> int:
    """--shard-size as bytes, by the one size parser (shards/sizes.py); ParamError for a bad one."""
    try:
        return sizes.parse_size(value, "--shard-size")
    except ValueError as e:
        raise ParamError(str(e)) from None


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
    """Where downloads of a URL --source go unless --cache-dir says: <cache root>/downloads."""
    return str(cache_root() / "downloads")


def _opt(help: str, default: Any = None, **cli: Any) -> Any:
    """A build parameter's default, help and command-line form (metavar, type, required)."""
    return field(default=default, metadata={"help": help, **cli})


def _required(help: str, **cli: Any) -> Any:
    return field(metadata={"help": help, "required": True, **cli})


@dataclass
class BuildParams:
    """Every build-shards parameter, declared once: its type, default and help. The CLI's
    options (flows/cli.py), the flow's signature and parameter schema (flows/build_shards.py)
    and so the deployments are all made from these fields."""

    dataset: str = _required(
        "Source kind: imagenet (folder with the three ILSVRC2012 archives), imagefolder (class-per-subfolder "
        "tree), cifar10 (cifar-10-python.tar.gz) or demo (generated, no --source).",
        metavar="|".join(DATASETS),
    )
    output: str = _required(
        "Folder or fsspec URL (s3://...) to write shards, .idx indexes and manifest.json into.", metavar="PATH_OR_URL"
    )
    source: str | None = _opt(
        "Where the dataset is: a folder or file, or an http(s):// or s3:// URL (imagenet: of the folder holding "
        "the three archives under their official names; cifar10/imagefolder: of the one archive), downloaded "
        "into --cache-dir with resume, retries and MD5 checks. Required except for --dataset demo. "
        "Credentials: ~/.netrc for http(s), the AWS chain for s3://; those in a URL (user:password@, a presigned "
        "query) are used only to connect, and shown redacted everywhere.",
        metavar="PATH_OR_URL",
    )
    cache_dir: str | None = _opt(
        "Local folder for the downloads of a URL --source; verified downloads are reused by the next run and an "
        "interrupted one resumes. Default: $SHARDLINE_CACHE_DIR/downloads, else ~/.cache/shardline/downloads "
        f"(here: {default_cache_dir()}).",
        metavar="DIR",
    )
    splits: list[str] | str | None = _opt(  # noqa: RUF009 (_opt returns a dataclasses.field)
        "Comma-separated splits to build, e.g. train,val. Default: every split the source has.", metavar="LIST"
    )
    shard_size: str | int | None = _opt(
        "Target shard size: bytes or a size such as 1GB, 500MB, 64MiB. Default 1GB. Excludes --shard-samples.",
        metavar="SIZE",
    )
    shard_samples: int | None = _opt(
        "Exactly N images per shard (the last one fewer), instead of --shard-size.", metavar="N", type=int
    )
    seed: int = _opt(
        "Seed of the global shuffle (and of the demo set and --val-fraction split): same seed, same bytes.",
        Options.seed,
        type=int,
    )
    verify: str = _opt(
        "How hard to check each image: decode fully, parse headers only, or trust it (none: JPEGs are stored "
        "unparsed, so the pixel rules need header or decode). Bad images are quarantined and listed in the manifest.",
        Options.verify,
        metavar="|".join(VERIFY_MODES),
    )
    max_side: int | None = _opt(
        "Downsize images whose longer side exceeds N pixels (re-encoded JPEG). Default: keep sizes.",
        metavar="N",
        type=int,
    )
    max_pixels: int = _opt(
        "Quarantine images of more than N pixels (width x height, read from the header before decoding: "
        "a guard against decompression bombs). Default: PIL's MAX_IMAGE_PIXELS.",
        Options.max_pixels,
        metavar="N",
        type=int,
    )
    workers: int | None = _opt(
        "Processes decoding and writing shards in parallel (bounds CPU and memory). Default: CPU count. "
        "With --runner dask and no --dask-address: the LocalCluster's worker processes.",
        metavar="N",
        type=int,
    )
    runner: str = _opt(
        "Where the shard-writing tasks run: local (threads feeding a process pool on this machine) or dask (a "
        "dask.distributed cluster through prefect-dask; its workers must import shardline and reach --source "
        "and --output by the same path or URL).",
        "local",
        metavar="|".join(RUNNERS),
    )
    dask_address: str | None = _opt(
        "With --runner dask: the scheduler to use, e.g. tcp://scheduler:8786. Default: start a LocalCluster of "
        "--workers processes, one thread each, for this run.",
        metavar="ADDR",
    )
    md5: dict[str, str] | None = _opt(  # noqa: RUF009 (_opt returns a dataclasses.field)
        "Expected MD5 of an archive: NAME is its file name (a path counts by its file name) and must be one of "
        "the source's archives; repeatable. Wins over the built-in ILSVRC2012 digests. Checked for a local "
        "archive too; downloads are always checked (a mismatch costs one fresh download, then fails naming both).",
        metavar="NAME=HEX",
        multiple=True,
    )
    check_md5: bool = _opt(
        "ImageNet: verify every local archive against the official (or --md5) digests before indexing.", False
    )
    val_fraction: float | None = _opt(
        "imagefolder without train/ and val/ subfolders: hold out this fraction (0..1) per class as val, "
        "chosen with --seed; 0 means no val split.",
        metavar="F",
        type=float,
    )
    image_ext: str | None = _opt(
        "Image member format. Default jpg; cifar10 defaults to png (lossless). jpg re-encodes lossless sources "
        "at --jpeg-quality.",
        metavar="|".join(IMAGE_EXTS),
    )
    jpeg_quality: int = _opt(
        "JPEG quality for images that are re-encoded (repaired, resized, or from a lossless source).",
        Options.jpeg_quality,
        metavar="Q",
        type=int,
    )
    allow_empty_classes: bool = _opt(
        "imagefolder: keep class folders that hold no image as classes with no samples (listed in the "
        "manifest's empty_classes) instead of failing, as torchvision's ImageFolder(allow_empty=True).",
        False,
    )
    train_per_class: int | None = _opt(
        f"demo only: training images per class (default {demo.TRAIN_PER_CLASS}).", metavar="N", type=int
    )
    val_per_class: int | None = _opt(
        f"demo only: validation images per class (default {demo.VAL_PER_CLASS}).", metavar="N", type=int
    )
    demo_size: int | None = _opt(f"demo only: image side in pixels (default {demo.SIZE}).", metavar="PX", type=int)
    wait: bool = _opt(
        "If another build holds --output (its .shardline.lock, or its lease on object storage), wait for it "
        "to finish instead of failing at once.",
        False,
    )

    def check(self) -> BuildParams:
        """Raise ParamError (one line) for the first bad parameter; no I/O beyond a stat."""
        self._check_where()
        self._check_shards()
        self._check_images()
        self._check_source_options()
        self._check_runner()
        return self

    def _check_where(self) -> None:
        if self.dataset not in DATASETS:
            raise ParamError(f"--dataset {self.dataset!r}: unknown; choose one of {', '.join(DATASETS)}")
        if self.dataset != "demo" and not self.source:
            raise ParamError(f"--source is required for --dataset {self.dataset} (a folder or URL)")
        if self.source and not is_url(self.source) and not os.path.exists(self.source.removeprefix("file://")):
            raise ParamError(f"--source {self.source}: no such file or folder")
        if not self.output:
            raise ParamError("--output is required (a folder or URL)")
        if self.cache_dir is not None and is_url(self.cache_dir):
            raise ParamError(f"--cache-dir {self.cache_dir}: must be a local folder, not a URL")

    def _check_shards(self) -> None:
        parse_splits(self.splits)
        if self.shard_samples is not None and self.shard_size is not None:
            raise ParamError("--shard-size and --shard-samples exclude each other: give one")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ParamError(f"--shard-samples {self.shard_samples}: must be at least 1")
        shard_size_bytes(self.shard_size if self.shard_size is not None else DEFAULT_SHARD_SIZE)

    def _check_images(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ParamError(f"--verify {self.verify!r}: choose one of {', '.join(VERIFY_MODES)}")
        if self.max_side is not None and self.max_side < 16:
            raise ParamError(f"--max-side {self.max_side}: must be at least 16 pixels")
        if self.max_pixels < 1:
            raise ParamError(f"--max-pixels {self.max_pixels}: must be at least 1")
        if self.image_ext is not None and self.image_ext not in IMAGE_EXTS:
            raise ParamError(f"--image-ext {self.image_ext!r}: choose one of {', '.join(IMAGE_EXTS)}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ParamError(f"--jpeg-quality {self.jpeg_quality}: must be 1..100")

    def _check_source_options(self) -> None:
        if not self.md5:
            self.md5 = None  # the CLI's empty tuple, or {}: none given
        else:
            from shards.download import archive_names  # only here: it imports the download stack

            try:
                self.md5 = parse_md5(self.md5, archive_names(self.dataset, self.source)) or None
            except ChecksumError as e:
                raise ParamError(str(e)) from None
        if self.allow_empty_classes and self.dataset != "imagefolder":
            raise ParamError("--allow-empty-classes applies to --dataset imagefolder only")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ParamError(f"--val-fraction {self.val_fraction}: must be at least 0 (no val split) and below 1")
        for name in ("train_per_class", "val_per_class", "demo_size"):
            if getattr(self, name) is not None and self.dataset != "demo":
                raise ParamError(f"--{name.replace('_', '-')} applies to --dataset demo only")

    def _check_runner(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise ParamError(f"--workers {self.workers}: must be at least 1")
        if self.runner not in RUNNERS:
            raise ParamError(f"--runner {self.runner!r}: choose one of {', '.join(RUNNERS)}")
        if self.dask_address and self.runner != "dask":
            raise ParamError("--dask-address needs --runner dask")

    def request(self) -> BuildRequest:
        """The checked parameters as shards/ takes them: what to build and the options that decide
        its bytes (BuildRequest's fields of the same name, the shard size in bytes; a URL source is
        downloaded, and checked as it arrives, before it is opened)."""
        same = {f.name: getattr(self, f.name) for f in fields(BuildRequest) if hasattr(self, f.name)}
        return BuildRequest(
            **same,
            shard_bytes=shard_size_bytes(self.shard_size if self.shard_size is not None else DEFAULT_SHARD_SIZE),
            downloaded=bool(self.source and is_url(self.source)),
        )

    def cache_path(self) -> str:
        return os.path.abspath(os.path.expanduser(self.cache_dir)) if self.cache_dir else default_cache_dir()

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1

    def split_list(self) -> list[str] | None:
        return parse_splits(self.splits)

    def flow_kwargs(self) -> dict:
        """The checked parameters as the flow takes them (md5 parsed, splits a list, sizes in bytes)."""
        kw = asdict(self)
        kw["splits"] = self.split_list()
        if self.shard_size is not None:
            kw["shard_size"] = shard_size_bytes(self.shard_size)
        return kw

    def lock_record(self) -> dict:
        """What the output's lock records about this build (for the message another build prints)."""
        keep = ("dataset", "source", "splits", "seed", "shard_size", "shard_samples", "runner")
        # others read it (a lease object, a second build's message): never a URL's credentials
        return redact_values({k: getattr(self, k) for k in keep})


def flow_signature() -> inspect.Signature:
    """BuildParams as a keyword-only signature, with real types, for the Prefect flow."""
    hints = typing.get_type_hints(BuildParams)
    params = [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if f.default is MISSING else f.default,
            annotation=hints[f.name],
        )
        for f in fields(BuildParams)
    ]
    return inspect.Signature(params, return_annotation=dict)


def flow_docstring(summary: str) -> str:
    """`summary` plus an Args section from the fields' help: Prefect shows these as the
    parameter descriptions of the flow and of every deployment."""
    lines = [summary, "", "Args:"] + [f"    {f.name}: {f.metadata['help']}" for f in fields(BuildParams)]
    return "\n".join(lines) + "\n"
