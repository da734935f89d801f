"""A real S3 endpoint over HTTP on loopback: moto in server mode, on a free port."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import s3fs
from moto.server import ThreadedMotoServer


def aws_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point every S3 client (boto3, s3fs, DALI) at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextmanager
def moto_s3(bucket: str | None = "team-data") -> Iterator[str]:
    """Start moto, point the standard AWS variables at it (inherited by child processes),
    create `bucket`, and yield the endpoint URL; everything is restored afterwards."""
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = aws_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _forget_s3_clients()  # an s3fs instance cached under an earlier endpoint would point there
    # moto keeps its buckets in process-wide state, shared by every server started in this
    # process: start from an empty store, so no test sees another module's objects.
    import requests

    requests.post(f"{endpoint}/moto-api/reset", timeout=30).raise_for_status()
    try:
        if bucket:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        srv.stop()
        _forget_s3_clients()


def _forget_s3_clients() -> None:

    s3fs.S3FileSystem.clear_instance_cache()


@contextmanager
def serving(folder: Path, bucket: str, prefix: str) -> Iterator[str]:
    """moto_s3 with every file of `folder` uploaded under s3://bucket/prefix/; yields the endpoint."""
    with moto_s3(bucket) as endpoint:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        for p in folder.iterdir():
            client.upload_file(str(p), bucket, f"{prefix}/{p.name}")
        _forget_s3_clients()
        yield endpoint
