"""build-shards on the ILSVRC2012-layout fixture, end to end through shards.build.build.

Checks the labels against torchvision.datasets.ImageNet on the same archives, repairs,
quarantine, that nothing is extracted or written outside the output, read-back through
tarfile, webdataset and DALI's webdataset reader with the written indexes, byte-identical
rebuilds, and a kill -9 mid-build followed by a rerun.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from ilsvrc_fixture import DEVKIT, TRAIN_TAR, VAL_TAR, make_ilsvrc
from PIL import Image

from shards.build import build
from shards.interop import reader_files
from shards.manifest import MANIFEST
from shards.sources.imagenet import ImageNetSource
from shards.storage import TMP_MARK
from shards.types import Options
from shards.verify import verify

REPO = Path(__file__).resolve().parent.parent
OPTIONS = dict(seed=3, shard_samples=7)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("imagenet_build")
    root = base / "ilsvrc"
    exp = make_ilsvrc(root)
    before = set(os.listdir(base))
    out = base / "out"
    # workers=2: the source is pickled into spawned worker processes, as in real builds.
    manifest = build(ImageNetSource(str(root)), str(out), Options(**OPTIONS), workers=2)
    return {"base": base, "root": root, "out": out, "exp": exp, "manifest": manifest, "before": before}


def _samples(out: Path, manifest: dict, split: str) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} for every sample of the split, read with tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.iterdir())
        if p.suffix in (".tar", ".idx")
    }


def _manifest_sans_time(out: Path) -> dict:
    m = json.loads((out / MANIFEST).read_text())
    m.pop("created")
    return m


def test_every_good_image_has_torchvisions_label(built, tmp_path, monkeypatch):
    from torchvision.datasets import imagenet as tv

    # torchvision extracts with tarfile.extractall, which follows '../' names on Python 3.11:
    # point it at the same fixture without the unsafe members (same images, keys and labels).
    ref = tmp_path / "tv"
    clean = make_ilsvrc(ref, unsafe=False)
    assert clean["train"] == built["exp"]["train"] and clean["val"] == built["exp"]["val"]
    for split, name in (("train", TRAIN_TAR), ("val", VAL_TAR), ("devkit", DEVKIT)):
        monkeypatch.setitem(tv.ARCHIVE_META, split, (name, clean["md5"][name]))
    for split in ("train", "val"):
        reference = {Path(p).stem: label for p, label in tv.ImageNet(str(ref), split=split).imgs}
        samples = _samples(built["out"], built["manifest"], split)
        assert set(samples) == set(built["exp"][split])  # every good image, nothing else
        for key, s in samples.items():
            assert int(s["cls"]) == reference[key], key
            assert struct.unpack("<q", s["label"])[0] == reference[key]
            meta = json.loads(s["json"])
            assert meta["class"] == built["manifest"]["classes"][reference[key]]["id"]
    assert [c["id"] for c in built["manifest"]["classes"]] == tv.ImageNet(str(ref), split="val").wnids


def test_repaired_images_are_rgb_jpegs_marked_repaired(built):
    exp = built["exp"]
    for split in ("train", "val"):
        samples = _samples(built["out"], built["manifest"], split)
        assert exp["repaired"][split]
        for key, kind in exp["repaired"][split].items():
            img = Image.open(io.BytesIO(samples[key]["jpg"]))
            img.load()
            assert (img.format, img.mode) == ("JPEG", "RGB")
            assert json.loads(samples[key]["json"])["repaired"] == kind
    train = _samples(built["out"], built["manifest"], "train")
    for key in exp["gray"]:  # grayscale JPEGs stay as they are
        assert Image.open(io.BytesIO(train[key]["jpg"])).mode == "L"
        assert json.loads(train[key]["json"])["repaired"] is None


@pytest.mark.parametrize(
    "kind,reason",
    [("truncated", "undecodable"), ("empty", "empty file"), ("dotdot", "'..'"), ("absolute", "absolute path"),
     ("symlink", "symlink"), ("hardlink", "hard link")],
)  # fmt: skip
def test_bad_members_are_quarantined_in_the_manifest(built, kind, reason):
    quarantine = {q["source"]: q for q in built["manifest"]["quarantine"]}
    planted = [b for b in built["exp"]["bad"] if b["kind"] == kind]
    assert planted
    for b in planted:
        assert reason in quarantine[b["source"]]["reason"], quarantine[b["source"]]
        if b["key"]:
            assert b["key"] not in _samples(built["out"], built["manifest"], b["split"])


def test_nothing_written_outside_output_and_nothing_extracted(built):
    base, out = built["base"], built["out"]
    assert set(os.listdir(base)) == built["before"] | {"out"}
    found = [Path(d, f) for d, _, files in os.walk(base) for f in files]
    names = {p.name for p in found}
    assert not names & set(built["exp"]["escape_names"])
    assert not Path("/shardline_escape_abs.JPEG").exists()
    # The train tar was never extracted: no image file anywhere, only archives and shards.
    assert not [p for p in found if p.suffix.lower() in (".jpeg", ".jpg", ".png")]
    assert sorted(os.listdir(built["root"])) == sorted([DEVKIT, TRAIN_TAR, VAL_TAR])
    shards = {s["name"] for sp in built["manifest"]["splits"].values() for s in sp["shards"]}
    indexes = {s["index"] for sp in built["manifest"]["splits"].values() for s in sp["shards"]}
    readers = set(reader_files(built["manifest"]))  # _info.json (timm), *.wids.json
    assert set(os.listdir(out)) == shards | indexes | readers | {MANIFEST}


def test_manifest_and_shards_verify(built):
    m = built["manifest"]
    assert m["dataset"] == "imagenet" and m["image_ext"] == "jpg"
    assert m["splits"]["train"]["pattern"] == "imagenet-train-{000..003}.tar"
    assert m["splits"]["train"]["samples"] == len(built["exp"]["train"])
    assert m["splits"]["val"]["samples"] == len(built["exp"]["val"])
    checks = verify(str(built["out"]), decode=True)
    assert checks and not [c for c in checks if c.problems]


def test_webdataset_reads_the_shards(built):
    import webdataset as wds

    out, m, exp = built["out"], built["manifest"], built["exp"]
    urls = [str(out / s["name"]) for s in m["splits"]["train"]["shards"]]
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        seen[s["__key__"]] = int(s["cls"])
        assert struct.unpack("<q", s["label"])[0] == int(s["cls"])
        Image.open(io.BytesIO(s["jpg"])).load()
    assert seen == exp["train"]


def test_dali_reads_the_shards_with_their_indexes(built):
    from nvidia.dali import fn, pipeline_def, types

    out, m, exp = built["out"], built["manifest"], built["exp"]
    shards = m["splits"]["train"]["shards"]
    n = m["splits"]["train"]["samples"]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        jpg, label, meta = fn.readers.webdataset(
            paths=[str(out / s["name"]) for s in shards],
            index_paths=[str(out / s["index"]) for s in shards],
            ext=["jpg", "label", "json"],
            dtypes=[types.UINT8, types.INT64, types.UINT8],
            missing_component_behavior="error",
            name="reader",
        )
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), label, meta

    p = pipe()
    p.build()
    assert p.reader_meta("reader")["epoch_size"] == n
    seen = {}
    for _ in range(n):
        img, label, meta = p.run()
        source = json.loads(bytes(meta.at(0)).decode())["source"]
        seen[source.rsplit("/", 1)[-1].split(".")[0]] = int(label.at(0)[0])
        assert img.at(0).shape[2] == 3
    assert seen == exp["train"]


def test_rebuild_with_same_seed_is_byte_identical(built, tmp_path):
    out2 = tmp_path / "again"
    build(ImageNetSource(str(built["root"])), str(out2), Options(**OPTIONS), workers=1)
    assert _digests(out2) == _digests(built["out"])
    assert _manifest_sans_time(out2) == _manifest_sans_time(built["out"])


# The child slows each read a little so the kill surely lands mid-build; the bytes written
# do not depend on timing, and the rerun runs without the slowdown.
_CHILD = textwrap.dedent("""
    import sys, time
    from shards.build import build
    from shards.sources.imagenet import ImageNetSource
    from shards.types import Options
    delay = float(sys.argv[3])
    class Slow(ImageNetSource):
        def read(self, item):
            time.sleep(delay)
            return super().read(item)
    source = Slow(sys.argv[1]) if delay else ImageNetSource(sys.argv[1])
    build(source, sys.argv[2], Options(seed=3, shard_samples=1), workers=1)
