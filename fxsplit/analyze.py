"""``analyze``: Recon's conflict scores for any model, from one forward and one gradient pass per task a step."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .conflicts import ConflictCounter
from .errors import FxsplitError, TaskError
from .layers import layer_graph
from .report import ConflictReport
from .split_module import SplitModule

Loss = Callable[[Any, Any], torch.Tensor]


def analyze(
    model: nn.Module,
    tasks: Mapping[str, Loss],
    data: Iterable,
    *,
    steps: int | None = None,
    threshold: float | Sequence[float] = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    graph: nx.DiGraph | None = None,
    progress: bool | None = None,
    every: int = 1,
    bins: int = 20,
) -> ConflictReport:
    """Score every shared layer of ``model`` by how often its task gradients conflict (Recon).

    At each step (one batch of ``data``, at most ``steps``): one forward, each task's gradient by
    ``torch.autograd.grad``, and for every layer that two or more tasks' losses reach, the cosine of every pair of
    task gradients (weight and bias together); a layer's score counts the (step, pair) with cosine < ``threshold``.

    Args:
        tasks: task name -> ``loss(output, batch)``, a scalar tensor; ``output`` is what the model returned.
        data: batches; the model is called as ``model(batch[0])`` for a tuple/list batch, ``model(batch)``
            otherwise, or ``forward(model, batch)``. Tensors are moved to the model's device.
        threshold: S, or several (the first is the primary one; one pass scores them all).
        optimizer: without one, analyze only probes and the model ends exactly as it began (parameters,
            buffers, ``.grad``, mode). With one, each step also applies ``optimizer.step()`` to the gradient of the
            summed loss: the scoring run trains the model, as in Recon.
        graph: the layer graph to score (default ``fxsplit.layer_graph(model)``; pass one built from
            ``fxsplit.trace(model, leaf_modules=...)`` for models that need custom tracing).
        progress: show a progress bar (default: when stderr is a terminal).
        every: score only every ``every``-th step; with an optimizer the others are plain training steps
            (``sum(losses).backward()``), without one they are skipped. Scoring costs then shrink by ``every``.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> tasks = {"a": lambda out, batch: out[:, 0].pow(2).mean(), "b": lambda out, batch: -out[:, 1].mean()}
    >>> report = fxsplit.analyze(net, tasks, [torch.randn(8, 4) for _ in range(5)], progress=False)
    >>> list(report.scores) == ["0", "2"] or list(report.scores) == ["2", "0"], report.steps
    (True, 5)
    """
    losses = _check_tasks(tasks)
    thresholds = _check_thresholds(threshold)
    if not (isinstance(every, int) and every >= 1):
        raise FxsplitError(f"every must be a whole number of steps >= 1, got {every!r}.")
    graph = layer_graph(model) if graph is None else graph
    forward = forward or _default_forward
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    weights = [p for _, p in named]
    if not weights:
        raise FxsplitError(f"{type(model).__name__} has no parameter that requires grad: nothing to score.")
    device = weights[0].device
    buffers = None if optimizer is not None else [b.detach().clone() for b in model.buffers()]
    gradients = _Gradients(graph, named, len(losses))
    scoring = None
    try:
        batches = _progress(islice(data, steps), steps if steps is not None else _length(data), progress)
        for step, batch in enumerate(batches):
            if step % every and optimizer is None:
                continue
            batch = tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)
            values = _losses(losses, forward(model, batch), batch)
            if step % every:
                optimizer.zero_grad(set_to_none=True)
                sum(values).backward()
                optimizer.step()
                continue
            for t, value in enumerate(values):  # each task's gradients go straight into its row, then are freed
                gradients.store(t, torch.autograd.grad(value, weights, retain_graph=t < len(values) - 1,
                                                       allow_unused=True))
            if scoring is None:  # the first step's gradients decide which layers are scored
                owners = model.parameter_tasks() if isinstance(model, SplitModule) else None
                scoring = _Scoring(graph, gradients, list(losses), thresholds, bins, owners)
            scoring.counter.update(gradients.flat)
            if optimizer is not None:
                gradients.step(optimizer)
    finally:
        if buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
    if scoring is None:
        raise FxsplitError("data gave no batch to analyze (empty data, or steps=0).")
    return scoring.report()


class _Gradients:
    """The tasks' gradients of the current step: one row per task of one flat buffer, laid out layer by layer
    in graph order (so each layer is one contiguous segment), then every other trainable parameter."""

    def __init__(self, graph, named, tasks: int):
        self.index = {name: i for i, (name, _) in enumerate(named)}
        self.weights = [p for _, p in named]
        in_layers = [self.index[name] for _, names in graph.nodes(data="parameters") for name in names
                     if name in self.index]
        order = list(dict.fromkeys(in_layers)) + sorted(set(range(len(named))) - set(in_layers))
        self.offsets, offset = [0] * len(self.weights), 0
        for i in order:
            self.offsets[i] = offset
            offset += self.weights[i].numel()
        first = self.weights[0]
        self.flat = torch.zeros(tasks, offset, dtype=first.dtype, device=first.device)
        self.views = [self._views(row) for row in self.flat]
        self.reached = [[False] * len(self.weights) for _ in range(tasks)]  # at the current step

    def _views(self, row: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat row shaped like each weight, in weight order."""
        return [row[start:start + w.numel()].view_as(w) for start, w in zip(self.offsets, self.weights)]

    def segment(self, names: list[str]) -> tuple[int, int]:
        """Where the parameters ``names`` (one layer's) lie in a row."""
        slots = [self.index[name] for name in names if name in self.index]
        return (min(self.offsets[i] for i in slots),
                max(self.offsets[i] + self.weights[i].numel() for i in slots))

    def store(self, task: int, grads) -> None:
        """Copy one task's gradients into its row (zeros where its loss does not reach)."""
        with torch.no_grad():
            for i, (view, grad) in enumerate(zip(self.views[task], grads)):
                self.reached[task][i] = grad is not None
                if grad is None:
                    view.zero_()
                else:
                    view.copy_(grad)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """One optimizer step on the gradient of the summed loss, as ``sum(losses).backward()`` gives it."""
        summed = self._views(self.flat.sum(0))
        for i, (weight, grad) in enumerate(zip(self.weights, summed)):
            weight.grad = grad if any(reached[i] for reached in self.reached) else None
        optimizer.step()


