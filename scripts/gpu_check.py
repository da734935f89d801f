"""`make gpu-check`: prove or disprove the GPU path in one command, and measure it (issue 13).

    python scripts/gpu_check.py [--quick] [--photos DIR] [--output runs/gpu-check] [--keep-going]

Its only precondition is a plain GPU machine: a CUDA driver, a PyTorch with CUDA, the project
installed. It runs on the torch the machine has and says which; it never installs or
reinstalls torch (a GPU image often ships its own build, newer or older than the pin).

Stages, in order (each with a time limit; the first that fails stops the run, unless
--keep-going, and everything measured so far is still written):

    environment   torch, CUDA, GPU, DALI, driver; the project's torch pin against the torch used
    data          a benchmark set built by the project's writer from real photos at full size,
                  each repeated (loaders/bench_data.py), kept for the next run
    tests         pytest -m gpu (tests/test_gpu.py; --quick leaves out those also marked slow)
    loader        python -m loaders.bench on the GPU: DALI train at 224, batch 256, fp16, beside
                  the ImageFolder baseline with one worker per core, in the same run
    throughput    python -m train.throughput: ResNet-50 bf16 channels-last from DALI on the GPU,
                  then from synthetic data on the GPU

Everything goes to OUTPUT/result.json (rewritten after every stage) and a table at the end.
Without a GPU it says so and exits 2 within seconds. Exit status: 0 when every stage passed,
1 when one failed, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PHOTO_DIRS = [
    REPO / "shared" / "data" / "imagenet-sample",
    REPO.parent / "shared" / "data" / "imagenet-sample",
    Path("/work/shared/data/imagenet-sample"),
    REPO / "tests" / "data" / "photos",
]
# Issue 13's targets on one H100/H200: figures to compare against, never asserted by a test.
TARGETS = {"dali_train_images_per_sec": 10_000, "resnet50_images_per_sec": 3_000, "resnet50_data_wait": 0.05}


class StageFailed(RuntimeError):
    """A stage did not pass; the message says why in one line."""


# Per mode: times each photo is repeated (100 photos: 4,000 / 12,000 images), pytest marker
# expression, loader bench seconds (warm-up, measured), ResNet-50 steps (warm-up, measured).
MODES = {
    "quick": dict(copies=40, marker="gpu and not slow", bench=(3, 6), steps=(3, 10), limits=(300, 120, 120)),
    "full": dict(copies=120, marker="gpu", bench=(5, 15), steps=(10, 35), limits=(420, 240, 180)),
}


def pinned_torch() -> str | None:
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next((d for d in deps if re.match(r"torch\b(?!vision)", d)), None)


def environment(_: dict) -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_pin": pinned_torch(),
        "cuda_available": torch.cuda.is_available(),
        "cpus": len(os.sched_getaffinity(0)),
    }
    pin = info["torch_pin"] or ""
    same = pin.split("==")[-1] == torch.__version__.split("+")[0]
    info["torch_note"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) from this machine" + (
        "" if same else f"; the project pins {pin}: not reinstalled, this run uses the machine's"
    )
    if not info["cuda_available"]:
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        gpus=torch.cuda.device_count(),
        gpu=props.name,
        capability=f"{props.major}.{props.minor}",
        gpu_memory_gib=round(props.total_memory / 2**30, 1),
        bf16_native=torch.cuda.is_bf16_supported(including_emulation=False),
    )
    try:
        import nvidia.dali

        info["dali"] = nvidia.dali.__version__
    except ImportError as e:
        info["dali"] = f"not importable: {e}"
    try:
        q = "--query-gpu=driver_version"
        smi = subprocess.run(["nvidia-smi", q, "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


def find_photos(given: str | None) -> Path:
    for p in [Path(given)] if given else PHOTO_DIRS:
        if p.is_dir() and any(f.suffix.lower() in (".jpeg", ".jpg") for f in p.iterdir()):
            return p
    raise StageFailed(f"no photos in {given or ', '.join(map(str, PHOTO_DIRS))}: give --photos DIR (n<wnid>_*.JPEG)")


def build_data(ctx: dict) -> dict:
    from loaders.bench_data import build_bench_shards
    from loaders.spec import open_shards

    photos = find_photos(ctx["args"].photos)
    copies = ctx["mode"]["copies"]
    out = Path(ctx["output"]) / f"data-{photos.name}-x{copies}"
    reused = (out / "manifest.json").exists()
    if not reused:
        build_bench_shards(str(photos), str(out), copies, shard_samples=512, workers=ctx["env"]["cpus"])
    shards, _ = open_shards(str(out), split="train")
    ctx["data"] = str(out)
    size = sum(os.path.getsize(s.url) for s in shards)
    return {"photos": str(photos), "path": str(out), "images": sum(s.samples for s in shards), "bytes": size,
            "reused": reused}  # fmt: skip


def run_logged(cmd: list[str], log: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command, its output also in `log`; a timeout is a failed stage, not a hang."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text(f"$ {' '.join(cmd)}\n(timed out after {timeout:.0f} s)\n{e.stdout or ''}{e.stderr or ''}")
        raise StageFailed(f"timed out after {timeout:.0f} s (log: {log})") from None
    log.write_text(f"$ {' '.join(cmd)}\n{p.stdout}\n{p.stderr}")
    return p


def gpu_tests(ctx: dict) -> dict:
    out = Path(ctx["output"])
    junit = out / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", ctx["mode"]["marker"],
           f"--junitxml={junit}", "tests/test_gpu.py"]  # fmt: skip
    p = run_logged(cmd, out / "tests.log", ctx["mode"]["limits"][0])
    result = {"command": " ".join(cmd[2:]), "log": str(out / "tests.log"), **junit_counts(junit)}
    if p.returncode != 0:
        failed = ", ".join(result.get("failed_tests", [])[:6]) or p.stdout.strip().splitlines()[-1:]
        ctx["partial"] = result
        raise StageFailed(f"pytest exited {p.returncode}: {failed} (log: {out / 'tests.log'})")
    return result


def junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": [], "skipped_tests": []}
    for c in cases:
        name = c.get("name", "?")
        if c.find("failure") is not None or c.find("error") is not None:
            counts["failed"] += 1
            counts["failed_tests"].append(name)
        elif c.find("skipped") is not None:
            counts["skipped"] += 1
            counts["skipped_tests"].append(f"{name}: {c.find('skipped').get('message', '')}")
        else:
            counts["passed"] += 1
    return counts


def last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise StageFailed("no JSON result line in the output")


def loader_bench(ctx: dict) -> dict:
    warm, secs = ctx["mode"]["bench"]
    cores = ctx["env"]["cpus"]
    cmd = [sys.executable, "-m", "loaders.bench", "--shards", ctx["data"], "--backend", "dali", "--device", "cuda",
           "--batch-size", "256", "--dtype", "float16", "--image-size", "224", "--workers", str(cores),
           "--warmup", str(warm), "--seconds", str(secs), "--json"]  # fmt: skip
    log = Path(ctx["output"]) / "loader.log"
    p = run_logged(cmd, log, ctx["mode"]["limits"][1])
    if p.returncode != 0:
        raise StageFailed(f"loaders.bench exited {p.returncode}: {tail(p.stderr)} (log: {log})")
    results = {r["backend"]: r for r in last_json(p.stdout)["results"]}
    return {"command": " ".join(cmd[2:]), "workers": cores, "results": results}


def throughput(ctx: dict) -> dict:
    warm, steps = ctx["mode"]["steps"]
    cmd = [sys.executable, "-m", "train.throughput", "--data", ctx["data"], "--arch", "resnet50", "--batch-size",
           "256", "--image-size", "224", "--amp", "bf16", "--channels-last", "--backend", "dali",
           "--warmup", str(warm), "--steps", str(steps), "--json"]  # fmt: skip
    log = Path(ctx["output"]) / "throughput.log"
    p = run_logged(cmd, log, ctx["mode"]["limits"][2])
    if p.returncode != 0:
        raise StageFailed(f"train.throughput exited {p.returncode}: {tail(p.stderr)} (log: {log})")
    return {"command": " ".join(cmd[2:]), **last_json(p.stdout)}


def tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


STAGES: list[tuple[str, Callable[[dict], dict]]] = [
    ("data", build_data),
    ("tests", gpu_tests),
    ("loader", loader_bench),
    ("throughput", throughput),
]


def figures(stages: dict) -> dict:
    """The headline numbers, from what the stages measured (absent when a stage did not run)."""
    out = {}
    loader = stages.get("loader", {}).get("results", {})
    if "dali" in loader:
        out["dali_train_images_per_sec"] = loader["dali"]["images_per_sec"]
    if "imagefolder" in loader:
        out["imagefolder_images_per_sec"] = loader["imagefolder"]["images_per_sec"]
    tp = stages.get("throughput", {})
    if "real" in tp:
        out["resnet50_images_per_sec"] = tp["real"]["images_per_sec"]
        out["resnet50_data_wait"] = tp["real"]["data_wait"]
        out["resnet50_synthetic_images_per_sec"] = tp["synthetic"]["images_per_sec"]
    return out


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def stage_detail(name: str, s: dict) -> str:
    if name == "data":
        return f"{s.get('images')} images from {s.get('photos')}"
    if name == "tests":
        return f"{s.get('passed')} passed, {s.get('failed')} failed, {s.get('skipped')} skipped"
    if name == "loader":
        return ", ".join(f"{k} {v['images_per_sec']:.0f} img/s" for k, v in s["results"].items())
    if name == "throughput":
        return f"real/synthetic {s['real_vs_synthetic']:.2f}"
    return ""


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    stages = Table(title=f"gpu-check ({result['mode']}): {result['environment'].get('torch_note', '')}")
    for col in ("stage", "status", "seconds", "detail"):
        stages.add_column(col)
    for name, s in result["stages"].items():
        detail = s.get("error") or stage_detail(name, s)
        stages.add_row(name, s["status"], f"{s.get('seconds', 0):.0f}", detail)
    console.print(stages)
    figs = Table(title="figures (targets on one H100/H200)")
    for col in ("figure", "measured", "target"):
        figs.add_column(col)
    for k, v in result["figures"].items():
        target = TARGETS.get(k)
        shown = f"{100 * v:.1f}%" if k.endswith("wait") else f"{v:,.0f}"
        want = "" if target is None else (f"< {100 * target:.0f}%" if k.endswith("wait") else f">= {target:,}")
        figs.add_row(k, shown, want)
    console.print(figs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 3 minutes: a smaller set, no slow tests, short runs")
    ap.add_argument("--photos", help="folder of real photos named n<wnid>_*.JPEG (default: the shared imagenet-sample)")
    ap.add_argument("--output", default=str(REPO / "runs" / "gpu-check"), help="where result.json, logs and data go")
    ap.add_argument("--keep-going", action="store_true", help="run the later stages even after one fails")
    args = ap.parse_args(argv)
    mode = "quick" if args.quick else "full"
    out = Path(args.output)
    path = out / "result.json"
    t0 = time.monotonic()
    result = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode, "ok": False,
              "failed_stage": None, "environment": {}, "stages": {}, "figures": {}, "targets": TARGETS}  # fmt: skip
    env = environment({})
    result["environment"] = env
    print(env["torch_note"], file=sys.stderr)
    if not env["cuda_available"]:
        result["failed_stage"] = "environment"
        result["error"] = "no GPU: torch.cuda.is_available() is False"
        write(result, path)
        print(f"gpu-check: no GPU here (torch {env['torch']} sees no CUDA device); nothing was run. Wrote {path}",
              file=sys.stderr)  # fmt: skip
        return 2
    ctx = {"args": args, "mode": MODES[mode], "env": env, "output": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    for name, stage in STAGES:
        if result["failed_stage"] and (not args.keep_going or "data" not in ctx):
            result["stages"][name] = {"status": "skipped", "error": f"after {result['failed_stage']} failed"}
            continue
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        t = time.monotonic()
        try:
            result["stages"][name] = {"status": "ok", **stage(ctx)}
        except Exception as e:  # a stage's failure is a result: record it and stop (or go on)
            msg = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
            result["stages"][name] = {"status": "failed", "error": msg, **ctx.pop("partial", {})}
            result["failed_stage"] = result["failed_stage"] or name
            print(f"gpu-check: {name} FAILED: {msg}", file=sys.stderr)
        result["stages"][name]["seconds"] = time.monotonic() - t
        result["figures"] = figures(result["stages"])
        result["seconds"] = time.monotonic() - t0
        write(result, path)
    result["ok"] = result["failed_stage"] is None
    write(result, path)
    print_table(result)
    print(f"gpu-check: {'all stages passed' if result['ok'] else 'FAILED at ' + result['failed_stage']} in "
          f"{result['seconds']:.0f} s; wrote {path}", file=sys.stderr)  # fmt: skip
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
