"""What the benchmarks share: multi-task models, batches and losses, timing, memory peaks, and the results table."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 10


@dataclass(frozen=True)
class Settings:
    """Run-wide options: ``quick`` trades precision for a smoke run of well under a minute."""

    quick: bool = False
    device: str = "cpu"

    @property
    def repeats(self) -> int:
        return 2 if self.quick else 7

    @property
    def batch(self) -> int:
        return 4 if self.quick else 16

    @property
    def pixels(self) -> int:
        return 32 if self.quick else 64

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def step_cases(self) -> list[Case]:
        """The models and sizes the per-step benchmarks run: small ones everywhere; on CUDA also the realistic
        sizes (resnet50 and ViT-S/16 at 224 px, batch 32)."""
        small = [Case("resnet18", self.batch, self.pixels)] + ([] if self.quick else [Case("vit_tiny", self.batch,
                                                                                              self.pixels)])
        return small + ([Case("resnet50", 32, 224), Case("vit_small", 32, 224)] if self.cuda else [])


@dataclass(frozen=True)
class Case:
    """A model of ``MODELS`` at a batch size and image size."""

    model: str
    batch: int
    pixels: int

    def __str__(self) -> str:
        return f"{self.model} {self.batch}x{self.pixels}px"


# --- models, data, losses -------------------------------------------------------------------------------------


def task_names(tasks: int) -> list[str]:
    return [f"t{i}" for i in range(tasks)]


class MultiHead(nn.Module):
    """A backbone whose pooled features feed one linear head per task; returns ``{task: logits}``."""

    def __init__(self, backbone: nn.Module, features: int, tasks: int):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({task: nn.Linear(features, CLASSES) for task in task_names(tasks)})

    def forward(self, x):
        features = self.backbone(x)
        return {task: head(features) for task, head in self.heads.items()}


def resnet(tasks: int, depth: int = 18) -> MultiHead:
    """torchvision ``resnet{depth}``, its classifier replaced by ``tasks`` linear heads."""
    import torchvision

    backbone = getattr(torchvision.models, f"resnet{depth}")()
    features = backbone.fc.in_features
    backbone.fc = nn.Identity()
    return MultiHead(backbone, features, tasks)


def vit(tasks: int, name: str = "vit_tiny_patch16_224", pixels: int = 64) -> MultiHead:
    """A timm ViT (patches of 16 px) at ``pixels``, its classifier replaced by ``tasks`` linear heads."""
    import timm

    backbone = timm.create_model(name, img_size=pixels, num_classes=0)
    return MultiHead(backbone, backbone.num_features, tasks)


MODELS: dict[str, Callable[[int, int], MultiHead]] = {  # name -> model(tasks, pixels)
    "resnet18": lambda tasks, pixels: resnet(tasks, 18),
    "resnet50": lambda tasks, pixels: resnet(tasks, 50),
    "vit_tiny": lambda tasks, pixels: vit(tasks, pixels=pixels),
    "vit_small": lambda tasks, pixels: vit(tasks, "vit_small_patch16_224", pixels=pixels),
}


def make_model(name: str, tasks: int, settings: Settings, pixels: int | None = None) -> MultiHead:
    """``MODELS[name]`` with ``tasks`` heads, seeded, on the device, in train mode."""
    torch.manual_seed(0)
    return MODELS[name](tasks, pixels or settings.pixels).to(settings.device).train()


def make_batch(tasks: int, batch: int, pixels: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of ``batch`` random images; ``labels[:, i]`` is task ``i``'s class."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, pixels, pixels, generator=generator)
    labels = torch.randint(0, CLASSES, (batch, tasks), generator=generator)
    return images.to(device), labels.to(device)


def setup(case: Case | str, tasks: int, settings: Settings) -> tuple[MultiHead, tuple[torch.Tensor, torch.Tensor],
                                                                    dict]:
    """The model, a batch and the task losses of one benchmark case (a model name: at the run's sizes)."""
    case = case if isinstance(case, Case) else Case(case, settings.batch, settings.pixels)
    batch = make_batch(tasks, case.batch, case.pixels, settings.device)
    return make_model(case.model, tasks, settings, case.pixels), batch, task_losses(tasks)


def task_losses(tasks: int) -> dict[str, Callable]:
    """``{task: loss(output, batch)}``: cross-entropy of each task's head against its own labels."""
    def loss(i: int, task: str):
        return lambda output, batch: F.cross_entropy(output[task], batch[1][:, i])
    return {task: loss(i, task) for i, task in enumerate(task_names(tasks))}


def summed_loss(losses: Mapping[str, Callable], output, batch) -> torch.Tensor:
    return sum(loss(output, batch) for loss in losses.values())


def train_step(model: nn.Module, losses: Mapping[str, Callable], batch) -> None:
    """One forward and one backward of the summed loss (``.grad`` reset to ``None`` first)."""
    model.zero_grad(set_to_none=True)
    summed_loss(losses, model(batch[0]), batch).backward()


def floor_step(model, losses, batch, weights, keep: bool = False) -> list[tuple[torch.Tensor | None, ...]]:
    """One forward, then each task's gradient by ``torch.autograd.grad`` and nothing else: what any exact method
    must pay. ``keep``: hold every task's gradients to the end (what a method that keeps them all must hold)."""
    output = model(batch[0])
    values = [loss(output, batch) for loss in losses.values()]
    kept = []
    for t, value in enumerate(values):
        grads = torch.autograd.grad(value, weights, retain_graph=t < len(values) - 1, allow_unused=True)
        if keep:
            kept.append(grads)
    return kept


# --- timing and memory ----------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(cases: Mapping[str, Callable[[], object]], settings: Settings, warmup: int = 1,
             repeats: int | None = None) -> dict[str, list[float]]:
    """Seconds per call of every case, ``repeats`` times each, interleaved (case by case within a repeat) so that
    a slow spell of the machine hits all cases alike; ``warmup`` untimed calls first."""
    repeats = settings.repeats if repeats is None else repeats
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            _sync(settings.device)
            start = time.perf_counter()
            fn()
            _sync(settings.device)
            samples[name].append(time.perf_counter() - start)
    return samples


