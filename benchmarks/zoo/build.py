"""How the sweep's models are built: a backbone with ``FEATURES`` outputs (its own classifier, so that the
classifier is the last shared layer), without randomness, at the smallest input it accepts, under task heads.

Names are ``"timm/<name>"``, ``"torchvision/<name>"`` (built as the tests' zoo builds them: :mod:`tests.zoo`) or
``"transformers/<model type>"`` (small configs: see :mod:`benchmarks.zoo.hugging_face`).
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.common import CLASSES, MultiHead, make_batch
from benchmarks.zoo import hugging_face
from tests import zoo
from tests.zoo import BATCH, FEATURES, SIZE, TORCHVISION_SIZES, calibrate, no_randomness


def backbone(name: str, **kwargs) -> nn.Module:
    """``name``'s model with ``FEATURES`` outputs and random weights; ``kwargs`` go to its constructor."""
    library, model = name.split("/")
    if library == "transformers":
        return hugging_face.backbone(model, FEATURES)
    return zoo.backbone(name, **kwargs)


def parameter_count(name: str) -> int:
    """The number of parameters of ``name``'s model (see :func:`tests.zoo.parameter_count`)."""
    if name.startswith("transformers/"):
        return sum(p.numel() for p in backbone(name).parameters())
    return zoo.parameter_count(name)


def sized_backbone(name: str) -> tuple[nn.Module, int]:
    """``name``'s backbone and the input size to sweep it at: ``SIZE`` where the model runs at it (timm models that
    take ``img_size`` are built for it), else the size the model was designed for."""
    library, model = name.split("/")
    torch.manual_seed(0)
    if library == "torchvision":
        return backbone(name), TORCHVISION_SIZES.get(model, SIZE)
    try:
        net = backbone(name, img_size=SIZE)
    except TypeError:  # the constructor takes no img_size
        net = backbone(name)
    try:
        with torch.no_grad():
            net.eval()(torch.randn(2, 3, SIZE, SIZE))
        return net, SIZE
    except Exception:  # too small for this architecture, or a fixed size: use its own
        torch.manual_seed(0)
        return backbone(name), net.pretrained_cfg["input_size"][-1]


def build(name: str, tasks: int = 2) -> tuple[MultiHead, tuple, bool]:
    """``name``'s backbone under ``tasks`` linear heads, without randomness, with calibrated BatchNorm, in train
    mode; a batch ``(inputs, labels)`` of ``BATCH`` images at the size of :func:`sized_backbone` (or the inputs of a
    transformers model); and whether train mode is deterministic."""
    library, model_type = name.split("/")
    if library == "transformers":
        torch.manual_seed(0)
        net, generator = backbone(name), torch.Generator().manual_seed(0)
        batch = (hugging_face.inputs(model_type, BATCH, generator),
                 torch.randint(0, CLASSES, (BATCH, tasks), generator=generator))
    else:
        net, size = sized_backbone(name)
        batch = make_batch(tasks, BATCH, size)
    model = MultiHead(no_randomness(net), FEATURES, tasks)
    return model, batch, calibrate(model, batch[0])
