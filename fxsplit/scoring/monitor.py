"""``ConflictMonitor``: Recon's conflict scores measured inside any training loop."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import nn

from ..errors import FxsplitError, ScoringError, TaskError
from ..layers import layer_graph
from ..outputs import task_names
from ..report import ConflictReport
from ..tracing import as_example, unwrapped
from . import checks
from .counter import ConflictCounter
from .distributed import check_not_sharded, reduction
from .figures import StepFigures
from .grads import GradWriter
from .methods import Aggregator, aggregate, aggregator_of
from .rows import GradientRows
from .scope import ScoredLayers, outside_layers, users_of


class _Layout:
    """The gradient rows of one set of trainable parameters, and how scoring and ``.grad`` read them.

    The monitor makes a new one when the parameters that require grad change (gradual unfreezing).
    """

    def __init__(self, params: tuple[int, ...], tensors: Sequence[torch.Tensor], tasks: int,
                 outside: Collection[int]):
        self.params = params  # positions in the monitor's parameter list
        self.position = {i: k for k, i in enumerate(params)}
        self.rows = GradientRows(tensors, tasks)
        self.writer = GradWriter(self.rows)
        self.outside = [k for k, i in enumerate(params) if i in outside]  # parameters no layer of the graph holds
        self.layer_grams = None  # set by fit, at the first scored step in this layout
        self.infinity: torch.Tensor | None = None
        self.shared: set[int] = set()  # parameters the aggregator combines (positions in the layout)
        self.shared_columns: list[tuple[int, int]] = []
        self.seen: set[int] = set()  # tasks that had a loss at a scored step in this layout

    def fit(self, scope: ScoredLayers, shared: Iterable[int]) -> None:
        """Read the scored layers' Gram matrices, and the columns the aggregator combines, in this layout."""
        rows = self.rows
        slot = {i: rows.slot[k] for i, k in self.position.items()}
        self.layer_grams = scope.gram(slot, rows.flat.dtype, rows.flat.device)
        self.infinity = torch.tensor(float("inf"), dtype=rows.flat.dtype, device=rows.flat.device)
        self.shared = {self.position[i] for i in shared if i in self.position}
        self.shared_columns = _merged(sorted(rows.columns(k) for k in self.shared))


@dataclass
class _Step:
    """The optimizer step in progress: what its micro-batches have gathered so far.

    A step opens at its first micro-batch, on the parameters that require grad then, and ends when it is scored, or
    when it fails half-way (it is then dropped whole, and the next one starts afresh).
    """

    layout: _Layout
    stored: list[bool]  # per task: its row holds this step's first micro-batch (the task has a loss at this step)
    reached: list[set[int]]  # per task: the parameters (positions in the layout) its losses reached
    captured: dict[str, bool] = field(default_factory=dict)  # hook style: this micro-batch's tasks -> accumulate
    sparse: dict[int, torch.Tensor] = field(default_factory=dict)  # sparse gradients, summed over tasks and batches

    @classmethod
    def new(cls, layout: _Layout, tasks: int) -> _Step:
        return cls(layout, [False] * tasks, [set() for _ in range(tasks)])


