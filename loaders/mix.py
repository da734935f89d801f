"""Several sets in one stream: the joint class list and one epoch's mixed order, in numpy.

The pure core of DESIGN.md section 6's mapping form ({SPEC: weight, ...}); what the loader
plans from, with plain numbers, so every rank and both backends compute the same thing:

- joint_classes: one class list by class id (a class's folder name or wnid: ImageNet has two
  classes *named* "crane", never two with one id). The first set's classes keep their labels,
  a later set's new classes are appended in its own order, a class in both sets is one class.
- shares: how many of an epoch's samples each set gives, its weight's share (largest remainder).
- mixed_order: each set reads an endless stream of passes over itself, every pass a new
  permutation from (seed, set, pass); epoch e takes that set's next `share` samples of the
  stream. A set smaller than its share so repeats, each pass in a new order; a larger one gives
  a different subset each epoch and all of itself over enough epochs. The sets' samples are
  then interleaved by a seeded shuffle of which set each position draws from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from loaders.spec import Shard, is_url, open_shards
from shards.redact import redact_url


def joint_classes(class_lists: list[list[dict]]) -> tuple[list[dict], list[np.ndarray]]:
    """(the joint class list, per set: int64 array mapping its labels to joint labels)."""
    joint: list[dict] = []
    by_id: dict[str, int] = {}
    remaps = []
    for classes in class_lists:
        remap = np.zeros(len(classes), np.int64)
        for c in sorted(classes, key=lambda c: c["index"]):
            key = str(c.get("id", c.get("name")))
            if key not in by_id:
                by_id[key] = len(joint)
                joint.append({**c, "index": len(joint)})
            remap[c["index"]] = by_id[key]
        remaps.append(remap)
    return joint, remaps


def shares(weights: list[float], epoch_size: int) -> list[int]:
    """Samples each set gives to an epoch of `epoch_size`: proportional to its weight, summing exactly."""
    if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"set weights must be non-negative with a positive sum, not {weights}")
    if epoch_size < 1:
        raise ValueError(f"epoch_size must be positive, not {epoch_size}")
    total = float(sum(weights))
    exact = [epoch_size * w / total for w in weights]
    out = [int(x) for x in exact]
    # largest remainder first; ties go to the earlier set
    for k in sorted(range(len(weights)), key=lambda k: (-(exact[k] - out[k]), k))[: epoch_size - sum(out)]:
        out[k] += 1
    return out


def _pass(counts: list[int], seed: int, set_no: int, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass p over one set: shards permuted, samples permuted inside each (local shard numbers)."""
    rng = np.random.default_rng([seed, set_no, p, 0x6D6978])  # "mix": no stream shared with a single-set plan
    shards, samples = [], []
    for s in rng.permutation(len(counts)):
        shards.append(np.full(counts[s], s, np.int32))
        samples.append(rng.permutation(counts[s]).astype(np.int32))
    return np.concatenate(shards), np.concatenate(samples)


def set_window(counts: list[int], share: int, *, seed: int, set_no: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The set's samples [epoch * share, (epoch + 1) * share) of its endless stream of passes."""
    size = sum(counts)
    lo, hi = epoch * share, (epoch + 1) * share
    parts_shard, parts_sample = [], []
    for p in range(lo // size, -(-hi // size)):
        sh, sa = _pass(counts, seed, set_no, p)
        a, b = max(lo - p * size, 0), min(hi - p * size, size)
        parts_shard.append(sh[a:b])
        parts_sample.append(sa[a:b])
    if not parts_shard:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(parts_shard), np.concatenate(parts_sample)


def mixed_order(
    set_counts: list[list[int]], set_shares: list[int], *, seed: int, epoch: int
) -> tuple[np.ndarray, np.ndarray]:
    """One epoch's order over all sets: (shard numbers into the joint shard list, sample numbers).

    The joint shard list is the sets' shard lists one after another, in the sets' order.
    """
    first = np.cumsum([0, *(len(c) for c in set_counts)])[:-1]
    draws = np.concatenate([np.full(n, k, np.int32) for k, n in enumerate(set_shares)])
    draws = np.random.default_rng([seed, epoch, 0x6D6978]).permutation(draws)
    shard = np.zeros(len(draws), np.int32)
    sample = np.zeros(len(draws), np.int32)
    for k, (counts, share) in enumerate(zip(set_counts, set_shares, strict=True)):
        sh, sa = set_window(counts, share, seed=seed, set_no=k, epoch=epoch)
        at = draws == k
        shard[at], sample[at] = sh + first[k], sa
    return shard, sample


# -- the sets a make_loader call names, opened -------------------------------------------------------


def as_sets(shards: Any) -> list[tuple[Any, float | None]] | None:
    """A mapping {SPEC: weight} or a list of set SPECs (folders, or lists) -> [(SPEC, weight or None)];
    None for one set's SPEC (a pattern, a folder, or a list of shard paths, as ever)."""
    if isinstance(shards, Mapping):
        for spec, w in shards.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)):
                raise ValueError(f"the weight of {redact_url(str(spec))} is {w!r}: weights are numbers")
        return list(shards.items())
    if isinstance(shards, (list, tuple)) and any(_names_a_set(s) for s in shards):
        return [(s, None) for s in shards]
    return None


