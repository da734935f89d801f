"""Progressive resizing and train-test resolution: the schedule, both backends following it,
a kill -9 in the middle of a ramp, and --tta flip / --eval-image-size in --evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_photo_shards, kill_9_at_checkpoint

from loaders import make_loader
from train.config import ConfigError, parse
from train.resolution import parse_ramp, schedule, size_at

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    *("--arch", "train.nets:NarrowResNet", "--image-size", "32", "--batch-size", "8", "--workers", "0"),
    *("--backend", "pytorch", "--lr", "0.4", "--warmup-epochs", "0", "--progress", "never"),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos")
    build_photo_shards(out, shard_samples=7, num_classes=4, copies=2, val_copies=1)
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_schedule_rises_in_multiples_of_8_and_never_down():
    sizes = [size_at(e, 32, 48, 0, 10) for e in range(12)]
    assert sizes[0] == 32 and sizes[10:] == [48, 48]
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert sizes == [32, 32, 32, 40, 40, 40, 40, 40, 48, 48, 48, 48]  # 32 + 16 e / 10, to the nearest 8
    ffcv = [size_at(e, 160, 192, 17, 20) for e in range(24)]
    assert ffcv[:18] == [160] * 18 and ffcv[18:20] == [168, 184] and ffcv[20:] == [192] * 4
    assert schedule(224, None, None)(5) == 224
    assert parse_ramp("3:7") == (3, 7)
    for bad in ("7:3", "3", "a:b", "-1:2", "2:2"):
        with pytest.raises(ValueError, match="A:B"):
            parse_ramp(bad)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--min-image-size", "32"], "go together"),
        (["--ramp-epochs", "0:3"], "go together"),
        (["--min-image-size", "64", "--ramp-epochs", "0:3"], "16..--image-size"),
        (["--min-image-size", "32", "--ramp-epochs", "3:1"], "A:B"),
        (["--eval-image-size", "8"], "at least 16"),
    ],
)
def test_bad_size_options_fail_in_one_line(photos, extra, message):
    with pytest.raises(ConfigError, match=message):
        parse(["--data", str(photos), *TINY, *extra])


def test_fast_preset_is_ffcvs_ramp():
    cfg = parse(["--data", "x", "--preset", "imagenet-resnet50-fast"])
    assert (cfg.min_image_size, cfg.image_size, cfg.ramp_epochs) == (160, 192, "17:20")
    assert (cfg.eval_image_size, cfg.tta, cfg.epochs) == (256, "flip", 24)


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_both_backends_follow_the_size_and_resume_across_a_change(photos, backend):
    kw = dict(batch_size=4, train=True, backend=backend, workers=1, image_size=32, seed=3)
    loader = make_loader(str(photos), **kw)
    try:
        loader.set_epoch(1)
        loader.set_image_size(16)
        it = iter(loader)
        first = next(it)[0]
        assert first.shape[-2:] == (16, 16)
        state = loader.state_dict()  # after one batch of a 16 px epoch
        rest = [x for x, _ in it]
        loader.set_image_size(24)
        loader.set_epoch(2)
        assert next(iter(loader))[0].shape[-2:] == (24, 24)
    finally:
        loader.close()
    again = make_loader(str(photos), **kw)  # a resumed run: built at --image-size, then set to the epoch's
    try:
        again.load_state_dict(state)
        again.set_image_size(16)
        again.set_epoch(1)
        resumed = [x for x, _ in again]
    finally:
        again.close()
    assert len(resumed) == len(rest) and all(torch.equal(a, b) for a, b in zip(resumed, rest, strict=True))


def run_train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def test_kill_9_in_the_middle_of_a_ramp_ends_as_the_uninterrupted_run(photos, tmp_path):
    ramp = ["--min-image-size", "16", "--ramp-epochs", "0:2"]
    common = ["--data", str(photos), *TINY, *ramp, "--epochs", "3", "--deterministic", "--batch-size", "4"]
    straight = tmp_path / "straight"
    run_train(*common, "--output", str(straight))
    assert [m["image_size"] for m in metrics(straight)] == [16, 24, 32]

    killed = tmp_path / "killed"
    args = [*common, "--output", str(killed), "--checkpoint-minutes", "0.0001"]  # a checkpoint every step
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    kill_9_at_checkpoint(proc, killed / "checkpoints" / "last.pt", epoch=1, timeout=180)  # inside the 24 px epoch
    assert "resumed from" in run_train(*args).stderr
    keys = ("epoch", "train_loss", "val_top1", "val_loss", "lr", "image_size")
    assert [{k: m[k] for k in keys} for m in metrics(killed)] == [{k: m[k] for k in keys} for m in metrics(straight)]


def test_flip_tta_averages_the_logits_of_the_mirror():
    from train.distributed import Dist
    from train.engine import evaluate

    class Loader:  # two batches of one image each; the model sees the image and its mirror
        def set_epoch(self, e):
            pass

        def with_valid(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(2):
                yield torch.rand(1, 3, 4, 4, generator=g), torch.tensor([0]), torch.tensor([True])

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 3))
    dist = Dist()
    plain, flip = evaluate(model, Loader(), dist), evaluate(model, Loader(), dist, tta="flip")
    want = 0.0
    for x, y, _ in Loader().with_valid():
        logits = (model(x) + model(x.flip(3))) / 2
        want += torch.nn.functional.cross_entropy(logits, y).item() / 2
    assert flip["loss"] == pytest.approx(want, rel=1e-5) and flip["loss"] != pytest.approx(plain["loss"])


@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_evaluate_with_flip_tta_at_a_higher_resolution(photos, tmp_path, capsys, backend):
    from train.run import main

    out = tmp_path / "run"
    args = [*(a if a != "pytorch" else backend for a in TINY), "--workers", "1"]  # DALI needs a thread
    capsys.readouterr()
    assert main(["--data", str(photos), *args, "--epochs", "1", "--output", str(out), "--tta", "flip"]) == 0
    assert "val_top1" in metrics(out)[0]
    capsys.readouterr()
    ckpt = str(out / "checkpoints" / "last.pt")
    rc = main(["--evaluate", ckpt, "--data", str(photos), "--backend", backend, "--workers", "1",
               "--tta", "flip", "--eval-image-size", "56"])  # fmt: skip
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and (result["image_size"], result["tta"], result["val_samples"]) == (56, "flip", 24)
