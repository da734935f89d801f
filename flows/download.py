"""The `download-archives` task: a URL --source brought into the cache folder, with progress.

shards/download.py does the work (parallel, resumable, MD5-verified downloads); this task
adds what Prefect gives: task retries, a run-logger line per file every few seconds (bytes,
rate, ETA) and a progress artifact. The download runs in a helper thread while the task's own
thread, which holds the run context, reports; so the Prefect calls never leave that thread.

Every line and artifact names the redacted URL; the real one (flows/credentials.py's `reveal`,
for a CLI run) is used only to open the connections, and an error that quotes it is redacted
before it leaves the task.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import threading
import time
from dataclasses import dataclass, field

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from flows.credentials import reveal
from flows.retry import worth_retrying
from shards.build import BuildError
from shards.download import localize_source
from shards.fetch import FetchError, RetryPolicy
from shards.redact import redact_text, redact_url
from shards.storage import Storage, is_url

DOWNLOAD_KEY = "build-shards-download"
REPORT_EVERY = 3.0  # seconds between progress lines per file: enough to follow, few enough to read
POLICY = RetryPolicy()  # per-request retries inside shards.fetch; tests swap in a faster one


@dataclass
class _File:
    done: int = 0
    total: int | None = None
    start: float = field(default_factory=time.monotonic)
    reported: float = 0.0  # monotonic time of the last line logged


@dataclass
class DownloadProgress:
    """Bytes per file, fed by the download threads, read by the reporting thread."""

    files: dict[str, _File] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, name: str, done: int, total: int | None) -> None:
        with self._lock:
            f = self.files.setdefault(name, _File())
            f.done, f.total = done, total

    def percent(self) -> float:
        with self._lock:
            known = [f for f in self.files.values() if f.total]
            return 100.0 * sum(f.done for f in known) / sum(f.total for f in known) if known else 0.0

    def due_lines(self, force: bool = False) -> list[str]:
        """One line per file not reported for REPORT_EVERY seconds: 'name: 12.0 of 64.0 MB (19%), 8.1 MB/s, ETA 6s'."""
        now, lines = time.monotonic(), []
        with self._lock:
            for name, f in self.files.items():
                if not force and now - f.reported < REPORT_EVERY:
                    continue
                f.reported = now
                # The rate counts this run's bytes only; a resumed file's earlier bytes came before `start`.
                rate = f.done / max(now - f.start, 1e-6)
                size = (
                    f"{f.done / 1e6:.1f} of {f.total / 1e6:.1f} MB ({100 * f.done / f.total:.0f}%)"
                    if f.total
                    else (f"{f.done / 1e6:.1f} MB")
                )
                eta = f", ETA {(f.total - f.done) / rate:.0f}s" if f.total and rate > 0 and f.done < f.total else ""
                lines.append(f"{name}: {size}, {rate / 1e6:.1f} MB/s{eta}")
        return lines


def check_output_writable(output: str) -> None:
    """Fail in one line before a long download when --output cannot take the shards.

    An object store gets a probe object (written and deleted); a local output is only
    checked with access() on its nearest existing folder, so a failed download leaves no
    folder behind."""
    if is_url(output):
        try:
            Storage(output).check_writable()
        except PermissionError as e:
            raise BuildError(str(e)) from None
        return
    path = os.path.abspath(output.removeprefix("file://"))
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        raise BuildError(f"cannot write to {output}: {path} is not a writable folder")


@task(
    name="download-archives",
    retries=2,
    retry_delay_seconds=10,
    retry_condition_fn=worth_retrying,
    cache_policy=NO_CACHE,
)
def download_archives(
    dataset: str, source: str, cache_dir: str, splits: list[str] | None, md5: dict[str, str] | None, output: str
) -> str:
    """Download what `dataset` needs from the URL `source` into `cache_dir`; return the local path
    to open. Verified downloads from an earlier run are reused without a request."""
    log = get_run_logger()
    check_output_writable(output)
    real, shown = reveal(source), redact_url(source)
    log.info("downloading %s into %s", shown, cache_dir)
    progress = DownloadProgress()
    artifact = create_progress_artifact(0.0, key=DOWNLOAD_KEY, description=f"download {shown}")
    start = time.monotonic()
    with cf.ThreadPoolExecutor(1, thread_name_prefix="download") as ex:
        fut = ex.submit(
            _localize, dataset, real, cache_dir, splits=splits, md5=md5, policy=POLICY, progress=progress.update
        )
        while True:
            try:
                local = fut.result(timeout=REPORT_EVERY)
                break
            except cf.TimeoutError:
                pass
            finally:
                for line in progress.due_lines(force=fut.done()):
                    log.info("download %s", line)
                try:
                    update_progress_artifact(artifact, progress.percent(), description=f"download {shown}")
                except Exception as e:  # a busy server must not fail the download; the next update catches up
                    log.warning("download progress artifact not updated: %s", e)
    # 100% also when nothing was fetched: every archive was a verified download already in the cache.
    update_progress_artifact(artifact, 100.0, description=f"download {shown}: done")
    log.info("source ready at %s (%.1fs)", local, time.monotonic() - start)
    return local


def _localize(dataset: str, source: str, cache_dir: str, **kw) -> str | None:
    """localize_source, with any error that still quotes the real URL redacted at this boundary
    (the task's failure is logged, and stored by the Prefect server, as its message says)."""
    try:
        return localize_source(dataset, source, cache_dir, **kw)
    except Exception as e:
        safe = redact_text(str(e), source)
        if safe == str(e):
            raise
        raise FetchError(f"{type(e).__name__}: {safe}") from None