class _Scoring:
    """Which layers are scored (decided at the first step, from which losses reach which parameters), and
    their conflict counts.

    On a split model the graph says which tasks' outputs each parameter serves (``owners``); a batched
    stream links the branches in autograd's graph, with zero gradients, which must not count as reaching.
    """

    def __init__(self, graph, gradients: _Gradients, tasks, thresholds, bins, owners=None):
        index = gradients.index
        reached = {name: [t for k, t in enumerate(tasks) if gradients.reached[k][i]
                          and (owners is None or t in owners[name])]
                   for name, i in index.items()}
        self.graph, self.tasks, self.thresholds = graph, tasks, thresholds
        self.reach: dict[str, list[str]] = {}
        self.left_out: dict[str, str] = {}
        self.layers: list[str] = []
        for layer, names in graph.nodes(data="parameters"):
            users = sorted({t for name in names if name in index for t in reached[name]}, key=tasks.index)
            self.reach[layer] = users
            if not any(name in index for name in names):
                self.left_out[layer] = "frozen (no parameter requires grad)"
            elif len(users) < 2:
                self.left_out[layer] = f"only task {users[0]!r} reaches it" if users else "no task's loss reaches it"
            else:
                self.layers.append(layer)
        bounds = [gradients.segment(graph.nodes[layer]["parameters"]) for layer in self.layers]
        reach = torch.tensor([[t in self.reach[layer] for t in tasks] for layer in self.layers],
                             device=gradients.flat.device, dtype=torch.bool).reshape(len(self.layers), len(tasks))
        self.counter = ConflictCounter(bounds, reach, thresholds, bins)

    def report(self) -> ConflictReport:
        tally = self.counter.tally()
        steps = tally.steps
        mean = [[(s / steps if valid else None) for s, valid in zip(row, valid_row)]
                for row, valid_row in zip(tally.cosine_sum.tolist(), self.counter.valid.cpu().tolist())]
        return ConflictReport(
            tasks=list(self.tasks), thresholds=list(self.thresholds), layers=list(self.layers),
            pairs=[[self.tasks[i], self.tasks[j]] for i, j in zip(self.counter.first.tolist(),
                                                                   self.counter.second.tolist())],
            counts=tally.counts.tolist(), mean_cosine=mean, histogram=tally.histogram.tolist(),
            whole_cosine=tally.whole.tolist(), steps=steps, reach=self.reach, left_out=self.left_out,
            graph=self.graph.copy(),
        )


def _check_tasks(tasks) -> dict[str, Loss]:
    if not isinstance(tasks, Mapping):
        raise TaskError(f"tasks must map task names to loss functions loss(output, batch), got {type(tasks).__name__}.")
    if len(tasks) < 2:
        raise TaskError(f"conflicts need at least two tasks, got {list(tasks)}.")
    for name, loss in tasks.items():
        if not isinstance(name, str) or not callable(loss):
            raise TaskError(f"tasks must map names (str) to callables loss(output, batch); got {name!r}: {loss!r}.")
    return dict(tasks)


def _check_thresholds(threshold) -> list[float]:
    values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
    bad = [v for v in values if not (isinstance(v, (int, float)) and -1.0 <= v <= 1.0)]
    if not values or bad:
        raise FxsplitError(f"threshold must be a cosine in [-1, 1] (or a list of them), got {threshold!r}.")
    return [float(v) for v in dict.fromkeys(values)]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    return model(batch[0]) if isinstance(batch, (tuple, list)) else model(batch)


def _losses(losses: Mapping[str, Loss], output: Any, batch: Any) -> list[torch.Tensor]:
    values = []
    for name, loss in losses.items():
        try:
            value = loss(output, batch)
        except Exception as error:
            raise TaskError(f"the loss of task {name!r} raised {type(error).__name__}: {error}") from error
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TaskError(f"the loss of task {name!r} must return a scalar tensor, got {shape}; reduce it "
                            f"(e.g. .mean()).")
        if not value.requires_grad:
            raise TaskError(f"the loss of task {name!r} does not depend on the model's parameters "
                            f"(it has no gradient); compute it from the model's output.")
        values.append(value.reshape(()))
    finite = torch.stack([v.detach() for v in values]).isfinite()
    if not bool(finite.all()):
        bad = [name for name, ok in zip(losses, finite.tolist()) if not ok]
        raise TaskError(f"the loss of task(s) {bad} is NaN or infinite; check the data and the learning rate.")
    return values


def _length(data: Iterable) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None


def _progress(batches: Iterable, total: int | None, enabled: bool | None) -> Iterable:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, total=total, desc="analyze", unit="step", dynamic_ncols=True)