class ConflictMonitor:
    """Scores every shared layer of ``model`` by how often its task gradients conflict, inside your own loop (Recon);
    ``tasks`` are the task names, a list (:func:`fxsplit.analyze` takes ``{name: loss}``: here the losses come to
    :meth:`backward` as ``{name: loss value}``).

    Call ``monitor.backward(losses)`` where you would call ``sum(losses.values()).backward()``: each task's gradient
    comes from its own autograd pass, the step is scored, and every parameter's ``.grad`` receives what the summed
    loss would have given it (the task gradients' sum) or, with an ``aggregator``, the aggregator's combination.
    ``monitor.report()`` is the same :class:`ConflictReport` that :func:`fxsplit.analyze` returns.

    Steps where only some tasks have a loss (partly labelled batches): leave a task out of the mapping, or give it
    ``None``. A task pair is scored only at the steps where both of its tasks have a loss (``report.pair_steps``
    counts them); ``.grad`` receives the present tasks' sum (an aggregator combines the present tasks' gradients, and
    is skipped when only one task is present). Which layers a task's loss reaches is read at the first step it has
    one: the scored layers grow when a task first appears, and ``on_step`` hooks then see more layers. A task that
    never has a loss is a :class:`~fxsplit.TaskError` in :meth:`report`. Under a process group, and with
    :meth:`task`, every task needs its loss at every step.

    Args:
        model: the model the losses come from (a ``DistributedDataParallel`` or ``DataParallel`` wrapper is
            accepted: its module is scored). The monitor keeps no hook on it and changes nothing but ``.grad``.
        tasks: the task names: the keys of the mapping given to :meth:`backward`.
        threshold: S, or several (the first is the primary one).
        graph: the layer graph to score. By default the model's ``forward`` is traced as
            :func:`fxsplit.layer_graph` traces it, with ``method``, ``example_inputs``, ``example_kwargs`` and
            ``tracer_kwargs``: on ``"auto"``, by ``torch.fx``, or by ``torch.export`` on the example when ``torch.fx``
            fails or mis-traces; with an example, the graph is checked against the model on it. The report keeps the
            example, so that a selection from it splits on the same route, checked on it.
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
        on_step: a function, or several, called with the :class:`~fxsplit.StepFigures` of every completed
            optimizer step (a logger, a progress display). The figures are tensors on the device: reading one waits
            for it, so gather them and read once per logging interval (the TensorBoard logger of
            ``fxsplit.integrations.tensorboard`` does).

    Under real training:

    * Precision: task gradients are compared in float32, or float64 when a parameter is float64 (a float16
      gradient of norm 300 has a squared norm float16 cannot hold); ``.grad`` keeps each parameter's dtype.
    * ``requires_grad`` is read at every step: the parameters that require grad then are the ones differentiated
      and given ``.grad``; a frozen one's ``.grad`` is left alone. The first scored step decides the scored layers
      and their parameters: a layer unfrozen later trains but is not scored (``report.left_out`` says so), and a
      scored parameter frozen later is a :class:`~fxsplit.ScoringError` (take the report before freezing it).
      The aggregator combines the parameters that two or more tasks reached at the first step they trained.
    * ``.grad``: a parameter whose ``.grad`` is ``None`` is given new memory (a view of the step's update); an
      existing ``.grad`` is accumulated into, in place, as autograd does. A ``.grad`` the user kept and then let
      go of (``zero_grad()``) never changes.
    * Modules the losses reach but the layer graph has no layer for (the training loop calls a method other than
      ``forward``, as mmdet's ``forward_train``) are not scored; ``report.left_out`` lists them and says how to
      score them.
    * Reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``) cannot be differentiated by
      ``torch.autograd.grad``: :meth:`backward` raises a :class:`~fxsplit.ScoringError`; use
      ``use_reentrant=False``, or :meth:`task` around each task's ``loss.backward()``, which is exact.
    * Sparse gradients (``nn.Embedding(sparse=True)``) are scored densified; ``.grad`` receives them sparse, as
      ``backward`` gives them (dense where an aggregator combines them, or under a process group: the mean).
    * Complex parameters: the cosine of two complex gradients is the real part of their Hermitian inner product
      over their norms, the cosine of their real views (``torch.view_as_real``); ``.grad`` is complex.

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
        on_step: Callable[[StepFigures], object] | Iterable[Callable[[StepFigures], object]] | None = None,
        method: str = "auto",
        example_inputs: Any = None,
        example_kwargs: dict[str, Any] | None = None,
        tracer_kwargs: Mapping[str, Any] | None = None,
    ):
        self.model = unwrapped(model, quietly=True)  # the documented way in: scoring inside a parallel loop
        self._ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        self.tasks = task_names(tasks)
        self.thresholds = checks.thresholds(threshold)
        self.example = as_example(example_inputs, example_kwargs)
        if graph is None:
            graph = layer_graph(self.model, tracer_kwargs=tracer_kwargs, example_inputs=example_inputs,
                                example_kwargs=example_kwargs, method=method)
        elif method != "auto" or tracer_kwargs:
            raise FxsplitError("method and tracer_kwargs say how to trace the model, and a graph was given: trace "
                               "it with them, graph=fxsplit.layer_graph(model, method=..., tracer_kwargs=...), or "
                               "give no graph.")
        self.graph = graph
        self.bins = checks.whole_number("bins", bins, 1)
        self.aggregator = aggregator_of(aggregator)
        self.scaler = scaler
        self._reduction = reduction(distributed, group)
        self._on_step = checks.step_hooks(on_step)
        self._completed = 0  # optimizer steps completed, scored or not
        named = list(self.model.named_parameters())  # every parameter, frozen ones too: they may be unfrozen
        check_not_sharded(named)
        self._names = [name for name, _ in named]
        self._parameters = [p for _, p in named]
        position = {id(p): i for i, p in enumerate(self._parameters)}
        self._index = {name: position[id(p)] for name, p in self.model.named_parameters(remove_duplicate=False)}
        self._owners = _owners(self.model, self._index, len(self._parameters))
        self._outside = set(range(len(named))) - _held_by_layers(self.graph, self._index)
        if self._reduction is not None:
            self._reduction.check_same_parameters(named)
        self._scope: ScoredLayers | None = None
        self._layer_of: dict[int, str] = {}  # scored parameter -> its layer
        self._counter: ConflictCounter | None = None
        self._users: dict[int, list[str]] = {}  # per parameter trained so far: the tasks that use it (see _fit_layout)
        self._outside_reach: dict[int, set[str]] = {}  # parameter no layer holds -> the tasks that reached it
        self._layout: _Layout | None = None  # of the parameters that required grad at the last step
        self._layout = self._layout_of(self._trainable())
        self._step: _Step | None = None
        self._reached = [[False] * len(named) for _ in self.tasks]  # task t's loss reached parameter i, when decided
        self._decided: list[set[int]] = [set() for _ in self.tasks]  # per task, the parameters _reached decides
        self._scope_seen: set[int] = set()  # the tasks the scored layers were decided with
        self._seen: set[int] = set()  # the tasks that had a loss at some step
        self._presence: dict[tuple[bool, ...], torch.Tensor] = {}  # tasks with a loss -> pairs scored, on the device

    # --- the two ways in ------------------------------------------------------------------------------------------

    def backward(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool = False,
                 update_grad: bool = True, retain_graph: bool = False) -> None:
        """Each task's gradient by its own autograd pass, in place of ``sum(losses.values()).backward()``.

        Args:
            losses: task name -> scalar loss; a task left out, or given ``None``, has no loss at this step (its
                labels are missing from the batch): its pairs are not scored at this step.
            accumulate: more micro-batches of this optimizer step follow (gradient accumulation): the task
                gradients are added up, and the step is scored, and ``.grad`` updated, by the first call without
                ``accumulate``.
            update_grad: ``False`` scores only and leaves every ``.grad`` as it is.
            retain_graph: keep the losses' graph after the last task's pass (as autograd's ``retain_graph``), for
                a backward of the loop's own that follows.
        """
        self._check_no_open_step()
        values = self._values(losses)
        with self._abandoning_on_error():
            checks.no_reentrant_checkpoint(self.model, list(values.values()))
            params = self._open_step().layout.rows.params
            for k, (t, value) in enumerate(values.items()):
                self._capture(t, self._grads(params, value, retain_graph or k < len(values) - 1))
            self._complete(accumulate, update_grad)

    def _grads(self, params: list[torch.Tensor], loss: torch.Tensor,
               retain_graph: bool) -> tuple[torch.Tensor | None, ...]:
        with self._translating_autograd_errors():
            return torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)

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
        with self._abandoning_on_error():
            step = self._open_step()
            params = step.layout.rows.params
            with self._capturing_hooks(params) as captured:
                yield
            self._capture(t, captured)
            step.captured[name] = accumulate
            if len(step.captured) == len(self.tasks):
                step.captured.clear()
                self._complete(accumulate, update_grad=True)

    @contextlib.contextmanager
    def _capturing_hooks(self, params: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor | None]]:
        """The gradients that the backward calls inside give ``params``, summed; ``.grad`` is put back after."""
        saved = [p.grad for p in params]
        captured: list[torch.Tensor | None] = [None] * len(params)

        def record(i):
            def hook(grad):
                captured[i] = grad if captured[i] is None else captured[i] + grad
            return hook

        for p in params:
            p.grad = None
        handles = [p.register_hook(record(i)) for i, p in enumerate(params)]
        try:
            with self._translating_autograd_errors():
                yield captured
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(params, saved):
                p.grad = grad

    # --- the result -------------------------------------------------------------------------------------------------

    def report(self) -> ConflictReport:
        """The scores so far, as :func:`fxsplit.analyze` reports them (under ``distributed="local"``, call it on
        every rank: it sums the ranks' counts, and ``steps`` counts every rank's steps)."""
        self._check_no_open_step()
        if self._counter is None:
            raise ScoringError("no step has been scored yet: call monitor.backward(losses) (or capture every task "
                               "with monitor.task) before monitor.report().")
        never = [name for t, name in enumerate(self.tasks) if t not in self._seen]
        if never:
            raise TaskError(f"task(s) {never} had no loss at any step: backward got None or no entry for them every "
                            f"time. Check their labels and loss functions, or leave them out of the tasks.")
        tally = self._counter.tally()
        if self._reduction is not None:
            tally = self._reduction.tally(tally)
        finite = tally.finite.cpu()
        steps = int(finite.sum())
        pair_steps = tally.pair_steps.cpu().tolist()
        valid = self._counter.valid[:-1].cpu().tolist()
        mean = [[(s / n if ok and n else None) for s, ok, n in zip(row, valid_row, pair_steps)]
                for row, valid_row in zip(tally.cosine_sum.cpu().tolist(), valid)]
        whole = [[c if present else None for c, present in zip(row, presence)]
                 for row, presence in zip(tally.whole.cpu()[finite].tolist(), tally.present.cpu()[finite].tolist())]
        scope = self._scope
        graph, outside_reach, outside_left_out = outside_layers(self.model, self.graph, self._names,
                                                                self._outside_reach, self.tasks)
        return ConflictReport(
            tasks=list(self.tasks), thresholds=list(self.thresholds), layers=list(scope.layers),
            pairs=[list(pair) for pair in self._pairs],
            counts=tally.counts.cpu().tolist(), mean_cosine=mean, histogram=tally.histogram.cpu().tolist(),
            whole_cosine=whole, steps=steps, reach={**scope.reach, **outside_reach},
            left_out={**scope.left_out, **scope.unfrozen(self._trained_names()), **outside_left_out}, graph=graph,
            skipped=len(finite) - steps, example=self.example, pair_steps=pair_steps,
        )

    def _trained_names(self) -> set[str]:
        """Every name of the parameters that trained at some scored step."""
        return {name for name, i in self._index.items() if i in self._users}

    @property
    def nonfinite_tasks(self) -> list[str]:
        """The tasks whose gradient was NaN or infinite at some step (such steps are not scored)."""
        if self._counter is None:
            return []
        return [name for name, finite in zip(self.tasks, self._finite.tolist()) if not finite]

    # --- one step -------------------------------------------------------------------------------------------------

    def _values(self, losses) -> dict[int, torch.Tensor]:
        """Task index -> its loss (scaled by the scaler), for the tasks that have one at this step, in task order."""
        if not isinstance(losses, Mapping):
            raise TaskError(f"backward takes a mapping task name -> loss, got {type(losses).__name__}.")
        for name in losses:
            self._task_index(name)
        missing = [name for name in self.tasks if losses.get(name) is None]
        if missing and self._reduction is not None:
            raise ScoringError(f"no loss for task(s) {missing} at this step: under a process group every task needs "
                               f"its loss at every step (the ranks reduce every task's gradient); give the step's "
                               f"loss of every task, or score in one process.")
        values = {t: checks.loss_value(name, losses[name]) for t, name in enumerate(self.tasks) if name not in missing}
        return values if self.scaler is None else {t: self.scaler.scale(value) for t, value in values.items()}

    def _trainable(self) -> tuple[int, ...]:
        """The parameters that require grad now."""
        params = tuple(i for i, p in enumerate(self._parameters) if p.requires_grad)
        if not params:
            raise FxsplitError(f"{type(self.model).__name__} has no parameter that requires grad: nothing to score.")
        return params

    def _open_step(self) -> _Step:
        """The step in progress; if none is, a new one on the parameters that require grad now."""
        params = self._trainable()
        if self._step is None:
            self._step = _Step.new(self._layout_of(params), len(self.tasks))
        elif params != self._step.layout.params:
            changed = sorted(set(params) ^ set(self._step.layout.params))[0]
            raise ScoringError(f"requires_grad of {self._names[changed]!r} changed between micro-batches (or tasks) of "
                               f"one optimizer step, whose gradients add up over one set of parameters; change it "
                               f"between optimizer steps.")
        return self._step

    def _layout_of(self, params: tuple[int, ...]) -> _Layout:
        """The layout of ``params``' gradient rows: the last one, or a new one if other parameters train now."""
        if self._layout is not None and self._layout.params == params:
            return self._layout
        self._check_scored_still_train(params)
        tensors = [self._parameters[i] for i in params]
        devices = {p.device for p in tensors}
        if len(devices) > 1:
            raise FxsplitError(f"the trainable parameters lie on {len(devices)} devices ({sorted(map(str, devices))}); "
                               f"the monitor needs them on one.")
        self._layout = _Layout(params, tensors, len(self.tasks), self._outside)
        return self._layout

    def _check_scored_still_train(self, params: tuple[int, ...]) -> None:
        """Raise if a scored parameter is not among ``params``, the parameters that require grad now."""
        trainable = set(params)
        for i, layer in self._layer_of.items():
            if i not in trainable:
                raise ScoringError(
                    f"{self._names[i]!r} of the scored layer {layer!r} no longer requires grad: the first scored step "
                    f"decided the scored layers, and a frozen parameter has no task gradient to score. Take "
                    f"monitor.report() before freezing it, and score the layers that still train with a new "
                    f"ConflictMonitor.")

    def _capture(self, t: int, grads: Sequence[torch.Tensor | None]) -> None:
        """File task ``t``'s gradients of one micro-batch in its row."""
        step = self._step
        reached = {k for k, grad in enumerate(grads) if grad is not None}
        if not reached:
            raise TaskError(f"the loss of task {self.tasks[t]!r} reaches none of the model's trainable parameters: it "
                            f"was computed from a detached tensor, or from something other than the model's output "
                            f"(check the output it reads).")
        step.reached[t] |= reached
        for k in reached:
            if grads[k].layout != torch.strided:  # .grad receives it as it is, as backward gives it
                step.sparse[k] = grads[k] if k not in step.sparse else step.sparse[k] + grads[k]
        rows = step.layout.rows
        if step.stored[t]:
            rows.add(t, grads)
        else:
            rows.store(t, grads)
            step.stored[t] = True

    def _complete(self, accumulate: bool, update_grad: bool) -> None:
        """End of a micro-batch; at the end of an optimizer step, score it and update ``.grad``."""
        if accumulate:
            return
        step = self._step
        layout = step.layout
        for t, stored in enumerate(step.stored):
            if not stored:  # no loss at this step: its row holds an earlier step's gradient
                layout.rows.flat[t].zero_()
        if self._reduction is not None:
            self._reduction.rows(layout.rows.flat)
        present = tuple(step.stored)
        if layout.layer_grams is None or not layout.seen.issuperset(t for t, p in enumerate(present) if p):
            self._fit_layout(step)
        self._note_outside_reach(step)
        grams = layout.rows.grams()
        finite = torch.lt(grams.sum(0).index_select(0, self._diagonal), layout.infinity)  # per task: |gradient|^2
        self._finite.bitwise_and_(finite)
        scored = finite.all()
        pairs = self._present_pairs(present)
        cosine, conflicts = self._counter.update(layout.layer_grams(grams).double(), scored, pairs)
        if update_grad:
            self._update_grad(step)
        self._step = None
        self._completed += 1
        if self._on_step:
            self._hand_over(cosine, conflicts, scored, pairs)

    def _present_pairs(self, present: tuple[bool, ...]) -> torch.Tensor:
        """``(pairs,)`` bool on the device: the pairs both of whose tasks have a loss (one copy per distinct set)."""
        if present not in self._presence:
            tasks = torch.tensor(present, device=self._diagonal.device)
            self._presence[present] = self._counter.pairs_of(tasks)
        return self._presence[present]

    def _hand_over(self, cosine: torch.Tensor, conflicts: torch.Tensor, scored: torch.Tensor,
                   present: torch.Tensor) -> None:
        """Give the step's figures to the ``on_step`` hooks, as they lie on the device."""
        counter = self._counter
        figures = StepFigures(
            step=self._completed - 1, layers=self._scope.layers, pairs=self._pairs, thresholds=self.thresholds,
            cosine=cosine[:-1], valid=torch.bitwise_and(counter.valid[:-1], present), whole=cosine[-1],
            conflicts=conflicts[:, :-1], scored=scored, present=present, limits=counter.thresholds.view(-1, 1))
        for hook in self._on_step:
            hook(figures)

    def _fit_layout(self, step: _Step) -> None:
        """At a layout's first scored step, and at the first step a task has a loss in it: which tasks use the
        parameters, each task decided at its first step with a loss on them (the scored layers grow when a task
        first has one), and how the layout is read."""
        layout = step.layout
        new = [t for t, stored in enumerate(step.stored) if stored and t not in layout.seen]
        for t in new:
            for k, i in enumerate(layout.params):
                if i not in self._decided[t]:
                    self._decided[t].add(i)
                    self._reached[t][i] = k in step.reached[t]
        layout.seen.update(new)
        self._seen.update(new)
        self._users.update(users_of(self.tasks, self._reached, layout.params, self._owners))
        if self._scope is None or not self._scope_seen.issuperset(new):
            self._score_layers(layout)
        layout.fit(self._scope, [i for i, users in self._users.items() if len(users) > 1])

    def _score_layers(self, layout: _Layout) -> None:
        """Decide which layers are scored, from which tasks' losses reached which parameters: at the first step
        on the parameters that train then, again (more layers, the counts kept) when a task first has a loss."""
        device = layout.rows.flat.device
        if self._scope is None:
            self._scope_index = {name: i for name, i in self._index.items() if i in layout.position}
            self._pairs = list(itertools.combinations(self.tasks, 2))  # in the counter's order
            self._finite = torch.ones(len(self.tasks), dtype=torch.bool, device=device)  # per task, every step so far
            self._diagonal = torch.arange(len(self.tasks), device=device) * (len(self.tasks) + 1)
        scope = ScoredLayers(self.graph, self._scope_index, self.tasks, self._reached, self._owners)
        reach = scope.reach_matrix(device)
        self._counter = ConflictCounter(reach, self.thresholds, self.bins) if self._scope is None else \
            self._counter.grown(reach, [scope.layers.index(layer) for layer in self._scope.layers])
        self._scope, self._layer_of = scope, scope.layer_of()
        self._scope_seen = set(self._seen)

    def _note_outside_reach(self, step: _Step) -> None:
        """Which tasks reached parameters that no layer of the graph holds (none, usually)."""
        for k in step.layout.outside:
            for name, reached in zip(self.tasks, step.reached):
                if k in reached:
                    self._outside_reach.setdefault(step.layout.params[k], set()).add(name)

    def _update_grad(self, step: _Step) -> None:
        """Add this step's update to ``.grad`` as ``backward`` would: parameters no task reached keep theirs."""
        update = self._update(step.layout, [t for t, stored in enumerate(step.stored) if stored])
        if self._reduction is not None:
            self._reduction.update(update)
        step.layout.writer.write(update, sorted(set().union(*step.reached)), self._sparse_addends(step))

    def _update(self, layout: _Layout, present: list[int]) -> torch.Tensor:
        """The step's update, as one vector: the task gradients' sum (an absent task's row is zero), the
        aggregator's combination of the ``present`` tasks' gradients on the shared parameters (two or more)."""
        flat = layout.rows.flat
        update = flat.sum(0)
        if self.aggregator is not None and layout.shared_columns and len(present) > 1:
            scale = None if self.scaler is None else self.scaler.scale(torch.ones((), device=update.device))
            rows = flat if len(present) == len(flat) else flat[present]
            jacobian = torch.cat([rows[:, start:stop] for start, stop in layout.shared_columns], dim=1)
            shared = aggregate(self.aggregator, jacobian, scale)
            if shared is not None:
                parts = shared.to(update.dtype).split([stop - start for start, stop in layout.shared_columns])
                for (start, stop), part in zip(layout.shared_columns, parts):
                    update[start:stop] = part
        return update

    def _sparse_addends(self, step: _Step) -> dict[int, torch.Tensor]:
        """The sparse gradients ``.grad`` receives as they are, as ``backward`` gives them: in one process, where no
        aggregator combines them (else the dense update holds what ``.grad`` needs: the mean over ranks, or the
        combination)."""
        if self._reduction is not None or not step.sparse:
            return {}
        combined = step.layout.shared if self.aggregator is not None else set()
        return {k: grad for k, grad in step.sparse.items() if k not in combined}

    # --- checks -----------------------------------------------------------------------------------------------------

    def _task_index(self, name) -> int:
        try:
            return self.tasks.index(name)
        except ValueError:
            raise TaskError(f"{name!r} is not a task of this monitor; its tasks are {self.tasks}.") from None

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


def _held_by_layers(graph: nx.DiGraph, index: Mapping[str, int]) -> set[int]:
    """The parameters (positions, from their names by ``index``) that some layer of ``graph`` holds."""
    return {index[name] for _, names in graph.nodes(data="parameters") for name in names if name in index}


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
