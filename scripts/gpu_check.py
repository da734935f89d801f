"""`make gpu-check`: prove or disprove the GPU path in one command, and measure it.

    python3 scripts/gpu_check.py [--quick] [--dry-run] [--photos DIR] [--copies N] [--skip STAGE,...]
                                 [--output runs/gpu-check]

Its only precondition is a GPU machine with its own PyTorch (CUDA), torchvision, and the
few wheels listed in the README's GPU section (DALI, webdataset, braceexpand): no pip
install of the project, no dev extras, no ../shared. It runs from a plain checkout (the
checkout's root goes on sys.path and on every child's PYTHONPATH), on the torch the machine
has, and says which; it never installs or reinstalls anything.

Stages, in order (scripts/gpu_stages.py), each with a time limit. A failed stage is recorded
and the run goes on; only the stages that need the benchmark set are skipped when it failed:

    imports      every module the stages import, with versions (DALI must be 2.x)
    data         a benchmark set built by the project's writer from real photos (the bundled
                 tests/data/photos, or the shared imagenet-sample when present), each repeated
                 until the set holds enough images that a DALI GPU epoch lasts seconds and its
                 pipeline build is a small share of it; kept for the next run
    tests        pytest -m gpu tests/test_gpu.py (--quick leaves out those also marked slow)
    loader       python -m loaders.bench: DALI on the GPU at 224, batch 256, in the dtype and
                 with the threads training uses, beside the ImageFolder baseline; pipeline
                 builds and their seconds; NVML's JPEG engine load: nvJPEG's hardware decoder used or not
    eval         scripts/eval_throughput.py: the evaluation path's images/s
    throughput   python -m train.throughput: ResNet-50 bf16 channels-last from DALI against
                 synthetic data, data wait, peak GPU memory
    compile      the same with --compile
    ddp          python -m train under torchrun on 2 GPUs (skipped, not failed, with one)

--dry-run: on a machine without a GPU (or with one), every stage that can run on CPU, small
and short (a tiny model, the DALI CPU backend): proves the kit, measures nothing worth keeping.

Everything goes to OUTPUT/result.json (rewritten after every stage) and a table at the end.
Exit status: 0 when every stage passed (or was skipped for want of a second GPU), 1 when one
failed, 2 without a GPU (and no --dry-run), within seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

# A plain checkout: Python put scripts/ on sys.path, not the project root.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import gpu_stages as st  # noqa: E402
from gpu_nvml import Sampler  # noqa: E402

# Targets on one H100/H200: figures to compare against, never asserted by a test.
TARGETS = {"dali_train_images_per_sec": 10_000, "dali_build_share": 0.05, "train_images_per_sec": 3_000,
           "train_data_wait": 0.05}  # fmt: skip
SHARES = ("data_wait", "build_share")  # figures shown as percentages, lower is better


def environment() -> dict:
    import torch

    info = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_pin": st.pinned_torch(),
        "cuda_available": torch.cuda.is_available(),
        "cpus": len(os.sched_getaffinity(0)),
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    pin = info["torch_pin"] or ""
    same = pin.split("==")[-1] == torch.__version__.split("+")[0]
    info["torch_note"] = f"torch {torch.__version__} (CUDA {torch.version.cuda}) from this machine" + (
        "" if same else f"; the project pins {pin}: not reinstalled, this run uses the machine's"
    )
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    bf16_native=torch.cuda.is_bf16_supported(including_emulation=False), driver=driver())  # fmt: skip
    return info


def driver() -> str | None:
    try:
        q = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        smi = subprocess.run(q, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None


def run_stage(name: str, stage, ctx: dict) -> dict:
    """One stage's record: ok with what it measured, failed with why, or skipped with why; never raises."""
    t = time.monotonic()
    sampler = Sampler() if not ctx["dry_run"] else None
    try:
        if sampler is None:
            rec = {"status": "ok", **stage(ctx)}
        else:
            with sampler:
                rec = {"status": "ok", **stage(ctx)}
            rec["gpu"] = sampler.figures()
    except st.StageSkipped as e:
        rec = {"status": "skipped", "reason": str(e)}
    except Exception as e:  # a stage's failure is a result: record it and go on
        msg = str(e) if isinstance(e, st.StageFailed) else f"{type(e).__name__}: {e}"
        rec = {"status": "failed", "error": msg, **ctx.pop("partial", {})}
    rec["seconds"] = round(time.monotonic() - t, 2)
    return rec


def run_stages(result: dict, ctx: dict, path: Path) -> None:
    for name, stage, on_cpu, needs_data in st.STAGES:
        if ctx["dry_run"] and not on_cpu:
            result["not_in_dry_run"].append(name)
            continue
        if name in ctx.get("skip", ()):
            result["stages"][name] = {"status": "skipped", "reason": "--skip"}
            continue
        if needs_data and "data" not in ctx:
            result["stages"][name] = {"status": "skipped", "reason": "needs the benchmark set (the data stage failed)"}
            continue
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        rec = run_stage(name, stage, ctx)
        result["stages"][name] = rec
        if rec["status"] != "ok":
            print(
                f"gpu-check: {name} {rec['status'].upper()}: {rec.get('error') or rec.get('reason')}", file=sys.stderr
            )
        result["figures"] = st.figures(result["stages"])
        write(result, path)


