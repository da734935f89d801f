"""manifest.json, the on-disk contract between build-shards and every reader.

Written last and atomically at the output root: its presence means the set is complete.
See DESIGN.md section 4 for the schema. Also here: turning a SPEC (brace pattern, list,
folder with a manifest, URL) into a list of shard URLs, which every reader needs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
from dataclasses import dataclass

from braceexpand import braceexpand

from shards.redact import redact_url
from shards.storage import Storage, is_url

MANIFEST = "manifest.json"
FORMAT = "shardline"
VERSION = 1
IMAGE_EXTS = ("jpg", "png")  # DESIGN.md section 2: the image member; every reader accepts both
LABEL_EXT = "label"  # fixed-width binary label member: little-endian int64
LABEL_DTYPE = "int64"
_LABEL_STRUCT = struct.Struct("<q")  # LABEL_DTYPE, little-endian
LABEL_BYTES = _LABEL_STRUCT.size


def encode_label(label: int) -> bytes:
    """The .label member of a sample."""
    return _LABEL_STRUCT.pack(label)


def decode_label(data: bytes) -> int:
    """A .label member's bytes back to the label."""
    return _LABEL_STRUCT.unpack(data)[0]


def shard_name(dataset: str, split: str, number: int, count: int) -> str:
    width = max(3, len(str(count - 1)))
    return f"{dataset}-{split}-{number:0{width}d}.tar"


def shard_pattern(dataset: str, split: str, count: int) -> str:
    width = max(3, len(str(count - 1)))
    return f"{dataset}-{split}-{{{0:0{width}d}..{count - 1:0{width}d}}}.tar"


def index_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx"


def new_manifest(dataset: str, image_ext: str, params: dict, classes: list[dict]) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "image_ext": image_ext,
        "label_ext": LABEL_EXT,
        "label_dtype": LABEL_DTYPE,
        "params": params,
        "classes": classes,
        "splits": {},
        "quarantine": [],
    }


def write_manifest(storage: Storage, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=False).encode() + b"\n"
    storage.write_bytes_atomic(MANIFEST, data)


class ManifestError(ValueError):
    pass


def read_manifest(root: str | Storage) -> dict:
    storage = root if isinstance(root, Storage) else Storage(root)
    try:
        m = json.loads(storage.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise ManifestError(f"no {MANIFEST} in {storage.shown}: the shard set is missing or incomplete") from None
    except json.JSONDecodeError as e:
        raise ManifestError(f"{redact_url(storage.url(MANIFEST))} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ManifestError(f"{redact_url(storage.url(MANIFEST))}: not a {FORMAT} v{VERSION} manifest")
    return m


@dataclass(frozen=True)
class ShardRef:
    """One shard a reader should open: its tar URL, its DALI index URL, its sample count."""

    url: str
    index_url: str | None
    samples: int | None  # None when unknown (a bare pattern without a manifest)


def resolve_spec(spec: str | os.PathLike | list, split: str = "train") -> tuple[list[ShardRef], dict | None]:
    """Expand a SPEC into shard references, plus the manifest when one was found.

    SPEC is a brace pattern, a list of paths/patterns, a folder (or URL) holding
    manifest.json (then `split` picks the split), or a single tar path/URL. Sample counts and
    indexes come from the manifest beside the shards when there is one. A URL's query (a token
    the server asks for) goes with every URL made from it: the manifest's, each index's.
    """
    specs = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    if len(specs) == 1 and not _path_of(specs[0]).endswith(".tar") and "{" not in specs[0]:
        storage = Storage(specs[0])
        m = read_manifest(storage)
        if split not in m["splits"]:
            raise ManifestError(f"{storage.shown}: manifest has no split {split!r} (has {sorted(m['splits'])})")
        refs = [
            ShardRef(storage.url(s["name"]), storage.url(s["index"]), s["samples"])
            for s in m["splits"][split]["shards"]
        ]
        return refs, m
    urls = [u for s in specs for u in braceexpand(s)]
    if not urls:
        raise ManifestError("no shards given")
    # Look for a manifest beside the first shard, for counts; shards may be a subset.
    manifest, by_name = None, {}
    try:
        manifest = read_manifest(folder_beside(urls[0]))
        for sp in manifest["splits"].values():
            for s in sp["shards"]:
                by_name[s["name"]] = s
    except (ManifestError, OSError):
        manifest = None
    refs = []
    for u in urls:
        if not is_url(u) and not os.path.exists(u):
            raise ManifestError(f"shard not found: {u}")
        path = _path_of(u)
        name, query = path.rsplit("/", 1)[-1], u[len(path) :]
        idx = path[: -len(".tar")] + ".idx" + query if path.endswith(".tar") else None
        rec = by_name.get(name)
        refs.append(ShardRef(u, idx, rec["samples"] if rec else None))
    return refs, manifest


def manifest_folder(spec: str | os.PathLike | list) -> str:
    """Where resolve_spec looks for SPEC's manifest.json: the folder SPEC names, or the one
    holding its first shard (a shard list or brace pattern may be a subset of a built set)."""
    specs = [str(s) for s in spec] if isinstance(spec, (list, tuple)) else [str(spec)]
    if len(specs) == 1 and not _path_of(specs[0]).endswith(".tar") and "{" not in specs[0]:
        return specs[0]
    return folder_beside(next(iter(braceexpand(specs[0]))))


def folder_beside(shard_url: str) -> str:
    """The folder (or URL, its query kept) holding a shard: where its set's manifest.json lies."""
    path, query = _path_of(shard_url), shard_url[len(_path_of(shard_url)) :]
    return path.rsplit("/", 1)[0] + query if "/" in path else "."


def _path_of(url: str) -> str:
    """A URL without its query (the part that names the object); a local path as it is."""
    return url.partition("?")[0] if is_url(url) else url
