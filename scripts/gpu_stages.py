"""The stages of `make gpu-check` (scripts/gpu_check.py) and the figures read from what they measured.

Each stage takes the run's context and returns what it measured (a dict) or raises; the
runner records either and goes on. Every measurement runs the project's own commands in a
subprocess (python -m loaders.bench, python -m train.throughput, python -m train under
torchrun, scripts/eval_throughput.py), each from the checkout by path, with a time limit.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from bench_cli import default_photos, has_jpegs

REPO = Path(__file__).resolve().parent.parent
MODULES = ["torch", "torchvision", "numpy", "PIL", "nvidia.dali", "webdataset", "braceexpand", "psutil", "rich",
           "loaders", "loaders.dali", "loaders.bench", "train", "train.run", "train.throughput", "shards.build"]  # fmt: skip


class StageFailed(RuntimeError):
    """A stage did not pass; the message says why in one line."""


class StageSkipped(RuntimeError):
    """A stage that cannot run here (one GPU for the 2-process figure); not a failure."""


@dataclass(frozen=True)
class Mode:
    """How big and how long. images: the benchmark set's size (photos repeated to reach it): big
    enough that a DALI GPU epoch lasts seconds, so the pipeline build each epoch is a small share."""

    images: int
    marker: str  # pytest -m expression for tests/test_gpu.py
    bench: tuple[float, float]  # loader bench seconds: warm-up, measured
    steps: tuple[int, int]  # throughput steps: warm-up, measured
    eval_images: int
    arch: str = "resnet50"
    batch_size: int = 256
    image_size: int = 224
    amp: str = "bf16"  # the one home of the GPU feed: the loader bench's dtype follows it (FEED_DTYPE)
    channels_last: bool = True
    device: str = "cuda"
    limit: float = 420  # seconds any one stage may take


MODES = {
    "quick": Mode(images=48_000, marker="gpu and not slow", bench=(3, 10), steps=(5, 20), eval_images=12_000, limit=300),
    "full": Mode(images=120_000, marker="gpu", bench=(5, 20), steps=(10, 40), eval_images=48_000, limit=600),
    # No GPU: every stage that can run on CPU, small and short; proves the kit itself, measures nothing.
    "dry-run": Mode(images=96, marker="gpu", bench=(1, 2), steps=(2, 3), eval_images=48, arch="train.nets:NarrowResNet",
                    batch_size=16, image_size=64, amp="none", channels_last=False, device="cpu", limit=180),
}  # fmt: skip
FEED_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "none": "float32"}  # what the trainer's amp feeds on


# -- running the project's commands -------------------------------------------------------------------
def child_env() -> dict:
    """The project from this checkout for every child (and tests/ for the GPU tests' helpers)."""
    path = [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def run_logged(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command, its output also in `log`; a timeout is a failed stage, not a hang."""
    try:
        p = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        log.write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout:.0f} s)\n{out}")
        raise StageFailed(f"timed out after {timeout:.0f} s (log: {log})") from None
    log.write_text(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def checked(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run a command that ends its output with one JSON line; that line, or StageFailed with the error."""
    p = run_logged(cmd, log, timeout)
    if p.returncode != 0:
        raise StageFailed(f"{' '.join(cmd[1:3])} exited {p.returncode}: {tail(p.stderr)} (log: {log})")
    return last_json(p.stdout)


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageFailed("no JSON result line in the output")


def tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def feed(mode: Mode) -> list[str]:
    """The model-side arguments every measurement shares."""
    return ["--arch", mode.arch, "--batch-size", str(mode.batch_size), "--image-size", str(mode.image_size),
            "--amp", mode.amp, *(["--channels-last"] if mode.channels_last else [])]  # fmt: skip


# -- the stages -----------------------------------------------------------------------------------------
def imports(ctx: dict) -> dict:
    """Every module the later stages import, with versions; the first missing one fails the stage."""
    found, missing = {}, {}
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
            found[name] = getattr(mod, "__version__", "ok")
        except Exception as e:  # an ImportError, or a library that fails while loading
            missing[name] = f"{type(e).__name__}: {e}"
    dali = str(found.get("nvidia.dali", "0"))
    if "nvidia.dali" in found and int(dali.split(".")[0]) < 2:
        missing["nvidia.dali"] = f"DALI {dali}: the loader needs DALI 2.x (pipe.outputs(stream))"
    project = sys.modules["loaders"].__file__ if "loaders" in found else None
    out = {"versions": found, "missing": missing, "python": sys.version.split()[0],
           "project": str(Path(project).resolve().parent.parent) if project else None}  # fmt: skip
    if missing:
        ctx["partial"] = out
        raise StageFailed("cannot import " + "; ".join(f"{k} ({v})" for k, v in missing.items()))
    return out


def find_photos(given: str | None) -> Path:
    folder = Path(given) if given else default_photos()
    if not has_jpegs(folder):
        raise StageFailed(f"no photos in {folder}: give --photos DIR (n<wnid>_*.JPEG)")
    return folder


def build_data(ctx: dict) -> dict:
    from loaders.bench_data import build_bench_shards
    from loaders.spec import open_shards

    mode: Mode = ctx["mode"]
    photos = find_photos(ctx["args"].photos)
    n = sum(1 for f in photos.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png"))
    copies = ctx["args"].copies or math.ceil(mode.images / n)
    out = Path(ctx["output"]) / f"data-{photos.name}-x{copies}"
    reused = (out / "manifest.json").exists()
    if not reused:
        big = copies * n > 2048  # a small set is built faster by one process than by a pool's start-up
        workers = ctx["env"]["cpus"] if big else 1
        build_bench_shards(str(photos), str(out), copies, shard_samples=512 if big else 32, workers=workers)
    shards, _ = open_shards(str(out), split="train")
    ctx["data"] = str(out)
    return {"photos": str(photos), "copies": copies, "path": str(out), "images": sum(s.samples for s in shards),
            "shards": len(shards), "bytes": sum(os.path.getsize(s.url) for s in shards), "reused": reused}  # fmt: skip


def gpu_tests(ctx: dict) -> dict:
    """tests/test_gpu.py: without CUDA (a dry run) every test must be collected and skip, saying why.
    The GPU machine's bare pytest suffices (no pytest-timeout, no xdist)."""
    out = Path(ctx["output"])
    junit = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", ctx["mode"].marker,
           f"--junitxml={junit}", "tests/test_gpu.py"]  # fmt: skip
    if junit.exists():
        junit.unlink()
    p = run_logged(cmd, out / "tests.log", ctx["mode"].limit)
    result = {"command": " ".join(cmd[2:]), "log": str(out / "tests.log"), **junit_counts(junit)}
    if p.returncode != 0 or not result.get("collected"):
        ctx["partial"] = result
        failed = ", ".join(result.get("failed_tests", [])[:6]) or tail(p.stdout)
        raise StageFailed(f"pytest exited {p.returncode}: {failed} (log: {out / 'tests.log'})")
    return result


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    counts = {"collected": 0, "passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "skipped_tests": []}
    for c in ET.parse(path).getroot().iter("testcase"):
        name = c.get("name", "?")
        counts["collected"] += 1
        if c.find("failure") is not None or c.find("error") is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif c.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skipped_tests"].append(f"{name}: {c.find('skipped').get('message', '')}")
        else:
            counts["passed"] += 1
    return counts


def loader_bench(ctx: dict) -> dict:
    """DALI on the GPU with the dtype and threads training uses (the machine default, no --workers),
    beside the ImageFolder baseline; a backend that fails comes back as {"error": ...} and is recorded."""
    mode: Mode = ctx["mode"]
    warm, secs = mode.bench
    cmd = [sys.executable, "-m", "loaders.bench", "--shards", ctx["data"], "--backend", "dali", "--device", mode.device,
           "--batch-size", str(mode.batch_size), "--dtype", FEED_DTYPE[mode.amp], "--image-size", str(mode.image_size),
           "--warmup", str(warm), "--seconds", str(secs), "--json"]  # fmt: skip
    if ctx["dry_run"]:
        cmd.append("--no-baseline")  # the baseline is torchvision's, not the kit's; keeps the dry run short
    doc = checked(cmd, Path(ctx["output"]) / "loader.log", mode.limit)
    return {"command": " ".join(cmd[2:]), "results": {r["backend"]: r for r in doc.get("results", [])}}


def eval_path(ctx: dict) -> dict:
    mode: Mode = ctx["mode"]
    cmd = [sys.executable, str(REPO / "scripts" / "eval_throughput.py"), "--data", ctx["data"], *feed(mode),
           "--backend", "dali", "--device", mode.device, "--images", str(mode.eval_images), "--json"]  # fmt: skip
    return {"command": " ".join(cmd[2:]), **checked(cmd, Path(ctx["output"]) / "eval.log", mode.limit)}


def throughput(ctx: dict, compile: bool = False) -> dict:
    mode: Mode = ctx["mode"]
    warm, steps = mode.steps
    cmd = [sys.executable, "-m", "train.throughput", "--data", ctx["data"], *feed(mode), "--backend", "dali",
           "--device", mode.device, "--warmup", str(warm), "--steps", str(steps), "--json"]  # fmt: skip
    if compile:
        cmd.insert(-1, "--compile")
    log = Path(ctx["output"]) / ("compile.log" if compile else "throughput.log")
    return {"command": " ".join(cmd[2:]), **checked(cmd, log, mode.limit * (2 if compile else 1))}


def compiled(ctx: dict) -> dict:
    return throughput(ctx, compile=True)


def ddp(ctx: dict) -> dict:
    """python -m train under torchrun on 2 GPUs, 2 epochs: the second epoch's figures (the first holds
    cudnn's autotuning and the first pipeline builds)."""
    gpus = ctx["env"].get("gpus", 0)
    if gpus < 2:
        raise StageSkipped(f"needs 2 GPUs, this machine has {gpus}")
    mode: Mode = ctx["mode"]
    out = Path(ctx["output"]) / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           "--shards", ctx["data"], *feed(mode), "--backend", "dali", "--epochs", "2", "--warmup-epochs", "0",
           "--progress", "never", "--no-auto-resume", "--output", str(out)]  # fmt: skip
    p = run_logged(cmd, Path(ctx["output"]) / "ddp.log", mode.limit)
    if p.returncode != 0:
        raise StageFailed(f"torchrun -m train exited {p.returncode}: {tail(p.stderr)} (log: {out.parent / 'ddp.log'})")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    last = lines[-1]
    return {"command": " ".join(cmd[2:]), "processes": 2, "images_per_sec": last["images_per_sec"],
            "data_wait": last["data_wait"], "epoch_seconds": last["epoch_seconds"]}  # fmt: skip


# (name, function, runs in a dry run, needs the data stage)
STAGES = [
    ("imports", imports, True, False),
    ("data", build_data, True, False),
    ("tests", gpu_tests, True, False),
    ("loader", loader_bench, True, True),
    ("eval", eval_path, True, True),
    ("throughput", throughput, True, True),
    ("compile", compiled, False, True),  # inductor on CPU takes minutes: a GPU-only figure
    ("ddp", ddp, False, True),
]


# -- the figures ------------------------------------------------------------------------------------------
def _number(d: dict, key: str) -> float | None:
    v = d.get(key) if isinstance(d, dict) else None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def loader_figures(stage: dict) -> dict:
    out = {}
    results = stage.get("results") or {}
    dali = results.get("dali") or {}
    for key, name in [("images_per_sec", "dali_train_images_per_sec"), ("threads", "dali_threads"),
                      ("pipeline_builds", "dali_pipeline_builds"), ("pipeline_build_seconds", "dali_pipeline_build_seconds"),
                      ("build_share", "dali_build_share")]:  # fmt: skip
        if _number(dali, key) is not None:
            out[name] = dali[key]
    base = _number(results.get("imagefolder") or {}, "images_per_sec")
    if base is not None:
        out["imagefolder_images_per_sec"] = base
    gpu = stage.get("gpu") or {}  # NVML, sampled while the bench ran (absent in a dry run)
    jpg = gpu.get("jpeg_engine_peak_percent")
    if jpg is not None:
        out["nvjpeg_hardware_decoder_used"] = jpg > 0  # the JPEG engine worked while DALI decoded
        out["jpeg_engine_peak_percent"] = jpg
    elif gpu:
        out["nvjpeg_hardware_decoder_used"] = (
            gpu.get("jpeg_engine") or f"unknown: {gpu.get('nvml', 'NVML gave no JPEG load')}"
        )
    return out


def throughput_figures(stage: dict, prefix: str) -> dict:
    out = {}
    real, fake = stage.get("real") or {}, stage.get("synthetic") or {}
    for src, key, name in [(real, "images_per_sec", "images_per_sec"), (fake, "images_per_sec", "synthetic_images_per_sec"),
                           (real, "data_wait", "data_wait"), (stage, "real_vs_synthetic", "real_vs_synthetic")]:  # fmt: skip
        if _number(src, key) is not None:
            out[f"{prefix}_{name}"] = src[key]
    peaks = [p for p in (_number(real, "peak_gpu_memory_gib"), _number(fake, "peak_gpu_memory_gib")) if p is not None]
    if peaks:
        out[f"{prefix}_peak_gpu_memory_gib"] = max(peaks)
    return out


def figures(stages: dict) -> dict:
    """The headline numbers from what the stages measured; absent where a stage did not measure
    them (failed, skipped, or a backend that reported {"error": ...})."""
    out = loader_figures(stages.get("loader") or {})
    if _number(stages.get("eval") or {}, "images_per_sec") is not None:
        out["eval_images_per_sec"] = stages["eval"]["images_per_sec"]
    out.update(throughput_figures(stages.get("throughput") or {}, "train"))
    out.update(throughput_figures(stages.get("compile") or {}, "train_compiled"))
    for key in ("images_per_sec", "data_wait"):
        if _number(stages.get("ddp") or {}, key) is not None:
            out[f"ddp_2proc_{key}"] = stages["ddp"][key]
    nvml = [_number(s.get("gpu") or {}, "gpu_memory_peak_gib") for s in stages.values() if isinstance(s, dict)]
    if any(v is not None for v in nvml):
        out["gpu_memory_peak_gib"] = max(v for v in nvml if v is not None)
    return out


def pinned_torch() -> str | None:
    """The torch requirement in pyproject.toml, read as text (tomllib needs Python 3.11)."""
    m = re.search(r'"(torch\s*[=<>~!][^"]*)"', (REPO / "pyproject.toml").read_text())
    return m.group(1) if m else None
