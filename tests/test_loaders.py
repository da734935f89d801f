"""make_loader on real shards built by the project: DALI in CPU mode and the pytorch backend.

Shards: tests/helpers.py's photos with 24 classes, so in the val split (24 samples in shards
of 7, 7, 7, 3) every label names exactly one photo and tells samples apart.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PHOTOS, PhotoSource, build_photo_shards
from PIL import Image
from s3_server import aws_env

from loaders import DecodeError, make_loader
from loaders.spec import parse_index
from shards.build import build
from shards.manifest import ManifestError
from shards.types import Item, Options

SIZE = 64
BACKENDS = ["dali", "pytorch"]
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    build_photo_shards(out, shard_samples=7, num_classes=24, copies=2, val_copies=1)
    return out


def loader(spec, backend, **kw):
    kw.setdefault("batch_size", 5)
    kw.setdefault("train", False)
    kw.setdefault("image_size", SIZE)
    kw.setdefault("workers", 1)
    return make_loader(spec, backend=backend, **kw)


def labels_of(ld, valid_only=True) -> list[int]:
    out = []
    for _, labels, valid in ld.with_valid():
        out += labels[valid].tolist() if valid_only else labels.tolist()
    return out


def reference(photo: Path) -> np.ndarray:
    """torchvision's eval transform on PIL: Resize(int(size / 0.875)), CenterCrop(size), Normalize."""
    im = Image.open(photo).convert("RGB")
    r = int(SIZE / 0.875)
    w, h = im.size
    new = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    im = im.resize(new, Image.BILINEAR)
    top, left = round((new[1] - SIZE) / 2), round((new[0] - SIZE) / 2)
    arr = np.asarray(im.crop((left, top, left + SIZE, top + SIZE)), dtype=np.float64)
    return ((arr - MEAN) / STD).transpose(2, 0, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_pixels_and_labels_match_pil_reference(shard_dir, backend):
    ld = loader(shard_dir, backend, batch_size=8)
    assert ld.num_classes == 24 and ld.classes[3]["id"] == "c3"
    seen = set()
    for images, labels in ld:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.float32 and labels.dtype == torch.int64
        for img, label in zip(images.numpy(), labels.tolist(), strict=True):
            ref = reference(PHOTOS[label])  # label i is photo i (24 classes, one copy)
            diff = np.abs(img - ref)
            # Normalized units (1.0 is about 57 grey levels); a pixel's shift would give about 0.3.
            assert diff.mean() < 0.02, (backend, label, diff.mean())
            assert np.percentile(diff, 99) < 0.1, (backend, label, np.percentile(diff, 99))
            seen.add(label)
    assert seen == set(range(24))


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_ranks_equal_len_cover_every_sample_once(shard_dir, backend):
    # 24 samples on 3 ranks in batches of 5: 8 real + 2 padding rows per rank.
    loaders_ = [loader(shard_dir, backend, rank=r, world_size=3, workers=2) for r in range(3)]
    assert [len(ld) for ld in loaders_] == [2, 2, 2]
    for epoch in (0, 1):
        got = []
        for ld in loaders_:
            ld.set_epoch(epoch)
            rows = labels_of(ld, valid_only=False)
            assert len(rows) == 10 and ld.num_valid == 8
            got += labels_of(ld)
        assert sorted(got) == list(range(24)), got


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_ranks_equal_and_disjoint_with_drop_last(shard_dir, backend):
    loaders_ = [
        loader(shard_dir, backend, split="val", train=True, rank=r, world_size=3, batch_size=3) for r in range(3)
    ]
    assert [len(ld) for ld in loaders_] == [2, 2, 2]
    got = []
    for ld in loaders_:
        for images, labels in ld:
            assert images.shape == (3, 3, SIZE, SIZE) and torch.isfinite(images).all()
            got += labels.tolist()
    assert len(got) == 18 and len(set(got)) == 18  # no sample read twice across ranks


def test_train_uneven_shards_equal_len_any_world_size(shard_dir):
    # 48 train samples in shards of 7: every rank count gives equal len on every rank.
    for world in (1, 2, 3, 5, 7):
        lens = {
            len(loader(shard_dir, "dali", train=True, rank=r, world_size=world, batch_size=4)) for r in range(world)
        }
        assert lens == {48 // world // 4}


def test_set_epoch_reorders_deterministically_and_backends_agree(shard_dir):
    def order(backend, epoch, seed=0):
        ld = loader(shard_dir, backend, seed=seed, batch_size=4)
        ld.set_epoch(epoch)
        return labels_of(ld)

    e0, e1 = order("dali", 0), order("dali", 1)
    assert sorted(e0) == sorted(e1) == list(range(24))
    assert e0 != e1
    assert order("dali", 1) == e1  # a fresh loader, same (seed, epoch): same order
    assert order("dali", 1, seed=5) != e1
    assert order("pytorch", 1) == e1  # one plan for both backends


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_resume_continues_exactly(shard_dir, backend):
    full = loader(shard_dir, backend, batch_size=3, rank=1, world_size=2)
    full.set_epoch(4)
    ref = [(x, y) for x, y in full]
    assert len(ref) == len(full) == 4

    first = loader(shard_dir, backend, batch_size=3, rank=1, world_size=2)
    first.set_epoch(4)
    it = iter(first)
    head = [next(it), next(it)]
    state = first.state_dict()
    assert state["epoch"] == 4 and state["batches"] == 2
    del it

    resumed = loader(shard_dir, backend, batch_size=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(4)  # the trainer's loop calls this again: the position is kept
    tail = list(resumed)
    assert len(tail) == 2 and resumed.state_dict()["batches"] == 0  # epoch finished
    for (x, y), (rx, ry) in zip(head + tail, ref, strict=True):
        assert torch.equal(y, ry) and torch.allclose(x, rx, atol=1e-5)  # eval pixels are deterministic

    resumed.set_epoch(5)
    assert len(labels_of(resumed, valid_only=False)) == 4 * 3  # a new epoch starts from batch 0


def test_resume_refuses_another_seed_data_or_format_version(shard_dir):
    # Another world size or batch size resumes (tests/test_resume_loaders.py); these cannot.
    state = loader(shard_dir, "pytorch", world_size=2, workers=0).state_dict()
    ld = loader(shard_dir, "pytorch", world_size=3, workers=0)
    with pytest.raises(ValueError, match="seed"):
        ld.load_state_dict({**state, "seed": 1})
    with pytest.raises(ValueError, match="num_samples"):
        ld.load_state_dict({**state, "num_samples": 23})
    with pytest.raises(ValueError, match="format version 99"):
        ld.load_state_dict({**state, "version": 99})


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_and_channels_last(shard_dir, backend):
    ld = loader(shard_dir, backend, train=True, split="val", dtype="float16", channels_last=True, batch_size=4)
    images, _ = next(iter(ld))
    assert images.dtype == torch.float16 and images.shape == (4, 3, SIZE, SIZE)
    assert images.is_contiguous(memory_format=torch.channels_last)
    bf = loader(shard_dir, backend, dtype=torch.bfloat16, batch_size=4)
    assert next(iter(bf))[0].dtype == torch.bfloat16


def test_spec_forms_agree(shard_dir):
    pattern = str(shard_dir / "photos-val-{000..003}.tar")
    listed = [str(p) for p in sorted(shard_dir.glob("photos-val-*.tar"))]
    orders = [labels_of(loader(spec, "dali", batch_size=4)) for spec in (shard_dir, pattern, listed)]
    assert orders[0] == orders[1] == orders[2]
    # A subset of shards without counts in reach: counts come from the .idx header.
    bare = shard_dir / "bare"
    bare.mkdir()
    for p in listed[:2]:
        for ext in (".tar", ".idx"):
            (bare / (Path(p).stem + ext)).write_bytes(Path(p[:-4] + ext).read_bytes())
    ld = loader(str(bare / "photos-val-{000..001}.tar"), "pytorch", batch_size=2)
    assert ld.num_classes is None and len(ld) == 7 and len(labels_of(ld)) == 14


class PngSource(PhotoSource):
    def read(self, item: Item) -> bytes:
        im = Image.open(item.locator[0]).convert("RGB")
        im.thumbnail((160, 160))
        buf = io.BytesIO()
        im.save(buf, "PNG")
        return buf.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_png_shards(tmp_path, backend):
    build(
        PngSource(num_classes=24, copies=1), str(tmp_path), Options(seed=1, shard_samples=7, image_ext="png"), workers=1
    )
    assert (tmp_path / "photos-val-000.idx").read_text().split("\n")[1].startswith("png ")
    for train in (True, False):
        got = labels_of(loader(tmp_path, backend, split="val", train=train, drop_last=False, batch_size=4))
        assert sorted(got) == list(range(24))


def corrupt_one(src: Path, dst: Path) -> str:
    """Copy the val shards, garbling the image of sample 2 in shard 001; return its key."""
    dst.mkdir()
    for p in src.glob("photos-val-*"):
        (dst / p.name).write_bytes(p.read_bytes())
    (dst / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
    text = (dst / "photos-val-001.idx").read_text()
    offset = int(parse_index(text, "x").image_offset[2])
    key = text.splitlines()[3].split()[3].split(".")[0]
    tar = bytearray((dst / "photos-val-001.tar").read_bytes())
    tar[offset : offset + 2000] = b"not a jpeg" * 200
    (dst / "photos-val-001.tar").write_bytes(bytes(tar))
    return key


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_sample_names_shard_and_key(shard_dir, tmp_path, backend):
    key = corrupt_one(shard_dir, tmp_path / "bad")
    with pytest.raises(DecodeError) as e:
        list(loader(tmp_path / "bad", backend, batch_size=4))
    assert "photos-val-001.tar" in str(e.value) and key in str(e.value)


def test_bad_arguments_fail_clearly(shard_dir, tmp_path):
    with pytest.raises(ValueError, match="rank 3"):
        loader(shard_dir, "dali", rank=3, world_size=3)
    with pytest.raises(ValueError, match="no full batch"):
        loader(shard_dir, "dali", train=True, split="val", batch_size=16, world_size=2)
    with pytest.raises(ValueError, match="unknown backend"):
        loader(shard_dir, "tensorflow")
    with pytest.raises(ManifestError, match="shard not found"):
        loader(str(tmp_path / "x-{000..001}.tar"), "pytorch")
    with pytest.raises(ManifestError, match="no manifest"):
        loader(tmp_path, "pytorch")
    with pytest.raises(ValueError, match="unknown dali backend options"):
        loader(shard_dir, "dali", options={"threads": 3})


def test_rows_per_label_cover_train_split_each_epoch(shard_dir):
    # train split, 2 copies of each photo; drop_last=False covers all 48 rows once.
    ld = loader(shard_dir, "dali", train=True, drop_last=False, batch_size=8)
    assert Counter(labels_of(ld)) == Counter({label: 2 for label in range(24)})


@pytest.fixture(scope="module")
def s3_shards(shard_dir):
    """The val shards in a moto S3 server running in its own process.

    Its own process because DALI's reader fetches from S3 while holding the GIL, which would
    starve a server thread inside the test process.
    """
    import socket
    import subprocess
    import sys
    import time

    import boto3
    import s3fs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = aws_env(endpoint)
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance cached by another test points elsewhere
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for _ in range(100):
            try:
                s3.create_bucket(Bucket="team-data")
                break
            except Exception:
                time.sleep(0.1)
        for p in [*shard_dir.glob("photos-val-*"), shard_dir / "manifest.json"]:
            s3.upload_file(str(p), "team-data", f"photos/{p.name}")
        yield "s3://team-data/photos"
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_s3_specs(s3_shards, backend):
    for spec in (s3_shards, s3_shards + "/photos-val-{000..003}.tar"):
        ld = loader(spec, backend, batch_size=4)
        assert ld.num_classes == 24
        assert sorted(labels_of(ld)) == list(range(24)), spec


def _ddp_rank(rank: int, world: int, spec: str, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ld = make_loader(spec, batch_size=5, train=False, backend="dali", rank=rank, world_size=world, image_size=32)
    got = []
    for _, labels, valid in ld.with_valid():
        dist.all_reduce(torch.ones(1))  # one collective per batch: a rank short of batches would hang here
        got += labels[valid].tolist()
    everyone = [None] * world
    dist.all_gather_object(everyone, got)
    if rank == 0:
        queue.put(everyone)
    dist.destroy_process_group()


@pytest.mark.slow
def test_gloo_ranks_never_hang_and_read_every_sample_once(shard_dir):
    import multiprocessing as mp
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 3, str(shard_dir), port, queue)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        everyone = queue.get(timeout=180)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert sorted(label for part in everyone for label in part) == list(range(24))


@pytest.mark.parametrize("train", [True, False])
def test_dali_gpu_graph_is_defined_without_a_gpu(train):
    # No GPU in CI: DALI still checks every operator argument while the graph is defined, and
    # the outputs must come from the GPU (mixed decoder, GPU resize / crop_mirror_normalize).
    from nvidia.dali import types

    from loaders.dali import DaliOptions, image_pipeline

    for layout in ("CHW", "HWC"):
        pipe = image_pipeline(
            ["x.tar"],
            ["x.idx"],
            train=train,
            image_size=224,
            gpu=True,
            out_dtype=types.FLOAT16,
            layout=layout,
            opts=DaliOptions(),
            batch_size=8,
            num_threads=4,
            device_id=0,
            seed=1,
        )
        assert [node.device for node in pipe._graph_out] == ["gpu", "gpu"]


def test_auto_backend_picks_dali_where_it_imports(shard_dir):
    ld = make_loader(shard_dir, batch_size=4, train=False, image_size=SIZE)
    assert ld.backend_name == "dali" and len(ld) == 6
