"""Multi-task models written the way multi-task repositories write them, not shaped to fxsplit.

Each ``Case`` gives a model, an example call, its tasks, which output is whose, a loss per task (for analyze,
``loss(output, batch)`` with ``batch = (inputs, targets)``) and the tied parameters a split must keep tied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 4


class HardSharing(nn.Module):
    """LibMTL's hard parameter sharing: ``forward(inputs, task_name=None)`` returns every task's output, or one."""

    def __init__(self, tasks=("segment", "depth")):
        super().__init__()
        self.task_name = list(tasks)
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                     nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.decoders = nn.ModuleDict({task: nn.Conv2d(8, 2, 1) for task in tasks})

    def forward(self, inputs, task_name=None):
        rep = self.encoder(inputs)
        if task_name is not None:
            return self.decoders[task_name](rep)
        return {task: self.decoders[task](rep) for task in self.task_name}


class CrossStitch(nn.Module):
    """Two task columns mixed after every layer by learned cross-stitch units (Misra et al.)."""

    def __init__(self, width: int = 8, depth: int = 3):
        super().__init__()
        self.columns = nn.ModuleList(nn.ModuleList(nn.Linear(width, width) for _ in range(depth)) for _ in range(2))
        self.stitch = nn.ParameterList(nn.Parameter(torch.eye(2) * 0.8 + 0.1) for _ in range(depth))
        self.heads = nn.ModuleList(nn.Linear(width, 3) for _ in range(2))

    def forward(self, x):
        streams = [x, x]
        for layer, alpha in enumerate(self.stitch):
            streams = [torch.relu(column[layer](s)) for column, s in zip(self.columns, streams)]
            streams = [alpha[i, 0] * streams[0] + alpha[i, 1] * streams[1] for i in range(2)]
        return {"left": self.heads[0](streams[0]), "right": self.heads[1](streams[1])}


class Expert(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, x):
        return self.net(x)


class PLE(nn.Module):
    """Progressive layered extraction (PLE, a generalised MMoE): shared experts and each task's own experts, mixed
    per task by a softmax gate over the task's and the shared experts, then a tower per task."""

    def __init__(self, width: int = 8, tasks=("click", "buy")):
        super().__init__()
        self.tasks = list(tasks)
        self.shared = nn.ModuleList(Expert(width) for _ in range(2))
        self.own = nn.ModuleDict({task: Expert(width) for task in tasks})
        self.gates = nn.ModuleDict({task: nn.Linear(width, 3) for task in tasks})
        self.towers = nn.ModuleDict({task: nn.Linear(width, 1) for task in tasks})

    def forward(self, x):
        shared = [expert(x) for expert in self.shared]
        out = {}
        for task in self.tasks:
            experts = torch.stack(shared + [self.own[task](x)], dim=1)
            gate = self.gates[task](x).softmax(-1).unsqueeze(-1)
            out[task] = self.towers[task]((gate * experts).sum(1)).squeeze(-1)
        return out


class TiedLM(nn.Module):
    """A small language model whose output projection reads the embedding matrix (``F.linear(h, embed.weight)``)
    and whose second head is a module tied to it (``decoder.weight = embed.weight``); a classifier as third task."""

    def __init__(self, vocab: int = 24, width: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.decoder = nn.Linear(width, vocab, bias=False)
        self.decoder.weight = self.embed.weight
        self.classifier = nn.Linear(width, 2)

    def forward(self, ids):
        h = self.norm(torch.tanh(self.mix(self.embed(ids))))
        return {"lm": F.linear(h, self.embed.weight), "denoise": self.decoder(h), "topic": self.classifier(h.mean(1))}


class UncertaintyWeighted(nn.Module):
    """Kendall et al.'s uncertainty weighting: ``log_vars`` that the loss reads, ``forward`` never does; a step
    counter buffer, an EMA copy of the trunk, and a plain attribute training code reads."""

    def __init__(self):
        super().__init__()
        self.tasks = ["a", "b"]
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in self.tasks})
        self.log_vars = nn.Parameter(torch.zeros(2))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.ema = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        h = self.trunk(x)
        return {task: self.heads[task](h) for task in self.tasks}


