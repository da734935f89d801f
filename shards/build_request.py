"""What to build, as one value: the dataset kind, where it is, and every option that decides the bytes.

The CLI and the Prefect flow (flows/params.py) make one from their checked parameters; a plain
script makes one itself. Either way `source_kwargs()` and `options()` are decided here, so
`build(request.open_source(), output, request.options())` writes the same manifest.json as
`python -m flows build-shards` with the same options:

    req = BuildRequest("demo", train_per_class=8, val_per_class=3, demo_size=48, shard_samples=25)
    manifest = build(req.open_source(), "/tmp/demo", req.options())
"""

from __future__ import annotations

from dataclasses import dataclass

from shards.sources import open_source
from shards.types import Options, Source

# Options that only check the source (digests) or are already Options fields: never recorded
# again among the manifest's source-specific params.
_NOT_RECORDED = ("seed", "md5", "check_md5", "image_ext", "jpeg_quality")


def default_image_ext(dataset: str) -> str:
    """CIFAR-10 is lossless at the source, so it keeps PNG unless told otherwise."""
    return "png" if dataset == "cifar10" else "jpg"


@dataclass(frozen=True)
class BuildRequest:
    """A build's dataset and byte-deciding options; None means the source's own default."""

    dataset: str
    source: str | None = None  # a local folder or file (a URL source is downloaded first: `downloaded`)
    seed: int = Options.seed
    shard_bytes: int = Options.shard_bytes
    shard_samples: int | None = None
    verify: str = Options.verify
    max_side: int | None = None
    max_pixels: int = Options.max_pixels
    image_ext: str | None = None
    jpeg_quality: int = Options.jpeg_quality
    md5: dict[str, str] | None = None
    check_md5: bool = False
    val_fraction: float | None = None
    allow_empty_classes: bool = False
    train_per_class: int | None = None
    val_per_class: int | None = None
    demo_size: int | None = None
    # The archives were downloaded, and checked against md5 as they arrived: hashing them again
    # would cost another full read (150 GB for ImageNet), so a downloaded source gets no md5.
    downloaded: bool = False

    @property
    def ext(self) -> str:
        """The image member's extension: image_ext, else the dataset's default."""
        return self.image_ext or default_image_ext(self.dataset)

    def source_kwargs(self) -> dict:
        """The keyword arguments open_source() takes for this dataset kind (unset ones left out)."""
        md5 = {} if self.downloaded else (self.md5 or {})
        if self.dataset == "imagenet":
            return {"check_md5": self.check_md5, "md5": md5}
        if self.dataset == "imagefolder":
            kw = {"seed": self.seed} | ({"val_fraction": self.val_fraction} if self.val_fraction is not None else {})
            return kw | ({"allow_empty_classes": True} if self.allow_empty_classes else {})
        if self.dataset == "cifar10":
            return {"image_ext": self.ext, "jpeg_quality": self.jpeg_quality, "md5": md5}
        kw = {"seed": self.seed, "train_per_class": self.train_per_class, "val_per_class": self.val_per_class}
        return {k: v for k, v in (kw | {"size": self.demo_size}).items() if v is not None}

    def options(self) -> Options:
        """Options for the build. Source options that change which images or bytes are written
        are recorded in the manifest params too, so a rerun with other values is never taken
        for a finished set; options that only check (md5, check_md5) are not."""
        extra = {"image_ext": self.ext} | {k: v for k, v in self.source_kwargs().items() if k not in _NOT_RECORDED}
        return Options(
            seed=self.seed,
            shard_bytes=self.shard_bytes,
            shard_samples=self.shard_samples,
            verify=self.verify,
            max_side=self.max_side,
            image_ext=self.ext,
            jpeg_quality=self.jpeg_quality,
            max_pixels=self.max_pixels,
            extra=extra,
        )

    def open_source(self, local_source: str | None = None) -> Source:
        """The Source to build from: `local_source` (where a URL source was downloaded to) or `source`."""
        return open_source(self.dataset, local_source or self.source, **self.source_kwargs())
