"""Benchmark 3: the cost of the surgery (trace, layer graph, rewrite) against the size of the graph.

Each step is timed as a user calls it on the model: ``fxsplit.trace(model)``, ``fxsplit.layer_graph(model)`` and
``fxsplit.rewrite(model, [a layer half-way down])`` (the last two trace the model themselves). Families:
torchvision resnet18 -> resnet152, timm ViT tiny -> base (same depth, so the same graph, wider), and a generated
ladder of small Linear layers with residual adds, ~1k to ~8k nodes. Growth is shown against a linear
extrapolation from the family's smallest member: ratio 1 is linear.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from torch import nn

import fxsplit

from .common import MultiHead, Row, Settings, compare, median, resnet, say, vit

NAME = "surgery"
TASKS = 2


class Rung(nn.Module):
    """``norm(x + fc2(relu(fc1(x))))``: five graph nodes."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.act, self.norm = nn.ReLU(), nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


def ladder(nodes: int, width: int = 8) -> MultiHead:
    """A generated model of about ``nodes`` graph nodes: a chain of residual rungs and two heads."""
    return MultiHead(nn.Sequential(*(Rung(width) for _ in range(nodes // 5))), width, TASKS)


def _families(quick: bool) -> dict[str, list[tuple[str, Callable[[], nn.Module]]]]:
    if quick:
        return {"resnet": [(f"resnet{d}", lambda d=d: resnet(TASKS, d)) for d in (18, 50)],
                "ladder": [(f"ladder {n}", lambda n=n: ladder(n)) for n in (1000, 2000)]}
    return {
        "resnet": [(f"resnet{d}", lambda d=d: resnet(TASKS, d)) for d in (18, 34, 50, 101, 152)],
        "vit": [(f"vit_{s}", lambda s=s: vit(TASKS, f"vit_{s}_patch16_224")) for s in ("tiny", "small", "base")],
        "ladder": [(f"ladder {n}", lambda n=n: ladder(n)) for n in (1000, 2000, 4000, 8000)],
    }


def _timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return median(times), result


def _measure(model: nn.Module, repeats: int) -> dict[str, float]:
    """Seconds for trace, layer graph and rewrite (and, for the details, rewrite of an already traced
    ``GraphModule`` and one ``copy.deepcopy`` of the model), and the graph's size."""
    t_trace, gm = _timed(lambda: fxsplit.trace(model), repeats)
    t_graph, graph = _timed(lambda: fxsplit.layer_graph(model), repeats)
    middle = sorted(graph, key=lambda layer: graph.nodes[layer]["order"])[graph.number_of_nodes() // 2]
    t_rewrite, split = _timed(lambda: fxsplit.rewrite(model, [middle]), repeats)
    t_rewrite_gm, _ = _timed(lambda: fxsplit.rewrite(gm, [middle]), repeats)
    t_copy, _ = _timed(lambda: copy.deepcopy(model), repeats)
    return {"nodes": len(gm.graph.nodes), "layers": graph.number_of_nodes(), "split nodes": len(split.graph.nodes),
            "trace": t_trace, "layer_graph": t_graph, "rewrite": t_rewrite, "rewrite traced": t_rewrite_gm,
            "deepcopy": t_copy, "total": t_trace + t_graph + t_rewrite}


def run(settings: Settings) -> list[Row]:
    rows = []
    for family, members in _families(settings.quick).items():
        first = None
        for label, build in members:
            model = build().train()
            # median of 3, except in quick runs and for the largest graphs (seconds per call, little noise)
            repeats = 1 if settings.quick or len(list(model.modules())) > 3000 else 3
            m = _measure(model, repeats)
            say(NAME, f"{label}: {m['nodes']} nodes, {m['layers']} layers, split graph {m['split nodes']} nodes; "
                      f"trace {m['trace']:.3f} s, layer_graph {m['layer_graph']:.3f} s, rewrite {m['rewrite']:.3f} s"
                      f" = {m['total'] / m['nodes'] * 1e6:.0f} us/node (rewrite of the traced GraphModule "
                      f"{m['rewrite traced']:.3f} s; one deepcopy of the model {m['deepcopy']:.3f} s)")
            first = first or m
            if label.startswith("ladder 1000"):
                rows.append(compare(NAME, f"{label} ({m['nodes']} nodes): rewrite vs 1 s", m["rewrite"], 1.0,
                                    "s", ("<=", 1.0)))
            if m is first:
                continue
            linear = first["total"] * m["nodes"] / first["nodes"]
            target = ("<=", 1.25) if family != "vit" else None  # the ViTs share one graph: nothing to extrapolate
            rows.append(compare(NAME, f"{label} ({m['nodes']} nodes): total vs linear from {members[0][0]}",
                                m["total"], linear, "s", target))
    return rows
