"""`make gpu-check` (scripts/gpu_check.py) as it will first run: on a simulated GPU machine's Python.

The simulation: a copy of the checkout in a temporary folder (no ../shared beside it), run by
path from outside it, by this interpreter with a sitecustomize that makes Prefect, s3fs,
boto3, moto and Dask unimportable and hides the editable install of the project, and with
pytest's plugin autoload off (the GPU machine's pytest has no pytest-timeout or xdist). So the
project is importable only the way the kit makes it so. Real torch, DALI (CPU), writer, loaders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_cli  # noqa: E402
import gpu_check  # noqa: E402
import gpu_stages  # noqa: E402

ABSENT = ["prefect", "prefect_dask", "s3fs", "boto3", "botocore", "moto", "dask", "distributed"]
SITECUSTOMIZE = textwrap.dedent(
    f"""
    # The GPU machine's Python: these packages are not there, and the project is not installed.
    import importlib.abc
    import sys

    ABSENT = {set(ABSENT)!r}


    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ABSENT:
                raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
            return None


    sys.meta_path[:] = [Absent()] + [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
    sys.path_importer_cache.clear()
    """
)
TOP_LEVEL_SKIP = {".git", ".venv", "runs", "data", "shared", ".pytest_cache", ".ruff_cache", "build"}


@pytest.fixture(scope="module")
def gpu_machine(tmp_path_factory) -> tuple[Path, dict]:
    """(a plain copy of the checkout, the environment of the GPU machine's python)."""
    base = tmp_path_factory.mktemp("gpu-machine")
    checkout = base / "checkout"

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__"}
        return skip | (TOP_LEVEL_SKIP & set(names) if Path(folder) == ROOT else set())

    shutil.copytree(ROOT, checkout, ignore=ignore)
    site = base / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "PYTEST_"))}
    env.update(PYTHONPATH=str(site), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS="1")
    return checkout, env


