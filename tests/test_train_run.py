"""python -m train end to end, in subprocesses, over real shards and the real make_loader.

Tiny models at small image sizes keep each run to seconds on 2 cores: the point is the
behaviour (outputs, checkpoints, resume, non-finite stop, bad input), not the accuracy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import build_photo_shards, kill_9_at_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "--arch",
    "train.nets:NarrowResNet",
    "--image-size",
    "32",
    "--batch-size",
    "8",
    "--workers",
    "0",
    "--backend",
    "pytorch",
    "--lr",
    "0.4",
    "--warmup-epochs",
    "0",
    "--progress",
    "never",
]


def run_train(*args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and p.returncode != 0:
        raise AssertionError(f"train exited {p.returncode}:\n{p.stderr[-3000:]}")
    return p


def train_in_process(capsys, *args: str) -> tuple[int, str]:
    """The same main() as `python -m train`, without paying a fresh interpreter's imports."""
    from train.run import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=2, val_copies=1)
    return out


def test_outputs_checkpoint_strict_load_and_tensorboard(photos, tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = train_in_process(
        capsys,
        "--data",
        str(photos),
        "--arch",
        "resnet18",
        "--stem",
        "standard",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--backend",
        "pytorch",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--output",
        str(out),
        "--progress",
        "never",
        "--ema",
        "0.9",
        "--accum-steps",
        "2",
        "--mixup",
        "0.2",
        "--cutmix",
        "1.0",
        "--clip-grad",
        "5",
    )
    assert rc == 0, err
    lines = read_metrics(out)
    assert [m["epoch"] for m in lines] == [0, 1]
    for m in lines:
        assert {"epoch", "train_loss", "val_top1", "val_top5", "lr", "images_per_sec", "data_wait"} <= set(m)
        assert 0 <= m["val_top1"] <= m["val_top5"] <= 100 and 0 <= m["data_wait"] <= 1 and m["images_per_sec"] > 0
        assert "val_top1_ema" in m
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_top1"] == lines[-1]["val_top1"]
    assert summary["best_val_top1"] == max(m["val_top1"] for m in lines) and summary["epochs"] == 2
    assert summary["seconds"] > 0
    assert summary["steps_per_rank"] == [2 * 48 // 8]  # batch 8 per step in 2 micro-batches of 4: 6 steps/epoch

    # Weights are stored unwrapped: the plain torchvision model takes them strictly.
    for name in ("last.pt", "best.pt"):
        ck = torch.load(out / "checkpoints" / name, map_location="cpu", weights_only=False)
        torchvision.models.resnet18(num_classes=4).load_state_dict(ck["model"], strict=True)
        torchvision.models.resnet18(num_classes=4).load_state_dict(ck["ema"], strict=True)
    # best.pt is that epoch's last.pt: the best epoch's weights, not reloaded from disk.
    best = torch.load(out / "checkpoints" / "best.pt", map_location="cpu", weights_only=False)
    best_epoch = max(range(len(lines)), key=lambda i: (lines[i]["val_top1"], -i))
    assert best["epoch"] == best_epoch + 1 and best["batches"] == 0
    assert best["history"] == lines[: best_epoch + 1]
    assert ck["num_classes"] == 4 and [c["id"] for c in ck["classes"]] == ["c0", "c1", "c2", "c3"]

    # TensorBoard: epoch and step scalars, hparams, and the grid of the first augmented batch.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"epoch/val_top1", "epoch/train_loss", "epoch/lr", "epoch/images_per_sec", "epoch/data_wait"} <= set(
        tags["scalars"]
    )
    assert [e.value for e in acc.Scalars("epoch/val_top1")] == pytest.approx([m["val_top1"] for m in lines])
    assert "step/loss" in tags["scalars"]
    assert "train/first_batch" in tags["images"]
    img = acc.Images("train/first_batch")[0]
    assert img.width > 32 and img.height > 32  # a grid of 8 crops of 32 px, not one image
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())


