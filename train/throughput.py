"""`python -m train.throughput`: training steps per second from real data against synthetic data.

The same model, recipe and trainer step as `python -m train` (train.engine.Trainer: autocast,
channels-last, the optimizer, the non-finite guard), fed first by make_loader (DALI decoding
on the GPU where there is one) and then by one batch made once on the device: the gap is what
the data path costs. Each run warms up (cudnn autotuning, the first pipeline build) before it
measures; both read their figures from the trainer's own EpochState (seen, seconds, wait).
Used by `make gpu-check` (scripts/gpu_check.py) and tests/test_gpu.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable, Iterator

import torch

from train import distributed
from train.engine import EpochState, Trainer, resolve_amp
from train.models import build_model
from train.recipe import WarmupCosine, make_loss, make_optimizer


class Steps:
    """A loader-like view of the next n batches of a shared iterator (len() is what the trainer needs)."""

    def __init__(self, it: Iterator, n: int) -> None:
        self.it, self.n = it, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator:
        return itertools.islice(self.it, self.n)


def forever(loader) -> Iterator:
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def synthetic(batch_size: int, image_size: int, num_classes: int, device: torch.device, dtype: torch.dtype) -> Iterator:
    """One normalized-looking batch on the device, handed over again and again: no reading, no decoding."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=g).to(device, dtype)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
    return itertools.repeat((images, labels))


def measure(
    batches: Iterable,
    *,
    arch: str,
    num_classes: int,
    image_size: int,
    steps: int,
    warmup: int,
    amp: str,
    channels_last: bool,
    device: torch.device,
    compile: bool = False,
) -> dict:
    """Train `warmup` steps, then `steps` measured ones; images/s, the share of time waiting for
    data and (GPU) the peak memory torch allocated. compile: as python -m train --compile (the
    warm-up steps then include the compilation)."""
    torch.backends.cudnn.benchmark = True
    model = build_model(arch, num_classes, stem="standard", image_size=image_size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt)
    optimizer = make_optimizer(model, "sgd", 0.1, 1e-4)
    dist = distributed.Dist(device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(
        model=distributed.wrap_model(model, dist, compile=compile)[0],
        optimizer=optimizer,
        schedule=WarmupCosine(0.1, steps + warmup, 0),
        criterion=make_loss(0.1),
        dist=dist,
        amp=amp,
        accum_steps=1,
        channels_last=channels_last,
    )
    it = iter(batches)
    never = lambda: False  # noqa: E731
    trainer.train_epoch(Steps(it, warmup), EpochState(), want_checkpoint=never, save_checkpoint=lambda: None)
    state = EpochState()
    trainer.train_epoch(Steps(it, steps), state, want_checkpoint=never, save_checkpoint=lambda: None)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "arch": arch,
        "amp": amp,
        "channels_last": channels_last,
        "compile": compile,
        "peak_gpu_memory_gib": peak,
        "steps": steps,
        "images": state.seen,
        "seconds": state.seconds,
        "images_per_sec": state.seen / max(state.seconds, 1e-9),
        "data_wait": state.wait_seconds / max(state.seconds, 1e-9),
        "train_loss": state.loss_sum / max(state.seen, 1),
    }


def run(args: argparse.Namespace) -> dict:
    from loaders import make_loader

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = resolve_amp(args.amp, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)
    loader = make_loader(
        args.data,
        batch_size=args.batch_size,
        train=True,
        backend=args.backend,
        device=str(device),
        image_size=args.image_size,
        dtype=dtype,
        channels_last=args.channels_last,
        split="train",
    )
    common = dict(
        arch=args.arch,
        num_classes=loader.num_classes or 1000,
        image_size=args.image_size,
        steps=args.steps,
        warmup=args.warmup,
        amp=amp,
        channels_last=args.channels_last,
        device=device,
        compile=args.compile,
    )
    try:
        real = measure(forever(loader), **common)
    finally:
        loader.close()  # its DALI pipelines go while CUDA is up, not at interpreter teardown
    real["loader"] = loader.backend_name
    fake = measure(synthetic(args.batch_size, args.image_size, common["num_classes"], device, dtype), **common)
    fake["loader"] = "synthetic"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "real": real,
        "synthetic": fake,
        "real_vs_synthetic": real["images_per_sec"] / max(fake["images_per_sec"], 1e-9),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with manifest.json (its train split is read)")
    p.add_argument("--arch", default="resnet50", help="torchvision model name or package.module:Class")
    p.add_argument("--batch-size", type=int, default=256, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="side of the training crop in pixels")
    p.add_argument("--steps", type=int, default=30, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps before measuring (cudnn autotuning, first build)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model, as python -m train --compile")
    add_run_options(p)
    return p.parse_args(argv)


def add_run_options(p: argparse.ArgumentParser) -> None:
    """The options every model-throughput measurement takes (this one, the GPU kit's eval path)."""
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="as python -m train")
    p.add_argument("--channels-last", action="store_true", help="channels-last model and images")
    p.add_argument("--backend", default="auto", choices=["auto", "dali", "pytorch"], help="loader backend")
    p.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    p.add_argument("--json", action="store_true", help="print one JSON line with the result")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result = run(args)
    r, s = result["real"], result["synthetic"]
    print(
        f"{args.arch} on {result['device']}, batch {args.batch_size}, {args.image_size} px, amp {r['amp']}: "
        f"{r['loader']} {r['images_per_sec']:.0f} img/s (data wait {100 * r['data_wait']:.1f}%), "
        f"synthetic {s['images_per_sec']:.0f} img/s",
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
