"""Deployments build-shards/{imagenet,imagefolder,cifar10,demo}, served by `python -m flows serve`.

Each is the one build-shards flow with defaults suited to its dataset; every flow parameter
can be overridden per run, so the parameters mirror the CLI options:

    prefect deployment run build-shards/imagenet -p source=/data/ilsvrc -p output=/ssd/imagenet --watch
    prefect deployment run build-shards/demo -p output=/tmp/demo -p shard_samples=500 --watch
"""

from __future__ import annotations

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from flows.build_shards import build_shards

# Defaults per dataset, on top of the flow's own (see `python -m flows build-shards --help`).
# source and output have no default (demo needs no source): they are given per run.
DEFAULTS: dict[str, dict] = {
    "imagenet": {"dataset": "imagenet", "verify": "decode"},
    "imagefolder": {"dataset": "imagefolder", "verify": "decode"},
    "cifar10": {"dataset": "cifar10", "image_ext": "png", "shard_samples": 10_000},
    "demo": {"dataset": "demo", "shard_samples": 500},
}

DESCRIPTIONS = {
    "imagenet": "ILSVRC2012 from a folder holding the train/val tars and the devkit; 1GB shards.",
    "imagefolder": "A class-per-subfolder image tree (train/ and val/, or split by val_fraction).",
    "cifar10": "CIFAR-10 from cifar-10-python.tar.gz, stored losslessly as PNG by default.",
    "demo": "The generated demo set (no source needed); 500 images per shard.",
}


def deployments() -> list[RunnerDeployment]:
    return [
        build_shards.to_deployment(name=name, parameters=params, description=DESCRIPTIONS[name], tags=["shardline"])
        for name, params in DEFAULTS.items()
    ]


def serve(limit: int | None = None) -> None:
    """Register the deployments with the Prefect server and run their flow runs until stopped."""
    prefect_serve(*deployments(), limit=limit)
