"""The `build-shards` Prefect flow: shards/ functions as coarse tasks with retries and progress.

    download-archives  only for a URL --source: the archives into --cache-dir (flows/download.py)
    index-source    open the source, index it, plan the shards, check the output (one task)
    write-shards    a batch of whole shards per task, a few tasks per worker. --runner local: a
                    ThreadPoolTaskRunner(max_workers=workers) whose threads hand each shard to
                    a pool of `workers` processes (shards/pool.py): true CPU parallelism, and
                    at most `workers` shards in memory at once. --runner dask: a DaskTaskRunner
                    whose worker processes (on this or other machines) write the shards themselves
    finish          manifest.json, written last

The flow holds the output's lock (shards/lock.py) from before index-source until the
manifest is written, whichever runner writes the shards; a second build fails at once, or
waits with wait=True.

Every format decision lives in shards/; this file only orders the calls, retries them, and
reports progress (a progress artifact, run-logger lines, a summary table artifact). A rerun
after a crash reuses every shard already published (shards/build.py's resume records).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from flows.credentials import warn_once
from flows.download import download_archives
from flows.params import BuildParams, flow_docstring, flow_signature
from flows.retry import worth_retrying
from shards.build import Plan, check_output, finish, prepare, reused_records, summary_rows
from shards.build_request import BuildRequest
from shards.lock import OutputLock, output_lock
from shards.plan import ShardSpec
from shards.pool import ShardPool
from shards.redact import redact_url
from shards.storage import Storage, is_url
from shards.types import Options, Source
from shards.write import ShardRecord, write_shard

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


@dataclass
class Indexed:
    """A local source opened and planned ahead of the flow (the CLI does it while its temporary
    server starts), for index-source to use instead of indexing again: the plan, or the error
    that indexing raised, which index-source then raises where the flow's logs and retries are."""

    request: BuildRequest
    splits: list[str] | None
    source: Source | None = None
    plan: Plan | None = None
    error: Exception | None = None


_ahead: Indexed | None = None  # set only inside indexed_ahead(), taken once by index-source


def index_ahead(p: BuildParams) -> Indexed | None:
    """Open and plan a local source now; None for a URL source (downloaded by the flow first).
    A failure is kept in the value, not raised: the flow raises it, with its logs."""
    if p.source is not None and is_url(p.source):
        return None
    request, splits = p.request(), p.split_list()
    try:
        src = request.open_source()
        return Indexed(request, splits, src, prepare(src, request.options(), splits))
    except Exception as e:  # kept, for index-source to raise
        return Indexed(request, splits, error=e)


@contextlib.contextmanager
def indexed_ahead(indexed: Indexed | None) -> Iterator[None]:
    """Offer `indexed` to the flow run started inside this block (in this process)."""
    global _ahead
    _ahead = indexed
    try:
        yield
    finally:
        _ahead = None


def _take_ahead(request: BuildRequest, splits: list[str] | None) -> Indexed | None:
    """The value indexed_ahead() offers, if it was made for this very request; once only."""
    global _ahead
    ready, _ahead = _ahead, None
    return ready if ready is not None and (ready.request, ready.splits) == (request, splits) else None


@task(name="index-source", retries=2, retry_delay_seconds=5, retry_condition_fn=worth_retrying, cache_policy=NO_CACHE)
def index_source(request: BuildRequest, local_source: str | None, splits: list[str] | None, output: str) -> Prepared:
    log = get_run_logger()
    ready = _take_ahead(request, splits)
    if ready is not None and ready.error is not None:
        raise ready.error
    if ready is not None and ready.source is not None and ready.plan is not None:
        src, plan = ready.source, ready.plan
    else:
        src = request.open_source(local_source)
        plan = prepare(src, request.options(), splits)
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
class ProgressArtifact:
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
    progress: ProgressArtifact | None,
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


@task(name="finish", retries=2, retry_delay_seconds=3, retry_condition_fn=worth_retrying, cache_policy=NO_CACHE)
def finish_set(job: Prepared, records: list[ShardRecord], image_ext: str, lock: OutputLock) -> dict:
    # A worker process that died mid-shard (the retry rewrote that shard) left its temporary
    # files; nothing is writing now, so they can go before the manifest says "complete".
    removed = job.storage.clean_temporaries()
    if removed:
        get_run_logger().info("removed %d partial files left by failed attempts", len(removed))
    return finish(job.storage, job.source, job.plan, records, image_ext, lock)


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


