"""Small networks of our own for CPU-sized runs, named as --arch train.nets:Class.

SmallConvNet is the demo preset's model: four full-resolution-first conv blocks, cheap enough
for a shared 2-core CPU. NarrowResNet is torchvision's ResNet (same BasicBlock, stem and
state_dict layout) with stage widths 16..128 and one block per stage: the tests' real but
small ResNet.
"""

from __future__ import annotations

import itertools

from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet


class NarrowResNet(ResNet):
    """ResNet with BasicBlocks, stage widths width x (1, 2, 4, 8) and `layers` blocks per stage."""

    def __init__(self, num_classes: int = 1000, width: int = 16, layers: tuple[int, ...] = (1, 1, 1, 1)) -> None:
        super().__init__(BasicBlock, list(layers), num_classes=num_classes, zero_init_residual=True)
        # torchvision fixes the widths at 64..512: rebuild the stages at `width`.
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(BasicBlock, width, layers[0])
        self.layer2 = self._make_layer(BasicBlock, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, width * 8, layers[3], stride=2)
        self.fc = nn.Linear(width * 8, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)  # zero-init of each block's last BN gamma


class SmallConvNet(nn.Module):
    """Four 3x3 conv-BN-ReLU-maxpool blocks (widths w, 2w, 4w, 8w), global average pool, linear.

    The first convolution runs at full input resolution, so fine textures survive (a 7x7
    stride-2 stem plus max-pool blurs 3-5 px patterns away at 48 px). About 9 M multiply-adds
    per 48 px image at width 16: the cheapest model that learns the demo set well on a CPU.
    """

    def __init__(self, num_classes: int = 1000, width: int = 16) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 8]
        blocks = []
        for cin, cout in itertools.pairwise(chans):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(chans[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