def python(env: dict, *args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_simulated_machine_lacks_what_the_gpu_machine_lacks(gpu_machine, tmp_path):
    _, env = gpu_machine
    names = [*ABSENT, "loaders", "train", "torch", "nvidia.dali"]
    probe = textwrap.dedent(
        f"""
        import importlib
        for name in {names!r}:
            try:
                importlib.import_module(name)
                print(name, "present")
            except ImportError:
                print(name, "absent")
        """
    )
    p = python(env, "-c", probe, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    seen = dict(line.split() for line in p.stdout.split("\n") if line)
    assert {m: seen[m] for m in ABSENT} == dict.fromkeys(ABSENT, "absent")
    assert seen["loaders"] == seen["train"] == "absent"  # not installed: only the kit's sys.path finds them
    assert seen["torch"] == seen["nvidia.dali"] == "present"  # the machine's torch and the carried DALI wheel


def test_gpu_tests_collect_and_skip_saying_why(gpu_machine):
    checkout, env = gpu_machine
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the GPU tests would run, not skip")
    # As a person would on the GPU machine, from the checkout's root, with the bare pytest it has.
    p = python(
        env, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py", cwd=checkout
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    skips = [line for line in p.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("needs a CUDA GPU" in line for line in skips), p.stdout[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert "skipped" in last and "passed" not in last and "error" not in last, last


def test_dry_run_runs_every_cpu_stage_ok_and_plain_quick_exits_2(gpu_machine, tmp_path):
    checkout, env = gpu_machine
    out = tmp_path / "dry"
    p = python(env, str(checkout / "scripts" / "gpu_check.py"), "--quick", "--dry-run", "--output", str(out),
               cwd=tmp_path, timeout=400)  # fmt: skip  # a hang guard, not a speed check
    assert p.returncode == 0, p.stderr[-4000:]
    r = json.loads((out / "result.json").read_text())
    assert r["ok"] and r["mode"] == "dry-run" and r["failed_stages"] == []
    assert {k: s["status"] for k, s in r["stages"].items()} == dict.fromkeys(
        ["imports", "data", "tests", "loader", "eval", "throughput"], "ok"
    )
    assert r["not_in_dry_run"] == ["compile", "ddp"]
    s = r["stages"]
    assert s["imports"]["project"] == str(checkout)  # the copy, found through the kit's own sys.path
    assert s["data"]["photos"] == str(checkout / "tests" / "data" / "photos")  # bundled: no ../shared here
    assert s["tests"]["collected"] == s["tests"]["skipped"] > 10 and s["tests"]["failed"] == 0
    assert all("needs a CUDA GPU" in t for t in s["tests"]["skipped_tests"])
    dali = s["loader"]["results"]["dali"]
    assert dali["device"] == "cpu" and dali["images_per_sec"] > 0 and "error" not in dali
    assert dali["pipeline_builds"] >= 1 and dali["threads"] >= 1 and 0 <= dali["build_share"] < 1
    assert s["eval"]["images"] > 0 and s["throughput"]["real"]["images"] > 0
    f = r["figures"]
    for key in ["dali_train_images_per_sec", "dali_pipeline_builds", "dali_pipeline_build_seconds", "dali_build_share",
                "eval_images_per_sec", "train_images_per_sec", "train_synthetic_images_per_sec", "train_data_wait"]:  # fmt: skip
        assert isinstance(f[key], (int, float)), key
    assert "dry run" in p.stderr and "all stages passed" in p.stderr

    plain = python(env, str(checkout / "scripts" / "gpu_check.py"), "--quick", "--output", str(tmp_path / "q"),
                   cwd=tmp_path)  # fmt: skip
    if torch.cuda.is_available():
        return
    assert plain.returncode == 2, plain.stderr[-2000:]
    assert "no GPU here" in plain.stderr and f"torch {torch.__version__}" in plain.stderr
    q = json.loads((tmp_path / "q" / "result.json").read_text())
    assert q["ok"] is False and q["failed_stages"] == ["environment"] and q["stages"] == {}
    assert q["environment"]["torch_pin"].startswith("torch==") and not (tmp_path / "q" / "tests.log").exists()


# -- the kit's own logic, in process --------------------------------------------------------------------
def test_a_backend_error_and_failed_stages_leave_the_figures_and_table_standing(capsys):
    stages = {
        "loader": {"status": "ok", "results": {"dali": {"error": "OSError: [Errno 28] No space left on device"},
                                               "imagefolder": {"images_per_sec": 900.0}}},
        "eval": {"status": "failed", "error": "eval_throughput.py exited 1: boom"},
        "throughput": {"status": "ok", "real": {"images_per_sec": 3100.0, "data_wait": 0.02, "peak_gpu_memory_gib": 21.5},
                       "synthetic": {"images_per_sec": 3200.0, "peak_gpu_memory_gib": 20.0}, "real_vs_synthetic": 0.97},
        "ddp": {"status": "skipped", "reason": "needs 2 GPUs, this machine has 1"},
    }  # fmt: skip
    f = gpu_stages.figures(stages)
    assert f == {
        "imagefolder_images_per_sec": 900.0,
        "train_images_per_sec": 3100.0,
        "train_synthetic_images_per_sec": 3200.0,
        "train_data_wait": 0.02,
        "train_real_vs_synthetic": 0.97,
        "train_peak_gpu_memory_gib": 21.5,
    }
    assert gpu_stages.figures({}) == {} and gpu_stages.figures({"loader": {"status": "failed"}}) == {}
    result = {"mode": "quick", "dry_run": False, "environment": {}, "stages": stages, "figures": f}
    gpu_check.print_table(result)
    err = capsys.readouterr().err
    assert "No space left" in err and "needs 2 GPUs" in err and "3,100" in err


def test_the_runner_goes_on_after_a_failed_stage(monkeypatch, tmp_path):
    ran = []

    def fails(ctx):
        ran.append("tests")
        raise gpu_stages.StageFailed("pytest exited 1: test_gpu_eval_pixels_match_the_cpu_eval_pipeline")

    def data(ctx):
        ran.append("data")
        ctx["data"] = "somewhere"
        return {"images": 1}

    def later(ctx):
        ran.append("loader")
        return {"results": {"dali": {"images_per_sec": 5.0}}}

    def broken(ctx):
        ran.append("eval")
        raise KeyError("images_per_sec")

    monkeypatch.setattr(gpu_stages, "STAGES", [("data", data, True, False), ("tests", fails, True, False),
                                               ("loader", later, True, True), ("eval", broken, True, True)])  # fmt: skip
    result = {"stages": {}, "figures": {}, "not_in_dry_run": []}
    ctx = {"dry_run": True, "output": str(tmp_path)}
    gpu_check.run_stages(result, ctx, tmp_path / "result.json")
    assert ran == ["data", "tests", "loader", "eval"]
    st = result["stages"]
    assert [st[k]["status"] for k in ("data", "tests", "loader", "eval")] == ["ok", "failed", "ok", "failed"]
    assert st["eval"]["error"] == "KeyError: 'images_per_sec'" and result["figures"]["dali_train_images_per_sec"] == 5
    assert json.loads((tmp_path / "result.json").read_text())["stages"]["tests"]["status"] == "failed"
    # --skip: recorded, not run.
    ran.clear()
    result = {"stages": {}, "figures": {}, "not_in_dry_run": []}
    gpu_check.run_stages(result, {**ctx, "skip": ["tests", "eval"]}, tmp_path / "result.json")
    assert ran == ["data", "loader"] and result["stages"]["tests"] == {"status": "skipped", "reason": "--skip"}
    # Without the benchmark set, the stages that read it are skipped, saying why.
    monkeypatch.setattr(gpu_stages, "STAGES", [("data", fails, True, False), ("loader", later, True, True)])
    result = {"stages": {}, "figures": {}, "not_in_dry_run": []}
    gpu_check.run_stages(result, {"dry_run": True, "output": str(tmp_path)}, tmp_path / "result.json")
    assert result["stages"]["loader"] == {
        "status": "skipped",
        "reason": "needs the benchmark set (the data stage failed)",
    }


def test_hardware_decoder_figure_from_nvml_and_in_words_without_it():
    def used(gpu: dict):
        return gpu_stages.figures({"loader": {"results": {}, "gpu": gpu}}).get("nvjpeg_hardware_decoder_used")

    assert used({"jpeg_engine_peak_percent": 37, "gpu_memory_peak_gib": 3.0}) is True
    assert used({"jpeg_engine_peak_percent": 0}) is False
    assert used({"jpeg_engine": "unknown: this driver's NVML has no nvmlDeviceGetJpgUtilization"}).startswith("unknown")
    assert used({"nvml": "no NVML here"}) == "unknown: no NVML here" and used({}) is None
    from gpu_nvml import Sampler

    with Sampler() as s:  # this machine: NVML or not, sampling never raises
        pass
    figures = s.figures()
    assert "nvml" in figures or "gpu_memory_peak_gib" in figures
    assert gpu_check.shown("dali_build_share", 0.031) == "3.1%" and gpu_check.shown("x", "unknown: y") == "unknown: y"


def test_results_are_read_from_the_stages_outputs(tmp_path):
    junit = tmp_path / "t.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure message="x"/></testcase>'
        '<testcase name="c"><skipped message="needs the shard cache"/></testcase></testsuite></testsuites>'
    )
    counts = gpu_stages.junit_counts(junit)
    assert (counts["collected"], counts["passed"], counts["failed"], counts["skipped"]) == (3, 1, 1, 1)
    assert counts["failed_tests"] == ["b"] and counts["skipped_tests"] == ["c: needs the shard cache"]
    assert gpu_stages.last_json('log line\n{"results": [1]}\n') == {"results": [1]}
    assert gpu_stages.pinned_torch().startswith("torch==")  # read without tomllib


def test_quick_and_full_sets_are_big_enough_to_measure_and_feed_what_training_uses():
    for name in ("quick", "full"):
        mode = gpu_stages.MODES[name]
        # At the 10,000 img/s target an epoch lasts seconds, so a pipeline build (~0.1 s) each epoch stays small.
        assert mode.images / gpu_check.TARGETS["dali_train_images_per_sec"] >= 4
        assert (mode.amp, gpu_stages.FEED_DTYPE[mode.amp], mode.channels_last) == ("bf16", "bfloat16", True)
    photos = len(list(bench_cli.BUNDLED_PHOTOS.glob("*.JPEG")))
    assert photos >= 20  # the bundled photos: the fallback set is these repeated, never 3 batches an epoch


def test_the_ddp_stage_runs_torchrun_and_reads_the_second_epoch(tmp_path):
    # On CPU (gloo, 2 processes): the stage's own command line and result parsing, as on 2 GPUs.
    import argparse

    ctx = {"args": argparse.Namespace(photos=None, copies=2), "mode": gpu_stages.MODES["dry-run"],
           "env": {"cpus": 1, "gpus": 1}, "output": str(tmp_path), "dry_run": True}  # fmt: skip
    with pytest.raises(gpu_stages.StageSkipped, match="needs 2 GPUs, this machine has 1"):
        gpu_stages.ddp(ctx)
    gpu_stages.build_data(ctx)
    ctx["env"]["gpus"] = 2
    r = gpu_stages.ddp(ctx)
    assert r["processes"] == 2 and r["images_per_sec"] > 0 and 0 <= r["data_wait"] <= 1
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["epoch"] == 1
