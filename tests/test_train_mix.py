"""python -m train over several --data sets: one joint class list (saved in the checkpoints, sizing
the model), --weights, and a val top-1 per set."""

from __future__ import annotations

import json

import pytest
import torch
from test_mix_loader import two_sets  # noqa: F401 (the fixture)
from test_train_run import TINY, train_in_process


def test_two_sets_train_with_weights_and_report_val_per_set(two_sets, tmp_path, capsys):  # noqa: F811
    a, b = two_sets
    out = tmp_path / "run"
    rc, err = train_in_process(
        capsys, "--data", a, "--data", b, "--weights", "3,1", *TINY, "--epochs", "1", "--output", str(out)
    )
    assert rc == 0, err
    assert "(6 classes" in err and "from each --data set's val split" in err
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final_val_sets"]) == {a, b}
    assert all(0 <= v["top1"] <= 100 and v["samples"] > 0 for v in summary["final_val_sets"].values())
    ck = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert [c["id"] for c in ck["classes"]] == ["c0", "c1", "c2", "c3", "c5", "c4"] and ck["num_classes"] == 6


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--weights", "3,1"], "--weights gives 2 weights for 1 --data set"),
        (["--data", "B", "--weights", "x,1"], "--weights x,1: expected numbers"),
        (["--data", "B", "--weights", "0,0"], "positive sum"),
    ],
)
def test_bad_weights_are_refused_in_one_line(capsys, args, message):
    rc, err = train_in_process(capsys, "--data", "A", *args, *TINY)
    assert rc == 2 and message in err
