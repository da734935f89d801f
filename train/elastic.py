"""Resuming a checkpoint under another number of processes or batch size.

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

from train.checkpoint import Saved
from train.engine import EPOCH_COUNTS, EPOCH_TIMES, EpochState
from train.recipe import peak_lr


def same_shape(ck: Saved, world_size: int, batch_size: int, micro_batch: int) -> bool:
    """The checkpoint was taken with this many processes, this global batch and this micro-batch."""
    return (
        ck.world_size == world_size
        and ck.batch_size == batch_size
        and (ck.micro_batch if ck.micro_batch is not None else micro_batch) == micro_batch
    )


def carried_sums(ranks: list[dict], rank: int) -> dict:
    """This new rank's share of the old ranks' running sums for the epoch (and their lr).

    Counts add up over ranks and times are per rank (engine.EPOCH_SUMS), so rank 0 takes the
    old totals and every rank the old mean time: the epoch-end reduction then gives the whole
    epoch's train_loss and time.
    """
    n = max(1, len(ranks))
    counts = {k: sum(r[k] for r in ranks) if rank == 0 else 0 for k in EPOCH_COUNTS}
    times = {k: sum(r[k] for r in ranks) / n for k in EPOCH_TIMES}
    return counts | times | {"lr": ranks[0]["lr"] if ranks else 0.0}


def resume(ck: Saved, loader, *, rank: int, world_size: int, global_batch: int, peak: float) -> tuple[EpochState, str]:
    """The epoch state to continue from under the new shape, and the log line that says what changed."""
    state = EpochState(ck.epoch, 0, 0)
    through = 0.0
    if ck.batches > 0 and ck.loader is not None:  # mid-epoch: the new ranks read the rest of it
        loader.load_state_dict(ck.loader)
        state.batches = int(loader.state_dict()["batches"])
        through = loader.progress
        carried = carried_sums(ck.rank_sums, rank)
        state.set_sums(carried)
        state.lr = carried["lr"]
    state.global_step = round(ck.samples_seen / global_batch)
    old_peak = peak_lr(ck.base_lr, ck.global_batch)
    line = (
        f"resumed {ck.world_size} -> {world_size} processes at epoch {state.epoch}, {through:.0%} through; "
        f"global batch {ck.global_batch} -> {global_batch}, lr {old_peak:.4g} -> {peak:.4g}"
    )
    return state, line
