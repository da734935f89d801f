"""The served deployments, end to end, as a user runs them:

    prefect server start --host 127.0.0.1 --port P        (temporary PREFECT_HOME)
    python -m flows serve
    prefect deployment run build-shards/demo -p output=... --watch

then a complete shard set must be at the output. Every process is started in its own process
group and killed with it, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shards.manifest import read_manifest
from shards.verify import verify

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENTS = ("imagenet", "imagefolder", "cifar10", "demo")
OPTIONS = {"source", "output", "splits", "shard_size", "shard_samples", "seed", "verify", "max_side", "workers", "md5"}
OPTIONS |= {"check_md5", "val_fraction", "image_ext", "jpeg_quality", "cache_dir", "runner", "dask_address"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], bool], timeout: float, procs: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{p.args} exited ({p.returncode}) while waiting for {what}")
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


@contextlib.contextmanager
def started(cmd: list[str], env: dict, log: Path) -> Iterator[subprocess.Popen]:
    """Run cmd in its own process group; on exit kill the whole group (children included)."""
    with open(log, "wb") as out:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield p
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(wait)
                break


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_served_demo_deployment_builds_a_complete_set(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # pick up the triggered run quickly
    }
    out = tmp_path / "demo-shards"
    logs = {name: tmp_path / f"{name}.log" for name in ("server", "serve")}
    try:
        with contextlib.ExitStack() as stack:
            server = stack.enter_context(
                started([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, logs["server"])
            )
            wait_for("the server's health endpoint", lambda: get(f"{api}/health")[0] == 200, 90, [server])
            serve = stack.enter_context(started([sys.executable, "-m", "flows", "serve"], env, logs["serve"]))
            wait_for(
                "the four deployments",
                lambda: all(get(f"{api}/deployments/name/build-shards/{d}")[0] == 200 for d in DEPLOYMENTS),
                60,
                [server, serve],
            )
            for name in DEPLOYMENTS:
                deployment = json.loads(get(f"{api}/deployments/name/build-shards/{name}")[1])
                assert deployment["parameters"]["dataset"] == name
                assert deployment["parameter_openapi_schema"]["properties"].keys() >= OPTIONS  # mirrors the CLI

            params = {
                "output": str(out),
                "train_per_class": 3,
                "val_per_class": 2,
                "demo_size": 32,
                "shard_samples": 7,
                "workers": 2,
            }
            cmd = [PREFECT, "deployment", "run", "build-shards/demo", "--watch"]
            for k, v in params.items():
                cmd += ["-p", f"{k}={v}"]
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
            assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
            assert "Completed" in run.stdout + run.stderr
    except BaseException:
        for name, log in logs.items():  # show what the background processes said
            if log.exists():
                print(f"----- {name} log (tail) -----\n{log.read_text(errors='replace')[-4000:]}")
        raise

    m = read_manifest(str(out))
    assert m["dataset"] == "demo" and m["params"]["shard_samples"] == 7
    assert m["splits"]["train"]["samples"] == 30 and m["splits"]["val"]["samples"] == 20
    assert len(m["splits"]["train"]["shards"]) == 5 and len(m["splits"]["val"]["shards"]) == 3
    checks = verify(str(out))
    assert len(checks) == 8 and all(not c.problems for c in checks), [c.problems for c in checks]


def test_serve_without_a_server_fails_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(tmp_path)}
    p = subprocess.run(
        [sys.executable, "-m", "flows", "serve"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: serve needs a running Prefect server"), p.stderr