class RunningStats(nn.Module):
    """State updated in ``forward``, as feature normalisers and step counters keep it: a counter rebound
    (``self.steps += 1``) and a running mean updated in place, both in train mode only."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(width))

    def forward(self, h):
        if self.training:
            self.steps += 1
            self.mean.mul_(0.9).add_(0.1 * h.detach().mean(0))
        return h - self.mean


class Stateful(nn.Module):
    """A trunk that normalises its features by their running mean, under two task heads."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.stats = RunningStats(8)
        self.trunk = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "ab"})

    def forward(self, x):
        h = self.trunk(self.stats(self.stem(x)).relu())
        return {task: head(h) for task, head in self.heads.items()}


class FrozenTeacher(nn.Module):
    """A frozen teacher run under ``torch.no_grad()`` feeding the trunk, and a target network (as in
    self-distillation) under ``torch.no_grad()`` after it, whose output both tasks read."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(6, 8)
        self.trunk = nn.Linear(8, 8)
        self.target = nn.Linear(8, 2)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "ab"})

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x).relu()
        h = self.trunk(t)
        with torch.no_grad():
            aim = self.target(h)
        return {"a": self.heads.a(h) + aim, "b": self.heads.b(h) - aim}


class MixedPrecisionTrunk(nn.Module):
    """A trunk run under ``torch.autocast`` in bfloat16 (the model asks for it itself), heads in float32."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.trunk = nn.Linear(16, 16)
        self.heads = nn.ModuleDict({task: nn.Linear(16, 2) for task in "ab"})

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.trunk(self.stem(x).relu())
        h = h.float()
        return {task: head(h) for task, head in self.heads.items()}


class DictBatch(nn.Module):
    """Reads a batch of dicts per modality (the image's pixels; metadata and a weight per sample) and an optional
    ``scale``, and returns a tuple ``(segmentation, depth)``; the metadata is reshaped by the batch size."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.meta_proj = nn.Linear(4, 8)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.segment = nn.Conv2d(8, 3, 1)
        self.depth = nn.Conv2d(8, 1, 1)

    def forward(self, batch, scale=None):
        meta = self.meta_proj(batch["meta"]["values"]) * batch["meta"]["weight"]
        pixels = batch["image"]["pixels"]
        h = self.stem(pixels) + meta.view(pixels.shape[0], -1, 1, 1)
        h = torch.relu(self.body(h))
        if scale is not None:  # an optional weighting, given by some calls only
            h = h * scale
        return self.segment(h), self.depth(h)


def dict_batch(size: int = BATCH) -> dict:
    """A batch for ``DictBatch``: ``size`` images and their metadata (TorchScript takes a dict of dicts of tensors)."""
    return {"image": {"pixels": torch.randn(size, 3, 8, 8)},
            "meta": {"values": torch.randn(size, 4), "weight": torch.rand(size, 1)}}


class UNetDecoder(nn.Module):
    """A small UNet decoder over an encoder's feature pyramid (deepest first), upsampling and fusing skips."""

    def __init__(self, channels: list[int], out: int):
        super().__init__()
        channels = channels[::-1]
        self.fuse = nn.ModuleList(nn.Conv2d(c_deep + c_skip, c_skip, 3, padding=1)
                                  for c_deep, c_skip in zip(channels, channels[1:]))
        self.head = nn.Conv2d(channels[-1], out, 1)

    def forward(self, features):
        features = features[::-1]
        x = features[0]
        for fuse, skip in zip(self.fuse, features[1:]):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = torch.relu(fuse(torch.cat([x, skip], dim=1)))
        return self.head(x)


class EncoderTwoDecoders(nn.Module):
    """A timm ``features_only`` encoder with two UNet decoders: segmentation and depth."""

    def __init__(self):
        super().__init__()
        import timm

        self.encoder = timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=(1, 2, 3))
        channels = self.encoder.feature_info.channels()
        self.segmentation = UNetDecoder(channels, 3)
        self.depth = UNetDecoder(channels, 1)

    def forward(self, x):
        features = self.encoder(x)
        return {"segmentation": self.segmentation(features), "depth": self.depth(features)}


class ListReLU(nn.ReLU):
    """The Recon authors' way of a ReLU: a subclass of ``nn.ReLU`` applied to each tensor of a list, in place. Its
    class is not torch.nn's own, so tracing goes through it and the in-place ReLU is a function call."""

    def forward(self, xs):
        out = []
        for x in xs if isinstance(xs, list) else [xs]:
            out.append(super().forward(x))
        return out


