"""Benchmark 2: forward + backward of the split network against the whole model T times and the ideal.

resnet18 with T heads, split with ``fxsplit.rewrite(init="copy")`` at a late, a mid and an early layer (the early
one right after the stem). Baselines: the original model run T times (each task's loss from its own run), and
the ideal "shared prefix once + T x the rest", built by slicing torchvision's stages: stem, the blocks of
layer1..layer4, pooling; the prefix is every stage before the block that holds the split layer.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch
from torch import nn

import fxsplit

from .common import Row, Settings, compare, median, say, setup, time_all, train_step

NAME = "split_network"
SPLITS = {"late": "layer4.1.conv1", "mid": "layer3.0.conv1", "early": "layer1.0.conv1"}
# the split network as rewrite() gives it, and (where rewrite has the option) with every shared layer run once per
# branch instead of once on the branches' batches concatenated
VARIANTS = {"split": {}}
if "batch_branches" in inspect.signature(fxsplit.rewrite).parameters:
    VARIANTS["split per-branch"] = {"batch_branches": False}


def resnet_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """torchvision ResNet as a chain of named stages: ``stem``, ``layer1.0`` ... ``layer4.1``, ``pool``."""
    stem = nn.Sequential(backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool)
    blocks = [(f"layer{i}.{j}", block) for i in range(1, 5) for j, block in enumerate(getattr(backbone, f"layer{i}"))]
    return [("stem", stem), *blocks, ("pool", nn.Sequential(backbone.avgpool, nn.Flatten(1)))]


class PrefixOnce(nn.Module):
    """The ideal split network: the stages before ``block`` once, the rest (and a head) once per task."""

    def __init__(self, model: nn.Module, block: str):
        super().__init__()
        stages = resnet_stages(model.backbone)
        k = [name for name, _ in stages].index(block)
        self.prefix = nn.Sequential(*(m for _, m in stages[:k]))
        self.rest = nn.Sequential(*(m for _, m in stages[k:]))
        self.heads = model.heads

    def forward(self, x):
        shared = self.prefix(x)
        return {task: head(self.rest(shared)) for task, head in self.heads.items()}


class WholeTimes(nn.Module):
    """The original model run once per task; task ``t`` takes its output from run ``t``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {task: self.model(x)[task] for task in self.model.heads}


def _check_equal(split: nn.Module, model: nn.Module, x: torch.Tensor) -> bool:
    """``init="copy"`` keeps the function: the split network's outputs equal the model's (eval mode)."""
    split.eval(), model.eval()
    with torch.no_grad():
        same = all(torch.allclose(split(x)[t], y, atol=1e-5) for t, y in model(x).items())
    split.train(), model.train()
    return same


def _case(tasks: int, settings: Settings) -> list[Row]:
    model, batch, losses = setup("resnet18", tasks, settings)
    cases = {"whole model x T": partial(train_step, WholeTimes(model), losses, batch)}
    for where, block_layer in SPLITS.items():
        for variant, options in VARIANTS.items():
            split = fxsplit.rewrite(model, [f"backbone.{block_layer}"], init="copy", **options)
            if not _check_equal(split, model, batch[0]):
                say(NAME, f"WARNING: the {where} {variant} does not reproduce the model")
            cases[f"{where} {variant}"] = partial(train_step, split, losses, batch)
        cases[f"{where} ideal"] = partial(train_step, PrefixOnce(model, block_layer.rsplit(".", 1)[0]), losses, batch)
    t = {name: median(samples) for name, samples in time_all(cases, settings).items()}
    say(NAME, f"resnet18 T={tasks}: " + ", ".join(f"{name} {value * 1e3:.1f} ms" for name, value in t.items()))
    rows = []
    for where, layer in SPLITS.items():
        case = f"resnet18 T={tasks} {where} ({layer})"
        early = where == "early"
        rows.append(compare(NAME, f"{case}: split vs prefix once + T x rest", t[f"{where} split"],
                            t[f"{where} ideal"], "ms", None if early else ("<=", 1.05)))
        rows.append(compare(NAME, f"{case}: split vs whole model x T", t[f"{where} split"], t["whole model x T"],
                            "ms", ("<=", 0.90) if early else None))
        if f"{where} split per-branch" in t:
            rows.append(compare(NAME, f"{case}: split per-branch (batch_branches=False) vs prefix once + T x rest",
                                t[f"{where} split per-branch"], t[f"{where} ideal"], "ms"))
    return rows


def run(settings: Settings) -> list[Row]:
    return [row for tasks in ((4,) if settings.quick else (2, 4)) for row in _case(tasks, settings)]
