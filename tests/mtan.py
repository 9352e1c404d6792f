"""An MTAN-style network (Liu et al., CVPR 2019), written the way its reference code writes it.

A shared encoder whose stages each give an intermediate and an output feature map; per task, one attention
module per stage that masks the stage's output with a mask computed from the intermediate map and the previous
attention output, resized when its spatial size differs (``if x.size()[-2:] != y.size()[-2:]``: torch.fx cannot
trace that branch). BatchNorm everywhere, so train and eval mode differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.BatchNorm2d(cout), nn.ReLU())


class SharedEncoder(nn.Module):
    """Stages of two conv blocks, max-pooled between stages; returns ``[(intermediate, output), ...]``."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        widths = (3, *channels)
        self.first = nn.ModuleList(conv_bn(cin, cout) for cin, cout in zip(widths, channels))
        self.second = nn.ModuleList(conv_bn(c, c) for c in channels)

    def forward(self, x):
        features = []
        for stage, (first, second) in enumerate(zip(self.first, self.second)):
            if stage:
                x = F.max_pool2d(x, 2)
            middle = first(x)
            x = second(middle)
            features.append((middle, x))
        return features


class TaskAttention(nn.Module):
    """One task's attention over one encoder stage: a sigmoid mask on the stage's output, then a conv block."""

    def __init__(self, cin: int, channels: int, cout: int):
        super().__init__()
        self.mask = nn.Sequential(
            nn.Conv2d(cin, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid(),
        )
        self.out = conv_bn(channels, cout)

    def forward(self, middle, output, previous=None):
        if previous is not None:
            if previous.size()[-2:] != middle.size()[-2:]:
                previous = F.interpolate(previous, size=middle.size()[-2:], mode="bilinear", align_corners=True)
            middle = torch.cat([middle, previous], dim=1)
        return self.out(self.mask(middle) * output)


class MTAN(nn.Module):
    """Shared encoder, per-task attention modules, per-task 1x1 heads at input resolution; ``{task: map}``."""

    def __init__(self, tasks: dict[str, int] | None = None, channels: tuple[int, ...] = (4, 8, 8)):
        super().__init__()
        tasks = tasks or {"segmentation": 3, "depth": 1}
        self.encoder = SharedEncoder(channels)
        outs = (*channels[1:], channels[-1])
        self.attention = nn.ModuleDict({
            task: nn.ModuleList(
                TaskAttention(c if stage == 0 else 2 * c, c, out)
                for stage, (c, out) in enumerate(zip(channels, outs))
            )
            for task in tasks
        })
        self.heads = nn.ModuleDict({task: nn.Conv2d(channels[-1], n, 1) for task, n in tasks.items()})

    def forward(self, x):
        features = self.encoder(x)
        outputs = {}
        for task, blocks in self.attention.items():
            attended = None
            for block, (middle, output) in zip(blocks, features):
                attended = block(middle, output, attended)
            outputs[task] = F.interpolate(self.heads[task](attended), size=x.shape[-2:], mode="bilinear",
                                          align_corners=True)
        return outputs
