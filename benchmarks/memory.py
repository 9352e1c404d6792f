"""Benchmark 4: peak memory of an ``fxsplit.analyze`` step against one plain training step.

* plain step: forward, backward of the summed loss, an SGD step (``.grad`` freed before it).
* analyze step: a later step of ``analyze(..., steps=3)`` (layer graph given: no tracing), the steady state.
* analyze, first step: the peak of the whole call; the first step also decides which layers are scored.
* floor: forward and T ``autograd.grad`` calls with every task's gradients kept: what a method that holds all T
  gradients at once must hold.

Peaks are measured above what was allocated before the step; the resident weights, buffers and batch are added
back for the "incl. weights" rows.
"""

from __future__ import annotations

import torch

import fxsplit

from .common import MEMORY_METHOD, Case, Row, Settings, compare, floor_step, peak_memory, say, setup, train_step

NAME = "memory"
STEPS = 3
LAST = "fxsplit-benchmark: last analyze step"


def _resident(model: torch.nn.Module, batch) -> int:
    tensors = [*model.parameters(), *model.buffers(), *batch]
    return sum(t.numel() * t.element_size() for t in tensors)


def _marked(batch, settings: Settings):
    """``STEPS`` batches; the last one's step runs inside a profiler range named ``LAST`` (on CUDA, the peak
    statistics are reset where it starts)."""
    for step in range(STEPS):
        if step < STEPS - 1:
            yield batch
            continue
        if settings.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with torch.profiler.record_function(LAST):
            yield batch


def _case(case: Case, tasks: int, settings: Settings) -> list[Row]:
    model, batch, losses = setup(case, tasks, settings)
    graph = fxsplit.layer_graph(model)
    weights = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def plain():
        train_step(model, losses, batch)
        optimizer.step()

    def analyze(data):
        return lambda: fxsplit.analyze(model, losses, data(), graph=graph, progress=False)

    cases = {
        "plain": (plain, None),
        "floor": (lambda: floor_step(model, losses, batch, weights, keep=True), None),
        "analyze": (analyze(lambda: _marked(batch, settings)), LAST),
        "analyze first step": (analyze(lambda: [batch]), None),
    }
    peaks = {}
    for label, (fn, within) in cases.items():
        fn()  # warm-up: lazy initialisation stays out of the peak
        model.zero_grad(set_to_none=True)
        peaks[label] = peak_memory(fn, settings, within)
    resident = _resident(model, batch)
    say(NAME, f"{case} T={tasks}: resident {resident / 2**20:.1f} MB; peak above it: " +
        ", ".join(f"{k} {v / 2**20:.1f} MB" for k, v in peaks.items()))
    label = f"{case} T={tasks}"
    total = {k: v + resident for k, v in peaks.items()}
    return [
        compare(NAME, f"{label}: analyze step vs plain step (incl. weights)", total["analyze"], total["plain"], "MB",
                ("<=", 1.3) if tasks == 4 else None),
        compare(NAME, f"{label}: analyze step vs plain step (above weights)", peaks["analyze"], peaks["plain"], "MB"),
        compare(NAME, f"{label}: analyze first step (the call's peak) vs plain step (incl. weights)",
                total["analyze first step"], total["plain"], "MB"),
        compare(NAME, f"{label}: floor, T gradients kept, vs plain step (incl. weights)", total["floor"],
                total["plain"], "MB"),
    ]


def run(settings: Settings) -> list[Row]:
    say(NAME, f"method: {MEMORY_METHOD}")
    tasks = (4,) if settings.quick else (2, 4)
    return [row for case in settings.step_cases() for t in tasks for row in _case(case, t, settings)]