""")


def _run_child(root: Path, out: Path, delay: float, log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    with open(log, "wb") as err:  # a file, not a pipe nobody reads while the child runs
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(root), str(out), str(delay)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def test_kill_9_mid_build_then_rerun_is_byte_identical(built, tmp_path):
    root = built["root"]
    reference = tmp_path / "reference"
    build(ImageNetSource(str(root)), str(reference), Options(seed=3, shard_samples=1), workers=1)
    total = len(list(reference.glob("*.tar")))
    assert total > 20

    out = tmp_path / "killed"
    child = _run_child(root, out, delay=0.05, log=tmp_path / "killed.log")
    deadline = time.monotonic() + 60
    while not list(out.glob("*.tar")) and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    published = list(out.glob("*.tar"))
    assert 1 <= len(published) < total and not (out / MANIFEST).exists()

    rerun = _run_child(root, out, delay=0, log=tmp_path / "rerun.log")
    rerun.wait(timeout=120)
    assert rerun.returncode == 0, (tmp_path / "rerun.log").read_text()[-2000:]
    assert _digests(out) == _digests(reference)
    assert _manifest_sans_time(out) == _manifest_sans_time(reference)
    left = [str(p) for p in out.rglob("*") if TMP_MARK in p.name or p.name == "_progress"]
    assert not left
