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


def test_dask_runner_on_two_worker_processes_writes_the_default_runners_bytes(prefect_harness, tmp_path):
    local, dask = tmp_path / "local", tmp_path / "dask"
    build_shards(output=str(local), workers=1, **DEMO)
    state = build_shards(output=str(dask), workers=2, runner="dask", return_state=True, **DEMO)
    result = state.result()
    m = read_manifest(str(dask))
    assert [len(s["shards"]) for s in m["splits"].values()] == [6, 2]
    assert m["splits"] == read_manifest(str(local))["splits"]
    shards = {n: d for n, d in digests(dask).items() if n != "manifest.json"}
    assert shards == {n: d for n, d in digests(local).items() if n != "manifest.json"}
    assert len(shards) == 16  # 8 tars and their indexes, nothing else (no _progress, no temporaries)
    assert all(not c.problems for c in verify(str(dask)))
    # The flow counted the shards as the dask tasks finished, and timed each split.
    assert progress_of(state.state_details.flow_run_id) == 100.0
    assert all(r["seconds"] > 0 and r["images_per_sec"] for r in result["rows"])


def test_a_dask_address_without_the_dask_runner_is_refused():
    with pytest.raises(ParamError, match="--dask-address needs --runner dask"):
        BuildParams(dataset="demo", output="/tmp/x", dask_address="tcp://127.0.0.1:8786").check()
    with pytest.raises(ParamError, match="--runner 'ray'"):
        BuildParams(dataset="demo", output="/tmp/x", runner="ray").check()
