"""The `build-shards` Prefect flow: shards/ functions as coarse tasks with retries and progress.

    download-archives  only for a URL --source: the archives into --cache-dir (flows/download.py)
    index-source    open the source, index it, plan the shards, check the output (one task)
    write-shards    a batch of whole shards per task, a few tasks per worker. --runner local: a
                    ThreadPoolTaskRunner(max_workers=workers) whose threads hand each shard to
                    a pool of `workers` processes (flows/pool.py): true CPU parallelism, and
                    at most `workers` shards in memory at once. --runner dask: a DaskTaskRunner
                    whose worker processes (on this or other machines) write the shards themselves
    finish          manifest.json, written last

Every format decision lives in shards/; this file only orders the calls, retries them, and
reports progress (a progress artifact, run-logger lines, a summary table artifact). A rerun
after a crash reuses every shard already published (shards/build.py's resume records).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.download import download_archives
from flows.params import BuildParams
from flows.pool import ShardPool
from shards.build import BuildError, Plan, ShardRecord, check_output, finish, prepare, summary_rows, write_shard
from shards.plan import ShardSpec
from shards.sources import open_source
from shards.storage import Storage, is_url
from shards.types import Options, Source

T = TypeVar("T")
SUMMARY_KEY = "build-shards-summary"
PROGRESS_KEY = "build-shards-progress"
MAX_TASKS = 200  # the Prefect server copes with a few hundred task runs per flow run, not thousands
TASKS_PER_WORKER = 3  # enough that a slow batch does not leave the other workers idle at the end


@dataclass
class Prepared:
    """What index-source hands on: the open source, the plan, the output, and the finished
    manifest when the output already holds this exact set."""

    source: Source
    plan: Plan
    storage: Storage
    done: dict | None


def _worth_retrying(task, task_run, state) -> bool:
    """Retry I/O hiccups, not mistakes: a wrong parameter or a missing file fails the same way twice."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, BuildError | ValueError | KeyError | TypeError | FileNotFoundError | PermissionError)


