"""``analyze``: Recon's conflict scores for any model, from one forward and one gradient pass per task a step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, islice
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import FxsplitError, TaskError
from .layers import graph_of, with_profile
from .outputs import part_to_json, paths_read
from .progress import Progress
from .report import ConflictReport
from .scoring import ConflictMonitor, StepFigures
from .scoring.checks import loss_value, step_hooks, task_names, thresholds, whole_number
from .scoring.methods import Aggregator
from .tracing import trace_graph, unwrapped
from .tracing.verify import check_trace, forwarding

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
    tracer_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
    every: int = 1,
    bins: int = 20,
    aggregator: Aggregator | str | None = None,
    on_step: Callable[[StepFigures], object] | Iterable[Callable[[StepFigures], object]] | None = None,
) -> ConflictReport:
    """Score every shared layer of ``model`` by how often its task gradients conflict (Recon); ``tasks`` maps names
    to losses, ``{name: loss(output, batch)}`` (:class:`~fxsplit.ConflictMonitor` takes the names only).

    At each step (one batch of ``data``, at most ``steps``): one forward, each task's gradient by
    ``torch.autograd.grad``, and for every layer that two or more tasks' losses reach, the cosine of every pair of
    task gradients (weight and bias together); a layer's score counts the (step, pair) with cosine < ``threshold``.

    Args:
        tasks: task name -> ``loss(output, batch)``, a scalar tensor; ``output`` is what the model returned. A loss
            may return ``None`` for a batch without its task's labels: that task's pairs are not scored at that
            step (see :class:`~fxsplit.ConflictReport` for how such reports rank); a task whose loss is ``None`` at
            every step is a :class:`~fxsplit.TaskError`.
        data: batches; the model is called as ``model(batch[0])`` for a tuple/list batch, ``model(batch)``
            otherwise, or ``forward(model, batch)``. Tensors are moved to the model's device.
        threshold: S, or several (the first is the primary one; one pass scores them all).
        optimizer: without one, analyze only probes and the model ends exactly as it began (parameters,
            buffers, ``.grad``, mode). With one, each step also applies ``optimizer.step()`` to the gradient of the
            summed loss: the scoring run trains the model, as in Recon.
        graph: the layer graph to score. By default the model is traced (with ``tracer_kwargs``, as
            :func:`fxsplit.trace` takes them) and the graph is checked against the model on the first batch, in the
            model's mode: a :class:`~fxsplit.TraceMismatchError` names the output that differs. A graph passed in
            is taken as it is.
        progress: show the run's progress and the share of conflicting task pairs so far on stderr: a bar on a
            terminal, otherwise a line every tenth of the run (every 100 steps if ``data`` has no length). Default
            (``None``): shown; ``False``: not.
        every: score only every ``every``-th step; with an optimizer the others are plain training steps
            (``sum(losses).backward()``), without one they are skipped. Scoring costs then shrink by ``every``.
        aggregator: with an optimizer, train on a gradient method's update instead of the summed gradient (see
            :class:`fxsplit.ConflictMonitor`).
        on_step: hooks given every scored step's :class:`~fxsplit.StepFigures`, as the monitor's ``on_step``
            (e.g. the TensorBoard logger of ``fxsplit.integrations.tensorboard``).

    Each scored step is :meth:`fxsplit.ConflictMonitor.backward`; the scores stay on the device until the end.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> tasks = {"a": lambda out, batch: out[:, 0].pow(2).mean(), "b": lambda out, batch: -out[:, 1].mean()}
    >>> report = fxsplit.analyze(net, tasks, [torch.randn(8, 4) for _ in range(5)], progress=False)
    >>> list(report.scores) == ["0", "2"] or list(report.scores) == ["2", "0"], report.steps
    (True, 5)
    """
    model = unwrapped(model)
    losses = _check_tasks(tasks)
    whole_number("every", every, 1, " of steps")
    whole_number("bins", bins, 1)
    if steps is not None:
        whole_number("steps", steps, 0)
    if graph is not None and tracer_kwargs:
        raise FxsplitError("tracer_kwargs apply when analyze traces the model itself; a graph was given.")
    forward = forward or default_forward
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # where batches go
    buffers = None if optimizer is not None else [b.detach().clone() for b in model.buffers()]
    hooks = step_hooks(on_step)
    display = Progress("analyze", steps if steps is not None else _length(data), thresholds(threshold)[0], progress)
    batches = iter(display.wrap(islice(data, steps)))
    try:
        first = next(batches, None)
        if first is None:
            raise FxsplitError("data gave no batch to analyze (empty data, or steps=0).")
        if graph is None:
            graph = _checked_graph(model, forward, _to(first, device), tracer_kwargs)
        monitor = ConflictMonitor(model, losses, threshold=threshold, graph=graph, bins=bins, aggregator=aggregator,
                                  on_step=(*hooks, display.share) if display.enabled else hooks)
        outputs = {}
        for step, batch in enumerate(chain([first], batches)):
            if step % every and optimizer is None:
                continue
            batch = _to(batch, device)
            output = forward(model, batch)
            values = _losses(losses, output, batch)
            unread = {task: value for task, value in values.items() if task not in outputs}
            if unread:  # the first batch, and the first that has a task's labels
                outputs.update(paths_read(output, unread))
            if optimizer is not None:
                model.zero_grad(set_to_none=True)
            if step % every:
                if values:
                    sum(values.values()).backward()
            else:
                monitor.backward(values, update_grad=optimizer is not None)
            if optimizer is not None:
                optimizer.step()
    finally:
        display.close()
        if buffers is not None:
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
    if monitor.nonfinite_tasks:
        raise TaskError(f"the loss of task(s) {monitor.nonfinite_tasks} is NaN or infinite, or its gradient, at some "
                        f"step; check the data and the learning rate.")
    report = monitor.report()
    report.outputs = {task: part_to_json(outputs[task]) for task in losses}
    return report


def _checked_graph(model: nn.Module, forward: Callable, batch: Any, tracer_kwargs) -> nx.DiGraph:
    """The layer graph of ``model`` traced in its current mode, once the graph is checked on ``batch``, with its
    compute profile on ``batch`` (what a split costs in FLOPs)."""
    traced = trace_graph(model, tracer_kwargs)
    call = forwarding(forward, batch)
    check_trace(model, traced, call, modes=(model.training,))
    return with_profile(graph_of(traced), traced, call)


def _to(batch: Any, device: torch.device) -> Any:
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, batch)


def _check_tasks(tasks) -> dict[str, Loss]:
    if not isinstance(tasks, Mapping):
        raise TaskError(f"tasks must map task names to loss functions loss(output, batch), got {type(tasks).__name__}.")
    task_names(tasks)
    for name, loss in tasks.items():
        if not callable(loss):
            raise TaskError(f"tasks must map names (str) to callables loss(output, batch); got {name!r}: {loss!r}.")
    return dict(tasks)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """How analyze calls the model on a batch without a ``forward``: ``model(batch[0])`` for a tuple or list."""
    return model(batch[0]) if isinstance(batch, (tuple, list)) else model(batch)


def _losses(losses: Mapping[str, Loss], output: Any, batch: Any) -> dict[str, torch.Tensor]:
    """The tasks' losses on a batch; a task whose loss returned ``None`` (no labels in the batch) is left out."""
    values = {}
    for name, loss in losses.items():
        try:
            value = loss(output, batch)
        except Exception as error:
            raise TaskError(f"the loss of task {name!r} raised {type(error).__name__}: {error}") from error
        if value is not None:
            values[name] = loss_value(name, value)
    return values


def _length(data: Iterable) -> int | None:
    try:
        return len(data)
    except TypeError:
        return None
