"""Models for train/ tests, loaded through --arch package.module:Class."""

from __future__ import annotations

import torch
from torch import nn

from train.nets import NarrowResNet


class NaNAfterSix(NarrowResNet):
    """A real small ResNet whose output turns NaN from its 7th training forward pass on.

    With 48 samples at batch 8 (6 steps an epoch) that is the first step of epoch 1: what a
    diverging run looks like to the trainer, at a step the test knows.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__(num_classes)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > 6:
                out = out * float("nan")
        return out


__all__ = ["NaNAfterSix", "nn"]
