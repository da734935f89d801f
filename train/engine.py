"""The loops: one training epoch (resumable at any optimizer step) and an exact evaluation.

A training step = `accum_steps` forward/backward passes (DDP's gradient all-reduce only on
the last, through no_sync), one small all-reduce of two flags (non-finite loss on any rank;
rank 0 wants a checkpoint) so every rank takes the same decision, then clipping, the
optimizer step, the lr schedule and the EMA.

Nothing in a step waits for the GPU. The flags of step t are copied (non-blocking) into
pinned host memory right after their all-reduce, and a CUDA event is recorded behind that
copy; the host reads them after step t + 1 has been queued (a step late), waiting on that
event only, never on the stream (a .tolist() there would wait for step t + 1's whole
forward and backward). The loss sum stays on the device until a checkpoint or
the epoch end needs it, and the progress bar reads the loss only every --log-every steps; so
the CPU runs ahead of the GPU and loader waits are real waits. A non-finite loss is therefore
found one step after it happened: the run stops there, before any checkpoint is written, so
the last checkpoint on disk (taken only after its own step's flags were read) is always
finite. Before a checkpoint every pending flag is read first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from train.distributed import Dist, all_reduce_sum, any_ranks
from train.recipe import MixupCutmix, ModelEma, WarmupCosine


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; training stopped before any checkpoint took that step."""


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def choose_amp(amp: str, device_type: str, native_bf16: bool) -> str:
    """auto: bf16 where the GPU computes it natively (Ampere and later), fp16 with a grad scaler
    on older GPUs (V100, T4: their bf16 is emulated, several times slower), none on CPU."""
    if amp != "auto":
        return amp
    if device_type == "cuda":
        return "bf16" if native_bf16 else "fp16"
    return "none"


def resolve_amp(amp: str, device: torch.device) -> str:
    # including_emulation defaults to True, which answers yes on V100/T4, whose bf16 is emulated.
    native = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_amp(amp, device.type, native)


# The epoch's running sums, per rank, named as EpochState's fields: a checkpoint keeps every
# rank's, an elastic resume hands the old ranks' to the new ones (train/elastic.py), the epoch end
# adds them over ranks (epoch_totals). Counts add up over ranks; times are per rank, so their
# sum over ranks is world size x the epoch's time.
EPOCH_COUNTS = ("loss_sum", "seen")
EPOCH_TIMES = ("seconds", "wait_seconds")
EPOCH_SUMS = EPOCH_COUNTS + EPOCH_TIMES


@dataclass
class EpochState:
    """What advances inside an epoch; all of it goes into the checkpoint (per rank)."""

    epoch: int = 0
    batches: int = 0  # micro-batches of this epoch already trained on
    global_step: int = 0  # optimizer steps since the start of the run
    loss_sum: float = 0.0  # sum of per-sample losses over this epoch (this rank)
    seen: int = 0  # samples trained on this epoch (this rank)
    seconds: float = 0.0  # time in the training loop this epoch (this rank)
    wait_seconds: float = 0.0  # of which waiting for the loader
    lr: float = 0.0

    def reset(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0
        self.set_sums(EpochState().sums())

    def sums(self) -> dict[str, float]:
        """This rank's running sums of the epoch (EPOCH_SUMS)."""
        return {k: getattr(self, k) for k in EPOCH_SUMS}

    def set_sums(self, sums: Mapping[str, float]) -> None:
        for k in EPOCH_SUMS:
            setattr(self, k, sums[k])


def epoch_totals(state: EpochState, dist: Dist) -> dict[str, float]:
    """The epoch's running sums added over every rank (a collective: every rank calls it)."""
    return dict(zip(EPOCH_SUMS, all_reduce_sum(list(state.sums().values()), dist), strict=True))


def ddp_of(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel module the trainer steps, also under torch.compile's wrapper
    (train.distributed.wrap_model compiles DDP, not the other way round)."""
    inner = getattr(model, "_orig_mod", model)
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def copy_to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of a small device tensor, readable later without waiting for work queued after it.

    On a GPU: a non-blocking copy into pinned memory (torch's caching host allocator: no
    cudaHostAlloc per step) and an event recorded right behind it on the current stream;
    whoever reads the copy waits for that event only. On CPU the tensor itself, no event.
    """
    if t.device.type != "cuda":
        return t, None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))
    return host, copied


@dataclass
class _Pending:
    """A queued step whose flags the host has not read yet."""

    flags: torch.Tensor  # int32 [2] on the host: non-finite on any rank, checkpoint wanted by rank 0
    copied: torch.cuda.Event | None  # GPU: recorded behind the flags' copy to the host
    epoch: int
    batches: int  # state.batches before the step
    step: int  # state.global_step before the step
    lr: float
    loss: torch.Tensor  # this step's per-sample mean loss (for the error message)


