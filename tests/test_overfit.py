"""`python -m train --overfit-batches N`: memorize N unaugmented batches, or fail naming the usual causes.

Runs the same main() as `python -m train` in this process, over a small real demo build
(70 training images), with the demo preset the README's first rung uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shards.build import build
from shards.sources.demo import DemoSource
from shards.types import Options
from train.overfit import PASS_LOSS
from train.run import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overfit") / "demo"
    build(
        DemoSource(seed=5, train_per_class=7, val_per_class=1, size=64), str(out), Options(shard_samples=32), workers=1
    )
    return out


def run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def test_demo_preset_memorizes_one_batch(demo, tmp_path, capsys):
    args = ["--data", str(demo), "--preset", "demo", "--overfit-batches", "1", "--workers", "0"]
    rc, err = run(capsys, *args, "--output", str(tmp_path))
    assert rc == 0, err
    o = json.loads((tmp_path / "summary.json").read_text())["overfit"]
    assert o["passed"] is True and o["batches"] == 1 and o["batch_size"] == 64
    assert o["final_top1"] == 100.0
    assert o["final_loss"] <= PASS_LOSS < 1.0 < o["first_loss"]  # from about ln(10) to near zero
    assert 0 < o["steps"] <= 500
    assert "overfit: passed" in err


def test_a_failing_overfit_exits_1_and_names_the_usual_causes(demo, tmp_path, capsys):
    # --shards FOLDER: the train split still (the 10 val images would not fill one batch)
    args = ["--shards", str(demo), "--preset", "demo", "--overfit-batches", "1", "--workers", "0"]
    rc, err = run(capsys, *args, "--output", str(tmp_path), "--lr", "1e-9", "--overfit-steps", "3")
    assert rc == 1
    o = json.loads((tmp_path / "summary.json").read_text())["overfit"]
    assert o["passed"] is False and o["steps"] == 3
    assert o["final_loss"] > PASS_LOSS
    assert "overfit: FAILED after 3 steps" in err
    for cause in ("learning rate", "labels", "collapsed feature map"):
        assert cause in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--overfit-batches", "0"], "--overfit-batches must be > 0"),
        (["--overfit-batches", "5"], "--overfit-batches 5: the training data has only 1 full batches of 64"),
    ],
)
def test_bad_overfit_options_fail_in_one_line(demo, tmp_path, capsys, extra, message):
    rc, err = run(capsys, "--data", str(demo), "--preset", "demo", "--output", str(tmp_path), *extra)
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1