class ListLayer(nn.Module):
    """A layer applied to each tensor of a list, held in a ``ModuleList`` as the authors hold their per-task
    copies (one copy: the unsplit network)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.copies = nn.ModuleList([layer])

    def forward(self, xs):
        return [self.copies[0](x) for x in (xs if isinstance(xs, list) else [xs])]


class ListBlock(nn.Module):
    """A residual block over lists: ``out[i] += identity[i]`` in place, then the in-place ReLU."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1, self.bn1 = ListLayer(nn.Conv2d(width, width, 3, padding=1, bias=False)), ListLayer(
            nn.BatchNorm2d(width))
        self.conv2, self.bn2 = ListLayer(nn.Conv2d(width, width, 3, padding=1, bias=False)), ListLayer(
            nn.BatchNorm2d(width))
        self.relu = ListReLU(inplace=True)

    def forward(self, x):
        identity = x if isinstance(x, list) else [x]
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        for i in range(len(out)):
            out[i] += identity[i]
        return self.relu(out)


class ListResNet(nn.Module):
    """A small ResNet written as the Recon authors wrote their MultiMNIST network: every layer over lists, a
    feature layer ``fc`` then an in-place ReLU, and one linear head per task over the list's first tensor."""

    def __init__(self, width: int = 8, tasks=("left", "right")):
        super().__init__()
        self.tasks = list(tasks)
        self.conv1, self.bn1 = ListLayer(nn.Conv2d(3, width, 3, padding=1, bias=False)), ListLayer(
            nn.BatchNorm2d(width))
        self.relu = ListReLU(inplace=True)
        self.blocks = nn.Sequential(ListBlock(width), ListBlock(width))
        self.fc = ListLayer(nn.Linear(width, 16))
        self.pred = nn.ModuleList(nn.Linear(16, 3) for _ in tasks)

    def forward(self, x):
        x = self.blocks(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.fc([torch.flatten(F.adaptive_avg_pool2d(x_i, 1), 1) for x_i in x]))
        return {task: head(x[0]) for task, head in zip(self.tasks, self.pred)}


def deeplab() -> nn.Module:
    """torchvision's DeepLabV3 (MobileNetV3 backbone) with its auxiliary head: 'out' and 'aux' are the tasks."""
    import torchvision

    return torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, aux_loss=True, num_classes=3)


@dataclasses.dataclass
class Case:
    """One real model: how to build it, call it and train it."""

    build: Callable[[], nn.Module]
    inputs: Callable[[], object]  # the model's one positional input
    targets: dict[str, Callable[[object], torch.Tensor]]  # task -> loss(task output, batch)
    outputs: dict | None = None  # rewrite's outputs=, when the output is not keyed by task
    ties: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # parameters that are one tensor
    top: int = 3

    def losses(self) -> dict[str, Callable]:
        """Task -> ``loss(output, batch)`` for analyze."""
        keys = self.outputs or {task: task for task in self.targets}
        return {task: (lambda key, loss: lambda out, batch: loss(out[key]))(keys[task], loss)
                for task, loss in self.targets.items()}


def _image(size: int = 16) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(BATCH, 3, size, size)


def _square(out: torch.Tensor) -> torch.Tensor:
    return out.float().pow(2).mean()


def _shifted(out: torch.Tensor) -> torch.Tensor:
    return (out.float() - 1).abs().mean()


CASES: dict[str, Case] = {
    "hard-sharing": Case(HardSharing, _image(), {"segment": _square, "depth": _shifted}),
    "cross-stitch": Case(CrossStitch, lambda: torch.randn(BATCH, 8), {"left": _square, "right": _shifted}),
    "ple": Case(PLE, lambda: torch.randn(BATCH, 8), {"click": _square, "buy": _shifted}),
    "tied-lm": Case(TiedLM, lambda: torch.randint(0, 24, (BATCH, 5)),
                    {"lm": _square, "denoise": _shifted, "topic": _square},
                    ties=[("embed.weight", "decoder.weight")]),
    "log-vars": Case(UncertaintyWeighted, lambda: torch.randn(BATCH, 6), {"a": _square, "b": _shifted}, top=2),
    "dict-batch": Case(DictBatch, dict_batch, {"segmentation": _square, "depth": _shifted},
                       outputs={"segmentation": 0, "depth": 1}),
    "deeplabv3": Case(deeplab, _image(32), {"out": _square, "aux": _shifted}, top=4),
    "timm-unet": Case(EncoderTwoDecoders, _image(32), {"segmentation": _square, "depth": _shifted}),
    "recon-lists": Case(ListResNet, _image(), {"left": _square, "right": _shifted}, top=5),
}