def _names_a_set(spec: Any) -> bool:
    if isinstance(spec, (list, tuple)):
        return True
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    return "{" not in text and not text.partition("?")[0].endswith(".tar")


@dataclass
class SetMix:
    """Several sets as one loader reads them: the joint shard list's order and labels."""

    specs: list[str]  # each set's SPEC, redacted (for messages)
    set_counts: list[list[int]]  # per set, its shards' sample counts
    set_shares: list[int]  # samples each set gives to an epoch
    seed: int
    classes: list[dict]  # the joint class list
    label_table: np.ndarray  # int64: joint label = label_table[label_base[shard] + the set's label]
    label_base: np.ndarray  # int64 per joint shard
    manifests: list[dict]  # each set's manifest.json (its splits' sizes, for the trainer's per-set val)

    @property
    def epoch_size(self) -> int:
        return sum(self.set_shares)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return mixed_order(self.set_counts, self.set_shares, seed=self.seed, epoch=epoch)

    def joint_labels(self, labels: torch.Tensor, shard_rows: np.ndarray) -> torch.Tensor:
        """Each row's label in the joint class list (on the labels' device)."""
        if not hasattr(self, "_tables") or self._tables[0].device != labels.device:
            self._tables = (
                torch.from_numpy(self.label_table).to(labels.device),
                torch.from_numpy(self.label_base).to(labels.device),
            )
        table, base = self._tables
        rows = torch.from_numpy(shard_rows.astype(np.int64)).to(labels.device, non_blocking=True)
        return table[base[rows] + labels]


def open_sets(
    sets: list[tuple[Any, float | None]], *, split: str, seed: int, epoch_size: int | None
) -> tuple[list[Shard], SetMix]:
    """Open every set (same split of each), join their shards and class lists, size the epoch."""
    if not sets:
        raise ValueError("no sets given: a mapping {SPEC: weight} needs at least one")
    shards, set_counts, class_lists, specs, manifests = [], [], [], [], []
    for spec, _ in sets:
        got, manifest = open_shards(spec, split=split)
        shown = ", ".join(redact_url(str(s)) for s in (spec if isinstance(spec, (list, tuple)) else [spec]))
        if any(is_url(s.url) for s in got):
            # The shard cache serves one set (its file names are the shards' names, which two sets can share).
            raise ValueError(f"{shown}: several sets in one stream are read from local folders only, for now")
        if not manifest or not manifest.get("classes"):
            raise ValueError(f"{shown}: several sets join their classes by name, so each needs its manifest.json")
        shards += got
        set_counts.append([s.samples for s in got])
        class_lists.append(manifest["classes"])
        manifests.append(manifest)
        specs.append(shown)
    sizes = [sum(c) for c in set_counts]
    weights = [float(sizes[k]) if w is None else float(w) for k, (_, w) in enumerate(sets)]
    classes, remaps = joint_classes(class_lists)
    bases = np.cumsum([0, *(len(r) for r in remaps)])[:-1]
    label_base = np.concatenate([np.full(len(c), b, np.int64) for c, b in zip(set_counts, bases, strict=True)])
    mix = SetMix(
        specs=specs,
        set_counts=set_counts,
        set_shares=shares(weights, sum(sizes) if epoch_size is None else epoch_size),
        seed=seed,
        classes=classes,
        label_table=np.concatenate(remaps),
        label_base=label_base,
        manifests=manifests,
    )
    return shards, mix
