"""Shards as a reader sees them: SPEC -> shard list with sample counts, and each shard's index.

The DALI index (v1.2) written beside every tar gives, per sample, the offset and size of each
member. Both backends plan their reads from it: the pytorch backend reads image bytes by
(offset, size), the DALI backend writes per-epoch sub-indexes over the same tars. Only the
numbers are kept in memory (numpy, about 25 bytes a sample); sample keys are read back from
the index file when an error message needs one.

A remote SPEC may carry credentials (a token in its query, user:password@): every message here
names the redacted URL (shards/redact.py), and an error a client library raises while reading
the manifest or an index, which may quote the real URL, is redacted at this boundary.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from shards.dali_index import IndexFormatError, OffsetArrays, header_count, parse_offsets, row_key
from shards.manifest import IMAGE_EXTS, LABEL_EXT, ManifestError, resolve_spec
from shards.redact import redact_text, redact_url
from shards.storage import is_url


@contextlib.contextmanager
def redacted_errors(*urls: str) -> Iterator[None]:
    """Re-raise an error whose text quotes a URL's credentials as a ManifestError without them."""
    try:
        yield
    except ManifestError:
        raise  # built here, from redacted URLs
    except Exception as e:
        safe = redact_text(str(e), *urls)
        if safe == str(e):
            raise
        raise ManifestError(f"{type(e).__name__}: {safe}") from None


def open_binary(url: str):
    """Open a local path or fsspec URL for binary reading."""
    if is_url(url):
        return fsspec.open(url, "rb").open()
    return open(url.removeprefix("file://"), "rb")


def read_text(url: str) -> str:
    with open_binary(url) as f:
        return f.read().decode()


SampleIndex = OffsetArrays  # per-sample member offsets of one shard, parsed from its .idx


@dataclass
class Shard:
    url: str
    index_url: str  # a local copy's path once a remote set's index is cached (loaders/cache/)
    samples: int
    bytes: int | None = None  # from the manifest, when there is one
    sha256: str | None = None
    _index: SampleIndex | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """The tar's file name: the last part of its URL's path (never its query, where a token may be)."""
        return shard_name(self.url)

    def index(self) -> SampleIndex:
        if self._index is None:
            with redacted_errors(self.index_url):
                self._index = parse_index(read_text(self.index_url), self.index_url)
            if len(self._index) != self.samples:
                raise ManifestError(
                    f"{redact_url(self.index_url)}: index lists {len(self._index)} samples, "
                    f"manifest says {self.samples}"
                )
        return self._index

    def key(self, i: int) -> str:
        """The key of sample i (read from the index file again: keys are not kept in memory)."""
        return self.keys()[i]

    def keys(self) -> list[str]:
        """Every sample's key, in shard order (read from the index file)."""
        return [row_key(line) for line in read_text(self.index_url).splitlines()[1:]]


def shard_name(url: str) -> str:
    return (url.partition("?")[0] if is_url(url) else url).rsplit("/", 1)[-1]


def index_count(text_head: str, url: str) -> int:
    try:
        return header_count(text_head)
    except IndexFormatError as e:
        raise ManifestError(f"{redact_url(url)}: {e}") from None


def parse_index(text: str, url: str) -> SampleIndex:
    try:
        return parse_offsets(text, IMAGE_EXTS, LABEL_EXT)
    except IndexFormatError as e:
        raise ManifestError(f"{redact_url(url)}: {e}") from None


def open_shards(spec, split: str = "train") -> tuple[list[Shard], dict | None]:
    """SPEC (brace pattern, list, folder with manifest.json, s3:// URLs) -> shards with counts.

    Counts come from the manifest when there is one beside the shards, else from each
    index's first line ("v1.2 N").
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    given = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    with redacted_errors(*given):
        return _open_shards(spec, given, split)


def _open_shards(spec, given: list[str], split: str) -> tuple[list[Shard], dict | None]:
    refs, manifest = resolve_spec(spec, split=split)
    recorded = {e["name"]: e for sp in (manifest or {}).get("splits", {}).values() for e in sp["shards"]}
    shards = []
    for r in refs:
        if r.index_url is None:
            raise ManifestError(f"{redact_url(r.url)}: not a .tar shard (no .idx beside it)")
        samples = r.samples
        if samples is None:
            try:
                with open_binary(r.index_url) as f:
                    samples = index_count(f.readline().decode(), r.index_url)
            except FileNotFoundError:
                raise ManifestError(f"{redact_url(r.index_url)}: index missing (build shards with shardline)") from None
        rec = recorded.get(shard_name(r.url), {})
        shards.append(Shard(r.url, r.index_url, samples, rec.get("bytes"), rec.get("sha256")))
    if sum(s.samples for s in shards) == 0:
        raise ManifestError(f"{', '.join(redact_url(g) for g in given)}: the shards hold no samples")
    return shards, manifest
