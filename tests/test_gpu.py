"""The GPU path on a real GPU (issue 13): `pytest -m gpu`; every test skips, saying why, without CUDA.

What a CPU cannot show: the DALI mixed-device graph (nvJPEG, the hardware decoder), GPU resize
and crop_mirror_normalize to fp16/bf16 and channels-last, eval pixels against the CPU graph,
the shard cache feeding the GPU pipeline, the trainer in bf16 / fp16 with its grad scaler /
torch.compile on the GPU, checkpoint and exact resume there, NCCL. Shards come from the real
photos in tests/data (small, so the whole file stays short); `make gpu-check` measures speed
on a full-size set (scripts/gpu_check.py). No test asserts a speed.

The GPU machine has no s3fs, boto3 or moto: only the test that needs them imports them, and
skips without them, so the file always collects.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import build_photo_shards, kill_9_at_checkpoint

from loaders import make_loader

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu-shards")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=2, val_copies=1)
    return out


def dali(spec, device: str, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("train", False)
    kw.setdefault("image_size", SIZE)
    return make_loader(spec, backend="dali", device=device, **kw)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Normalized images back to 0..255 grey levels, float32 on CPU."""
    return (x.float().cpu() * STD + MEAN) * 255


# -- the DALI graph on the GPU ----------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dali_cuda_batches_shape_dtype_device_layout_range(shard_dir, train, channels_last, dtype):
    ld = dali(shard_dir, "cuda", train=train, dtype=dtype, channels_last=channels_last)
    n = 0
    for images, labels in ld:
        assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == dtype and images.is_cuda
        assert labels.dtype == torch.int64 and labels.is_cuda and labels.shape == (8,)
        assert images.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        grey = pixels(images)
        assert grey.min() >= -2 and grey.max() <= 257  # normalized with the ImageNet mean/std, nothing else
        assert grey.std() > 10  # real pixels, not a constant
        assert int(labels.min()) >= 0 and int(labels.max()) < 4
        n += 1
    assert n == len(ld)


def test_gpu_eval_pixels_match_the_cpu_eval_pipeline(shard_dir):
    # Issue 14, item 2: with jpeg_fancy_upsampling the mixed decoder upsamples chroma as libjpeg does.
    gpu, cpu = dali(shard_dir, "cuda"), dali(shard_dir, "cpu", workers=2)
    for (xg, yg), (xc, yc) in zip(gpu, cpu, strict=True):
        assert torch.equal(yg.cpu(), yc)
        diff = (pixels(xg) - pixels(xc)).abs()
        # Grey levels: different IDCTs and resize kernels differ by a level or two, a shifted pixel by tens.
        assert diff.mean() < 1.5, diff.mean()
        assert torch.quantile(diff.flatten()[:1_000_000], 0.99) < 8, torch.quantile(diff.flatten()[:1_000_000], 0.99)


@pytest.mark.parametrize("train", [False, True])
def test_hardware_decoder_gives_the_cuda_decoders_images(shard_dir, train):
    # hw_decoder_load > 0 sends that share of the JPEGs to the A100/H100 hardware decoder; 0 sends none.
    hw = dali(shard_dir, "cuda", train=train, seed=3, options={"hw_decoder_load": 0.9})
    sw = dali(shard_dir, "cuda", train=train, seed=3, options={"hw_decoder_load": 0.0})
    assert hw.backend.opts.hw_decoder_load == 0.9
    for (xh, yh), (xs, ys) in zip(hw, sw, strict=True):
        assert torch.equal(yh, ys)
        diff = (pixels(xh) - pixels(xs)).abs().flatten()
        p99 = torch.quantile(diff[:1_000_000], 0.99)
        assert diff.mean() < 2.0 and p99 < 16, (diff.mean(), p99)


def test_eval_pipeline_built_once_and_outputs_on_the_current_stream(shard_dir):
    # Issue 14, items 3 and 4: one build for every evaluation; batches ordered on torch's stream.
    ld = dali(shard_dir, "cuda")
    first = [x.clone() for x, _ in ld]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # a consumer on another stream sees finished batches
        again = [x.clone() for x, _ in ld]
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(ld.backend.builds) == 1
    hints = ld.backend.hints
    assert hints["preallocate_width_hint"] < 5980 and hints["preallocate_height_hint"] < 6430  # scaled to the photos


