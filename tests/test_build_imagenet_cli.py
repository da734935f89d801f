"""kill -9 of `python -m flows build-shards --dataset imagenet` mid-build, then the same command again.

The user's path, end to end, against a real Prefect server (`prefect server start` on a free
loopback port, temporary PREFECT_HOME): the CLI in its own process group, killed with SIGKILL
as soon as a shard is published, then rerun to completion. The result must equal, byte for
byte, a build that was never interrupted, and leave no temporary file behind. Slower than the
rest (a Prefect server start), hence its own file; tests/test_build_imagenet.py has the fast
library-level kill test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from ilsvrc_fixture import make_ilsvrc

from shards.build import build
from shards.manifest import MANIFEST
from shards.sources.imagenet import ImageNetSource
from shards.storage import TMP_MARK
from shards.types import Options

REPO = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (REPO / "flows" / "__main__.py").exists(), reason="flows CLI not present"),
]


def _digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".idx")
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A real Prefect server for this module; yields its API URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, home
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _cli(root: Path, out: Path, tmp: Path, log: str, api: tuple[str, Path]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flows", "build-shards", "--dataset", "imagenet", "--source", str(root),
           "--output", str(out), "--shard-samples", "1", "--workers", "1", "--seed", "3"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO), "PREFECT_API_URL": api[0], "PREFECT_HOME": str(api[1])}
    with open(tmp / log, "wb") as f:
        # Own session, so SIGKILL reaches every process of the build (its workers too).
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def test_cli_kill_9_mid_build_then_rerun_is_byte_identical(tmp_path, prefect_api):
    root = tmp_path / "ilsvrc"
    make_ilsvrc(root)
    reference = tmp_path / "reference"
    ref_manifest = build(ImageNetSource(str(root)), str(reference), Options(seed=3, shard_samples=1), workers=1)
    total = len(list(reference.glob("*.tar")))

    out = tmp_path / "out"
    child = _cli(root, out, tmp_path, "killed.log", prefect_api)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*.tar")) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    published = list(out.glob("*.tar"))
    assert child.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert 1 <= len(published) < total and not (out / MANIFEST).exists()

    rerun = _cli(root, out, tmp_path, "rerun.log", prefect_api)
    try:
        rerun.wait(timeout=300)
    finally:
        if rerun.poll() is None:
            os.killpg(rerun.pid, signal.SIGKILL)
    assert rerun.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]

    assert _digests(out) == _digests(reference)
    m = json.loads((out / MANIFEST).read_text())
    for part in ("splits", "quarantine", "classes", "dataset", "image_ext"):
        assert m[part] == ref_manifest[part], part
    assert not [p for p in out.rglob("*") if TMP_MARK in p.name or p.name == "_progress"]
