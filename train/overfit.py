"""`python -m train ... --overfit-batches N`: the sanity step before a real run.

Take the first N batches of the training data once, without augmentation (the evaluation
transform: resize, center crop), and train on exactly those batches again and again. A model,
loss, labels and learning rate that work together memorize them: the loss falls to near zero
and train top-1 reaches 100%. If that does not happen within --overfit-steps optimizer steps,
something basic is broken, and no real run will do better. Regularizers that forbid a near-zero
loss are off here: label smoothing, mixup and cutmix (the recipe's weight decay and lr stay).

Passing means: one whole pass over the N batches with every prediction right and a mean
cross-entropy at most PASS_LOSS, measured on the forward passes that train (BatchNorm in train
mode, as in training). The result goes to OUTPUT/summary.json as "overfit": {"passed", "steps",
"first_loss", "final_loss", ...}; the exit status is 0 on a pass and 1 on a failure.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from train.config import Config
from train.engine import autocast, resolve_amp
from train.recipe import WarmupCosine, make_optimizer, peak_lr
from train.report import Reporter

PASS_LOSS = 0.05  # mean cross-entropy over the N batches that counts as "near zero"
WARMUP_FRACTION = 0.05  # of the step budget: a short linear warmup, then cosine decay over the budget
FAILURE_HINTS = (
    "the learning rate (--lr: too high diverges or stalls, too low crawls; try x10 and x0.1)",
    "the labels (do they match the images? look: python -m shards show DATA --output grid.png)",
    "a collapsed feature map (strides that shrink --image-size to almost nothing: try --stem small "
    "or a larger --image-size)",
    "too little model or budget for N batches (try --overfit-batches 1, or more --overfit-steps)",
)


class TooFewBatches(ValueError):
    """The training data holds fewer full batches than --overfit-batches asks for."""


@dataclass
class OverfitResult:
    passed: bool
    steps: int
    first_loss: float  # mean loss of the first pass over the N batches
    final_loss: float  # mean loss of the last pass
    final_top1: float  # percent, last pass
    batches: int
    batch_size: int
    seconds: float
    diverged: bool = False


def take_batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of epoch 0, read once and kept (on the loader's device)."""
    full = loader.num_samples // loader.batch_size  # the last, padded batch would repeat samples
    if n > full:
        raise TooFewBatches(
            f"--overfit-batches {n}: the training data has only {full} full batches of {loader.batch_size}"
        )
    loader.set_epoch(0)
    batches = []
    for images, labels in loader:
        batches.append((images.clone(), labels.clone()))
        if len(batches) == n:
            break
    return batches


def memorize(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule: WarmupCosine,
    *,
    amp: str,
    max_steps: int,
    log=None,
) -> OverfitResult:
    """Train on `batches` in passes until one pass is all right at loss <= PASS_LOSS, or the budget ends."""
    criterion = nn.CrossEntropyLoss()  # no smoothing: a near-zero loss must be reachable
    device = batches[0][0].device
    model.train()
    t0, step, first, loss, top1, diverged = time.perf_counter(), 0, None, math.inf, 0.0, False
    log_every, next_log = max(1, max_steps // 10), 0
    while step < max_steps and not diverged:
        loss_sum, correct, seen = 0.0, 0, 0
        for images, labels in batches:
            schedule.apply(optimizer, step)
            with autocast(amp, device):
                logits = model(images)
            batch_loss = criterion(logits.float(), labels)
            if not torch.isfinite(batch_loss):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            step += 1
            loss_sum += batch_loss.item() * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
        if diverged:
            loss = math.inf
            break
        loss, top1 = loss_sum / seen, 100.0 * correct / seen
        first = loss if first is None else first
        if log and step >= next_log:
            log(f"overfit step {step}: loss {loss:.4f}, train top-1 {top1:.1f}%")
            next_log = step + log_every
        if top1 == 100.0 and loss <= PASS_LOSS:
            break
    passed = not diverged and top1 == 100.0 and loss <= PASS_LOSS
    return OverfitResult(
        passed, step, first if first is not None else loss, loss, top1,
        len(batches), len(batches[0][1]), round(time.perf_counter() - t0, 2), diverged,
    )  # fmt: skip


def run_overfit(cfg: Config, loader, model: nn.Module, device: torch.device) -> int:
    """The whole --overfit-batches run on a built loader (evaluation transform) and model; returns the exit status."""
    reporter = Reporter(cfg.output, active=True, progress="never")
    batches = take_batches(loader, cfg.overfit_batches)
    loader.close()  # its workers would go on decoding the epoch, for nothing, beside the training
    peak = peak_lr(cfg.lr, cfg.batch_size)
    optimizer = make_optimizer(model, cfg.optimizer, peak, cfg.wd, cfg.momentum, cfg.nesterov)
    schedule = WarmupCosine(peak, cfg.overfit_steps, round(WARMUP_FRACTION * cfg.overfit_steps), cfg.min_lr)
    reporter.log(
        f"overfitting {cfg.arch} on {len(batches)} batch(es) of {cfg.batch_size} (no augmentation, no label "
        f"smoothing, no mixup), peak lr {peak:.4g}, at most {cfg.overfit_steps} steps; output {cfg.output}"
    )
    r = memorize(
        model, batches, optimizer, schedule, amp=resolve_amp(cfg.amp, device), max_steps=cfg.overfit_steps,
        log=reporter.log,
    )  # fmt: skip
    reporter.summary({"overfit": asdict(r), "arch": cfg.arch, "lr": cfg.lr, "image_size": cfg.image_size})
    if r.passed:
        reporter.log(
            f"overfit: passed in {r.steps} steps ({r.seconds:.1f} s): loss {r.first_loss:.3f} -> "
            f"{r.final_loss:.4f}, train top-1 100%"
        )
        return 0
    what = "the loss became non-finite" if r.diverged else f"loss {r.first_loss:.3f} -> {r.final_loss:.4f}"
    reporter.log(
        f"overfit: FAILED after {r.steps} steps: {what}, train top-1 {r.final_top1:.1f}% (a pass needs 100% and "
        f"loss <= {PASS_LOSS}). Usual causes:\n" + "\n".join(f"  - {h}" for h in FAILURE_HINTS)
    )
    return 1