def test_kill_9_mid_epoch_then_rerun_equals_uninterrupted(photos, tmp_path):
    common = ["--data", str(photos), *TINY, "--epochs", "2", "--deterministic", "--batch-size", "4"]
    straight = tmp_path / "straight"
    run_train(*common, "--output", str(straight))

    killed = tmp_path / "killed"
    args = [*common, "--output", str(killed), "--checkpoint-minutes", "0.0001"]  # a checkpoint every step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    # wait for a mid-epoch checkpoint in epoch 1 (after one finished epoch), then kill -9
    kill_9_at_checkpoint(proc, killed / "checkpoints" / "last.pt", epoch=1, timeout=180)
    assert not (killed / "summary.json").exists()

    p = run_train(*args)  # the same command: resumes by itself from last.pt
    assert "resumed from" in p.stderr
    keys = ("epoch", "train_loss", "val_top1", "val_top5", "val_loss", "lr")
    got, want = read_metrics(killed), read_metrics(straight)
    assert [{k: m[k] for k in keys} for m in got] == [{k: m[k] for k in keys} for m in want]
    a = torch.load(killed / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_uneven_shards_equal_steps_and_exact_eval(photos, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    # 48 train samples in shards of 7 (uneven), batch 4 per rank; 24 val samples in 4 shards.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "train",
        "--data",
        str(photos),
        *TINY,
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--output",
        str(out),
    ]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 8
    steps = summary["steps_per_rank"]
    assert len(steps) == 2 and steps[0] == steps[1] == 48 // 8  # floor(48 / 2 / 4) batches each
    ddp_top1 = read_metrics(out)[-1]["val_top1"]

    single = run_train(
        "--evaluate",
        str(out / "checkpoints" / "last.pt"),
        "--data",
        str(photos),
        "--batch-size",
        "5",
        "--workers",
        "0",
        "--backend",
        "pytorch",
    )
    result = json.loads(single.stdout.strip().splitlines()[-1])
    assert result["val_samples"] == 24  # every val sample once, padding left out
    assert result["val_top1"] == ddp_top1


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(photos, tmp_path, capsys):
    out = tmp_path / "nan"
    rc, stderr = train_in_process(
        capsys, "--data", str(photos), *TINY, "--arch", "train_nets:NaNAfterSix", "--epochs", "3", "--output", str(out)
    )
    assert rc == 3, stderr
    err = stderr.strip().splitlines()[-1]
    assert "non-finite loss" in err and "last good checkpoint" in err and "epoch 1" in err
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["epoch"] == 1 and ck["batches"] == 0  # the end of epoch 0, before anything went wrong
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())
    assert len(read_metrics(out)) == 1 and not (out / "summary.json").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shards", "/nonexistent/x-{000..002}.tar"], "shard not found"),
        (["--data", "/nonexistent/dir"], "manifest"),
        (["--data", "PHOTOS", "--arch", "alexnet", "--stem", "standard", "--image-size", "32"], "--stem small"),
        (["--data", "PHOTOS", "--batch-size", "64", "--epochs", "1"], "training data"),
    ],
)
def test_bad_data_and_models_fail_in_one_line_before_training(photos, tmp_path, capsys, extra, message):
    extra = [str(photos) if a == "PHOTOS" else a for a in extra]
    rc, err = train_in_process(capsys, *TINY[2:], *extra, "--output", str(tmp_path / "o"))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.slow
def test_demo_set_learns_well_above_chance(tmp_path, capsys):
    """A short demo run: a broken label or augmentation path would stay at chance (10%)."""
    from shards.build import build
    from shards.sources.demo import DemoSource
    from shards.types import Options

    data = tmp_path / "demo"
    build(
        DemoSource(seed=0, train_per_class=60, val_per_class=20, size=64), str(data), Options(seed=0, shard_samples=150)
    )
    out = tmp_path / "run"
    rc, err = train_in_process(
        capsys,
        "--data",
        str(data),
        "--preset",
        "demo",
        "--image-size",
        "32",
        "--batch-size",
        "32",
        "--epochs",
        "8",
        "--workers",
        "0",
        "--backend",
        "pytorch",
        "--output",
        str(out),
        "--progress",
        "never",
    )
    assert rc == 0, err
    lines = read_metrics(out)
    assert lines[-1]["val_top1"] >= 20.0, lines  # 600 training images, 8 short epochs: 2x chance at least
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]


def test_dali_cpu_backend_trains_and_evaluates_every_val_sample(photos, tmp_path, capsys):
    from train.run import main

    out = tmp_path / "dali"
    args = [a if a != "pytorch" else "dali" for a in TINY]
    rc, err = train_in_process(
        capsys, "--data", str(photos), *args, "--workers", "1", "--epochs", "1", "--output", str(out)
    )
    assert rc == 0, err
    assert "loader dali" in err
    assert json.loads((out / "summary.json").read_text())["steps_per_rank"] == [48 // 8]
    trained_top1 = read_metrics(out)[0]["val_top1"]
    ckpt = str(out / "checkpoints" / "last.pt")
    rc = main(["--evaluate", ckpt, "--data", str(photos), "--batch-size", "5", "--workers", "1", "--backend", "dali"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and result["val_samples"] == 24  # 24 val images, batches of 5: the padding is left out
    assert result["val_top1"] == trained_top1
