"""The build-shards flow with --runner dask: a real dask.distributed LocalCluster of 2 worker
processes (through prefect-dask) writes the same bytes as the default runner."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.build_shards import PROGRESS_KEY, build_shards
from flows.params import BuildParams, ParamError
from shards.manifest import read_manifest
from shards.verify import verify

# 80 train and 30 val images (10 classes) of 40 px in uneven shards of 15: 6 + 2 shards.
DEMO = {"dataset": "demo", "shard_samples": 15, "train_per_class": 8, "val_per_class": 3, "demo_size": 40, "seed": 2}


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def progress_of(flow_run_id) -> float:
    body = {"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}, "key": {"any_": [PROGRESS_KEY]}}, "limit": 5}
    (found,) = get_client(sync_client=True).request("POST", "/artifacts/filter", json=body).json()
    return found["data"]


@pytest.fixture(scope="module")
def local_build(prefect_harness, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "demo"
    build_shards(output=str(out), workers=1, **DEMO)
    return out


def shard_digests(out: Path) -> dict[str, str]:
    return {n: d for n, d in digests(out).items() if n != "manifest.json"}


def test_dask_runner_on_two_worker_processes_writes_the_default_runners_bytes(local_build, tmp_path):
    local, dask = local_build, tmp_path / "dask"
    state = build_shards(output=str(dask), workers=2, runner="dask", return_state=True, **DEMO)
    result = state.result()
    m = read_manifest(str(dask))
    assert [len(s["shards"]) for s in m["splits"].values()] == [6, 2]
    assert m["splits"] == read_manifest(str(local))["splits"]
    shards = shard_digests(dask)
    assert shards == shard_digests(local)
    # 8 tars and their indexes, _info.json and 2 wids indexes; nothing else (no _progress, no temporaries)
    assert len(shards) == 16 + 3
    assert all(not c.problems for c in verify(str(dask)))
    # The flow counted the shards as the dask tasks finished, and timed each split.
    assert progress_of(state.state_details.flow_run_id) == 100.0
    assert all(r["seconds"] > 0 and r["images_per_sec"] for r in result["rows"])


def test_dask_address_runs_the_tasks_on_that_cluster(local_build, tmp_path):
    """--dask-address: the multi-machine path, here a scheduler with 2 worker processes started
    apart from the flow (as dask-scheduler and dask-worker would be); the flow connects to it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        result = build_shards(
            output=str(tmp_path / "remote"), workers=1, runner="dask", dask_address=cluster.scheduler_address, **DEMO
        )
        with Client(cluster.scheduler_address) as client:
            ran = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_prefixes))
    assert ran > 0  # the tasks went through this scheduler
    assert shard_digests(tmp_path / "remote") == shard_digests(local_build)
    assert not result["complete_before"]


def test_a_dask_address_without_the_dask_runner_is_refused():
    with pytest.raises(ParamError, match="--dask-address needs --runner dask"):
        BuildParams(dataset="demo", output="/tmp/x", dask_address="tcp://127.0.0.1:8786").check()
    with pytest.raises(ParamError, match="--runner 'ray'"):
        BuildParams(dataset="demo", output="/tmp/x", runner="ray").check()
