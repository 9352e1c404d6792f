"""The Recon paper's MultiMNIST set-up, on MultiDigits: the paper's network and 36x36 images.

The network is torchvision's ``resnet18`` with a 1-channel 7x7 stem and ``fc`` 512 -> 100, then ReLU and one
100 -> 10 head per task, as the authors built it for MultiMNIST-style data: 11,223,560 parameters, 41 shared
layers. MultiDigits' 12x12 canvases (8x8 digits) are upscaled three times, bilinearly, to the paper's 36x36.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from fxsplit.datasets import MultiDigits

TASKS = ("left", "right")
IMAGE_SIZE = 36


class MultiMnistResNet(nn.Module):
    """ResNet-18 (1-channel stem, 100 features) with a ReLU and a linear head per task; returns ``{task: logits}``.

    >>> sum(p.numel() for p in MultiMnistResNet().parameters())
    11223560
    """

    def __init__(self, tasks=TASKS, classes: int = 10, features: int = 100):
        super().__init__()
        import torchvision  # lazy: only the reproduction needs it

        self.backbone = torchvision.models.resnet18(num_classes=features)
        self.backbone.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.heads = nn.ModuleDict({task: nn.Linear(features, classes) for task in tasks})

    def forward(self, x):
        features = F.relu(self.backbone(x))
        return {task: head(features) for task, head in self.heads.items()}


def data(seed: int, train_size: int, test_size: int, image_size: int = IMAGE_SIZE) -> tuple[TensorDataset, ...]:
    """MultiDigits' training and test sets for ``seed``, upscaled to ``image_size`` pixels square.

    >>> train, test = data(0, 4, 2)
    >>> train[0][0].shape, len(test)
    (torch.Size([1, 36, 36]), 2)
    """
    return tuple(upscaled(MultiDigits(split, size=size, seed=seed), image_size)
                 for split, size in (("train", train_size), ("test", test_size)))


def upscaled(digits: MultiDigits, image_size: int) -> TensorDataset:
    """``digits`` (images and targets) with images resized bilinearly to ``image_size`` pixels square."""
    images = F.interpolate(digits.images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return TensorDataset(images, digits.targets)
