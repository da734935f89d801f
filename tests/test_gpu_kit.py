"""`make gpu-check` (scripts/gpu_check.py) where there is no GPU: it says so, writes result.json, exits 2.

On a GPU machine these are skipped: there the kit itself is the test (it would run in full).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run `make gpu-check` itself")


def test_without_a_gpu_it_says_so_and_exits_non_zero(tmp_path):
    p = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--quick", "--output", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a speed check
    )
    assert p.returncode == 2, p.stderr
    assert "no GPU here" in p.stderr and f"torch {torch.__version__}" in p.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["ok"] is False and result["failed_stage"] == "environment" and result["stages"] == {}
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["cuda_available"] is False
    assert result["environment"]["torch_pin"].startswith("torch==")
    assert not (tmp_path / "tests.log").exists()  # nothing was run


def test_results_are_read_from_the_stages_outputs(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped message="needs the shard cache"/></testcase></testsuite></testsuites>'
    )
    counts = gpu_check.junit_counts(junit)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1) and counts["failed_tests"] == ["b"]
    assert counts["skipped_tests"] == ["c: needs the shard cache"]
    assert gpu_check.last_json('log line\n{"results": [1]}\n') == {"results": [1]}
    stages = {
        "loader": {"results": {"dali": {"images_per_sec": 12000.0}, "imagefolder": {"images_per_sec": 900.0}}},
        "throughput": {"real": {"images_per_sec": 3100.0, "data_wait": 0.02}, "synthetic": {"images_per_sec": 3200.0}},
    }
    assert gpu_check.figures(stages) == {
        "dali_train_images_per_sec": 12000.0,
        "imagefolder_images_per_sec": 900.0,
        "resnet50_images_per_sec": 3100.0,
        "resnet50_data_wait": 0.02,
        "resnet50_synthetic_images_per_sec": 3200.0,
    }
    assert gpu_check.figures({"loader": {"status": "failed"}}) == {}  # nothing measured, nothing shown
