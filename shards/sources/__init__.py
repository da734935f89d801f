"""One module per source kind, each giving a `Source` (shards/types.py).

`open_source` is the single entry point the CLI and the flow use, so adding a kind means
adding a module and a line here.
"""

from __future__ import annotations

from shards.types import Source

DATASETS = ("imagenet", "imagefolder", "cifar10", "demo")


def open_source(dataset: str, source: str | None, **options) -> Source:
    """Open a source by kind. `options` are the kind's own keyword arguments."""
    if dataset == "imagenet":
        from shards.sources.imagenet import ImageNetSource

        return ImageNetSource(source, **options)
    if dataset == "imagefolder":
        from shards.sources.imagefolder import ImageFolderSource

        return ImageFolderSource(source, **options)
    if dataset == "cifar10":
        from shards.sources.cifar10 import Cifar10Source

        return Cifar10Source(source, **options)
    if dataset == "demo":
        from shards.sources.demo import DemoSource

        return DemoSource(**options)
    raise ValueError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
