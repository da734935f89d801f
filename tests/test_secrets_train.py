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


def test_trainer_with_a_token_in_the_spec(photos, tmp_path, capsys, one_torch_thread):
    from train.run import main

    out = tmp_path / "run"
    with FaultyServer(photos, query={"token": TOKEN}) as srv:
        spec = f"{srv.url}/?token={TOKEN}"  # the folder holding manifest.json
        capsys.readouterr()
        rc = main(
            ["--data", spec, "--epochs", "1", "--output", str(out), "--cache-dir", str(tmp_path / "cache"), *TINY]
        )
        captured = capsys.readouterr()
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


@pytest.mark.xfail(
    strict=False,
    reason="the shard cache (loaders/cache) names its files by the URL's last part, query included; "
    "its package rewrite is to name them by the path alone",
)
def test_shard_cache_file_names_hold_no_token(photos, tmp_path):
    with FaultyServer(photos, query={"token": TOKEN}) as srv:
        loader = make_loader(f"{srv.url}/?token={TOKEN}", batch_size=4, train=False, cache_dir=tmp_path / "cache")
        try:
            next(iter(loader))
        finally:
            loader.close()
    assert list((tmp_path / "cache").iterdir())
    assert_nowhere("", tmp_path / "cache")
