"""python -m train resumes exactly after kill -9 with DALI, elastically under torchrun, and safely.

Tiny images (photos shrunk to 48 px when the shards are built), 16 px crops and a narrow ResNet
keep every run to seconds; a run killed with -9 is a real subprocess, the runs that resume it
are in-process (the same main() as `python -m train`, without a fresh interpreter's imports).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import kill_9_at_checkpoint
from test_resume_loaders import UniqueLabels

from shards.build import build
from shards.types import Options
from train import checkpoint as ckpt_io

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
TINY = [
    *("--arch", "train.nets:NarrowResNet", "--image-size", "16", "--batch-size", "4", "--workers", "1"),
    *("--lr", "0.4", "--warmup-epochs", "0", "--progress", "never"),
]
METRICS = ("epoch", "train_loss", "val_top1", "val_top5", "val_loss", "lr")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build(UniqueLabels(), str(out), Options(seed=1, shard_samples=7, max_side=48), workers=1)
    return out  # 48 train samples (one label each), 24 val


def main_in_process(capsys, *args: str) -> tuple[int, str]:
    from train.run import main

    capsys.readouterr()
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): the same float summation order
    try:
        rc = main(list(args))
    finally:  # --deterministic switches torch's global mode: leave it as the other tests expect
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    return rc, capsys.readouterr().err


def metrics(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: m[k] for k in METRICS} for m in lines]


def descendants(pid: int) -> list[int]:
    """Every process below pid (Linux /proc): torchrun starts its workers in sessions of their own."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_9_all(pid: int) -> None:
    for p in [*descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.kill(p, signal.SIGKILL)


def start_and_kill_mid_epoch(cmd: list[str], out: Path, epoch: int, min_batches: int) -> None:
    """Run cmd until OUTPUT/checkpoints/last.pt is a checkpoint inside `epoch`, then kill -9 all of it."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_9_at_checkpoint(proc, out / "checkpoints" / ckpt_io.LAST, epoch, min_batches, kill=kill_9_all)
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_dali_kill_9_twin_equals_uninterrupted_even_from_a_damaged_last_pt(tiny, tmp_path, capsys):
    common = ["--data", str(tiny), *TINY, "--backend", "dali", "--epochs", "2", "--deterministic"]
    straight = tmp_path / "straight"
    rc, err = main_in_process(capsys, *common, "--output", str(straight))
    assert rc == 0, err

    killed = tmp_path / "killed"
    args = [*common, "--output", str(killed), "--checkpoint-minutes", "0.0001"]  # a checkpoint every step
    start_and_kill_mid_epoch([sys.executable, "-m", "train", *args], killed, epoch=1, min_batches=2)
    # Damage the newest checkpoint too: the rerun must fall back to the one before it.
    last = killed / "checkpoints" / ckpt_io.LAST
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    rc, err = main_in_process(capsys, *args)  # the same command: resumes by itself
    assert rc == 0, err
    assert "truncated or damaged" in err and "resuming from the previous checkpoint" in err, err
    assert re.search(r"resumed from \S*previous\.pt at epoch 1, batch \d+/12", err), err
    # The same crops, flips, order and arithmetic as the uninterrupted run: the same metrics and weights.
    assert metrics(killed) == metrics(straight)
    a = torch.load(killed / "checkpoints" / "last.pt", map_location="cpu")["model"]  # plain torch.load reads it
    b = torch.load(straight / "checkpoints" / "last.pt", map_location="cpu")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_torchrun_two_processes_killed_resume_as_one(tiny, tmp_path, capsys):
    out = tmp_path / "elastic"
    args = ["--data", str(tiny), *TINY, "--backend", "pytorch", "--workers", "0", "--epochs", "1"]
    args += ["--output", str(out), "--checkpoint-minutes", "0.0001"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # 48 samples, 2 ranks of batch 4: 6 steps of 8; kill after at least 2 of them.
    start_and_kill_mid_epoch([*torchrun, "-m", "train", *args], out, epoch=0, min_batches=2)
    ck = ckpt_io.load(str(out / "checkpoints" / ckpt_io.LAST))
    done = ck["batches"]
    assert ck["world_size"] == 2 and 2 <= done < 6

    rc, err = main_in_process(capsys, *args)  # one process now
    assert rc == 0, err
    through = round(100 * done * 8 / 48)
    assert f"resumed 2 -> 1 processes at epoch 0, {through}% through; global batch 8 -> 4, lr 0.0125 -> 0.00625" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 1
    # The schedule clock counts samples: 8 * done samples = 2 * done steps of 4, then the 48 - 8 * done
    # samples left in steps of 4: 12 in all, what one process takes for the whole epoch.
    assert summary["steps_per_rank"] == [12]
    ck = ckpt_io.load(str(out / "checkpoints" / ckpt_io.LAST))
    assert ck["samples_seen"] == 48 and ck["epoch"] == 1 and ck["format_version"] == ckpt_io.FORMAT_VERSION
    assert [m["epoch"] for m in metrics(out)] == [0]


class RunsCode:
    """Unpickling this calls open(marker, "w"): the kind of payload a checkpoint from elsewhere may carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_a_callable_is_refused_not_run(tiny, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "num_classes": 48, "hook": RunsCode(str(marker))}, evil)
    args = ["--data", str(tiny), "--batch-size", "8", "--workers", "0", "--backend", "pytorch"]
    rc, err = main_in_process(capsys, "--evaluate", str(evil), *args)
    assert rc == 2 and "refusing to load checkpoint" in err, err
    assert not marker.exists()
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    os.replace(evil, out / "checkpoints" / ckpt_io.LAST)  # as an auto-resume target: refused too, no fallback
    rc, err = main_in_process(capsys, "--data", str(tiny), *TINY, "--epochs", "1", "--output", str(out))
    assert rc == 2 and "refusing to load checkpoint" in err and not marker.exists(), err
    torch.load(out / "checkpoints" / ckpt_io.LAST, weights_only=False)  # what an unsafe load would have done
    assert marker.exists()


