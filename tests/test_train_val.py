"""Where validation comes from when the command names only --shards, and the words when there is none."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import PhotoSource, build_photo_shards
from test_train_run import TINY, train_in_process

from shards.build import build
from shards.types import Options


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=1, val_copies=1)
    return out


def test_shards_alone_validate_on_the_val_split_beside_them(photos, tmp_path, capsys):
    """The design's used-by form: --shards with a brace pattern, no --val-shards."""
    trains = sorted(p.name for p in photos.glob("*-train-*.tar"))
    pattern = str(photos / trains[0].replace("000", f"{{000..{len(trains) - 1:03d}}}"))
    val_samples = json.loads((photos / "manifest.json").read_text())["splits"]["val"]["samples"]
    out = tmp_path / "run"
    rc, err = train_in_process(capsys, "--shards", pattern, *TINY, "--epochs", "1", "--output", str(out))
    assert rc == 0, err
    assert f"val: {val_samples:,} samples from the manifest beside the shards; --val-shards to choose" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_top1"] is not None and summary["val"].startswith(f"{val_samples} samples")
    assert "final val top-1 " in err and "None" not in err


def test_no_val_split_anywhere_says_so_in_words(photos, tmp_path, capsys):
    bare = tmp_path / "bare"  # the tars and their indexes, no manifest: nothing tells of a val split
    bare.mkdir()
    for p in photos.glob("*-train-*"):
        shutil.copy(p, bare)
    out = tmp_path / "run"
    shards = sorted(str(p) for p in bare.glob("*.tar"))
    rc, err = train_in_process(
        capsys, "--shards", *shards, "--num-classes", "4", *TINY, "--epochs", "1", "--output", str(out)
    )
    assert rc == 0, err
    assert "no validation: no --val-shards, and no manifest with a val split beside the shards" in err
    assert "done: no validation (none: " in err and "None" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_top1"] is None and summary["best_val_top1"] is None
    assert summary["val"].startswith("none: ")


def test_data_without_a_val_split_trains_and_says_no_validation(tmp_path, capsys):
    """A set built with no val split (--val-fraction 0, say): --data trains, and says so."""
    data = tmp_path / "data"
    build(PhotoSource(num_classes=4, copies=1), str(data), Options(seed=1, shard_samples=7), splits=["train"])
    out = tmp_path / "run"
    rc, err = train_in_process(capsys, "--data", str(data), *TINY, "--epochs", "1", "--output", str(out))
    assert rc == 0, err
    assert "no validation: the manifest has no val split" in err
    assert json.loads((out / "summary.json").read_text())["val"] == "none: the manifest has no val split"


def test_the_manifest_is_looked_for_beside_the_first_shard_remote_too():
    from loaders import manifest_folder

    assert manifest_folder("s3://bucket/set/x-train-{000..002}.tar") == "s3://bucket/set"
    assert manifest_folder("https://h/set/x-train-000.tar?token=t") == "https://h/set?token=t"
    assert manifest_folder(["/d/a.tar", "/e/b.tar"]) == "/d"
    assert manifest_folder("s3://bucket/set") == "s3://bucket/set"


def test_remote_shards_alone_validate_on_the_val_split_beside_them(photos, tmp_path, capsys):
    """The same on s3://: the manifest beside the shards is read there, val goes through the shard cache."""
    import s3fs
    from s3_server import moto_s3

    trains = sorted(p.name for p in photos.glob("*-train-*.tar"))
    name = trains[0].replace("000", f"{{000..{len(trains) - 1:03d}}}")
    with moto_s3() as endpoint:
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}).put(
            str(photos) + "/", "team-data/set/", recursive=True
        )
        out = tmp_path / "run"
        rc, err = train_in_process(
            capsys,
            "--shards",
            f"s3://team-data/set/{name}",
            "--cache-dir",
            str(tmp_path / "cache"),
            *TINY,
            "--epochs",
            "1",
            "--output",
            str(out),
        )
    assert rc == 0, err
    assert "samples from the manifest beside the shards; --val-shards to choose" in err
    assert json.loads((out / "summary.json").read_text())["final_val_top1"] is not None
