"""The build, as plain functions any orchestrator can call: prepare, check_output, write_shard, finish.

    plan = prepare(source, options, splits)                       # index + seeded shuffle + cuts
    with output_lock(storage, plan.params) as lock:              # shards/lock.py: one build per output
        done = check_output(storage, plan)                        # a finished set, or None; free space
        records = [write_shard(source, s, storage, options, plan.params) for s in plan.shards]  # parallel-safe
        manifest = finish(storage, source, plan, records, options.image_ext, lock)  # written last

`build()` runs them with the shard process pool (shards/pool.py); flows/ runs them as Prefect
tasks. Resume works at shard granularity (shards/write.py's progress records). What to build
and with which options, as the CLI decides it, is shards/build_request.py's BuildRequest.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from shards.interop import write_reader_files
from shards.lock import OutputLock
from shards.manifest import MANIFEST, ManifestError, new_manifest, read_manifest, shard_pattern, write_manifest
from shards.plan import ShardSpec, plan_split
from shards.pool import ShardPool
from shards.storage import Storage
from shards.types import Options, Quarantined, Source
from shards.write import PROGRESS_DIR, BuildError, ShardRecord, record_name, write_shard
from shards.writer import SAMPLE_OVERHEAD, SHARD_OVERHEAD

log = logging.getLogger("shards")


@dataclass
class Plan:
    dataset: str
    params: dict
    shards: list[ShardSpec]
    source_quarantine: dict[str, list[Quarantined]]  # per split, found while indexing
    splits: list[str]

    def split_shards(self, split: str) -> list[ShardSpec]:
        return [s for s in self.shards if s.split == split]


def prepare(source: Source, options: Options, splits: Iterable[str] | None = None) -> Plan:
    """Index the source and decide which sample goes to which shard."""
    available = source.splits()
    wanted = list(splits) if splits else available
    missing = [s for s in wanted if s not in available]
    if missing:
        raise BuildError(f"{source.dataset}: no split {missing} in the source (has {available})")
    params = options.params() | {"splits": wanted}
    shards, quarantine = [], {}
    for split in wanted:
        items = source.items(split)
        quarantine[split] = list(source.quarantined(split))
        if not items:
            raise BuildError(f"{source.dataset}: split {split!r} has no images")
        shards += plan_split(source.dataset, split, items, options)
    return Plan(source.dataset, params, shards, quarantine, wanted)


def check_output(storage: Storage, plan: Plan) -> dict | None:
    """Before writing: the finished manifest if this exact set is already built; clean leftovers.

    Fails if the output holds a finished set built with other parameters, rather than mixing.
    """
    try:
        storage.check_writable()
    except PermissionError as e:
        raise BuildError(str(e)) from None
    if storage.exists(MANIFEST):
        try:
            m = read_manifest(storage)
        except ManifestError as e:
            raise BuildError(str(e)) from None
        if m.get("dataset") == plan.dataset and m.get("params") == plan.params:
            return m
        raise BuildError(
            f"{storage.root} already holds a finished {m.get('dataset')} set built with other parameters "
            f"({m.get('params')}); choose another --output or delete it"
        )
    removed = storage.clean_temporaries()
    if removed:
        log.info("removed %d partial files left by an interrupted run", len(removed))
    check_free_space(storage, plan)
    return None


def estimated_bytes(plan: Plan) -> int:
    """What the shards of the plan will take: the source's image sizes plus the tar's overhead
    (shards/writer.py's, the same the plan cuts shards by)."""
    images = sum(it.size + SAMPLE_OVERHEAD for s in plan.shards for it in s.items)
    return images + SHARD_OVERHEAD * len(plan.shards)


def check_free_space(storage: Storage, plan: Plan) -> None:
    """Before writing: fail at once if a local output cannot hold the set (shards already
    published there count as written)."""
    if storage.remote:
        return
    written = sum(os.path.getsize(p) for s in plan.shards if os.path.isfile(p := os.path.join(storage.root, s.name)))
    need = estimated_bytes(plan) - written
    free = shutil.disk_usage(storage.root).free
    if need > free:
        raise BuildError(
            f"not enough free space at {storage.root}: the shards need about {_size(need)}, {_size(free)} is free; "
            f"free {_size(need - free)} more or choose another --output"
        )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def finish(
    storage: Storage,
    source: Source,
    plan: Plan,
    records: list[ShardRecord],
    image_ext: str,
    lock: OutputLock | None = None,
) -> dict:
    """Write the files for other readers, then manifest.json (last, atomically); drop the progress
    records. With the build's lock given, first make sure it is still this build's (an object-store
    lease can be lost)."""
    by_name = {r.name: r for r in records}
    missing = [s.name for s in plan.shards if s.name not in by_name]
    if missing:
        raise BuildError(f"shards not written: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    classes = [{"index": c.index, "id": c.id, "name": c.name} for c in source.classes()]
    m = new_manifest(plan.dataset, image_ext, plan.params, classes)
    labelled = {it.label for s in plan.shards for it in s.items}
    empty = [c["id"] for c in classes if c["index"] not in labelled]
    if empty:  # kept on purpose (--allow-empty-classes): say which classes have no image
        m["empty_classes"] = empty
    for split in plan.splits:
        specs = plan.split_shards(split)
        recs = [by_name[s.name] for s in specs]
        m["splits"][split] = {
            "samples": sum(r.samples for r in recs),
            "pattern": shard_pattern(plan.dataset, split, len(specs)),
            "shards": [r.manifest_entry() for r in recs],
        }
        m["quarantine"] += [q.to_json() for q in plan.source_quarantine.get(split, [])]
        m["quarantine"] += [q for r in recs for q in r.quarantine]
    if lock is not None:
        lock.check()
    write_reader_files(storage, m)  # timm's _info.json, wids indexes: before the completeness marker
    write_manifest(storage, m)
    for s in plan.shards:
        storage.remove(record_name(s))
    storage.remove(PROGRESS_DIR)
    return m


def reused_records(plan: Plan, manifest: dict) -> list[ShardRecord]:
    """The records of a set that was already complete (nothing written, every shard reused),
    from its manifest, for summary_rows: each shard's quarantine is its planned items' entries."""
    quarantined = {(q["key"], q["source"]): q for q in manifest.get("quarantine", [])}
    records = []
    for split in plan.splits:
        entries = {e["name"]: e for e in manifest["splits"][split]["shards"]}
        for spec in plan.split_shards(split):
            e = entries[spec.name]
            q = [quarantined[(it.key, it.source)] for it in spec.items if (it.key, it.source) in quarantined]
            records.append(
                ShardRecord(e["name"], e["index"], split, e["samples"], e["bytes"], e["sha256"], "", 0.0, True, q)
            )
    return records


def summary_rows(plan: Plan, records: list[ShardRecord], seconds: dict[str, float]) -> list[dict]:
    """Per split: samples, shards, bytes, quarantined, seconds, images/s (for logs and artifacts)."""
    rows = []
    for split in plan.splits:
        recs = [r for r in records if r.split == split]
        n = sum(r.samples for r in recs)
        secs = seconds.get(split, 0.0)
        rows.append({
            "split": split,
            "samples": n,
            "shards": len(recs),
            "bytes": sum(r.bytes for r in recs),
            "quarantined": len(plan.source_quarantine.get(split, [])) + sum(len(r.quarantine) for r in recs),
            "reused": sum(r.reused for r in recs),
            "seconds": round(secs, 2),
            "images_per_sec": round(n / secs, 1) if secs > 0 else None,
        })  # fmt: skip
    return rows


def build(
    source: Source,
    output: str,
    options: Options,
    splits: Iterable[str] | None = None,
    workers: int | None = None,
    progress: Callable[[ShardRecord], None] | None = None,
    scratch: str | None = None,
    wait: bool = False,
) -> dict:
    """Build the whole set with a local process pool, holding the output's lock; returns the manifest."""
    storage = Storage(output, scratch=scratch)
    plan = prepare(source, options, splits)
    lock = OutputLock(storage, plan.params)
    try:
        lock.acquire(wait=wait)
    except PermissionError as e:
        raise BuildError(str(e)) from None
    try:
        done = check_output(storage, plan)
        if done is not None:
            log.info("%s is already complete; nothing to do", storage.root)
            return done
        records = _write_shards(source, plan, storage, options, workers, progress)
        return finish(storage, source, plan, records, options.image_ext, lock)
    finally:
        lock.release()


def _write_shards(
    source: Source,
    plan: Plan,
    storage: Storage,
    options: Options,
    workers: int | None,
    progress: Callable[[ShardRecord], None] | None,
) -> list[ShardRecord]:
    workers = min(max(1, workers or os.cpu_count() or 1), len(plan.shards))  # no idle processes for a small set
    records: list[ShardRecord] = []
    # Biggest first so one slow shard does not run alone at the end.
    specs = sorted(plan.shards, key=lambda s: -len(s.items))
    if workers <= 1:
        for s in specs:
            records.append(write_shard(source, s, storage, options, plan.params))
            if progress:
                progress(records[-1])
        return records
    with ShardPool(source, workers) as pool:
        futs = [pool.submit(s, storage, options, plan.params) for s in specs]
        for fut in cf.as_completed(futs):
            records.append(fut.result())
            if progress:
                progress(records[-1])
    return records