def write_all(
    job: Prepared, options: Options, p: BuildParams, log: logging.LoggerAdapter
) -> tuple[list[ShardRecord], dict[str, float]]:
    """Run the write-shards tasks; returns every shard's record and each split's seconds.

    --runner local: `workers` task threads, each handing its shards to the process pool.
    --runner dask: the cluster's worker processes write the shards themselves (no pool there);
    they cannot reach this process's ProgressArtifact, so the flow counts shards as tasks complete."""
    plan = job.plan
    progress = new_progress(len(plan.shards))
    workers = min(p.worker_count(), len(plan.shards))  # no idle processes for a small set
    local = p.runner == "local"
    pool = ShardPool(job.source, workers) if local and workers > 1 else None
    try:
        with task_runner(p, workers) as runner:
            # Parallelism is what the runner has: for dask, its worker threads.
            slots = workers if local else sum(runner.client.nthreads().values()) or 1
            groups = batches(plan.shards, slots)
            where = f"{workers} workers" if local else f"dask ({p.dask_address or 'local cluster'}, {slots} threads)"
            log.info("writing %d shards in %d tasks on %s", len(plan.shards), len(groups), where)
            shared = {"job": Leaf(job), "options": options, "pool": None, "progress": None}
            if local:  # quote() does not survive pickling to a dask worker; dask tasks get neither
                shared |= {"pool": quote(pool), "progress": quote(progress)}
            futures = [
                runner.submit(write_batch, {"label": batch_label(g), "specs": Leaf(g), **shared}) for g in groups
            ]
            done = _results(futures, None if local else progress)
    finally:
        if pool is not None:
            pool.close()
    return [r for b in done for r in b.records], split_seconds(done)


def _results(futures: list, progress: ProgressArtifact | None) -> list[Batch]:
    """Every batch's result, once all of them ended: a failure leaves all the other shards
    reusable. With `progress`, shards are counted as their task completes."""
    for f in as_completed(futures):
        if progress is None:
            continue
        try:
            batch = f.result()
        except Exception:  # raised below, once every other batch has ended
            continue
        progress.shards_done([r.name for r in batch.records])
    return [f.result() for f in futures]


def new_progress(total: int) -> ProgressArtifact:
    return ProgressArtifact(total, create_progress_artifact(0.0, key=PROGRESS_KEY, description="shards written"))


def _dask_task_runner(address: str | None, workers: int):
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


def task_runner(p: BuildParams, workers: int):
    """The runner of the write-shards tasks: threads here, or a dask cluster."""
    if p.runner == "dask":
        return _dask_task_runner(p.dask_address, workers)
    return ThreadPoolTaskRunner(max_workers=workers)


def _build_shards(**params) -> dict:
    p = BuildParams(**params).check()
    log = get_run_logger()
    workers, request = p.worker_count(), p.request()
    warn_once(p.source, log.warning)
    log.info(
        "build-shards %s from %s to %s with %d workers (%s runner)",
        p.dataset,
        redact_url(p.source) if p.source else "(generated)",
        redact_url(p.output),
        workers,
        p.runner,
    )
    start = time.perf_counter()
    local_source = p.source
    if p.source is not None and is_url(p.source):
        local_source = download_archives(p.dataset, p.source, p.cache_path(), p.split_list(), p.md5, p.output)
    # The output's lock, held by this process (the flow's, whichever runner writes the shards)
    # from before anything is written there until the manifest is.
    with output_lock(p.output, p.lock_record(), wait=p.wait, on_wait=log.warning) as lock:
        job = index_source(request, local_source, p.split_list(), p.output)
        log.info("indexed and planned in %.1fs: %d shards", time.perf_counter() - start, len(job.plan.shards))
        rows = _write_or_reuse(job, p, request.options(), lock, log)
    _report(rows, p.dataset, job, log)
    output = redact_url(job.storage.root)  # the flow's result is stored by the server too
    log.info("done in %.1fs: %s", time.perf_counter() - start, output)
    return {"output": output, "dataset": p.dataset, "rows": rows, "complete_before": job.done is not None}


def _write_or_reuse(
    job: Prepared, p: BuildParams, options: Options, lock: OutputLock, log: logging.LoggerAdapter
) -> list[dict]:
    if job.done is not None:
        log.info("%s already holds this complete set; nothing to do", redact_url(job.storage.root))
        return summary_rows(job.plan, reused_records(job.plan, job.done), {})
    records, seconds = write_all(job, options, p, log)
    finish_set(quote(job), quote(records), options.image_ext, quote(lock))
    return summary_rows(job.plan, records, seconds)


def _report(rows: list[dict], dataset: str, job: Prepared, log: logging.LoggerAdapter) -> None:
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
    create_table_artifact(
        rows, key=SUMMARY_KEY, description=f"build-shards {dataset} -> {redact_url(job.storage.root)}"
    )


# The flow's parameters are BuildParams' fields (flows/params.py): its signature, types,
# defaults and the descriptions Prefect shows for it and its deployments all come from there.
_build_shards.__signature__ = flow_signature()
_build_shards.__annotations__ = {n: q.annotation for n, q in flow_signature().parameters.items()} | {"return": dict}
_build_shards.__doc__ = flow_docstring(
    "Build `dataset` from `source` into shards + manifest.json at `output` (a folder or URL); the parameters "
    'are `python -m flows build-shards --help`\'s options. Returns {"output", "dataset", "rows": per-split '
    'summary, "complete_before": bool}.'
)
build_shards = flow(
    name="build-shards", description="Dataset to verified, shuffled WebDataset shards with DALI indexes."
)(_build_shards)
