"""Benchmark 5: what the second tracing route (torch.export) costs against the first (torch.fx), on models both trace.

For each model: the layer graph by each route (``fxsplit.layer_graph``, given the batch, so each trace is checked
on it), a rewrite at the middle layer by each route (given the batch: traced in both modes, checked), and one
training step of the split model (forward and backward of the summed task losses) by each route: the same
arithmetic against the fx route's split with ``batch_branches=False`` (the export route's graphs have nothing to
batch), and what batching wins the fx route on top. A BERT-base, which only the export route traces, is timed
against one training step of the model itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

import fxsplit

from .common import (
    Row, Settings, compare, make_batch, median, resnet, say, steps_of, task_losses, time_per_step, train_step, vit,
)

NAME = "routes"
TASKS = 2


def _seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return median(times)


def _surgery(model: nn.Module, x, middle: str, repeats: int) -> dict[str, dict[str, float]]:
    """Route -> seconds of layer_graph and of a rewrite at ``middle``, both given ``x``."""
    return {route: {
        "layer_graph": _seconds(lambda: fxsplit.layer_graph(model, example_inputs=(x,), method=route), repeats),
        "rewrite": _seconds(lambda: fxsplit.rewrite(model, [middle], example_inputs=(x,), method=route), repeats),
    } for route in ("fx", "export")}


def _bert(length: int):
    """A BERT-base (12 layers, width 768) with two heads, and a batch of 4 sequences of ``length`` tokens."""
    from transformers import BertConfig, BertModel

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(BertConfig(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
            self.heads = nn.ModuleDict({f"t{i}": nn.Linear(768, 10) for i in range(TASKS)})

        def forward(self, ids, mask):
            pooled = self.bert(input_ids=ids, attention_mask=mask).pooler_output
            return {task: head(pooled) for task, head in self.heads.items()}

    ids = torch.randint(1, 30000, (4, length))
    return TwoHeads(), (ids, torch.ones_like(ids))


def run(settings: Settings) -> list[Row]:
    rows = []
    repeats = 1 if settings.quick else 3
    batch = make_batch(TASKS, settings.batch, settings.pixels, settings.device)
    losses = task_losses(TASKS)
    for label, build in (("resnet18", lambda: resnet(TASKS, 18)),
                         ("vit_tiny", lambda: vit(TASKS, pixels=settings.pixels))):
        torch.manual_seed(0)
        model = build().to(settings.device).train()
        graph = fxsplit.layer_graph(model)
        middle = list(graph)[graph.number_of_nodes() // 2]
        m = _surgery(model, batch[0], middle, repeats)
        for stage in ("layer_graph", "rewrite"):
            rows.append(compare(NAME, f"{label}: {stage}, torch.export vs torch.fx", m["export"][stage],
                                m["fx"][stage], "s"))
        splits = {"export": fxsplit.rewrite(model, [middle], example_inputs=(batch[0],), method="export"),
                  "fx": fxsplit.rewrite(model, [middle], method="fx", batch_branches=False),
                  "fx batched": fxsplit.rewrite(model, [middle], method="fx")}
        step = time_per_step({route: steps_of(lambda split=split: train_step(split, losses, batch))
                              for route, split in splits.items()}, settings)
        say(NAME, f"{label}: split at {middle}: layer_graph fx {m['fx']['layer_graph']:.2f} s, export "
                  f"{m['export']['layer_graph']:.2f} s; rewrite fx {m['fx']['rewrite']:.2f} s, export "
                  f"{m['export']['rewrite']:.2f} s; train step export {step['export'] * 1e3:.1f} ms, fx "
                  f"{step['fx'] * 1e3:.1f} ms (batched {step['fx batched'] * 1e3:.1f} ms)")
        rows.append(compare(NAME, f"{label}: split's train step, torch.export vs torch.fx route, unbatched",
                            step["export"], step["fx"], "ms", ("<=", 1.1)))
        rows.append(compare(NAME, f"{label}: split's train step, torch.export vs torch.fx route, batched",
                            step["export"], step["fx batched"], "ms"))
    model, example = _bert(32 if settings.quick else 128)
    model.train()
    graph_seconds = _seconds(lambda: fxsplit.layer_graph(model, example_inputs=example), 1)
    forward = time_per_step({"model": steps_of(lambda: sum(model(*example).values()).sum().backward())},
                            settings)["model"]
    say(NAME, f"BERT-base, batch 4 x {example[0].shape[1]} tokens: layer_graph (torch.export) {graph_seconds:.2f} s, "
              f"one train step of the model {forward:.2f} s")
    rows.append(compare(NAME, f"BERT-base x{example[0].shape[1]}: layer_graph vs one train step", graph_seconds,
                        forward, "s"))
    return rows
