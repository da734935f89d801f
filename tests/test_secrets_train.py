"""A SPEC's credentials (a token in an http(s) URL's query) are used to read and written nowhere.

Real parts: shards built by shards/, served on loopback by a server that refuses any request
without the token (tests/faulty_http.py), read by the real make_loader through the shard cache,
and `python -m train`'s main(). Every byte of the run folder is searched, TensorBoard's event
files and the torch checkpoints included, with the captured output and the loaders' errors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from faulty_http import FaultyServer
from helpers import build_photo_shards

from loaders import make_loader

TOKEN = "tr41n-S3CRET-t0ken"
TINY = ["--arch", "train.nets:NarrowResNet", "--image-size", "32", "--batch-size", "8", "--workers", "0"]
TINY += ["--backend", "pytorch", "--lr", "0.1", "--warmup-epochs", "0", "--progress", "never"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=2, val_copies=1)
    return out


def assert_nowhere(text: str, folder: Path | None = None) -> None:
    assert TOKEN not in text, text
    for path in folder.rglob("*") if folder else []:
        assert TOKEN not in str(path), path
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("where", ["query", "userinfo"])
def test_trainer_with_a_token_in_the_spec(photos, tmp_path, capfd, one_torch_thread, where):
    from train.run import main

    out = tmp_path / "run"
    auth = ("alice", TOKEN) if where == "userinfo" else None
    with FaultyServer(photos, query={"token": TOKEN} if where == "query" else None, auth=auth) as srv:
        # the folder holding manifest.json
        spec = f"{srv.url}/?token={TOKEN}" if where == "query" else srv.url.replace("://", f"://alice:{TOKEN}@")
        capfd.readouterr()
        rc = main(
            ["--data", spec, "--epochs", "1", "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY]
        )
        captured = capfd.readouterr()  # the file descriptors: what any library printed too
        assert rc == 0, captured.err
        assert srv.refused == 0 and srv.requests
    assert (out / "summary.json").exists() and list((out / "checkpoints").glob("*.pt"))
    assert list((out / "tb").rglob("events.*"))
    assert_nowhere(captured.out + captured.err, out)


def test_loader_errors_name_the_redacted_url(photos, tmp_path):
    with FaultyServer(photos, query={"token": TOKEN}) as srv:
        with pytest.raises(Exception) as refused:  # a wrong token: the server answers 403
            make_loader(f"{srv.url}/?token=wrong-{TOKEN}", batch_size=4, train=True, cache_dir=tmp_path / "c")
        with pytest.raises(Exception) as missing:
            make_loader(f"{srv.url}/nothing/?token={TOKEN}", batch_size=4, train=True, cache_dir=tmp_path / "c")
        with pytest.raises(Exception) as not_tar:
            make_loader(f"{srv.url}/x-{{0..1}}.txt?token={TOKEN}", batch_size=4, train=True, cache_dir=tmp_path / "c")
    for e in (refused, missing, not_tar):
        assert "token=***" in str(e.value), str(e.value)
        assert_nowhere(str(e.value))
    with FaultyServer(photos, auth=("alice", TOKEN)) as srv, pytest.raises(Exception) as unauthorized:
        make_loader(srv.url.replace("://", f"://alice:{TOKEN}-x@"), batch_size=4, train=True, cache_dir=tmp_path)
    assert "***@127.0.0.1" in str(unauthorized.value), str(unauthorized.value)
    assert_nowhere(str(unauthorized.value))


def test_shard_cache_file_names_hold_no_token(photos, tmp_path):
    with FaultyServer(photos, query={"token": TOKEN}) as srv:
        loader = make_loader(f"{srv.url}/?token={TOKEN}", batch_size=4, train=False, cache_dir=tmp_path / "cache")
        try:
            next(iter(loader))
        finally:
            loader.close()
    assert list((tmp_path / "cache").iterdir())
    assert_nowhere("", tmp_path / "cache")
