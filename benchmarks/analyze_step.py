"""Benchmark 1: the cost of one ``fxsplit.analyze`` step against a plain step, the floor, and the authors' way.

Every method is timed per step the same way: N2 steps and N1 steps, the difference divided by N2 - N1, so that
set-up (for analyze: its first step, which decides the scored layers, and the final report) cancels out.

* analyze: ``fxsplit.analyze(model, tasks, [batch] * N, graph=graph)``: the layer graph is given, so no tracing.
* plain step: one forward, one backward of the summed loss.
* floor: one forward and T ``torch.autograd.grad`` calls, nothing else.
* authors' way (Recon's code): per task ``backward(retain_graph=True)``, clone every ``.grad``, zero them, then a
  Python loop over layers and task pairs with ``F.normalize`` cosines.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

import fxsplit

from .common import Case, Row, Settings, compare, floor_step, say, setup, steps_of, time_per_step, train_step

NAME = "analyze_step"


def authors_step(model, losses, batch, layers: list[list[torch.Tensor]], threshold: float = 0.0) -> list[bool]:
    """Recon's per-step scoring as its authors wrote it: backward per task, cloned ``.grad``, a loop of cosines."""
    model.zero_grad(set_to_none=True)
    output = model(batch[0])
    values = [loss(output, batch) for loss in losses.values()]
    shared = [p for params in layers for p in params]
    per_task = []
    for t, value in enumerate(values):
        value.backward(retain_graph=t < len(values) - 1)
        per_task.append([p.grad.detach().clone().view(-1) for p in shared])
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
    conflicts, start = [], 0
    for params in layers:
        stop = start + len(params)
        grads = [torch.cat(task_grads[start:stop]) for task_grads in per_task]
        for i, j in itertools.combinations(range(len(grads)), 2):
            cosine = (F.normalize(grads[i], dim=0) * F.normalize(grads[j], dim=0)).sum()
            conflicts.append(cosine.item() < threshold)
        start = stop
    return conflicts


def _case(case: Case, tasks: int, settings: Settings) -> list[Row]:
    model, batch, losses = setup(case, tasks, settings)
    graph = fxsplit.layer_graph(model)
    weights = [p for p in model.parameters() if p.requires_grad]
    scored = fxsplit.analyze(model, losses, [batch], graph=graph, progress=False).layers
    named = dict(model.named_parameters())
    layers = [[named[p] for p in graph.nodes[layer]["parameters"]] for layer in scored]
    t = time_per_step({
        "plain": steps_of(lambda: train_step(model, losses, batch)),
        "floor": steps_of(lambda: floor_step(model, losses, batch, weights)),
        "authors": steps_of(lambda: authors_step(model, losses, batch, layers)),
        "analyze": lambda steps: fxsplit.analyze(model, losses, [batch] * steps, graph=graph, progress=False),
    }, settings)
    plain, floor, authors, per_step = t["plain"], t["floor"], t["authors"], t["analyze"]
    say(NAME, f"{case} T={tasks}: {len(scored)} scored layers; plain {plain * 1e3:.1f} ms, floor "
              f"{floor * 1e3:.1f} ms, analyze {per_step * 1e3:.1f} ms/step, authors' way {authors * 1e3:.1f} ms")
    label = f"{case} T={tasks}"
    headline = case.model == "resnet18" and tasks == 4
    realistic = case.pixels >= 224  # issue 13's CUDA sizes: a tighter target
    return [
        compare(NAME, f"{label}: analyze/step vs floor", per_step, floor, "ms", ("<=", 1.05 if realistic else 1.08)),
        compare(NAME, f"{label}: authors' way vs analyze (speed-up)", authors, per_step, "ms",
                (">=", 1.35) if headline else None),
        compare(NAME, f"{label}: analyze/step vs plain step", per_step, plain, "ms"),
        compare(NAME, f"{label}: floor vs plain step", floor, plain, "ms"),
    ]


def run(settings: Settings) -> list[Row]:
    return [row for case in settings.step_cases() for tasks in (2, 4) for row in _case(case, tasks, settings)]
