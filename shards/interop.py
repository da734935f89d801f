"""Files for other readers, derived from the manifest and published beside it (DESIGN.md section 4).

    _info.json                    timm's dataset info (timm/data/readers/reader_wds.py reads it):
                                  {"name", "splits": {split: {"name", "num_samples", "filenames",
                                  "shard_lengths"}}}; the val split is listed again under timm's
                                  default --val-split name, "validation"
    {dataset}-{split}.wids.json   a wids shard index (wids-shard-index-v1) per split: shardlist of
                                  {"url" relative to the index, "nsamples", "filesize"}

Both are pure functions of the manifest, so `finish()` writes them just before manifest.json
(the one completeness marker) with the same atomic publish, and `verify` rebuilds them from
the manifest and compares. No torch, no timm, no wids here: the formats are plain JSON.
"""

from __future__ import annotations

import json

from shards.storage import Storage

TIMM_INFO = "_info.json"
TIMM_VAL_ALIAS = {"val": "validation"}  # our split name -> timm train.py's default --val-split
WIDS_KIND = "wids-shard-index-v1"
WIDS_VERSION = 1


def wids_index_name(dataset: str, split: str) -> str:
    return f"{dataset}-{split}.wids.json"


def timm_info(manifest: dict) -> dict:
    """timm's `_info.json` for every split of the manifest (filenames relative to the root)."""
    splits = {}
    for split, entry in manifest["splits"].items():
        shards = entry["shards"]
        info = {
            "num_samples": entry["samples"],
            "filenames": [s["name"] for s in shards],
            "shard_lengths": [s["samples"] for s in shards],
        }
        splits[split] = {"name": split, **info}
        alias = TIMM_VAL_ALIAS.get(split)
        if alias and alias not in manifest["splits"]:
            splits[alias] = {"name": alias, **info}
    return {"name": manifest["dataset"], "splits": splits}


def wids_index(manifest: dict, split: str) -> dict:
    """The wids shard index of one split; urls are relative, so the set can move or sit in a bucket."""
    return {
        "__kind__": WIDS_KIND,
        "wids_version": WIDS_VERSION,
        "name": f"{manifest['dataset']}-{split}",
        "shardlist": [
            {"url": s["name"], "nsamples": s["samples"], "filesize": s["bytes"]}
            for s in manifest["splits"][split]["shards"]
        ],
    }


def reader_files(manifest: dict) -> dict[str, dict]:
    """Every companion file of the set: name -> JSON document."""
    files = {TIMM_INFO: timm_info(manifest)}
    for split in manifest["splits"]:
        files[wids_index_name(manifest["dataset"], split)] = wids_index(manifest, split)
    return files


def _encode(doc: dict) -> bytes:
    return json.dumps(doc, indent=1).encode() + b"\n"


def write_reader_files(storage: Storage, manifest: dict) -> list[str]:
    """Publish each companion file atomically (local rename or whole-object upload); returns the names."""
    files = reader_files(manifest)
    for name, doc in files.items():
        storage.write_bytes_atomic(name, _encode(doc))
    return list(files)


def check_reader_files(storage: Storage, manifest: dict) -> dict[str, list[str]]:
    """name -> problems (empty list = good) for each companion file, compared with the manifest."""
    out: dict[str, list[str]] = {}
    for name, want in reader_files(manifest).items():
        try:
            got = json.loads(storage.read_bytes(name))
        except FileNotFoundError:
            out[name] = ["missing (a set built before reader files existed? add --write-reader-files)"]
            continue
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            out[name] = [f"not valid JSON: {e}"]
            continue
        out[name] = [] if got == want else [_first_difference(got, want)]
    return out


def _first_difference(got: object, want: object, where: str = "") -> str:
    """A one-line description of where two JSON documents part."""
    if isinstance(got, dict) and isinstance(want, dict):
        for k in sorted(set(got) | set(want)):
            if k not in got:
                return f"{where}{k} missing"
            if k not in want:
                return f"{where}{k} not in the manifest"
            if got[k] != want[k]:
                return _first_difference(got[k], want[k], f"{where}{k}.")
    if isinstance(got, list) and isinstance(want, list) and len(got) == len(want):
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                return _first_difference(g, w, f"{where}{i}.")
    return f"{where.rstrip('.') or 'document'} is {json.dumps(got)[:80]}, the manifest says {json.dumps(want)[:80]}"
