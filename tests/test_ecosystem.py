"""Other readers read our shards as they are: timm, wids and HuggingFace datasets, the real libraries.

One small demo build for the module (30 train, 20 val samples of 32 px, in uneven shards).
The expected samples come from Python's tarfile over the manifest's shards, so every reader
is checked against the bytes, not against our own reading code.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from shards import build as build_mod
from shards.build import build
from shards.interop import TIMM_INFO, reader_files, wids_index_name
from shards.manifest import MANIFEST, read_manifest
from shards.sources.demo import DemoSource
from shards.types import Options


def cli(*args: str):
    """`python -m shards ...`: the real click command, run in this process (AWS variables as set now)."""
    from click.testing import CliRunner

    from shards.__main__ import cli as shards_cli

    return CliRunner().invoke(shards_cli, list(args))


def build_demo(out: Path | str) -> dict:
    return build(
        DemoSource(seed=3, train_per_class=3, val_per_class=2, size=32),
        str(out),
        Options(seed=1, shard_samples=8),
        workers=1,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eco") / "demo"
    build_demo(out)
    return out


def stored(root: Path, split: str) -> list[tuple[str, int]]:
    """(key, label) of every sample of the split, in shard order, read with tarfile."""
    out = []
    for entry in read_manifest(str(root))["splits"][split]["shards"]:
        with tarfile.open(root / entry["name"]) as tar:
            out += [(m.name.split(".")[0], int(tar.extractfile(m).read())) for m in tar if m.name.endswith(".cls")]
    return out


def test_reader_files_describe_the_manifest(demo):
    m = read_manifest(str(demo))
    info = json.loads((demo / TIMM_INFO).read_text())
    assert set(info["splits"]) == {"train", "val", "validation"}
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert info["splits"][split] == {
            "name": split,
            "num_samples": m["splits"][split]["samples"],
            "filenames": [s["name"] for s in shards],
            "shard_lengths": [s["samples"] for s in shards],
        }
        wids = json.loads((demo / wids_index_name("demo", split)).read_text())
        assert wids["__kind__"] == "wids-shard-index-v1" and wids["wids_version"] == 1
        assert wids["shardlist"] == [
            {"url": s["name"], "nsamples": s["samples"], "filesize": s["bytes"]} for s in shards
        ]
        assert all((demo / s["url"]).stat().st_size == s["filesize"] for s in wids["shardlist"])
    assert {k: v for k, v in info["splits"]["validation"].items() if k != "name"} == {
        k: v for k, v in info["splits"]["val"].items() if k != "name"
    }
    assert len(m["splits"]["train"]["shards"]) == 4 and m["splits"]["train"]["samples"] == 30


def test_reader_files_are_published_before_the_manifest(tmp_path, monkeypatch):
    def killed(storage, manifest):
        raise KeyboardInterrupt("killed just before the manifest")

    monkeypatch.setattr(build_mod, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert MANIFEST not in names
    assert {TIMM_INFO, "demo-train.wids.json", "demo-val.wids.json"} <= names
    assert not any(".tmp-" in n for n in names)


def test_verify_checks_the_reader_files(demo, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(demo, copy)

    ok = cli("verify", str(copy))
    assert ok.exit_code == 0, ok.output
    assert "3 reader files" in ok.stdout
    info = json.loads((copy / TIMM_INFO).read_text())
    info["splits"]["train"]["shard_lengths"][2] += 1
    (copy / TIMM_INFO).write_text(json.dumps(info))
    (copy / "demo-val.wids.json").unlink()
    (copy / "demo-train.wids.json").write_text('{"__kind__": "wids-shard-index-v1", ')  # cut short
    bad = cli("verify", str(copy))
    assert bad.exit_code == 1
    assert "BAD _info.json: splits.train.shard_lengths.2 is 9, the manifest says 8" in bad.stderr
    assert "BAD demo-val.wids.json: missing" in bad.stderr
    assert "BAD demo-train.wids.json: not valid JSON" in bad.stderr
    assert "3 of 10 files are bad (7 shards, 3 reader files)" in bad.stderr
    fixed = cli("verify", str(copy), "--write-reader-files")
    assert fixed.exit_code == 0, fixed.output
    assert json.loads((copy / TIMM_INFO).read_text()) == reader_files(read_manifest(str(copy)))[TIMM_INFO]


def test_timm_reads_every_sample_with_its_label(demo):
    import timm.data

    for split, ours in (("train", "train"), ("validation", "val")):
        ds = timm.data.create_dataset("wds/imagenet", root=str(demo), split=split)
        want = stored(demo, ours)
        assert len(ds) == len(want)
        got = [(img.size, target) for img, target in ds]
        assert [t for _, t in got] == [label for _, label in want]
        assert {size for size, _ in got} == {(32, 32)}


def test_timm_training_loader_takes_the_split_without_flags(demo):
    """What timm's train.py does with --dataset wds/imagenet --data-dir OUT and its default splits."""
    import timm.data

    ds = timm.data.create_dataset("wds/imagenet", root=str(demo), split="train", is_training=True, batch_size=6)
    loader = timm.data.create_loader(
        ds, input_size=(3, 32, 32), batch_size=6, is_training=True, num_workers=0, use_prefetcher=False, device="cpu"
    )
    images, targets = next(iter(loader))
    assert images.shape == (6, 3, 32, 32) and len(loader) == 5
    assert set(targets.tolist()) <= set(range(10))


def test_wids_opens_each_split_and_reads_samples(demo, tmp_path):
    import wids

    for split in ("train", "val"):
        want = stored(demo, split)
        ds = wids.ShardListDataset(str(demo / wids_index_name("demo", split)), cache_dir=str(tmp_path / "wids"))
        assert len(ds) == len(want)
        for i in (0, len(want) // 2, len(want) - 1):
            sample = ds[i]
            assert (sample["__key__"], int(sample[".cls"])) == want[i]
            assert sample[".jpg"].size == (32, 32)  # wids decodes images with PIL by default


def test_hf_datasets_streams_every_sample_with_its_cls(demo):
    from datasets import load_dataset

    m = read_manifest(str(demo))
    files = {split: [str(demo / s["name"]) for s in m["splits"][split]["shards"]] for split in ("train", "val")}
    for split in files:
        ds = load_dataset("webdataset", data_files=files, split=split, streaming=True)
        got = [(ex["__key__"], ex["cls"], ex["json"]["class"]) for ex in ds]
        classes = [c["id"] for c in m["classes"]]
        assert got == [(k, label, classes[label]) for k, label in stored(demo, split)]


def test_reader_files_on_s3_and_show_from_a_bucket(tmp_path):
    from s3_server import moto_s3

    from shards.storage import Storage

    with moto_s3():
        m = build_demo("s3://team-data/demo")
        storage = Storage("s3://team-data/demo")
        for name, doc in reader_files(m).items():
            assert json.loads(storage.read_bytes(name)) == doc
        out = tmp_path / "grid.png"
        r = cli("verify", "s3://team-data/demo")
        assert r.exit_code == 0 and "3 reader files" in r.stdout, r.output
        r = cli("show", "s3://team-data/demo", "--split", "val", "--count", "5", "--output", str(out))
        assert r.exit_code == 0, r.output
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
