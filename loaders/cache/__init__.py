"""A bounded local cache of remote shards, one per node, filled ahead of the readers in plan order.

Why: a backend that seeks through a remote tar per sample re-fetches large blocks at each jump
(the pytorch backend) or pays one request per sample (DALI). The epoch plan
(loaders/sharding.py) already says which shards each rank reads in which order, so whole shards
are downloaded ahead of use into a local folder, and both backends read only local files from
it: no per-sample request reaches the network.

One folder serves the node: the 8 ranks of an 8-GPU machine share it, and each shard crosses the
wire once per node. The package, one concern a file:

- plan.py: the node plan. Every process computes every local rank's plan, this epoch (from the
  reader's batch) and the next, from (seed, epoch, world size, rank); the local ranks are
  LOCAL_WORLD_SIZE consecutive ranks (all of them without it). Eviction and prefetch decide on
  that union: a shard another rank reads next is never the one to go.
- folder.py: the folder. Files, pins (a shared flock per shard being read), and one budget per
  node: every download records its reservation in the folder's ledger under one lock before it
  starts, so all processes together stay within cache_limit plus at most 2 of the largest shards
  (the bytes in flight, and what they brought that is about to be read); once readers release
  what they read, the folder goes back under the limit. Eviction by furthest next use (Belady)
  across ranks and across the epoch boundary, decided when readers release (not when a prefetch
  starts); a download evicts only what is needed later than what it fetches. A full disk evicts
  what may go and goes on; it fails, in one line naming the folder, only when nothing can go.
- download.py: one file. Parallel ranged GETs pinned to the ETag the download started with,
  hashed (sha256 against the manifest) as they come, retried (shards/retry.py); the shard a reader
  waits for gets the wire first: other downloads of the node pause while it transfers.
- indexes.py: each `.idx` checked (against the manifest's digest when it records one, its own
  shape, and its tar once that lands) before the reader trusts its offsets.
- facade.py: what the backends call. `ShardCache.get(j)` blocks until occurrence j of this
  epoch's sequence is here and pins it; `release(j)` unpins; meanwhile a prefetch thread fetches
  this rank's next shards in order of first need, bounded by bytes (2 of the largest shards
  ahead, and the room the budget gives), into the next epoch during this one's tail. `EpochReads(cache,
  plan)` turns that into batches: `need(b)`, `finished(b)`.

The smallest cache_limit that works is one largest shard per local rank plus the indexes; a
smaller one is refused in one line naming it. Readers that pin more than the limit allows at once
(a batch spanning shards, a DataLoader asking batches ahead) and have nothing in flight for
STUCK_S seconds go over it, with one warning, rather than wait for each other forever.

Shared with every process: a killed process's flocks go with it, so its downloads and
reservations are taken over (and its `.part` removed) by the next process to look. Final names
carry the content's digest (`<sha16>.<name>`), so a rebuilt set never reads an old copy.
"""

from loaders.cache.download import Remote
from loaders.cache.errors import CacheError
from loaders.cache.facade import CacheStats, EpochReads, ShardCache, default_folder, default_limit
from loaders.cache.folder import PART
from loaders.cache.plan import NodePlan, local_ranks

__all__ = [
    "PART",
    "CacheError",
    "CacheStats",
    "EpochReads",
    "NodePlan",
    "Remote",
    "ShardCache",
    "default_folder",
    "default_limit",
    "local_ranks",
]