def time_per_step(runs: Mapping[str, Callable[[int], object]], settings: Settings) -> dict[str, float]:
    """Seconds per step of each ``run(steps)``: runs of ``few`` and of ``many`` steps, timed interleaved, and the
    median over repeats of ``(t_many - t_few) / (many - few)``. Set-up costs and the colder first step cancel."""
    few, many = (1, 2) if settings.quick else (1, 3)
    cases = {(name, steps): (lambda run=run, steps=steps: run(steps)) for name, run in runs.items()
             for steps in (few, many)}
    samples = time_all(cases, settings)
    return {name: median([(b - a) / (many - few) for a, b in zip(samples[name, few], samples[name, many])])
            for name in runs}


def steps_of(step: Callable[[], object]) -> Callable[[int], None]:
    """``run(steps)`` for a function that does one step."""
    def run(steps: int) -> None:
        for _ in range(steps):
            step()
    return run


def median(values) -> float:
    return statistics.median(values)


def peak_memory(fn: Callable[[], object], settings: Settings, within: str | None = None) -> int:
    """Peak bytes allocated by torch while ``fn`` runs (or, given ``within``, during its ``record_function`` range
    of that name), above what was allocated before ``fn``.

    CUDA: ``torch.cuda.max_memory_allocated`` (``fn`` resets the peak where ``within`` starts). CPU: the allocator's
    running total as ``torch.profiler(profile_memory=True)`` records it at every allocation; only blocks allocated
    while profiling count, so what existed before ``fn`` (the weights, the batch) is left out.
    """
    if settings.device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    peak, stack = 0, [(event, within is None) for event in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        event, inside = stack.pop()
        inside = inside or event.name == within
        if inside and isinstance(event.extra_fields, _ExtraFields_Allocation):
            peak = max(peak, event.extra_fields.total_allocated)
        stack.extend((child, inside) for child in event.children)
    return peak


MEMORY_METHOD = ("CUDA: torch.cuda.max_memory_allocated. CPU: torch.profiler(profile_memory=True), the maximum of "
                 "the CPU allocator's running total over the step's allocation events; blocks allocated before the "
                 "step (weights, buffers, batch) are added back as 'resident'")


# --- results ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table: ``ratio = measured / baseline``, checked against ``target``."""

    benchmark: str
    case: str
    measured: str
    baseline: str
    ratio: float
    target: str = ""
    met: bool | None = None


def compare(benchmark: str, case: str, measured: float, baseline: float, unit: str,
            target: tuple[str, float] | None = None) -> Row:
    """A row for ``measured`` against ``baseline`` (both in ``unit``: "ms", "s", "MB", "ops" or "x")."""
    ratio = measured / baseline if baseline else math.inf
    met = None
    text = ""
    if target is not None:
        op, bound = target
        met = ratio <= bound if op == "<=" else ratio >= bound
        text = f"{'≤' if op == '<=' else '≥'} {bound:g}"
    return Row(benchmark, case, _format(measured, unit), _format(baseline, unit), ratio, text, met)


def _format(value: float, unit: str) -> str:
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "MB":
        return f"{value / 2**20:.1f} MB"
    if unit == "ops":
        return f"{value:,.0f} ops"
    return f"{value:.3g}{unit}"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    header = ["benchmark", "case", "measured", "baseline", "ratio", "target", "met?"]
    lines = [[r.benchmark, r.case, r.measured, r.baseline, f"{r.ratio:.3f}", r.target or "–",
              "–" if r.met is None else ("yes" if r.met else "**no**")] for r in rows]
    widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]

    def line(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, lines)])


def say(benchmark: str, text: str) -> None:
    """A progress or detail line, flushed at once."""
    print(f"[{benchmark}] {text}", flush=True)
