"""Bring a remote `--source` to local disk: the archives a source kind needs, in parallel.

ImageNet: `--source` is a folder URL holding the archives under their official names; only
the archives of the requested splits are fetched, plus the devkit, each verified against its
official MD5 (or `--md5 NAME=HEX`, which wins). CIFAR-10: the URL of cifar-10-python.tar.gz
or of a folder holding it. Image folders: the URL of one .tar/.tar.gz/.zip of the tree,
extracted safely (no member outside the target) under the cache.

A query on the URL (a token the server asks for) goes with every archive fetched below it;
file names and progress name each archive by its path alone, never by its credentials.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable

from shards.checksums import expected_md5
from shards.fetch import FetchError, RetryPolicy, fetch, url_file_name
from shards.sources.imagenet import DEVKIT, TRAIN_TAR, VAL_TAR
from shards.storage import is_url

IMAGENET_ARCHIVES = {"train": TRAIN_TAR, "val": VAL_TAR, "devkit": DEVKIT}
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"

Progress = Callable[[str, int, int | None], None]  # (file name, bytes so far, total or None)


def archive_names(dataset: str, source: str | None) -> tuple[str, ...]:
    """The archive file names a `--md5 NAME=HEX` may name for this dataset and source."""
    if dataset == "imagenet":
        return tuple(IMAGENET_ARCHIVES.values())
    try:
        base = url_file_name(source) if source and is_url(source) else (source or "").rstrip("/").rsplit("/", 1)[-1]
    except FetchError:  # a bare host: no archive named by the URL itself
        base = ""
    if dataset == "cifar10":
        return (base,) if base.endswith((".tar.gz", ".tgz")) else (CIFAR10_ARCHIVE,)
    if dataset == "imagefolder" and source and is_url(source):
        return (base,)  # the one archive of the tree
    return ()  # a local folder or a generated set: no archive


def _below(folder_url: str, name: str) -> str:
    """The URL of `name` inside a folder URL, the folder's query (a token) kept at the end."""
    head, mark, query = folder_url.partition("?")
    return f"{head.rstrip('/')}/{name}{mark}{query}"


def _fetch_all(urls: list[str], cache_dir: str, md5: dict[str, str] | None, policy, progress, workers) -> list[str]:
    def one(url: str) -> str:
        name = url_file_name(url)
        cb = (lambda done, total: progress(name, done, total)) if progress else None
        return fetch(url, cache_dir, md5=expected_md5(name, md5), policy=policy, progress=cb)

    with cf.ThreadPoolExecutor(max(1, min(workers, len(urls)))) as pool:
        return list(pool.map(one, urls))  # parallel: three archives download at once


def _extract_tree(archive: str, cache_dir: str) -> str:
    """Extract an image-folder archive once; the finished tree is renamed into place."""
    base = os.path.basename(archive)
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    target = os.path.join(cache_dir, base)
    if os.path.isdir(target):
        return target
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=cache_dir)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():  # zipfile strips '..' and absolute parts itself
                    z.extract(info, tmp)
        else:
            with tarfile.open(archive) as t:
                t.extractall(tmp, filter="data")  # refuses links, devices and paths outside tmp
        entries = [e for e in os.listdir(tmp) if not e.startswith(".")]
        root = (
            os.path.join(tmp, entries[0]) if len(entries) == 1 and os.path.isdir(os.path.join(tmp, entries[0])) else tmp
        )
        os.replace(root, target)
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise FetchError(f"{archive}: cannot extract: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def localize_source(
    dataset: str,
    source: str | None,
    cache_dir: str,
    *,
    splits: list[str] | None = None,
    md5: dict[str, str] | None = None,
    policy: RetryPolicy | None = None,
    progress: Progress | None = None,
    workers: int = 3,
) -> str | None:
    """Return a local path to give `open_source`: `source` itself when it is already local."""
    if source is None or not is_url(source):
        return source
    base = source.rstrip("/")
    if dataset == "imagenet":
        wanted = [IMAGENET_ARCHIVES[s] for s in (splits or ["train", "val"]) if s in IMAGENET_ARCHIVES]
        urls = [_below(base, n) for n in [*wanted, IMAGENET_ARCHIVES["devkit"]]]
        paths = _fetch_all(urls, cache_dir, md5, policy, progress, workers)
        return os.path.dirname(paths[0])
    if dataset == "cifar10":
        url = base if url_file_name(base).endswith((".tar.gz", ".tgz")) else _below(base, CIFAR10_ARCHIVE)
        return _fetch_all([url], cache_dir, md5, policy, progress, 1)[0]
    if dataset == "imagefolder":
        (archive,) = _fetch_all([base], cache_dir, md5, policy, progress, 1)
        return _extract_tree(archive, cache_dir)
    raise FetchError(f"{dataset}: a URL --source is not supported for this dataset")
