"""Credentials in a --source URL are used to download and are written nowhere.

Real parts: `python -m flows build-shards` as a subprocess (its own temporary Prefect server,
on the test harness's database, so that database can be searched too), a loopback HTTP server
that refuses requests without the credentials (tests/faulty_http.py), and moto's S3 server for
the lease object. Each test searches every byte the build left: its stdout and stderr, every
file under the output, the download cache and the Prefect home, the Prefect database, the lock.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import quote

import pytest
from faulty_http import FaultyServer
from PIL import Image
from s3_server import moto_s3

from flows.params import BuildParams
from shards.lock import LOCK_NAME, LockHeld, OutputLock, output_lock
from shards.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
USER, TOKEN = "alice", "s3cr3t-T0KEN/4242"  # a '/' as AWS secret keys have: it must be quoted in a URL
SIGNATURE = "f00dfeedcafe" * 4
CREDENTIAL = "AKIASECRETEXAMPLE/20260101/us-east-1/s3/aws4_request"
SECRETS = (TOKEN, quote(TOKEN, safe=""), SIGNATURE, "AKIASECRETEXAMPLE")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """photos.tar: a class-per-folder tree of 2 x 4 tiny JPEGs."""
    root = tmp_path_factory.mktemp("served")
    with tarfile.open(root / "photos.tar", "w") as tar:
        for c, color in enumerate(("red", "blue")):
            for i in range(4):
                buf = io.BytesIO()
                Image.new("RGB", (24 + i, 20), color).save(buf, "JPEG")
                info = tarfile.TarInfo(f"photos/class{c}/img{i}.jpg")
                info.size = len(buf.getvalue())
                tar.addfile(info, io.BytesIO(buf.getvalue()))
    return root


def assert_nowhere(texts: list[str], *folders: Path) -> None:
    """No secret, in any of its encodings, in the texts nor in any file's bytes under the folders."""
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} in output:\n{text}"
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            for secret in SECRETS:
                assert secret not in str(path), path
            if path.is_file():
                data = path.read_bytes()
                for secret in SECRETS:
                    assert secret.encode() not in data, f"{secret!r} in {path}"


