"""Deployments build-shards/{imagenet,imagefolder,cifar10,demo}, served by `python -m flows serve`.

Each is the one build-shards flow with defaults suited to its dataset; every flow parameter
can be overridden per run, so the parameters mirror the CLI options:

    prefect deployment run build-shards/imagenet -p source=/data/ilsvrc -p output=/ssd/imagenet --watch
    prefect deployment run build-shards/demo -p output=/tmp/demo -p shard_samples=500 --watch
    prefect deployment run build-shards/imagenet -p source=https://mirror.example/ilsvrc/ \
        -p output=s3://team-data/imagenet -p cache_dir=/scratch/dl -p runner=dask -p dask_address=tcp://sched:8786

Dataset-specific values only fill in `dataset`; everything else keeps the flow's defaults,
declared once in flows/params.py, so a deployment run and the same CLI command build the same
bytes. Deployment runs take the output's lock like any build (a second run into the same
output fails at once; -p wait=true waits).
"""

from __future__ import annotations

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from flows.build_shards import build_shards
from shards.sources import DATASETS

# Each deployment fixes only `dataset`; every other parameter, with its default, type and
# description, is the flow's own (flows/params.py: BuildParams), so a deployment run and the
# same CLI command build the same bytes (CIFAR-10's PNG default is BuildParams' too).
DEFAULTS: dict[str, dict] = {name: {"dataset": name} for name in DATASETS}

DESCRIPTIONS = {
    "imagenet": "ILSVRC2012 from a folder holding the train/val tars and the devkit (-p source=... -p output=...).",
    "imagefolder": "A class-per-subfolder image tree (train/ and val/, or split by -p val_fraction=F).",
    "cifar10": "CIFAR-10 from cifar-10-python.tar.gz, stored losslessly as PNG by default.",
    "demo": "The generated demo set (no source needed); try -p shard_samples=500.",
}


def deployments() -> list[RunnerDeployment]:
    return [
        build_shards.to_deployment(name=name, parameters=params, description=DESCRIPTIONS[name], tags=["shardline"])
        for name, params in DEFAULTS.items()
    ]


def serve(limit: int | None = None) -> None:
    """Register the deployments with the Prefect server and run their flow runs until stopped."""
    prefect_serve(*deployments(), limit=limit)