def test_checkpoint_versions_and_fallback_units(tmp_path):
    folder = tmp_path / "ck"
    for epoch in (1, 2):
        ckpt_io.save_atomic(
            {"model": {"w": torch.ones(2)}, "epoch": epoch}, str(folder / "last.pt"), keep_previous=True
        )
    assert sorted(os.listdir(folder)) == ["last.pt", "previous.pt"]
    ck, path, warning = ckpt_io.load_latest(str(folder))
    assert ck["epoch"] == 2 and path.endswith("last.pt") and warning is None
    (folder / "last.pt").write_bytes(b"PK\x03\x04 not a whole zip")
    ck, path, warning = ckpt_io.load_latest(str(folder))
    assert ck["epoch"] == 1 and path.endswith("previous.pt") and "truncated or damaged" in warning
    newer = tmp_path / "newer.pt"
    torch.save({"model": {}, "format": ckpt_io.FORMAT, "format_version": 99}, newer)
    with pytest.raises(ckpt_io.CheckpointError, match="version 99"):
        ckpt_io.load(str(newer))
    # A checkpoint from before versions (numpy arrays in its RNG state) still loads, through the allowlist.
    import numpy as np

    old = tmp_path / "old.pt"
    torch.save({"model": {}, "rng": {"numpy": np.random.get_state()}}, old)
    assert ckpt_io.load(str(old))["rng"]["numpy"][0] == "MT19937"


def test_elastic_rule_units(tiny):
    from loaders import make_loader
    from train import elastic

    # A checkpoint of 8 processes x 256 (base lr 0.1: peak 0.8), mid-epoch 12, every rank 5 of 6 batches in.
    old = make_loader(str(tiny), batch_size=1, train=True, backend="pytorch", workers=0, rank=3, world_size=8)
    old.load_state_dict({**old.state_dict(), "epoch": 12, "batches": 5})
    ranks = [
        {
            "loader": old.state_dict(),
            "loss_sum": 2.0 * r,
            "seen": 5,
            "seconds": 10.0 + r,
            "wait_seconds": 1.0,
            "lr": 0.5,
        }
        for r in range(8)
    ]
    ck = {
        "config": {"batch_size": 256, "lr": 0.1},
        "world_size": 8,
        "epoch": 12,
        "batches": 5,
        "global_step": 12 * 6 + 5,
        "ranks": ranks,
    }
    ck = ckpt_io.saved(ck)
    assert ck.samples_seen == (12 * 6 + 5) * 2048  # no samples_seen recorded: steps x global batch
    assert not elastic.same_shape(ck, 4, 256, 1) and elastic.same_shape(ck, 8, 256, 1)
    new = make_loader(str(tiny), batch_size=1, train=True, backend="pytorch", workers=0, rank=0, world_size=4)
    state, line = elastic.resume(ck, new, rank=0, world_size=4, global_batch=1024, peak=0.4)
    assert line == "resumed 8 -> 4 processes at epoch 12, 83% through; global batch 2048 -> 1024, lr 0.8 -> 0.4"
    assert state.global_step == 2 * (12 * 6 + 5)  # the same samples seen, in steps of half the size
    assert (state.loss_sum, state.seen) == (56.0, 40) and state.seconds == pytest.approx(13.5)  # the old totals
    assert len(new) - state.batches == 2  # 8 of 48 samples left, on 4 ranks of 1
    other, _ = elastic.resume(ck, new, rank=1, world_size=4, global_batch=1024, peak=0.4)
    assert (other.loss_sum, other.seen) == (0.0, 0) and other.seconds == pytest.approx(13.5)  # summed once
