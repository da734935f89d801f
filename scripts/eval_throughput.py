"""`python scripts/eval_throughput.py`: images/s of the evaluation path, as python -m train evaluates.

train.engine.evaluate (inference mode, autocast, channels-last, the exact masked sums) over
the eval loader (make_loader train=False: resize + center crop; DALI keeps one pipeline for
every pass), with the kernel flags python -m train --evaluate sets. One pass warms up
(pipeline build, cudnn autotuning), then --passes passes are timed. The weights are random:
speed does not depend on them. Used by `make gpu-check` (scripts/gpu_check.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a plain checkout: the project is not installed

import torch

from loaders import make_loader
from loaders.spec import open_shards
from train.distributed import Dist
from train.engine import evaluate, resolve_amp
from train.models import build_model
from train.run import set_kernel_flags
from train.throughput import add_run_options


def first_shards(spec: str, images: int) -> list[str]:
    """The first shards of the train split holding at least `images` samples (all of them when fewer)."""
    shards, _ = open_shards(spec, split="train")
    out, n = [], 0
    for s in shards:
        out.append(s.url)
        n += s.samples
        if n >= images:
            break
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_kernel_flags(deterministic=False)
    amp = resolve_amp(args.amp, device)
    loader = make_loader(
        first_shards(args.data, args.images),
        batch_size=args.batch_size,
        train=False,
        backend=args.backend,
        device=str(device),
        image_size=args.image_size,
        channels_last=args.channels_last,
    )
    try:
        model = build_model(args.arch, loader.num_classes or 1000, stem="standard", image_size=args.image_size)
        model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        d = Dist(device=device)
        evaluate(model, loader, d, amp, args.channels_last)  # warm-up: the pipeline build, cudnn's autotuning
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        samples = sum(evaluate(model, loader, d, amp, args.channels_last)["samples"] for _ in range(args.passes))
        seconds = time.perf_counter() - t0  # evaluate() reads its sums on the host: the GPU is done
        builds = len(getattr(loader.backend, "builds", []))
    finally:
        loader.close()  # DALI's pipelines go while CUDA is up, not at interpreter teardown
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "amp": amp,
        "channels_last": args.channels_last,
        "loader": loader.backend_name,
        "images": samples,
        "seconds": seconds,
        "images_per_sec": samples / max(seconds, 1e-9),
        "pipeline_builds": builds,
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python scripts/eval_throughput.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with manifest.json (its train split is read, eval transform)")
    p.add_argument("--arch", default="resnet50", help="torchvision model name or package.module:Class")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch")
    p.add_argument("--image-size", type=int, default=224, help="side of the center crop in pixels")
    p.add_argument("--images", type=int, default=10_000, help="read the first shards holding at least this many")
    p.add_argument("--passes", type=int, default=2, help="timed passes after the warm-up pass")
    add_run_options(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    r = run(args)
    print(f"eval {r['arch']} on {r['device']}, amp {r['amp']}: {r['images_per_sec']:.0f} img/s "
          f"({r['images']} images, {r['loader']} loader, {r['pipeline_builds']} pipeline build(s))",
          file=sys.stderr)  # fmt: skip
    if args.json:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