@pytest.mark.skipif(
    "cache_dir" not in inspect.signature(make_loader).parameters,
    reason="needs the shard cache (make_loader(cache_dir=...), the object-storage issue): not on this branch",
)
def test_shard_cache_feeds_the_gpu_pipeline(shard_dir, tmp_path):
    import socket

    boto3 = pytest.importorskip("boto3", reason="needs boto3, s3fs and moto (a real S3 endpoint on loopback)")
    s3fs = pytest.importorskip("s3fs", reason="needs boto3, s3fs and moto (a real S3 endpoint on loopback)")
    pytest.importorskip("moto", reason="needs boto3, s3fs and moto (a real S3 endpoint on loopback)")
    from s3_server import aws_env

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = aws_env(f"http://127.0.0.1:{port}")
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
        for _ in range(200):  # the server process is starting
            try:
                s3.create_bucket(Bucket="gpu-data")
                break
            except Exception:
                time.sleep(0.1)
        for p in [*shard_dir.glob("photos-val-*"), shard_dir / "manifest.json"]:
            s3.upload_file(str(p), "gpu-data", f"photos/{p.name}")
        cache = tmp_path / "cache"
        remote = dali("s3://gpu-data/photos", "cuda", cache_dir=str(cache))
        local = dali(shard_dir, "cuda")
        for (xr, yr), (xl, yl) in zip(remote, local, strict=True):
            assert torch.equal(yr, yl) and (pixels(xr) - pixels(xl)).abs().mean() < 0.5
        assert any(p.is_file() for p in cache.rglob("*"))  # whole shards landed in the cache
    finally:
        mp.undo()
        s3fs.S3FileSystem.clear_instance_cache()
        proc.terminate()
        proc.wait(10)


# -- the trainer on the GPU -------------------------------------------------------------------------
def test_resnet50_bf16_channels_last_from_dali_and_from_synthetic_data(shard_dir):
    from train.throughput import forever, measure, synthetic

    dev = torch.device("cuda")
    ld = make_loader(
        shard_dir, batch_size=16, train=True, backend="dali", device="cuda", image_size=128,
        dtype=torch.bfloat16, channels_last=True,
    )  # fmt: skip
    common = dict(arch="resnet50", num_classes=4, image_size=128, steps=4, warmup=2, amp="bf16", channels_last=True)
    real = measure(forever(ld), device=dev, **common)
    fake = measure(synthetic(16, 128, 4, dev, torch.bfloat16), device=dev, **common)
    for r in (real, fake):
        assert r["images"] == 4 * 16 and r["images_per_sec"] > 0 and 0 <= r["data_wait"] <= 1
        assert np.isfinite(r["train_loss"])
    print(f"\nresnet50 bf16 cl: dali {real['images_per_sec']:.0f} img/s, synthetic {fake['images_per_sec']:.0f} img/s")


def run_train(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p


SMALL = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--backend", "dali", "--progress", "never"]


@pytest.mark.slow
def test_compile_and_fp16_with_grad_scaler(shard_dir, tmp_path):
    out = tmp_path / "fp16"
    p = run_train("--data", str(shard_dir), *SMALL, "--epochs", "2", "--warmup-epochs", "1", "--compile",
                  "--amp", "fp16", "--channels-last", "--output", str(out))  # fmt: skip
    assert "amp fp16" in p.stderr and "cuda" in p.stderr
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["scaler"] is not None and ck["scaler"]["scale"] > 0  # the grad scaler ran and was saved
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ck["model"])  # compiled, saved unwrapped
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(np.isfinite(m["train_loss"]) for m in lines)