@dataclass
class Trainer:
    """Everything a training step needs, built once by train.run."""

    model: nn.Module  # possibly DDP- and compile-wrapped
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    criterion: nn.Module
    dist: Dist
    amp: str
    accum_steps: int
    clip_grad: float = 0.0
    scaler: torch.amp.GradScaler | None = None
    ema: ModelEma | None = None
    mixing: MixupCutmix | None = None
    channels_last: bool = False
    raw_model: nn.Module | None = None  # unwrapped: what the EMA averages
    on_first_batch: Callable[[torch.Tensor], None] | None = None
    _first_logged: bool = field(default=False, repr=False)
    _pending: list[_Pending] = field(default_factory=list, repr=False)
    _loss_sum: torch.Tensor | None = field(default=None, repr=False)  # state.loss_sum, on the device

    def train_epoch(
        self,
        loader,
        state: EpochState,
        *,
        want_checkpoint: Callable[[], bool],
        save_checkpoint: Callable[[], None],
        on_step: Callable[[EpochState, torch.Tensor, int], None] | None = None,
    ) -> None:
        """Train from state.batches to the end of the epoch; state is exact when this returns
        and whenever save_checkpoint is called (loss_sum included)."""
        self.model.train()
        n = len(loader)
        it = iter(loader)
        self._loss_sum = torch.tensor(state.loss_sum, dtype=torch.float64, device=self.dist.device)
        while state.batches < n:
            t_step = time.perf_counter()
            group = min(self.accum_steps, n - state.batches)
            loss_total, nonfinite, samples, wait = self._forward_backward(it, group)
            flags = any_ranks([nonfinite, want_checkpoint()], self.dist, read=False)
            flags, copied = copy_to_host(flags)  # queued before this step's optimizer kernels
            mean_loss = loss_total / max(1, samples)
            self._pending.append(
                _Pending(flags, copied, state.epoch, state.batches, state.global_step, state.lr, mean_loss)
            )
            state.lr = self.schedule.apply(self.optimizer, state.global_step)
            self._optimizer_step()
            state.global_step += 1
            state.batches += group
            state.seen += samples
            self._loss_sum += loss_total
            state.wait_seconds += wait
            # The previous step's flags: long done on the device by now, so reading them costs no wait.
            checkpoint = self._settle(keep=1)
            state.seconds += time.perf_counter() - t_step  # logging and checkpoints are not step time
            if on_step is not None:
                on_step(state, mean_loss, group)
            if checkpoint and state.batches < n:  # the epoch-end checkpoint follows anyway
                self._settle(keep=0)  # this step too: a checkpoint never holds an unchecked step
                state.loss_sum = self._loss_sum.item()
                save_checkpoint()
        t_end = time.perf_counter()
        self._settle(keep=0)
        state.loss_sum = self._loss_sum.item()  # waits for the last step: its time belongs to the epoch
        state.seconds += time.perf_counter() - t_end

    def _forward_backward(self, it, group: int) -> tuple[torch.Tensor, torch.Tensor, int, float]:
        """`group` micro-batches: summed loss (float64, on the device), non-finite flag, samples, loader wait."""
        ddp = ddp_of(self.model)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=self.dist.device)
        wait, samples = 0.0, 0
        for i in range(group):
            t_wait = time.perf_counter()
            images, labels = next(it)
            wait += time.perf_counter() - t_wait
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if self.mixing is not None and self.mixing.enabled:
                images, targets = self.mixing(images, labels)
            if not self._first_logged and self.on_first_batch is not None:
                self.on_first_batch(images)
            self._first_logged = True
            sync = ddp.no_sync() if ddp is not None and i < group - 1 else contextlib.nullcontext()
            with sync:
                with autocast(self.amp, self.dist.device):
                    loss = self.criterion(self.model(images), targets)
                scaled = loss / group
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss = loss.detach().float()
            nonfinite |= ~torch.isfinite(loss)
            loss_total += loss.double() * images.shape[0]
            samples += images.shape[0]
        return loss_total, nonfinite, samples, wait

    def _settle(self, keep: int) -> bool:
        """Read the flags of all pending steps but the last `keep`; raise on a non-finite loss.

        Returns whether rank 0 asked for a checkpoint in one of them.
        """
        checkpoint = False
        while len(self._pending) > keep:
            p = self._pending.pop(0)
            if p.copied is not None:
                p.copied.synchronize()  # that step's all-reduce and copy only, not the steps queued since
            stop, wanted = (bool(v) for v in p.flags.tolist())
            if stop:
                self._pending.clear()
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLoss(
                    f"non-finite loss ({p.loss.item()}) at epoch {p.epoch}, batch {p.batches}, step "
                    f"{p.step} (lr {p.lr:.4g}): stopped before any checkpoint took it"
                )
            checkpoint |= wanted
        return checkpoint

    def _optimizer_step(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            if self.clip_grad > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip_grad > 0:
                nn.utils.clip_grad_norm_(params, self.clip_grad)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model if self.raw_model is not None else self.model)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader, dist: Dist, amp: str = "none", channels_last: bool = False, tta: str = "none"
) -> dict:
    """Top-1 / top-5 (percent) and mean loss over the real samples of every rank, exactly.

    Per-rank sums of correct predictions, losses and sample counts (padding rows left out
    through the loader's valid mask) are all-reduced, so the result equals a single-process
    evaluation of the same data whatever the world size. Masking by multiplication, not by
    indexing, so no batch waits for the GPU (loss[valid] needs the count on the host).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=dist.device)
    loader.set_epoch(0)
    for images, labels, valid in loader.with_valid():
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(amp, dist.device):
            logits = model(images).float()
            if tta == "flip":
                logits = (logits + model(images.flip(3)).float()) / 2
        loss = nn.functional.cross_entropy(logits, labels, reduction="none")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack(
            [
                (hit[:, 0] & valid).sum(),
                (hit.any(dim=1) & valid).sum(),
                torch.where(valid, loss, 0.0).sum(),
                valid.sum(),
            ]
        ).double()
    model.train(was_training)
    top1, top5, loss_sum, count = all_reduce_sum(sums.tolist(), dist)
    count = max(count, 1.0)
    return {"top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count, "loss": loss_sum / count, "samples": int(count)}
