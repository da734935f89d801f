"""The training recipe: optimizer and its parameter groups, lr schedule, loss, mixup/cutmix, EMA.

Bag of Tricks (He et al. 2018) items live here: lr = base x global_batch / 256, linear warmup
per iteration then cosine decay, label smoothing, no weight decay on biases and norm layers
(zero-init of the last BN gamma is in models.py), mixup. `make_recipe` builds them all, once,
from the command line (a Recipe). Everything random here draws from its
own numpy Generator whose state goes into the checkpoint, so a resumed run repeats exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from train.config import Config
from train.distributed import Dist


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weights decay; biases and normalization parameters (all 1-D tensors) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = False
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"unknown optimizer {name!r}")


def peak_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: base_lr is the lr for a global batch of 256."""
    return base_lr * global_batch / 256


class WarmupCosine:
    """lr at optimizer step t: linear warmup from ~0 to peak, then cosine decay to min_lr.

    A pure function of the step, so the schedule's whole state is the step counter.
    """

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> None:
        self.peak, self.total, self.warmup, self.min_lr = peak, max(1, total_steps), warmup_steps, min_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr


def make_loss(label_smoothing: float) -> nn.Module:
    # CrossEntropyLoss takes class indices or (mixed) class probabilities, smoothing both.
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


class MixupCutmix:
    """Batch-level mixup / cutmix (as timm: each image mixes with its mirror in the batch).

    Returns the mixed images and soft targets (N x C probabilities). With both enabled each
    batch picks one at random. Its Generator state is checkpointed with state_dict().
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int) -> None:
        self.mixup_alpha, self.cutmix_alpha, self.num_classes = mixup_alpha, cutmix_alpha, num_classes
        self.rng = np.random.default_rng(seed)

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or self.rng.random() < 0.5)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        flipped = images.flip(0)
        if use_cutmix:
            h, w = images.shape[-2:]
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(self.rng.integers(h)), int(self.rng.integers(w))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            images = images.clone()
            images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
        else:
            images = images * lam + flipped * (1 - lam)
        one_hot = nn.functional.one_hot(labels, self.num_classes).to(
            images.dtype if images.is_floating_point() else torch.float32
        )
        targets = one_hot * lam + one_hot.flip(0) * (1 - lam)
        return images, targets

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class ModelEma:
    """Exponential moving average of the weights, updated after each optimizer step.

    The decay ramps up as min(decay, (1 + t) / (10 + t)) so the average is useful in short
    runs too (it would otherwise stay close to the random init for 1 / (1 - decay) steps).
    Float parameters and buffers are averaged; integer buffers (BN's step count) copied.
    The tensor lists are taken once (parameters and buffers are updated in place, also by
    load_state_dict), and the average is one torch._foreach_lerp_ over all of them: a few
    kernel launches a step instead of two per tensor (about 640 for ResNet-50).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._lists: tuple[nn.Module, list, list, list, list] | None = None

    def _tensors(self, model: nn.Module) -> tuple[list, list, list, list]:
        if self._lists is None or self._lists[0] is not model:
            src, ema = model.state_dict(keep_vars=True), self.module.state_dict(keep_vars=True)
            floats = [k for k, t in ema.items() if t.is_floating_point()]
            others = [k for k, t in ema.items() if not t.is_floating_point()]
            self._lists = (
                model,
                [ema[k].detach() for k in floats],
                [src[k].detach() for k in floats],
                [ema[k].detach() for k in others],
                [src[k].detach() for k in others],
            )
        return self._lists[1:]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema_f, src_f, ema_i, src_i = self._tensors(model)
        torch._foreach_lerp_(ema_f, src_f, 1 - d)  # ema + (1 - d) * (src - ema) = d * ema + (1 - d) * src
        if ema_i:
            torch._foreach_copy_(ema_i, src_i)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates


@dataclass
class Recipe:
    """What turns gradients into progress, built once from the config."""

    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    scaler: torch.amp.GradScaler | None
    ema: ModelEma | None
    mixing: MixupCutmix
    global_batch: int
    peak_lr: float


def make_recipe(cfg: Config, d: Dist, model: nn.Module, num_classes: int, batches: int, amp: str) -> Recipe:
    steps_per_epoch = -(-batches // cfg.accum_steps)
    global_batch = cfg.batch_size * d.world_size
    peak = peak_lr(cfg.lr, global_batch)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return Recipe(
        optimizer=make_optimizer(model, cfg.optimizer, peak, cfg.wd, cfg.momentum, cfg.nesterov),
        schedule=WarmupCosine(peak, cfg.epochs * steps_per_epoch, warmup, cfg.min_lr),
        scaler=torch.amp.GradScaler(d.device.type) if amp == "fp16" else None,
        ema=ModelEma(model, cfg.ema) if cfg.ema > 0 else None,
        mixing=MixupCutmix(cfg.mixup, cfg.cutmix, num_classes, seed=cfg.seed * 1000 + d.rank),
        global_batch=global_batch,
        peak_lr=peak,
    )
