"""Look at a batch as the trainer gets it: `python -m loaders.show SPEC [--train] --output FILE.png`.

The first batch of epoch 0 on rank 0, from the real make_loader (same backend, crops, flips and
normalization as training), turned back into pixels with the loader's own mean/std and drawn
with the grid that `python -m shards show` and the trainer's TensorBoard image use
(shards/grid.py). Each cell is captioned with its label, class name and sample key; padding
rows of an evaluation batch are marked.
"""

from __future__ import annotations

import argparse
import sys

import torch

from loaders.api import Loader, make_loader
from loaders.augment import AUTO_AUGMENT
from loaders.common import DecodeError
from loaders.pixels import batch_grid
from shards.redact import redact_text

MIN_CELL = 128  # small crops (CIFAR's 32 px) are enlarged to this, so they and their captions can be read


def first_batch(loader: Loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(images, labels, valid, keys) of the loader's first batch of its current epoch."""
    images, labels, valid = next(iter(loader.with_valid()))
    plan = loader.plan()
    rows = zip(plan.shard[: len(labels)].tolist(), plan.sample[: len(labels)].tolist(), strict=True)
    keys = [loader.shards[s].key(i) for s, i in rows]
    return images, labels, valid, keys


def captions_for(labels: torch.Tensor, keys: list[str], classes: list[dict] | None) -> list[str]:
    names = [c["name"] for c in classes] if classes else None
    return [
        (f"{names[label]} ({label})" if names and 0 <= label < len(names) else f"label {label}") + f"\n{key}"
        for label, key in zip(labels.tolist(), keys, strict=True)
    ]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loaders.show",
        description="Draw the first batch a trainer would get from SPEC (denormalized) into a PNG grid.",
    )
    p.add_argument(
        "spec", nargs="+", metavar="SPEC", help="shards: brace pattern, paths, folder with manifest.json, or s3:// URLs"
    )
    p.add_argument(
        "--train",
        action="store_true",
        help="training batch (random-resized-crop + flip); default: evaluation transform",
    )
    p.add_argument("--count", type=int, default=32, metavar="N", help="batch size, i.e. images shown (default: 32)")
    p.add_argument(
        "--split", default=None, help="split of a folder-with-manifest SPEC (default: train with --train, else val)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=224,
        metavar="PX",
        help="crop side, as the trainer's --image-size (default: 224)",
    )
    p.add_argument(
        "--backend", choices=["auto", "dali", "pytorch"], default="auto", help="loader backend (default: auto)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="order and augmentation seed, as the trainer's --seed (default: 0)"
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="loader workers (default: 1)")
    p.add_argument(
        "--auto-augment",
        choices=list(AUTO_AUGMENT),
        default="none",
        help="with --train: RandAugment or TrivialAugment, as the trainer's --auto-augment (default: none)",
    )
    p.add_argument(
        "--random-erasing",
        type=float,
        default=0.0,
        metavar="P",
        help="with --train: probability of an erased rectangle, as the trainer's --random-erasing (default: 0)",
    )
    p.add_argument("--columns", type=int, default=8, metavar="N", help="cells per grid row (default: 8)")
    p.add_argument(
        "--cell",
        type=int,
        default=None,
        metavar="PX",
        help=f"cell side; smaller crops are enlarged pixel for pixel (default: the crop size, at least {MIN_CELL})",
    )
    p.add_argument("--output", required=True, metavar="FILE.png", help="PNG file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.count < 1 or args.columns < 1:
        print("error: --count and --columns must be at least 1", file=sys.stderr)
        return 2
    if not args.train and (args.auto_augment != "none" or args.random_erasing > 0):
        print("error: --auto-augment and --random-erasing are training augmentations: add --train", file=sys.stderr)
        return 2
    spec = args.spec if len(args.spec) > 1 else args.spec[0]
    try:
        loader = make_loader(
            spec,
            batch_size=args.count,
            train=args.train,
            backend=args.backend,
            seed=args.seed,
            workers=args.workers,
            image_size=args.image_size,
            split=args.split,
            options=dict(auto_augment=args.auto_augment, random_erasing=args.random_erasing) if args.train else None,
        )
        images, labels, valid, keys = first_batch(loader)
    except (ValueError, OSError, ImportError, DecodeError) as e:
        print(f"error: {redact_text(str(e), *args.spec)}", file=sys.stderr)
        return 2
    captions = captions_for(labels, keys, loader.classes)
    padding = (~valid).tolist()
    captions = [c + ("\npadding" if pad else "") for c, pad in zip(captions, padding, strict=True)]
    cell = args.cell or max(args.image_size, MIN_CELL)
    batch_grid(images, captions, padding, columns=args.columns, cell=cell).save(args.output, format="PNG")
    print(
        f"wrote {args.output}: {'training' if args.train else 'evaluation'} batch of {len(labels)} at "
        f"{args.image_size} px from the {loader.backend_name} backend"
    )
    loader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
