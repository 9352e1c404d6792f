"""``ConflictMonitor``: Recon's conflict scores measured inside any training loop."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import nn

from ..errors import FxsplitError, ScoringError, TaskError
from ..layers import layer_graph
from ..report import ConflictReport
from . import checks
from .counter import ConflictCounter
from .distributed import check_not_sharded, reduction, unwrap
from .methods import Aggregator, aggregate, aggregator_of
from .rows import GradientRows
from .scope import ScoredLayers


@dataclass
class _Step:
    """The optimizer step in progress: what its micro-batches have gathered so far.

    A step opens at its first micro-batch and ends when it is scored, or when it fails half-way (it is then dropped
    whole, and the next one starts afresh).
    """

    stored: list[bool]  # per task: its row holds this step's first micro-batch
    reached: list[list[bool]]  # per task, per parameter: its losses reached the parameter in this step
    captured: dict[str, bool] = field(default_factory=dict)  # hook style: tasks captured in this micro-batch -> their
    # accumulate

    @classmethod
    def new(cls, tasks: int, parameters: int) -> _Step:
        return cls([False] * tasks, [[False] * parameters for _ in range(tasks)])


class ConflictMonitor:
    """Scores every shared layer of ``model`` by how often its task gradients conflict, inside your own loop (Recon).

    Call ``monitor.backward(losses)`` where you would call ``sum(losses.values()).backward()``: each task's gradient
    comes from its own autograd pass, the step is scored, and every parameter's ``.grad`` receives what the summed
    loss would have given it (the task gradients' sum) or, with an ``aggregator``, the aggregator's combination.
    ``monitor.report()`` is the same :class:`ConflictReport` that :func:`fxsplit.analyze` returns.

    Args:
        model: the model the losses come from (a ``DistributedDataParallel`` wrapper is accepted: its module is
            scored). The monitor keeps no hook on it and changes nothing but ``.grad``.
        tasks: the task names: the keys of the mapping given to :meth:`backward`.
        threshold: S, or several (the first is the primary one).
        graph: the layer graph to score (default ``fxsplit.layer_graph(model)``).
        bins: bins of the cosine histogram over [-1, 1].
        aggregator: a gradient method on the shared parameters: a torchjd aggregator (e.g.
            ``torchjd.aggregation.UPGrad()``) or its class name (``"UPGrad"``). Parameters that two or more tasks
            reach get the aggregator's combination of the task gradients, the others their own task's gradient.
        scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop: the monitor scales the losses with it (pass
            the losses unscaled), and a step whose gradients are not finite (one the scaler skips) is not scored.
        distributed: under an initialized process group, ``"global"`` (one all-reduce of the task gradients per
            step: every rank scores the global batch) or ``"local"`` (every rank scores its own gradients, the
            counts are summed in :meth:`report`); either way ``.grad`` ends as DDP's mean over ranks.
        group: the process group (default: the whole world).

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> monitor = fxsplit.ConflictMonitor(net, ["a", "b"])
    >>> optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    >>> for x in torch.randn(5, 16, 4):
    ...     out = net(x)
    ...     monitor.backward({"a": out[:, 0].pow(2).mean(), "b": -out[:, 1].mean()})
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    >>> report = monitor.report()
    >>> report.steps, sorted(report.scores)
    (5, ['0', '2'])
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Iterable[str],
        *,
        threshold: float | Sequence[float] = 0.0,
        graph: nx.DiGraph | None = None,
        bins: int = 20,
        aggregator: Aggregator | str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        distributed: str = "global",
        group=None,
    ):
        self.model = unwrap(model)
        self._ddp = model if model is not self.model else None
        self.tasks = checks.task_names(tasks)
        self.thresholds = checks.thresholds(threshold)
        self.graph = layer_graph(self.model) if graph is None else graph
        self.bins = bins
        self.aggregator = aggregator_of(aggregator)
        self.scaler = scaler
        self._reduction = reduction(distributed, group)
        named = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise FxsplitError(f"{type(self.model).__name__} has no parameter that requires grad: nothing to score.")
        check_not_sharded(named)
        devices = {p.device for _, p in named}
        if len(devices) > 1:
            raise FxsplitError(f"the trainable parameters lie on {len(devices)} devices ({sorted(map(str, devices))}); "
                               f"the monitor needs them on one.")
        self._weights = [p for _, p in named]
        if self._reduction is not None:
            self._reduction.check_same_parameters(named)
        position = {id(p): i for i, p in enumerate(self._weights)}
        self._index = {name: position[id(p)] for name, p in self.model.named_parameters(remove_duplicate=False)
                       if id(p) in position}  # every name of a parameter, a tied one's aliases too
        self._owners = _owners(self.model, self._index, len(self._weights))
        self._rows = GradientRows(self._weights, len(self.tasks))
        self._scope: ScoredLayers | None = None
        self._counter: ConflictCounter | None = None
        self._step: _Step | None = None
        self._grad: torch.Tensor | None = None  # storage whose views the parameters get as .grad
        self._grad_views: list[torch.Tensor] = []

    # --- the two ways in ------------------------------------------------------------------------------------------

    def backward(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool = False,
                 update_grad: bool = True) -> None:
        """Each task's gradient by its own autograd pass, in place of ``sum(losses.values()).backward()``.

        Args:
            losses: task name -> scalar loss, for every task of the monitor.
            accumulate: more micro-batches of this optimizer step follow (gradient accumulation): the task
                gradients are added up, and the step is scored, and ``.grad`` updated, by the first call without
                ``accumulate``.
            update_grad: ``False`` scores only and leaves every ``.grad`` as it is.
        """
        self._check_no_open_step()
        values = self._values(losses)
        with self._abandoning_on_error():
            self._open_step()
            for t, value in enumerate(values):
                self._capture(t, self._grads(value, retain_graph=t < len(values) - 1))  # freed before the next
            self._complete(accumulate, update_grad)

    def _grads(self, loss: torch.Tensor, retain_graph: bool) -> tuple[torch.Tensor | None, ...]:
        with self._translating_autograd_errors():
            return torch.autograd.grad(loss, self._weights, retain_graph=retain_graph, allow_unused=True)

    @contextlib.contextmanager
    def task(self, name: str, *, accumulate: bool = False) -> Iterator[None]:
        """Capture the gradients of the backward calls run inside as task ``name``'s, for loops that call
        ``backward`` once per task (``retain_graph=True`` for all but the last).

        Each context leaves ``.grad`` as it found it, whatever the backward put there. When every task has been
        captured once, the step completes as :meth:`backward` completes it: same scores, same ``.grad``. Give the
        same ``accumulate`` to every task of a micro-batch.

        >>> import torch, fxsplit
        >>> net = torch.nn.Linear(3, 2)
        >>> monitor = fxsplit.ConflictMonitor(net, ["a", "b"])
        >>> out = net(torch.randn(4, 3))
        >>> with monitor.task("a"):
        ...     out[:, 0].sum().backward(retain_graph=True)
        >>> with monitor.task("b"):
        ...     out[:, 1].pow(2).sum().backward()
        >>> monitor.report().steps, net.weight.grad.shape
        (1, torch.Size([2, 3]))
        """
        t = self._task_index(name)
        if self._ddp is not None and self._ddp.require_backward_grad_sync:
            raise ScoringError("under DistributedDataParallel, run the forward and every task's backward inside "
                               "model.no_sync(): DDP reduces the gradients of one backward per forward, and the "
                               "monitor reduces the task gradients itself.")
        captured_before = {} if self._step is None else self._step.captured
        if name in captured_before:
            raise TaskError(f"task {name!r} was already captured in this step; capture each task once per step "
                            f"(tasks still to come: {[n for n in self.tasks if n not in captured_before]}).")
        if captured_before and accumulate != next(iter(captured_before.values())):
            raise TaskError(f"task {name!r} is captured with accumulate={accumulate} but the other tasks of this "
                            f"micro-batch with accumulate={not accumulate}; give every task the same value.")
        step = self._open_step()
        saved = [p.grad for p in self._weights]
        captured: list[torch.Tensor | None] = [None] * len(self._weights)

        def record(i):
            def hook(grad):
                captured[i] = grad if captured[i] is None else captured[i] + grad
            return hook

        for p in self._weights:
            p.grad = None
        handles = [p.register_hook(record(i)) for i, p in enumerate(self._weights)]
        with self._abandoning_on_error():
            try:
                with self._translating_autograd_errors():
                    yield
            finally:
                for handle in handles:
                    handle.remove()
                for p, grad in zip(self._weights, saved):
                    p.grad = grad
            self._capture(t, captured)
            step.captured[name] = accumulate
            if len(step.captured) == len(self.tasks):
                step.captured.clear()
                self._complete(accumulate, update_grad=True)

    # --- the result -------------------------------------------------------------------------------------------------

    def report(self) -> ConflictReport:
        """The scores so far, as :func:`fxsplit.analyze` reports them (under ``distributed="local"``, call it on
        every rank: it sums the ranks' counts, and ``steps`` counts every rank's steps)."""
        self._check_no_open_step()
        if self._counter is None:
            raise ScoringError("no step has been scored yet: call monitor.backward(losses) (or capture every task "
                               "with monitor.task) before monitor.report().")
        tally = self._counter.tally()
        if self._reduction is not None:
            tally = self._reduction.tally(tally)
        finite = tally.finite.cpu()
        steps = int(finite.sum())
        valid = self._counter.valid[:-1].cpu().tolist()
        mean = [[(s / steps if ok and steps else None) for s, ok in zip(row, valid_row)]
                for row, valid_row in zip(tally.cosine_sum.cpu().tolist(), valid)]
        scope = self._scope
        return ConflictReport(
            tasks=list(self.tasks), thresholds=list(self.thresholds), layers=list(scope.layers),
            pairs=[[self.tasks[i], self.tasks[j]] for i, j in zip(self._counter.first.tolist(),
                                                                   self._counter.second.tolist())],
            counts=tally.counts.cpu().tolist(), mean_cosine=mean, histogram=tally.histogram.cpu().tolist(),
            whole_cosine=tally.whole.cpu()[finite].tolist(), steps=steps, reach=dict(scope.reach),
            left_out=dict(scope.left_out), graph=self.graph.copy(), skipped=len(finite) - steps,
        )

    @property
    def nonfinite_tasks(self) -> list[str]:
        """The tasks whose gradient was NaN or infinite at some step (such steps are not scored)."""
        if self._counter is None:
            return []
        return [name for name, finite in zip(self.tasks, self._finite.tolist()) if not finite]

    # --- one step -------------------------------------------------------------------------------------------------

    def _values(self, losses) -> list[torch.Tensor]:
        if not isinstance(losses, Mapping):
            raise TaskError(f"backward takes a mapping task name -> loss, got {type(losses).__name__}.")
        for name in losses:
            self._task_index(name)
        missing = [name for name in self.tasks if name not in losses]
        if missing:
            raise TaskError(f"no loss for task(s) {missing}: backward needs every task's loss, {self.tasks}.")
        values = [checks.loss_value(name, losses[name]) for name in self.tasks]
        return values if self.scaler is None else [self.scaler.scale(value) for value in values]

    def _capture(self, t: int, grads: Sequence[torch.Tensor | None]) -> None:
        """File task ``t``'s gradients of one micro-batch in its row."""
        reached = [grad is not None for grad in grads]
        if not any(reached):
            raise TaskError(f"the loss of task {self.tasks[t]!r} reaches none of the model's trainable parameters: it "
                            f"was computed from a detached tensor, or from something other than the model's output "
                            f"(check the output it reads).")
        step = self._step
        step.reached[t] = [a or b for a, b in zip(step.reached[t], reached)]
        if step.stored[t]:
            self._rows.add(t, grads)
        else:
            self._rows.store(t, grads)
            step.stored[t] = True

    def _complete(self, accumulate: bool, update_grad: bool) -> None:
        """End of a micro-batch; at the end of an optimizer step, score it and update ``.grad``."""
        if accumulate:
            return
        if self._reduction is not None:
            self._reduction.rows(self._rows.flat)
        if self._scope is None:
            self._start_scoring()
        grams = self._rows.grams()
        finite = torch.lt(grams.sum(0).index_select(0, self._diagonal), self._infinity)  # per task: |gradient|^2
        self._finite.bitwise_and_(finite)
        self._counter.update(self._layer_grams(grams).double(), finite.all())
        if update_grad:
            self._update_grad()
        self._step = None

    def _start_scoring(self) -> None:
        """The first step decides which layers are scored, from which tasks' losses reached which parameters."""
        device = self._rows.flat.device
        self._scope = ScoredLayers(self.graph, self._index, self.tasks, self._step.reached, self._owners)
        self._layer_grams = self._scope.gram(self._rows.slot, self._rows.flat.dtype, device)
        self._counter = ConflictCounter(self._scope.reach_matrix(device), self.thresholds, self.bins)
        self._finite = torch.ones(len(self.tasks), dtype=torch.bool, device=device)  # per task, at every step so far
        self._infinity = torch.tensor(float("inf"), dtype=self._rows.flat.dtype, device=device)
        self._diagonal = torch.arange(len(self.tasks), device=device) * (len(self.tasks) + 1)
        self._shared = _merged(sorted(self._rows.columns(i) for i in self._scope.shared()))

    def _update_grad(self) -> None:
        """Add this step's update to ``.grad`` as ``backward`` would: parameters no task reached keep theirs."""
        if self._grad is None:
            self._grad = self._rows.flat.new_zeros(self._rows.flat.shape[1])
            self._grad_views = self._rows.views(self._grad)
        reached = [any(task[i] for task in self._step.reached) for i in range(len(self._weights))]
        held = [p.grad is view for p, view in zip(self._weights, self._grad_views)]
        if self.aggregator is None and not any(held) and all(p.grad is None for p, r in zip(self._weights, reached)
                                                              if r):
            update = torch.sum(self._rows.flat, 0, out=self._grad)  # no parameter holds the storage: fill it
        else:
            update = self._update()
        if self._reduction is not None:
            self._reduction.update(update)
        if update is not self._grad and all(h for h, r in zip(held, reached) if r):
            self._grad.add_(update)
            return
        dtype = self._rows.flat.dtype
        for p, part, view, r in zip(self._weights, self._rows.views(update), self._grad_views, reached):
            if not r:
                continue
            if p.dtype != dtype:  # .grad must have its parameter's dtype: no view of the storage
                p.grad = part.to(p.dtype) if p.grad is None else p.grad.add_(part)
            elif update is self._grad:
                p.grad = view
            elif p.grad is None:
                p.grad = view.copy_(part)
            else:
                p.grad.add_(part)

    def _update(self) -> torch.Tensor:
        """The step's update, as one vector: the task gradients' sum, the aggregator's on the shared parameters."""
        update = self._rows.flat.sum(0)
        if self.aggregator is not None and self._shared:
            scale = None if self.scaler is None else self.scaler.scale(torch.ones((), device=update.device))
            jacobian = torch.cat([self._rows.flat[:, start:stop] for start, stop in self._shared], dim=1)
            shared = aggregate(self.aggregator, jacobian, scale)
            if shared is not None:
                parts = shared.to(update.dtype).split([stop - start for start, stop in self._shared])
                for (start, stop), part in zip(self._shared, parts):
                    update[start:stop] = part
        return update

    # --- checks -----------------------------------------------------------------------------------------------------

    def _task_index(self, name) -> int:
        try:
            return self.tasks.index(name)
        except ValueError:
            raise TaskError(f"{name!r} is not a task of this monitor; its tasks are {self.tasks}.") from None

    def _open_step(self) -> _Step:
        """The step in progress, opened if none is."""
        if self._step is None:
            self._step = _Step.new(len(self.tasks), len(self._weights))
        return self._step

    def _check_no_open_step(self) -> None:
        """Raise while a micro-batch captured with ``monitor.task`` still waits for tasks."""
        if self._step is not None and self._step.captured:
            missing = [name for name in self.tasks if name not in self._step.captured]
            raise ScoringError(f"the step captured with monitor.task is not complete: task(s) {missing} are still to "
                               f"be captured.")

    @contextlib.contextmanager
    def _abandoning_on_error(self) -> Iterator[None]:
        """A step that fails half-way is dropped whole: the next one starts afresh."""
        try:
            yield
        except BaseException:
            self._step = None
            raise

    @contextlib.contextmanager
    def _translating_autograd_errors(self) -> Iterator[None]:
        """Say what autograd's 'backward through the graph a second time' means for a scored step."""
        try:
            yield
        except RuntimeError as error:
            if "backward through the graph a second time" not in str(error):
                raise
            model = type(self.model).__name__
            if not self.model.training:
                raise ScoringError(
                    f"{model} is in eval mode and reuses a tensor computed at an earlier step (timm's LeViT, "
                    f"EfficientViT, TinyViT and EfficientFormer cache their attention biases in eval mode), so this "
                    f"step's gradients would run through a graph already freed. Score it in train mode: call "
                    f"model.train() first.") from error
            raise ScoringError(
                f"this step's graph runs through tensors whose graph was already freed: either the losses were "
                f"already backpropagated (let the monitor run the backward passes, not loss.backward() as well), or "
                f"{model} reuses a tensor computed at an earlier step.") from error


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted column ranges with adjacent ones joined."""
    merged: list[tuple[int, int]] = []
    for start, stop in ranges:
        if merged and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], stop)
        else:
            merged.append((start, stop))
    return merged


def _owners(model: nn.Module, index: Mapping[str, int], count: int) -> list[tuple[str, ...]] | None:
    """Per parameter, the tasks whose outputs depend on it, if the model says (a split model does)."""
    parameter_tasks = getattr(model, "parameter_tasks", None)
    if not callable(parameter_tasks):
        return None
    owners: list[tuple[str, ...]] = [()] * count
    for name, tasks in parameter_tasks().items():
        if name in index:
            owners[index[name]] = tuple(dict.fromkeys(owners[index[name]] + tuple(tasks)))
    return owners