def write(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def stage_detail(name: str, s: dict) -> str:
    """One line per stage for the table; only keys that are there (a failed stage has few)."""
    if s.get("status") != "ok":
        return str(s.get("error") or s.get("reason") or "")
    if name == "imports":
        return ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items() if k in ("torch", "nvidia.dali"))
    if name == "data":
        return f"{s.get('images')} images ({s.get('copies')} x each photo in {s.get('photos')})"
    if name == "tests":
        reasons = sorted({t.split(": ", 1)[-1] for t in s.get("skipped_tests", [])})
        return f"{s.get('passed')} passed, {s.get('failed')} failed, {s.get('skipped')} skipped" + (
            f" ({'; '.join(reasons)[:120]})" if reasons else ""
        )
    if name == "loader":
        return ", ".join(
            f"{k} {v['error']}" if "error" in v else f"{k} {v.get('images_per_sec', 0):.0f} img/s"
            for k, v in (s.get("results") or {}).items()
        )
    if "images_per_sec" in s:
        return f"{s['images_per_sec']:.0f} img/s"
    if "real_vs_synthetic" in s:
        return f"real/synthetic {s['real_vs_synthetic']:.2f}"
    return ""


def shown(key: str, v) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if key.endswith(SHARES):
        return f"{100 * v:.1f}%"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.2f}"


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=160)
    title = f"gpu-check ({result['mode']}): {result['environment'].get('torch_note', '')}"
    stages = Table(title=title)
    for col in ("stage", "status", "seconds", "detail"):
        stages.add_column(col)
    for name, s in result["stages"].items():
        stages.add_row(name, s["status"], f"{s.get('seconds', 0):.0f}", stage_detail(name, s))
    console.print(stages)
    figs = Table(title="figures" + (" (dry run: a tiny model on CPU, not GPU figures)" if result["dry_run"] else
                                    " (targets on one H100/H200)"))  # fmt: skip
    for col in ("figure", "measured", "target"):
        figs.add_column(col)
    for k, v in result["figures"].items():
        target = None if result["dry_run"] else TARGETS.get(k)
        want = "" if target is None else (f"< {100 * target:.0f}%" if k.endswith(SHARES) else f">= {target:,}")
        figs.add_row(k, shown(k, v), want)
    console.print(figs)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python3 scripts/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="a few minutes: a smaller set, no slow tests, shorter runs")
    ap.add_argument("--dry-run", action="store_true",
                    help="every stage that can run on CPU, tiny and short, on CPU even where there is a GPU")  # fmt: skip
    ap.add_argument("--photos", help="folder of real photos named n<wnid>_*.JPEG "
                    "(default: the shared imagenet-sample where present, else the bundled tests/data/photos)")  # fmt: skip
    ap.add_argument("--copies", type=int, default=None,
                    help="times each photo is repeated in the benchmark set (default: enough for the mode's set size)")  # fmt: skip
    ap.add_argument("--output", default=str(st.REPO / "runs" / "gpu-check"), help="where result.json, logs and data go")
    ap.add_argument("--keep-going", action="store_true",
                    help="accepted for older command lines: the kit always goes on after a failed stage")  # fmt: skip
    ap.add_argument("--skip", default="", metavar="STAGE,...",
                    help="stages not to run, e.g. compile,tests: recorded as skipped (a short GPU lease)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.copies is not None and args.copies < 1:
        ap.error(f"--copies {args.copies}: give a whole number of at least 1")
    args.skip = [x.strip() for x in args.skip.split(",") if x.strip()]
    unknown = sorted(set(args.skip) - {name for name, *_ in st.STAGES})
    if unknown:
        ap.error(f"--skip {','.join(unknown)}: no such stage; the stages: {', '.join(n for n, *_ in st.STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.dry_run:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, for the kit and every child, even where a GPU is
    mode = "dry-run" if args.dry_run else "quick" if args.quick else "full"
    out = Path(args.output)
    path = out / "result.json"
    t0 = time.monotonic()
    result = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "mode": mode,
              "dry_run": args.dry_run, "ok": False, "failed_stages": [], "environment": {}, "stages": {},
              "not_in_dry_run": [], "figures": {}, "targets": TARGETS}  # fmt: skip
    env = environment()
    result["environment"] = env
    print(env["torch_note"], file=sys.stderr)
    if not env["cuda_available"] and not args.dry_run:
        result["failed_stages"] = ["environment"]
        result["error"] = "no GPU: torch.cuda.is_available() is False"
        write(result, path)
        print(f"gpu-check: no GPU here (torch {env['torch']} sees no CUDA device); nothing was run "
              f"(--dry-run runs the kit on CPU). Wrote {path}", file=sys.stderr)  # fmt: skip
        return 2
    ctx = {"args": args, "mode": st.MODES[mode], "env": env, "output": str(out), "dry_run": args.dry_run,
           "skip": args.skip}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    run_stages(result, ctx, path)
    result["failed_stages"] = [n for n, s in result["stages"].items() if s["status"] == "failed"]
    result["ok"] = not result["failed_stages"]
    result["seconds"] = round(time.monotonic() - t0, 1)
    write(result, path)
    print_table(result)
    verdict = "all stages passed" if result["ok"] else "FAILED: " + ", ".join(result["failed_stages"])
    print(f"gpu-check: {verdict} in {result['seconds']:.0f} s; wrote {path}", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
