"""How the zoo's models are built: a backbone with ``FEATURES`` outputs (its own classifier, so that the classifier
is the last shared layer), without randomness, at the smallest input it accepts, under task heads.

Names are ``"timm/<name>"``, ``"torchvision/<name>"`` or ``"transformers/<model type>"`` (small configs: see
:mod:`benchmarks.zoo.hugging_face`). Models are built with ``pretrained=False`` (no weights are downloaded);
:func:`parameter_count` builds on the meta device, where only the structure is needed.
"""

from __future__ import annotations

import timm
import torch
import torchvision
from torch import nn
from torchvision.models import get_model, get_model_weights

from benchmarks.common import CLASSES, MultiHead, make_batch
from benchmarks.zoo import hugging_face

FEATURES = 10
BATCH = 4  # with 64 px, BatchNorm in train mode normalises over >= 16 values: 2 at 1x1 would be ill-conditioned
SIZE = 64

# torchvision: the input size of models that need more than SIZE, and what constructors need.
TORCHVISION_SIZES = {"inception_v3": 75, "maxvit_t": 224}
TORCHVISION_KWARGS = {
    "googlenet": {"aux_logits": False, "init_weights": False},
    "inception_v3": {"aux_logits": False, "init_weights": False},
    "maxvit_t": {"input_size": (224, 224)},  # partition size 7 on a 1/32 grid
    "vit_b_16": {"image_size": SIZE},
    "vit_b_32": {"image_size": SIZE},
}

# Float attributes that hold a drop probability (timm heads' drop_rate, DropPath, attention dropout, ...).
DROP_ATTRIBUTES = ("drop_rate", "drop_prob", "dropout", "attention_dropout", "attn_drop", "proj_drop")


def backbone(name: str, **kwargs) -> nn.Module:
    """``name``'s model with ``FEATURES`` outputs and random weights; ``kwargs`` go to its constructor."""
    library, model = name.split("/")
    if library == "torchvision":
        return get_model(model, weights=None, num_classes=FEATURES, **TORCHVISION_KWARGS.get(model, {}), **kwargs)
    if library == "transformers":
        return hugging_face.backbone(model, FEATURES)
    return timm.create_model(model, pretrained=False, num_classes=FEATURES, **kwargs)


def parameter_count(name: str) -> int:
    """The number of parameters of ``name``'s model: timm's built on the meta device, torchvision's as published
    with its weights (some torchvision constructors cannot run on the meta device)."""
    library, model = name.split("/")
    if library == "torchvision":
        return get_model_weights(model).DEFAULT.meta["num_params"]
    if library == "transformers":
        return sum(p.numel() for p in backbone(name).parameters())
    with torch.device("meta"):
        return sum(p.numel() for p in backbone(name).parameters())


def no_randomness(model: nn.Module) -> nn.Module:
    """Set every drop probability of ``model`` to 0 (dropout, drop-path, stochastic depth, attention dropout)."""
    for module in model.modules():
        if isinstance(module, (nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
            module.p = 0.0
        for attribute in DROP_ATTRIBUTES:
            if isinstance(getattr(module, attribute, None), float):
                setattr(module, attribute, 0.0)
    return model


def calibrate(model: nn.Module, x: torch.Tensor) -> bool:
    """Set BatchNorm running statistics to those of batch ``x`` (so that eval mode sees activations of a sensible
    scale); whether train mode is deterministic (two calls give equal outputs)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.momentum = 1.0
    model.train()
    with torch.no_grad():
        first, second = model(x), model(x)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    return all(torch.equal(first[task], second[task]) for task in first)


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
