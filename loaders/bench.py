"""`python -m loaders.bench`: the loader backends side by side with torchvision's ImageFolder baseline.

Each measurement runs in its own spawned process (so host memory and CPU time belong to one
loader only): iterate for --warmup seconds, then count images for --seconds. Reported per
backend: images/s; batch latency p50/p99 (time between consecutive batches reaching the
consumer); CPU use, as CPU seconds of the process and its workers per wall second (2.0 means
two cores busy) and per image (steadier than images/s on a shared machine); peak host memory,
as RSS summed over the process tree every 0.2 s (shared pages count once per process) and
PSS every 2 s.
The baseline: torchvision.datasets.ImageFolder + DataLoader (RandomResizedCrop, RandomHorizontalFlip,
ToTensor, Normalize; same batch size, workers and device) over the same JPEGs extracted from
the shards to a temporary folder. --synthetic adds the ceiling with no reading and no decoding:
a batch made once, normalized and handed over each step.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import tempfile
import threading
import time
from pathlib import Path

import click
import numpy as np
import psutil

from loaders.spec import open_shards
from shards.redact import redact_text

BACKENDS = ("dali", "pytorch")


class TreeMonitor:
    """CPU seconds and peak memory of this process and its children, sampled in a thread."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        return [self.proc, *self.proc.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self._tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.2):
            full = tick % 10 == 0  # PSS reads /proc/*/smaps: only every 2 s, to keep the monitor's own CPU small
            rss = pss = 0
            for p in self._tree():
                try:
                    if full:
                        m = p.memory_full_info()
                        rss, pss = rss + m.rss, pss + m.pss
                    else:
                        rss += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            if full:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1

    def __enter__(self) -> TreeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def batches_forever(kind: str, cfg: dict, info: dict | None = None):
    """Endless (images, labels) batches of one loader kind; `info` gets what the backend chose."""
    import torch

    device = torch.device(cfg["device"])
    if kind in BACKENDS:
        from loaders import make_loader

        loader = make_loader(
            cfg["shards"],
            batch_size=cfg["batch_size"],
            train=not cfg["eval"],
            backend=kind,
            device=device,
            workers=cfg["workers"],
            image_size=cfg["image_size"],
            split=cfg["split"],
            dtype=cfg["dtype"],
            options=cfg["options"].get(kind, {}),
            cache_dir=cfg.get("cache_dir"),
            cache_limit=cfg.get("cache_limit"),
        )
        if info is not None and kind == "dali":
            info["fused_resize"] = bool(loader.backend.opts.fused_resize)  # shardline's plugin, or DALI's resize
            info["threads"] = loader.backend.opts.num_threads  # what the machine default chose, as in training
            info["builds"] = loader.backend.builds  # seconds of each pipeline build, appended as they happen
        if info is not None and loader.cache is not None:
            info["cache"] = loader.cache.stats  # read when the measurement ends
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1
    elif kind == "imagefolder":
        from torch.utils.data import DataLoader
        from torchvision import datasets, transforms

        from loaders.common import EVAL_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD

        size = cfg["image_size"]
        if cfg["eval"]:
            crop = [transforms.Resize(int(size / EVAL_CROP_RATIO)), transforms.CenterCrop(size)]
        else:
            crop = [transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()]
        tf = transforms.Compose([*crop, transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        ds = datasets.ImageFolder(cfg["imagefolder"], transform=tf)
        dl = DataLoader(
            ds,
            batch_size=cfg["batch_size"],
            shuffle=not cfg["eval"],
            num_workers=baseline_workers(cfg["workers"]),
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=baseline_workers(cfg["workers"]) > 0,
        )
        while True:
            for images, labels in dl:
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    elif kind == "synthetic":
        from loaders.common import DTYPES
        from loaders.pytorch import normalize

        dtype = DTYPES[cfg["dtype"]]
        s = cfg["image_size"]
        raw = torch.randint(0, 256, (cfg["batch_size"], s, s, 3), dtype=torch.uint8, device=device)
        labels = torch.zeros(cfg["batch_size"], dtype=torch.int64, device=device)
        while True:
            yield normalize(raw, dtype, False), labels
    else:
        raise ValueError(kind)


def baseline_workers(workers: int | None) -> int:
    """The ImageFolder baseline's DataLoader workers: as given, else one per core (the pytorch backend's default)."""
    return len(os.sched_getaffinity(0)) if workers is None else workers


def build_figures(builds: list[float], before: int, wall: float) -> dict:
    """DALI pipeline builds over the whole run (warm-up included) and the share of the measured
    time the builds inside it took: a figure dominated by rebuilds measures the builds, not the loader."""
    inside = builds[before:]
    return {
        "pipeline_builds": len(builds),
        "pipeline_build_seconds": round(sum(builds), 3),
        "pipeline_builds_measured": len(inside),
        "build_share": round(sum(inside) / max(wall, 1e-9), 4),
    }


def measure(kind: str, cfg: dict, queue) -> None:
    try:
        import torch

        cuda = cfg["device"].startswith("cuda")
        info: dict = {}
        it = batches_forever(kind, cfg, info)
        with TreeMonitor() as mon:
            start = time.perf_counter()
            while time.perf_counter() - start < cfg["warmup"]:
                next(it)
            if cuda:
                torch.cuda.synchronize()
            cpu0, t0 = mon.cpu_seconds(), time.perf_counter()
            builds_before = len(info.get("builds", []))
            last, lat, images = t0, [], 0
            while last - t0 < cfg["seconds"]:
                x, _ = next(it)
                if cuda:
                    torch.cuda.synchronize()
                now = time.perf_counter()
                lat.append(now - last)
                last, images = now, images + x.shape[0]
            wall, cpu = last - t0, mon.cpu_seconds() - cpu0
        if "builds" in info:
            info.update(build_figures(info.pop("builds"), builds_before, wall))
        cache = info.pop("cache", None)
        if cache is not None:  # whole run, warm-up included: the first shards arrive then
            info.update(
                cache_bytes_downloaded=cache.bytes_downloaded,
                cache_bytes_served=cache.bytes_served,
                cache_hit_rate=round(cache.hit_rate, 3),
                cache_peak_mb=round(cache.peak_bytes / 1e6, 1),
            )
        queue.put(
            {
                "backend": kind,
                "device": cfg["device"],
                "images_per_sec": round(images / wall, 1),
                "batch_ms_p50": round(float(np.percentile(lat, 50)) * 1e3, 2),
                "batch_ms_p99": round(float(np.percentile(lat, 99)) * 1e3, 2),
                "cpu_cores_used": round(cpu / wall, 2),
                "cpu_ms_per_image": round(cpu / images * 1e3, 2),
                "peak_rss_mb": round(mon.peak_rss / 2**20),
                "peak_pss_mb": round(mon.peak_pss / 2**20),
                "images": images,
                "seconds": round(wall, 2),
                "batch_size": cfg["batch_size"],
                "workers": baseline_workers(cfg["workers"]) if kind == "imagefolder" else cfg["workers"],
                "image_size": cfg["image_size"],
                **info,
            }
        )
    except BaseException as e:
        queue.put({"backend": kind, "device": cfg["device"], "error": f"{type(e).__name__}: {redact_text(str(e))}"})
        raise
    finally:
        queue.close()
        queue.join_thread()  # the result is flushed to the parent...
        os._exit(0)  # ...then exit without waiting for loader threads and workers to wind down


def run_one(kind: str, cfg: dict) -> dict:
    """Measure one loader kind in a fresh spawned process; an error comes back as {"error": ...}."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=measure, args=(kind, cfg, q))
    p.start()
    deadline = time.monotonic() + cfg["warmup"] + cfg["seconds"] + 600
    try:
        while True:
            try:
                return q.get(timeout=1)
            except queue_mod.Empty:
                if not p.is_alive() and q.empty():
                    return {"backend": kind, "device": cfg["device"], "error": f"exited with code {p.exitcode}"}
                if time.monotonic() > deadline:
                    return {"backend": kind, "device": cfg["device"], "error": "timed out"}
    finally:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()


def print_table(results: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    base = next((r["images_per_sec"] for r in results if r["backend"] == "imagefolder" and "error" not in r), None)
    table = Table(title=title)
    for col in (
        "backend",
        "device",
        "images/s",
        "vs ImageFolder",
        "batch p50 ms",
        "batch p99 ms",
        "CPU cores",
        "CPU ms/image",
        "peak RSS MB",
        "peak PSS MB",
    ):
        table.add_column(col, justify="left" if col in ("backend", "device") else "right")
    for r in results:
        if "error" in r:
            table.add_row(r["backend"], r["device"], f"[red]{r['error']}[/red]", *[""] * 7)
            continue
        ratio = f"{r['images_per_sec'] / base:.2f}x" if base else "-"
        fused = {True: " (fused resize)", False: " (DALI resize)"}.get(r.get("fused_resize"), "")
        table.add_row(
            r["backend"] + fused,
            r["device"],
            f"{r['images_per_sec']:.0f}",
            ratio,
            f"{r['batch_ms_p50']:.1f}",
            f"{r['batch_ms_p99']:.1f}",
            f"{r['cpu_cores_used']:.2f}",
            f"{r['cpu_ms_per_image']:.2f}",
            str(r["peak_rss_mb"]),
            str(r["peak_pss_mb"]),
        )
    Console(width=160).print(table)
    for r in results:
        if "pipeline_builds" in r:
            print(
                f"{r['backend']}: {r['pipeline_builds']} pipeline builds in {r['pipeline_build_seconds']:.2f} s, "
                f"{r['build_share']:.1%} of the measured time; {r['threads']} threads"
            )
        if "cache_bytes_downloaded" in r:
            print(
                f"{r['backend']}: shard cache downloaded {r['cache_bytes_downloaded'] / 1e6:.1f} MB for "
                f"{r['cache_bytes_served'] / 1e6:.1f} MB read, hit rate {r['cache_hit_rate']:.0%}, "
                f"folder peak {r['cache_peak_mb']:.0f} MB"
            )


def parse_options(values: tuple[str, ...]) -> dict[str, dict]:
    """("dali.antialias=true", "pytorch.workers=3") -> {"dali": {"antialias": True}, "pytorch": {"workers": 3}}."""
    out: dict[str, dict] = {}
    for v in values:
        key, sep, raw = v.partition("=")
        backend, dot, name = key.partition(".")
        if not (sep and dot and backend in BACKENDS and name):
            raise click.BadParameter(f"{v!r}: use BACKEND.NAME=VALUE, e.g. dali.antialias=true", param_hint="--option")
        low = raw.lower()
        value = low == "true" if low in ("true", "false") else json.loads(raw) if raw[:1].isdigit() else raw
        out.setdefault(backend, {})[name] = value
    return out


def split_backends(values: tuple[str, ...]) -> list[str]:
    out = [b.strip() for v in values for b in v.split(",") if b.strip()]
    for b in out:
        if b not in BACKENDS:
            raise click.BadParameter(f"{b!r}: use dali or pytorch", param_hint="--backend")
    return out or list(BACKENDS)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--shards",
    "spec",
    required=True,
    help="SPEC of the shards to read: brace pattern, folder with manifest.json, or s3:// URLs.",
)
@click.option(
    "--split", default="train", show_default=True, help="Split to read when SPEC is a folder with a manifest."
)
@click.option(
    "--backend",
    "backends",
    multiple=True,
    help="Loader backend to measure: dali or pytorch; repeat or comma-separate. Default: both.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where batches land (and, for dali, where JPEGs are decoded). Default: cuda if available, else cpu.",
)
@click.option("--batch-size", default=64, show_default=True, help="Images per batch.")
@click.option(
    "--workers",
    type=int,
    default=None,
    help="DataLoader worker processes (pytorch, ImageFolder) and DALI CPU threads. Default: the machine's, as "
    "make_loader and so python -m train choose them (DALI: up to 8 threads per GPU, or one per core on CPU; "
    "pytorch and ImageFolder: one worker per core).",
)
@click.option("--seconds", default=20.0, show_default=True, help="Length of the measured steady state, per backend.")
@click.option("--warmup", default=5.0, show_default=True, help="Seconds of warm-up before measuring, per backend.")
@click.option("--image-size", default=224, show_default=True, help="Output side in pixels.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Output dtype of the images.",
)
@click.option("--eval", "eval_", is_flag=True, help="Measure the eval transform (resize + center crop), not train.")
@click.option("--synthetic", is_flag=True, help="Also measure the ceiling: no reading, no decoding.")
@click.option("--no-baseline", is_flag=True, help="Skip the ImageFolder baseline (and its extraction).")
@click.option(
    "--build-from",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of photos (n<wnid>_*.JPEG): build --shards (a folder) from them first if it has no manifest.",
)
@click.option("--copies", default=10, show_default=True, help="With --build-from: times each photo is repeated.")
@click.option("--shard-samples", default=128, show_default=True, help="With --build-from: samples per shard.")
@click.option(
    "--option",
    "backend_options",
    multiple=True,
    metavar="BACKEND.NAME=VALUE",
    help="A backend knob (loaders/dali.py DaliOptions, loaders/pytorch.py TorchOptions), e.g. dali.antialias=true; "
    "repeatable.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Remote SPEC (s3://...): the shard cache folder (default ~/.cache/shardline/shards/<hash>, "
    "$SHARDLINE_CACHE_DIR replacing ~/.cache/shardline); the table is followed by bytes downloaded and the cache hit rate.",
)
@click.option("--cache-limit", default=None, help="Remote SPEC: most bytes the shard cache may hold, e.g. 2GB.")
@click.option("--json", "as_json", is_flag=True, help='End the output with one line {"results": [...]}.')
def main(
    spec,
    split,
    backends,
    device,
    batch_size,
    workers,
    seconds,
    warmup,
    image_size,
    dtype,
    eval_,
    synthetic,
    no_baseline,
    build_from,
    copies,
    shard_samples,
    backend_options,
    cache_dir,
    cache_limit,
    as_json,
) -> None:
    """Measure loader throughput: the chosen backends, the ImageFolder baseline, optionally the synthetic ceiling."""
    import torch

    from loaders.bench_data import build_bench_shards, extract_imagefolder

    kinds = split_backends(backends)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if build_from and not (Path(spec) / "manifest.json").exists():
        build_bench_shards(build_from, spec, copies, shard_samples)
    shards, _ = open_shards(spec, split=split)
    cfg = dict(
        shards=spec,
        split=split,
        device=device,
        batch_size=batch_size,
        workers=workers,
        seconds=seconds,
        warmup=warmup,
        image_size=image_size,
        dtype=dtype,
        eval=eval_,
        options=parse_options(backend_options),
        cache_dir=cache_dir,
        cache_limit=cache_limit,
    )
    tmp = None
    if not no_baseline:
        tmp = tempfile.mkdtemp(prefix="shardline-imagefolder-")
        extract_imagefolder(spec, split, tmp)
        cfg["imagefolder"] = tmp
        kinds.append("imagefolder")
    if synthetic:
        kinds.append("synthetic")
    results = []
    try:
        for kind in kinds:
            click.echo(f"measuring {kind} on {device}: {warmup:g}s warm-up + {seconds:g}s ...", err=True)
            results.append(run_one(kind, cfg))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    n = sum(s.samples for s in shards)
    print_table(
        results,
        f"{'eval' if eval_ else 'train'} {image_size}px, batch {batch_size}, {workers or 'default'} workers, "
        f"{n} samples in {len(shards)} shards, {os.cpu_count()} CPUs",
    )
    if as_json:
        click.echo(json.dumps({"results": results}))


if __name__ == "__main__":
    main()