def cli_env(tmp: Path) -> dict[str, str]:
    """No API URL (the CLI starts its own server) on the harness's migrated database; the Prefect
    home and the shardline cache root in the test's folder, so both can be searched."""
    from prefect.settings import get_current_settings

    database = get_current_settings().server.database.connection_url.get_secret_value()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp / "prefect"), "PYTHONPATH": str(ROOT), "SHARDLINE_CACHE_DIR": str(tmp / "root")}
    return env | {"PREFECT_API_DATABASE_CONNECTION_URL": database, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def database_files() -> list[Path]:
    from prefect.settings import get_current_settings

    url = get_current_settings().server.database.connection_url.get_secret_value()
    db = Path(url.split("///", 1)[1])
    return [p for p in db.parent.glob(db.name + "*") if p.is_file()]  # the database and its -wal, -shm


def build(source: str, out: Path, tmp: Path) -> subprocess.CompletedProcess:
    args = ["build-shards", "--dataset", "imagefolder", "--source", source, "--output", str(out)]
    args += ["--cache-dir", str(tmp / "downloads"), "--shard-samples", "3", "--workers", "1", "--verify", "header"]
    return subprocess.run(
        [sys.executable, "-m", "flows", *args], cwd=ROOT, env=cli_env(tmp), capture_output=True, text=True, timeout=300
    )


def test_basic_auth_source_and_the_lock_another_build_meets(prefect_harness, served, tmp_path):
    out = tmp_path / "out"
    with FaultyServer(served, auth=(USER, TOKEN)) as srv:
        source = srv.url.replace("://", f"://{USER}:{quote(TOKEN, safe='')}@") + "/photos.tar"
        run = build(source, out, tmp_path)
        assert run.returncode == 0, run.stderr
        assert srv.refused == 0 and srv.requests, "every request brought the credentials"
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["samples"] == 8
    assert (tmp_path / "downloads" / "photos.tar.md5").exists()
    # the warning, once and redacted: credentials in a URL end up in the process list
    assert (run.stdout + run.stderr).count("carries credentials in the URL") == 1
    assert f"http://***@127.0.0.1:{srv.url.rsplit(':', 1)[1]}/photos.tar" in run.stdout + run.stderr

    # A second build while another one, from the same URL, holds the output
    record = BuildParams(dataset="imagefolder", source=source, output=str(out)).lock_record()
    with output_lock(str(out), record):
        lock_bytes = (out / LOCK_NAME).read_bytes()
        second = build(source, out, tmp_path)
    assert second.returncode == 1 and "is locked by build pid" in second.stderr, second.stderr
    assert b"http://***@127.0.0.1" in lock_bytes
    assert_nowhere([run.stdout, run.stderr, second.stdout, second.stderr, lock_bytes.decode()], tmp_path)
    # the server's database holds the flow run's parameters: the source there is the redacted one
    assert any(b"http://***@127.0.0.1" in p.read_bytes() for p in database_files())
    assert_nowhere([], *database_files())


def test_presigned_source(prefect_harness, served, tmp_path):
    out = tmp_path / "out"
    query = {"X-Amz-Credential": CREDENTIAL, "X-Amz-Signature": SIGNATURE}
    with FaultyServer(served, query=query) as srv:
        source = (
            f"{srv.url}/photos.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={quote(CREDENTIAL, safe='')}"
            f"&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature={SIGNATURE}"
        )
        run = build(source, out, tmp_path)
        assert run.returncode == 0, run.stderr
        assert srv.refused == 0
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["photos", "photos.tar", "photos.tar.md5"]
    assert "X-Amz-Signature=***" in run.stdout + run.stderr
    assert_nowhere([run.stdout, run.stderr], tmp_path)
    assert_nowhere([], *database_files())


def test_a_refused_download_says_so_redacted(served, tmp_path):
    from shards.fetch import FetchError, fetch

    with FaultyServer(served, auth=(USER, TOKEN)) as srv:
        source = srv.url.replace("://", f"://{USER}:wrong-{quote(TOKEN, safe='')}@") + "/photos.tar"
        with pytest.raises(FetchError) as refused:
            fetch(source, str(tmp_path / "downloads"))
    assert "HTTP 401" in str(refused.value) and "http://***@127.0.0.1" in str(refused.value)
    assert_nowhere([str(refused.value)], tmp_path)


def test_lease_object_and_its_message_on_s3():
    source = f"http://{USER}:{quote(TOKEN, safe='')}@example.com/photos.tar?X-Amz-Signature={SIGNATURE}"
    with moto_s3("secrets") as _endpoint:
        storage = Storage("s3://secrets/set")
        record = BuildParams(dataset="imagefolder", source=source, output=storage.root).lock_record()
        with output_lock(storage, record):
            with pytest.raises(LockHeld) as held:
                OutputLock(Storage("s3://secrets/set"), record).acquire()
            head = storage.fs.call_s3("head_object", Bucket="secrets", Key=f"set/{LOCK_NAME}")
            body = storage.read_bytes(LOCK_NAME).decode()
    assert json.loads(body)["params"]["source"] == "http://***@example.com/photos.tar?X-Amz-Signature=***"
    assert_nowhere([str(held.value), body, json.dumps(head.get("Metadata", {}))])


def test_netrc_gives_the_credentials_without_a_url_carrying_them(served, tmp_path, monkeypatch):
    from shards.fetch import fetch

    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {TOKEN}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))  # requests reads it, as it reads ~/.netrc
    with FaultyServer(served, auth=(USER, TOKEN)) as srv:
        path = fetch(f"{srv.url}/photos.tar", str(tmp_path / "downloads"))
        assert srv.refused == 0
    assert Path(path).read_bytes() == (served / "photos.tar").read_bytes()


def test_a_flow_run_given_the_real_url_logs_it_redacted(prefect_harness, served, tmp_path, capfd):
    """A deployment run gets its parameters as typed: the flow itself redacts what it logs and shows."""
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogHandler

    from flows.build_shards import build_shards

    secret = "d3pl0y-0nly-S3CRET"  # not the other tests' secret: the database keeps this run's parameters
    with FaultyServer(served, auth=(USER, secret)) as srv:
        source = srv.url.replace("://", f"://{USER}:{secret}@") + "/photos.tar"
        state = build_shards(
            dataset="imagefolder",
            source=source,
            output=str(tmp_path / "out"),
            cache_dir=str(tmp_path / "downloads"),
            shard_samples=3,
            workers=1,
            verify="header",
            return_state=True,
        )
        assert srv.refused == 0
    result, run_id = state.result(), state.state_details.flow_run_id
    APILogHandler().flush()  # the logs go to the server in the background: send them now
    client = get_client(sync_client=True)
    # the REST filters directly: the sync client's read_* send unset options as null, which the server rejects
    body = {"logs": {"flow_run_id": {"any_": [str(run_id)]}}, "limit": 200}
    logs = [r["message"] for r in client.request("POST", "/logs/filter", json=body).json()]
    body = {"artifacts": {"flow_run_id": {"any_": [str(run_id)]}}, "limit": 50}
    artifacts = client.request("POST", "/artifacts/filter", json=body).json()
    assert any("downloading http://***@127.0.0.1" in m for m in logs), logs
    assert sum("carries credentials in the URL" in m for m in logs) == 1
    assert len(artifacts) >= 2  # the download's progress, the shards' progress, the summary table
    shown = [*logs, json.dumps(artifacts), json.dumps(result), *capfd.readouterr()]
    for text in shown:
        assert secret not in text, text
    for path in tmp_path.rglob("*"):
        assert secret not in str(path) and (not path.is_file() or secret.encode() not in path.read_bytes()), path
