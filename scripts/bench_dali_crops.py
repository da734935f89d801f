"""A/B of the DALI CPU train loader: per-sample crops (loaders/dali_crops.py) vs DALI's own random crop.

    .venv/bin/python scripts/bench_dali_crops.py [--photos DIR] [--copies 3] [--batch-size 32]
        [--workers 2] [--repeats 5]

Builds --copies x the photos into shards (once, in a temporary folder), then alternates the two
graphs --repeats times each in one process (A, B, A, B, ...: a shared machine's load drifts over
minutes, alternation spreads it over both), two epochs per measurement, the first batch (pipeline
build) left out. "dali-random" swaps in DALI's own crop, what the loader used before per-sample crops:
fn.decoders.image_random_crop + fn.random.coin_flip, seeded per pipeline. Prints images/s per
repeat and the median, and CPU ms per image (all threads: what a loaded machine cannot inflate).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO)]
from bench_cli import default_photos  # noqa: E402  (scripts/ is on sys.path: the script's own folder)


def dali_random(jpegs, params, decoder):
    from nvidia.dali import fn

    images = fn.decoders.image_random_crop(
        jpegs, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10, **decoder
    )
    return images, fn.random.coin_flip(probability=0.5)


def measure(spec: str, batch_size: int, workers: int) -> tuple[float, float]:
    """(images/s wall, CPU ms per image over all the process's threads): CPU time is what load cannot inflate."""
    from loaders import make_loader

    ld = make_loader(spec, batch_size=batch_size, train=True, backend="dali", workers=workers, image_size=224)
    n, t0, c0 = 0, None, None
    for epoch in range(2):
        ld.set_epoch(epoch)
        for images, _ in ld:
            if t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
                continue
            n += images.shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ld.close()
    return n / wall, 1000 * cpu / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", default=str(default_photos()), help="folder of JPEG photos to build shards from")
    ap.add_argument("--copies", type=int, default=3, help="times each photo is repeated in the shards")
    ap.add_argument("--batch-size", type=int, default=32, help="loader batch size")
    ap.add_argument("--workers", type=int, default=2, help="DALI CPU threads")
    ap.add_argument("--repeats", type=int, default=5, help="measurements per graph, alternating")
    args = ap.parse_args()

    from loaders import dali_crops
    from loaders.bench_data import build_bench_shards

    spec = tempfile.mkdtemp(prefix="bench-crops-")
    build_bench_shards(args.photos, spec, args.copies, 100, workers=1)
    graphs = {"dali-per-sample (now)": dali_crops.random_resized_crop, "dali-random (before)": dali_random}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in graphs}
    for _ in range(args.repeats):
        for name, impl in graphs.items():
            dali_crops.random_resized_crop = impl
            results[name].append(measure(spec, args.batch_size, args.workers))
    for name, values in results.items():
        rates, cpu = [v[0] for v in values], [v[1] for v in values]
        print(
            f"{name}: {' '.join(f'{v:.0f}' for v in rates)} img/s (median {statistics.median(rates):.0f}); "
            f"CPU {' '.join(f'{v:.2f}' for v in cpu)} ms/image (median {statistics.median(cpu):.2f})"
        )


if __name__ == "__main__":
    main()
