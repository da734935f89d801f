"""Resuming a checkpoint under another number of processes or batch size (issue 15).

The documented rule for what depends on the global batch:

- the peak lr follows the linear scaling rule of recipe.peak_lr (base lr x global batch / 256),
  so it is recomputed for the new global batch, as for any run;
- the lr schedule's position counts samples seen, not steps: the run continues at step
  samples_seen / new global batch of a schedule laid out in the new world's steps, so warmup
  and decay end after the same number of samples as they would have;
- the epoch in progress continues: the new ranks read exactly the samples the old ones had not
  (loaders' elastic resume, from any one rank's loader state: they agree at a batch boundary);
  the epoch's running loss and sample count carry over, so its train_loss covers the whole epoch.

What cannot carry over: the per-rank RNG streams (mixup/cutmix, dropout) belong to ranks that no
longer exist; the new ranks start theirs from the seed. So an elastic resume is a correct
continuation, not a bit-exact replay (a resume on the same shape is; see train/checkpoint.py).
"""

from __future__ import annotations

from train.engine import EpochState
from train.recipe import peak_lr


def old_global_batch(ck: dict) -> int:
    return int(ck["config"]["batch_size"]) * int(ck.get("world_size", 1))


def samples_seen(ck: dict) -> int:
    """Samples trained on before the checkpoint (all ranks); older checkpoints: steps x global batch."""
    if "samples_seen" in ck:
        return int(ck["samples_seen"])
    return int(ck["global_step"]) * old_global_batch(ck)


def samples_before_epoch(ck: dict) -> int:
    """Samples trained on in the epochs before the checkpoint's epoch."""
    if "samples_before_epoch" in ck:
        return int(ck["samples_before_epoch"])
    return samples_seen(ck) - sum(int(r.get("seen", 0)) for r in ck["ranks"]) if ck["batches"] > 0 else samples_seen(ck)


def same_shape(ck: dict, world_size: int, batch_size: int, micro_batch: int) -> bool:
    """The checkpoint was taken with this many processes, this global batch and this micro-batch."""
    loader = (ck["ranks"][0] or {}).get("loader", {}) if ck.get("ranks") else {}
    return (
        ck.get("world_size") == world_size
        and int(ck["config"]["batch_size"]) == batch_size
        and loader.get("batch_size", micro_batch) == micro_batch
    )


def carried_sums(ranks: list[dict], rank: int, world_size: int) -> dict:
    """This new rank's share of the old ranks' running sums for the epoch.

    Epoch metrics are sums over ranks (loss and sample counts) or per-rank means (seconds), so
    rank 0 takes the old totals and every rank the old mean time: the epoch-end reduction then
    gives the whole epoch's train_loss and time.
    """
    n = max(1, len(ranks))
    return {
        "loss_sum": sum(r["loss_sum"] for r in ranks) if rank == 0 else 0.0,
        "seen": sum(r["seen"] for r in ranks) if rank == 0 else 0,
        "seconds": sum(r["seconds"] for r in ranks) / n,
        "wait_seconds": sum(r["wait_seconds"] for r in ranks) / n,
        "lr": ranks[0]["lr"] if ranks else 0.0,
    }


def resume(ck: dict, loader, *, rank: int, world_size: int, global_batch: int, peak: float) -> tuple[EpochState, str]:
    """The epoch state to continue from under the new shape, and the log line that says what changed."""
    state = EpochState(int(ck["epoch"]), 0, 0)
    through = 0.0
    if ck["batches"] > 0:  # mid-epoch: the new ranks read the rest of it
        loader.load_state_dict(ck["ranks"][0]["loader"])
        state.batches = int(loader.state_dict()["batches"])
        through = loader.progress
        for k, v in carried_sums(ck["ranks"], rank, world_size).items():
            setattr(state, k, v)
    state.global_step = round(samples_seen(ck) / global_batch)
    old_batch = old_global_batch(ck)
    old_peak = peak_lr(float(ck["config"]["lr"]), old_batch)
    line = (
        f"resumed {ck.get('world_size', 1)} -> {world_size} processes at epoch {state.epoch}, {through:.0%} through; "
        f"global batch {old_batch} -> {global_batch}, lr {old_peak:.4g} -> {peak:.4g}"
    )
    return state, line