@task(name="index-source", retries=2, retry_delay_seconds=5, retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def index_source(
    dataset: str, source: str | None, source_kw: dict, options: Options, splits: list[str] | None, output: str
) -> Prepared:
    log = get_run_logger()
    src = open_source(dataset, source, **source_kw)
    plan = prepare(src, options, splits)
    storage = Storage(output)
    for split in plan.splits:
        specs = plan.split_shards(split)
        log.info(
            "plan %s: %d images in %d shards (%s), %d quarantined while indexing",
            split,
            sum(len(s.items) for s in specs),
            len(specs),
            specs[0].name if specs else "-",
            len(plan.source_quarantine.get(split, [])),
        )
    return Prepared(src, plan, storage, check_output(storage, plan))


@dataclass
class Progress:
    """Counts finished shards and keeps the progress artifact current. In-process only: the
    local runner's task threads call it per shard; on dask the flow calls it per finished task."""

    total: int
    artifact_id: object
    done: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def shards_done(self, names: list[str]) -> None:
        # The artifact is updated inside the lock: two updates in flight at once can reach the
        # server in either order, and a late, older count would overwrite the newer one.
        with self._lock:
            self.done.update(names)  # by name: a retried batch does not count its shards twice
            done = len(self.done)
            try:
                update_progress_artifact(
                    self.artifact_id, 100.0 * done / self.total, description=f"{done} of {self.total} shards"
                )
            except Exception as e:  # a busy server must not fail a written shard; the next update catches up
                get_run_logger().warning("progress artifact not updated: %s", e)


@dataclass
class Batch:
    """What a write-shards task returns: its shards' records and, per split, the wall-clock
    span (time.time(), comparable across processes and machines) from its first shard's start
    to its last one's end, from which the flow times each split whatever ran the task."""

    records: list[ShardRecord]
    spans: dict[str, tuple[float, float]]


def split_seconds(batches: list[Batch]) -> dict[str, float]:
    starts: dict[str, float] = {}
    ends: dict[str, float] = {}
    for b in batches:
        for split, (t0, t1) in b.spans.items():
            starts[split] = min(starts.get(split, t0), t0)
            ends[split] = max(ends.get(split, t1), t1)
    return {s: ends[s] - t for s, t in starts.items()}


class Leaf(Generic[T]):
    """Hands an object to a task as it is. Prefect walks the dataclasses and lists in task
    parameters (slow for a plan of a million items) unless they are wrapped; its own quote()
    would do, but it does not survive pickling to a dask worker (a tuple subclass, it comes
    back wrapping a 1-tuple). A plain class is a leaf to Prefect and pickles as it is."""

    def __init__(self, value: T) -> None:
        self.value = value


@task(name="write-shards", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE, task_run_name="write-{label}")
def write_batch(
    label: str,
    specs: Leaf[list[ShardSpec]],
    job: Leaf[Prepared],
    options: Options,
    pool: ShardPool | None,
    progress: Progress | None,
) -> Batch:
    """Write (or reuse) whole shards one after another; with a pool each goes to a process,
    without one (a single worker, or a dask worker process) it is written right here."""
    log = get_run_logger()
    specs, job = specs.value, job.value
    start, records, spans = time.perf_counter(), [], {}
    params = job.plan.params
    for spec in specs:
        t0 = time.time()
        if pool is not None:
            rec = pool.write(spec, job.storage, options, params)
        else:
            rec = write_shard(job.source, spec, job.storage, options, params)
        records.append(rec)
        spans[spec.split] = (spans.get(spec.split, (t0, 0.0))[0], time.time())
        if progress is not None:
            progress.shards_done([rec.name])
    n, q = sum(r.samples for r in records), sum(len(r.quarantine) for r in records)
    reused = sum(r.reused for r in records)
    secs = time.perf_counter() - start
    log.info(
        "batch %s done: %d shards (%d reused), %d images, %d quarantined, %.1fs",
        label,
        len(records),
        reused,
        n,
        q,
        secs,
    )
    return Batch(records, spans)


@task(name="finish", retries=2, retry_delay_seconds=3, retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def finish_set(job: Prepared, records: list[ShardRecord], image_ext: str) -> dict:
    # A worker process that died mid-shard (the retry rewrote that shard) left its temporary
    # files; nothing is writing now, so they can go before the manifest says "complete".
    removed = job.storage.clean_temporaries()
    if removed:
        get_run_logger().info("removed %d partial files left by failed attempts", len(removed))
    return finish(job.storage, job.source, job.plan, records, image_ext)


def batches(specs: list[ShardSpec], workers: int) -> list[list[ShardSpec]]:
    """Cut the shards into about TASKS_PER_WORKER x workers batches (at most MAX_TASKS), in
    split order (so each split's time and images/s mean something), biggest shards first
    within a split so its last task is a short one."""
    if not specs:
        return []
    split_order = {s: i for i, s in enumerate(dict.fromkeys(spec.split for spec in specs))}
    ordered = sorted(specs, key=lambda s: (split_order[s.split], -len(s.items), s.name))
    n_tasks = min(len(ordered), MAX_TASKS, TASKS_PER_WORKER * workers)
    per = -(-len(ordered) // n_tasks)
    return [ordered[i : i + per] for i in range(0, len(ordered), per)]


def batch_label(specs: list[ShardSpec]) -> str:
    return specs[0].name.removesuffix(".tar") + (f"-and-{len(specs) - 1}-more" if len(specs) > 1 else "")


def rows_from_manifest(plan: Plan, manifest: dict) -> list[dict]:
    """Summary rows for a set that was already complete (nothing written, every shard reused)."""
    rows = []
    quarantined = {(q["key"], q["source"]) for q in manifest.get("quarantine", [])}
    for split in plan.splits:
        entry = manifest["splits"][split]
        planned = {(it.key, it.source) for s in plan.split_shards(split) for it in s.items}
        rows.append(
            {
                "split": split,
                "samples": entry["samples"],
                "shards": len(entry["shards"]),
                "bytes": sum(s["bytes"] for s in entry["shards"]),
                "quarantined": len(plan.source_quarantine.get(split, [])) + len(quarantined & planned),
                "reused": len(entry["shards"]),
                "seconds": 0.0,
                "images_per_sec": None,
            }
        )
    return rows


def write_all(
    job: Prepared, options: Options, workers: int, log: logging.LoggerAdapter
) -> tuple[list[ShardRecord], dict[str, float]]:
    """Run the write-shards tasks, `workers` at a time; returns every shard's record and each split's seconds."""
    plan = job.plan
    progress = new_progress(len(plan.shards))
    workers = min(workers, len(plan.shards))  # no idle processes for a small set
    groups = batches(plan.shards, workers)
    log.info("writing %d shards in %d tasks on %d workers", len(plan.shards), len(groups), workers)
    pool = ShardPool(job.source, workers) if workers > 1 else None
    try:
        with ThreadPoolTaskRunner(max_workers=workers) as runner:
            shared = {"job": Leaf(job), "options": options, "pool": quote(pool), "progress": quote(progress)}
            futures = [
                runner.submit(write_batch, {"label": batch_label(g), "specs": Leaf(g), **shared}) for g in groups
            ]
            for f in futures:
                f.wait()
            # Every batch ran to its end first, so a failure leaves all the other shards reusable.
            done = [f.result() for f in futures]
    finally:
        if pool is not None:
            pool.close()
    return [r for b in done for r in b.records], split_seconds(done)


def new_progress(total: int) -> Progress:
    return Progress(total, create_progress_artifact(0.0, key=PROGRESS_KEY, description="shards written"))


def dask_task_runner(address: str | None, workers: int):
    """A DaskTaskRunner on the cluster at `address`, or on a LocalCluster of `workers` processes
    with one thread each (decoding holds the GIL, so processes, not threads, give parallelism)."""
    from prefect_dask import DaskTaskRunner  # only a dask run pays for importing dask

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        # The dashboard on a free port: the default fixed one collides between concurrent runs.
        cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True, "dashboard_address": ":0"},
    )


def write_all_dask(
    job: Prepared, options: Options, workers: int, address: str | None, log: logging.LoggerAdapter
) -> tuple[list[ShardRecord], dict[str, float]]:
    """Run the write-shards tasks on a dask.distributed cluster: each task writes its shards in
    the dask worker process (no pool there). Worker processes cannot reach this process's
    Progress, so the flow counts shards as task futures complete."""
    plan = job.plan
    progress = new_progress(len(plan.shards))
    with dask_task_runner(address, min(workers, len(plan.shards))) as runner:
        # Parallelism is what the cluster has: its worker threads (for a LocalCluster, `workers`).
        slots = sum(runner.client.nthreads().values()) or 1
        groups = batches(plan.shards, slots)
        log.info(
            "writing %d shards in %d tasks on dask (%s, %d worker threads)",
            len(plan.shards),
            len(groups),
            address or "local cluster",
            slots,
        )
        shared = {"job": Leaf(job), "options": options, "pool": None, "progress": None}
        futures = [runner.submit(write_batch, {"label": batch_label(g), "specs": Leaf(g), **shared}) for g in groups]
        for f in as_completed(futures):
            try:
                batch = f.result()
            except Exception:  # raised below, once every other batch has ended
                continue
            progress.shards_done([r.name for r in batch.records])
        # Every batch ran to its end first, so a failure leaves all the other shards reusable.
        done = [f.result() for f in futures]
    return [r for b in done for r in b.records], split_seconds(done)


@flow(name="build-shards", description="Dataset to verified, shuffled WebDataset shards with DALI indexes.")
def build_shards(
    dataset: str,
    output: str,
    source: str | None = None,
    splits: list[str] | str | None = None,
    shard_size: str | int | None = None,
    shard_samples: int | None = None,
    seed: int = 0,
    verify: str = "decode",
    max_side: int | None = None,
    workers: int | None = None,
    md5: dict[str, str] | None = None,
    check_md5: bool = False,
    val_fraction: float | None = None,
    image_ext: str | None = None,
    jpeg_quality: int = 95,
    train_per_class: int | None = None,
    val_per_class: int | None = None,
    demo_size: int | None = None,
    cache_dir: str | None = None,
    runner: str = "local",
    dask_address: str | None = None,
) -> dict:
    """Build `dataset` from `source` into shards + manifest.json at `output` (a folder or URL).

    Parameters mirror `python -m flows build-shards --help`: shard_size is bytes or a string
    such as "1GB" (default 1GB) and excludes shard_samples; splits is "train,val" or a list
    (default: all); workers defaults to the CPU count; md5 maps archive names to digests;
    train_per_class, val_per_class and demo_size size the demo set only. A URL source is
    downloaded into cache_dir first (default ~/.cache/shardline, or $XDG_CACHE_HOME/shardline);
    runner "dask" writes the shards on the dask.distributed cluster at dask_address (or on a
    LocalCluster of `workers` processes).
    Returns {"output", "dataset", "rows": per-split summary, "complete_before": bool}.
    """
    p = BuildParams(**locals()).check()  # first statement: locals() holds exactly the parameters
    log = get_run_logger()
    workers, options = p.worker_count(), p.options()
    log.info(
        "build-shards %s from %s to %s with %d workers (%s runner)",
        dataset,
        source or "(generated)",
        output,
        workers,
        runner,
    )
    start = time.perf_counter()
    local_source = source
    if source is not None and is_url(source):
        local_source = download_archives(dataset, source, p.cache_path(), p.split_list(), md5, output)
    job = index_source(dataset, local_source, p.source_kwargs(), options, p.split_list(), output)
    plan = job.plan
    log.info("indexed and planned in %.1fs: %d shards", time.perf_counter() - start, len(plan.shards))

    if job.done is not None:
        log.info("%s already holds this complete set; nothing to do", job.storage.root)
        rows = rows_from_manifest(plan, job.done)
    else:
        if runner == "dask":
            records, seconds = write_all_dask(job, options, workers, dask_address, log)
        else:
            records, seconds = write_all(job, options, workers, log)
        finish_set(quote(job), quote(records), p.ext)
        rows = summary_rows(plan, records, seconds)

    quarantined = sum(r["quarantined"] for r in rows)
    if quarantined:
        log.warning("%d images quarantined (listed in manifest.json with reasons)", quarantined)
    for r in rows:
        log.info(
            "%s: %d images in %d shards, %.1f MB, %d quarantined, %d reused, %.1fs, %s images/s",
            r["split"],
            r["samples"],
            r["shards"],
            r["bytes"] / 1e6,
            r["quarantined"],
            r["reused"],
            r["seconds"],
            r["images_per_sec"],
        )
    create_table_artifact(rows, key=SUMMARY_KEY, description=f"build-shards {dataset} -> {job.storage.root}")
    log.info("done in %.1fs: %s", time.perf_counter() - start, job.storage.root)
    return {"output": job.storage.root, "dataset": dataset, "rows": rows, "complete_before": job.done is not None}
