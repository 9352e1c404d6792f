"""``analyze``: Recon's conflict scores for any model, from one forward and one gradient pass per task a step."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, islice
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch.utils._pytree import tree_map

from .errors import FxsplitError, TaskError, TraceError
from .modules import saved_buffers
from .outputs import part_to_json, paths_read, task_names
from .progress import Progress
from .report import ConflictReport
from .scoring import ConflictMonitor, StepFigures
from .scoring.checks import loss_value, step_hooks, thresholds, whole_number
from .scoring.methods import Aggregator
from .tracing import unwrapped
from .tracing.verify import forwarding, recorded_example

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
    method: str = "auto",
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
        graph: the layer graph to score. By default the model is traced by ``method`` (with ``tracer_kwargs``, as
            :func:`fxsplit.trace` takes them) on the call of the model that ``forward`` makes on the first batch,
            the example, and the graph is checked against the model on it, in the model's mode: a
            :class:`~fxsplit.TraceMismatchError` names the output that differs. ``"auto"`` takes the ``torch.fx``
            route, or the ``torch.export`` route when ``torch.fx`` fails or mis-traces; ``report.route`` and
            ``report.route_reason`` say which and why. A graph passed in is taken as it is. Either way the report
            keeps the example call (none where ``forward`` never calls the model itself), so that
            ``fxsplit.rewrite(model, report.top(k))`` splits on the same route, checked on it.
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
    forward = forward or default_forward
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # where batches go
    restore_buffers = None if optimizer is not None else saved_buffers(model.buffers())
    hooks = step_hooks(on_step)
    display = Progress("analyze", steps if steps is not None else _length(data), thresholds(threshold)[0], progress)
    batches = iter(display.wrap(islice(data, steps)))
    try:
        first = next(batches, None)
        if first is None:
            raise FxsplitError("data gave no batch to analyze (empty data, or steps=0).")
        args, kwargs = _example(model, forward, _to(first, device), graph is None)
        monitor = ConflictMonitor(model, losses, threshold=threshold, graph=graph, bins=bins, aggregator=aggregator,
                                  on_step=(*hooks, display.share) if display.enabled else hooks, method=method,
                                  example_inputs=args, example_kwargs=kwargs, tracer_kwargs=tracer_kwargs)
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
        if restore_buffers is not None:
            restore_buffers()
    if monitor.nonfinite_tasks:
        raise TaskError(f"the loss of task(s) {monitor.nonfinite_tasks} is NaN or infinite, or its gradient, at some "
                        f"step; check the data and the learning rate.")
    report = monitor.report()
    report.outputs = {task: part_to_json(outputs[task]) for task in losses}
    return report


def _example(model: nn.Module, forward: Callable, batch: Any, needed: bool) -> tuple[Any, dict | None]:
    """The call ``(args, kwargs)`` that ``forward`` makes of ``model`` on ``batch``, or ``(None, None)`` where it
    never calls the model itself and no example is ``needed`` (a graph was given)."""
    try:
        return recorded_example(model, forwarding(forward, batch))
    except TraceError as error:
        if needed:
            raise TraceError(f"forward(model, batch) never calls {type(model).__name__} itself, so analyze has no "
                             f"call of its forward to trace: call the model in forward, or give graph=... (the layer "
                             f"graph of what forward runs).") from error
        return None, None


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