def test_a_step_reads_the_previous_steps_flags_without_waiting_for_the_stream():
    # The flags of step t are copied to pinned memory behind their all-reduce; reading them after
    # step t + 1 is queued waits for that copy's event, not for step t + 1 (a long sleep kernel here).
    from train.engine import copy_to_host

    flags = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    host, copied = copy_to_host(flags)
    assert host.device.type == "cpu" and host.is_pinned() and copied is not None
    torch.cuda._sleep(2_000_000_000)  # the next step's work: about a second of GPU time
    copied.synchronize()
    assert host.tolist() == [0, 1]
    assert not torch.cuda.current_stream().query()  # the "next step" is still running: nothing waited for it
    torch.cuda.synchronize()


def test_ddp_then_compile_all_reduces_in_buckets(tmp_path):
    import torch.distributed as dist

    from train import distributed
    from train.engine import ddp_of

    class Collective(distributed.Dist):
        @property
        def enabled(self) -> bool:
            return True

    dev = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=dev)  # fmt: skip
    try:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dev)
        stepped, evaluated = distributed.wrap_model(model, Collective(device=dev), compile=True)
        ddp = ddp_of(stepped)
        assert ddp is not None and ddp.gradient_as_bucket_view and evaluated._orig_mod is model
        stepped(torch.randn(4, 8, device=dev)).sum().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_amp_auto_is_bf16_on_this_gpu_when_it_has_it_natively():
    from train.engine import resolve_amp

    native = torch.cuda.get_device_capability()[0] >= 8  # Ampere and later compute bf16 in hardware
    assert resolve_amp("auto", torch.device("cuda")) == ("bf16" if native else "fp16")


def test_checkpoint_and_exact_resume_on_the_gpu(shard_dir, tmp_path):
    # pytorch backend: its crops are seeded per sample, so a mid-epoch resume repeats them exactly.
    # --stem small: no max-pool, whose CUDA backward is not on torch's list of deterministic kernels either way.
    common = ["--data", str(shard_dir), *SMALL, "--backend", "pytorch", "--workers", "2", "--epochs", "2",
              "--warmup-epochs", "1", "--deterministic", "--amp", "bf16", "--stem", "small"]  # fmt: skip
    straight = tmp_path / "straight"
    run_train(*common, "--output", str(straight))
    killed = tmp_path / "killed"
    args = [*common, "--output", str(killed), "--checkpoint-minutes", "0.0001"]  # a checkpoint every step
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ck = kill_9_at_checkpoint(proc, killed / "checkpoints" / "last.pt", epoch=1, timeout=300)
    rng = ck["ranks"][0]["rng"]["cuda"]
    assert isinstance(rng, torch.Tensor) and rng.dtype == torch.uint8  # this rank's GPU only (issue 14, item 8)
    p = run_train(*args)
    assert "resumed from" in p.stderr
    keys = ("epoch", "train_loss", "val_top1", "val_top5", "val_loss", "lr")
    read = lambda out: [{k: json.loads(x)[k] for k in keys} for x in (out / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(killed) == read(straight)
    a = torch.load(killed / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nccl_init_and_exact_distributed_eval_in_one_process(shard_dir, tmp_path, monkeypatch):
    import torch.distributed as dist

    from train import distributed
    from train.engine import evaluate
    from train.models import build_model

    class Collective(distributed.Dist):  # world size 1, but through the collectives as with many ranks
        @property
        def enabled(self) -> bool:
            return True

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # the same kernels for both evaluations
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    dev = torch.device("cuda", torch.cuda.current_device())
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=dev)
    try:
        assert dist.get_backend() == "nccl"
        d = Collective(device=dev)
        assert distributed.all_reduce_sum([1.0, 2.5], d) == [1.0, 2.5]
        assert distributed.any_ranks([torch.tensor(True, device=dev), False], d) == [True, False]
        assert distributed.gather_objects({"rank": 0}, d) == [{"rank": 0}]
        torch.manual_seed(0)
        model = build_model("resnet18", 4, stem="small", image_size=32).to(dev)
        distributed.average_buffers(model, d)
        ld = dali(shard_dir, "cuda", batch_size=5, image_size=32)
        over_nccl = evaluate(model, ld, d, "none")
        plain = evaluate(model, ld, distributed.Dist(device=dev), "none")
        assert over_nccl == plain and over_nccl["samples"] == 24  # every val sample once, padding left out
    finally:
        dist.destroy_process_group()
