"""The rewrite stage: give chosen layers one copy per task, or per group of tasks, and fan everything downstream
out into branches.

Plan, apply, assemble: trace (both modes) -> the plan (:mod:`.plan`: which layers split into which groups, which
nodes each task needs, computed once) -> the passes that apply it: fan out (:mod:`.fanout`), make the copies
(:mod:`.copies`), batch branches (:mod:`.batching`, optional) -> one assembly of the :class:`SplitModule`, which is
checked against the model when an example input is given (:mod:`.check`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import LayerError
from ..modules import attribute, check_names, copy_module, has, persistent, place
from ..split_module import COPIES, SplitModule, Surgery
from ..tracing import as_example, check_method, check_options, trace_modes, unwrapped
from ..tracing.frozen import stand_in
from ..tracing.verify import calling
from .batching import batch_branches as batch_pass
from .check import check_split
from .copies import Init, check_init, make_copies
from .fanout import FanOut, fan_out, output_node
from .plan import Partition, Plan, plan as make_plan, refuse_foreign, selection
from ..outputs import OutputKey, task_paths

__all__ = ["rewrite"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


def rewrite(
    model: nn.Module,
    layers: Iterable[str] | Mapping[str, Partition],
    tasks: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    outputs: Mapping[str, OutputKey] | None = None,
    init: Init = "copy",
    split_norms: bool = False,
    batch_branches: bool = True,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    method: str | None = None,
) -> SplitModule:
    """A copy of ``model`` in which each of ``layers`` has one copy per task (or per group of tasks), and all that
    follows fans out.

    Args:
        model: any ``nn.Module``; it is never modified. It is traced now, in train and eval mode, by ``method``
            with ``tracer_kwargs`` (as :func:`fxsplit.trace` takes them): ``"auto"`` takes the ``torch.fx``
            route, or the ``torch.export`` route on the example when ``torch.fx`` fails or mis-traces; the split
            model's ``route`` and ``route_reason`` say which and why. Default: a selection's route when there is
            an example to check it on (``route_reason``: "as the report's trace: " and the report's reason), else
            ``"auto"``.
        layers: layer names, as in ``fxsplit.layer_graph(model)`` (``[]`` splits nothing), or a selection from
            a conflict report (``report.top(k)``), which also brings the tasks, which parts of the output each
            task's loss read, and the example call and route the report's trace was checked on (a report loaded
            from JSON has no example). Or a mapping from layer names to partitions of the tasks,
            ``{"layer3.0.conv1": [["a", "b"], ["c", "d", "e"]], "layer4.1.bn2": "each"}``: each group gets one
            copy (``"each"``: one per task), and tasks that passed the same copies share one stream, which splits
            where a later layer's groups separate them (``split.tree()``); ``report.groups(...)`` makes one, which
            brings what a report's selection brings.
        tasks: task names; optional when the model returns a mapping (its keys are the tasks) or ``layers``
            comes from a report.
        outputs: which part of the model's output belongs to which task: ``{"seg": 0, "depth": 1}`` for a
            tuple, ``{"seg": "out"}`` for a mapping (or a namedtuple's or dataclass's field), a tuple of keys for
            nested outputs, a list of those for several parts (``{"seg": ["seg", ("aux", "seg")]}``: the task's
            branch returns the output pruned to them). Needed when the model returns a tuple, a list or a mapping
            not keyed by task; a single tensor goes whole to every task.
        init: ``"copy"`` (copies start equal to the shared layer: the function is unchanged), ``"reset"``
            (each copy's ``reset_parameters()``) or a callable ``init(copy, layer, task)`` that edits the copy
            (``task`` is the tuple of a group's tasks for a group's copy).
        split_norms: also split every normalisation layer with running statistics that lies wholly in the
            fanned-out region, one copy per task, so that each task's statistics see only its own branch.
        batch_branches: in the fanned-out region, run a shared convolution or linear layer (and the per-sample
            modules that follow it: activations, pooling, LayerNorm, ...) once on the branches' batches
            concatenated, instead of once per branch. Mathematically the same (each sample is computed alone),
            but kernels round differently at a larger batch: deep networks can drift by ~1e-5 relative
            (``False`` reproduces the original bit for bit). BatchNorm always runs per branch. Only the
            ``torch.fx`` route batches (its graphs call modules; the ``torch.export`` route's apply ATen
            operations, with the batch size read once from the input): there it does nothing.
        example_inputs, example_kwargs: an example call (``torch.export``'s convention: a tuple of positional
            inputs, or one input, and a dict). When given, the trace and then the split model are run against the
            original, task by task, in eval and in train mode (dropout off), and a
            :class:`~fxsplit.TraceMismatchError` or :class:`~fxsplit.SplitMismatchError` stops a split that
            differs. Without one, nothing is checked. The ``torch.export`` route needs one. Default: the
            selection's example; one given here replaces it.

    Returns:
        A :class:`SplitModule` whose ``forward`` returns ``{task: output}``.

    >>> import torch, fxsplit
    >>> class TwoHeads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    ...         self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 2), "b": torch.nn.Linear(8, 3)})
    ...     def forward(self, x):
    ...         return {task: head(self.trunk(x)) for task, head in self.heads.items()}
    >>> net = TwoHeads()
    >>> x = torch.randn(5, 4)
    >>> split = fxsplit.rewrite(net, ["trunk.2"], example_inputs=x)  # checked against net on x
    >>> all(torch.allclose(split(x)[t], net(x)[t]) for t in ("a", "b"))
    True
    >>> sum(p.numel() for p in split.parameters()) - sum(p.numel() for p in net.parameters())
    72
    """
    model = unwrapped(model)
    if isinstance(model, SplitModule):
        raise LayerError("model is already split; rewrite the original model with all the layers at once.")
    check_init(init)
    if method is not None:
        check_method(method)
    check_options(tracer_kwargs)
    check_names(model, SplitModule, "a split model")
    from_report = hasattr(layers, "tasks")  # a report's selection (report.top(k), a grouped one) brings them
    example, reason = as_example(example_inputs, example_kwargs), None
    if from_report:
        tasks = layers.tasks if tasks is None else tasks
        outputs = getattr(layers, "outputs", None) if outputs is None else outputs
        _check_report_model(model, layers)
        example = getattr(layers, "example", None) if example is None else example
        if method is None and example is not None and getattr(layers, "route", None) is not None:
            method, reason = layers.route, f"as the report's trace: {layers.route_reason}"
    method = "auto" if method is None else method
    partitions = selection(layers)
    root = copy_module(model, share_tensors=False)
    traced = trace_modes(root, tracer_kwargs, private=True, method=method, example=example)
    graphs = {training: traced.graph_for(training) for training in (True, False)}
    paths = task_paths(output_node(graphs[model.training]).args[0], tasks, outputs)
    plan = make_plan(traced, graphs, paths, partitions, training=model.training, split_norms=split_norms,
                     from_report=from_report)

    fanned = {id(graph): fan_out(traced, plan, graph) for graph in plan.distinct_graphs()}
    make_copies(traced, plan, init)
    if batch_branches:
        for result in fanned.values():
            batch_pass(traced, result.graph)
    split = _assemble(plan, traced, root, fanned, type(model).__name__, reason)
    if example is not None:
        check_split(model, traced, split, paths, calling(*example))
    return split


def _assemble(plan: Plan, traced: fx.GraphModule, root: nn.Module, fanned: Mapping[int, FanOut], class_name: str,
              reason: str | None) -> SplitModule:
    """The split model: the fanned-out graphs on ``traced`` (which holds the copies), everything else of ``root``
    kept, and the surgery recorded (``reason``, if given, says why the route was taken)."""
    members = {layer: plan.current.layers[layer].members for layer in plan.layers}
    replaced = [member for layer in members.values() for member in layer]
    uses: dict[str, set[str]] = {}
    for result in fanned.values():
        for target, tasks_using in result.uses.items():
            uses.setdefault(target, set()).update(tasks_using)
    route = traced.meta["route"], reason or traced.meta["route_reason"]
    surgery = Surgery(plan.tasks, plan.layers, members, plan.groups, plan.holders,
                      _owners(traced, root, replaced, uses, plan.tasks), _plain_attributes(traced, root), *route)
    split = SplitModule(traced, {training: fanned[id(graph)].graph for training, graph in plan.graphs.items()},
                        class_name, surgery=surgery)
    _keep_the_rest(split, root, replaced)
    held = {name for name, _ in [*split.named_parameters(remove_duplicate=False),
                                 *split.named_buffers(remove_duplicate=False)]}
    for name in set(surgery.owners) - held:  # what only nodes no task needs read: not on the split
        del surgery.owners[name]
    split.meta.update(route=route[0], route_reason=route[1], frozen=traced.meta.get("frozen", {}),
                      given=traced.meta.get("given", {}))
    return split


def _check_report_model(model: nn.Module, selection) -> None:
    """Before the model is traced (or run on the report's example): each chosen layer holds the same parameters
    in ``model`` as in the report's model."""
    named = dict(model.named_parameters(remove_duplicate=False))
    foreign = [layer for layer, (parameters, count) in getattr(selection, "parameters", {}).items()
               if not all(name in named for name in parameters)
               or sum({id(named[name]): named[name].numel() for name in parameters}.values()) != count]
    refuse_foreign(foreign)


def _keep_the_rest(split: SplitModule, root: nn.Module, replaced: list[str]) -> None:
    """Give ``split`` every module, parameter and buffer of ``root`` it lacks, at the same path, except the
    members of split layers (their copies replace them)."""
    for path, module in root.named_modules():
        if not path or _replaced(path, replaced) or has(split, path):
            continue
        holds_replaced = any(member.startswith(path + ".") for member in replaced)
        place(split, path, stand_in(module, nn.Module()) if holds_replaced else module)  # then its other
        # children, one by one
    for path, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        if not _replaced(path, replaced) and not has(split, path):
            place(split, path, tensor, persistent(root, path))


def _replaced(path: str, replaced: list[str]) -> bool:
    return any(path == member or path.startswith(member + ".") for member in replaced)


def _owners(traced: nn.Module, root: nn.Module, replaced: list[str], uses: Mapping[str, set[str]],
            tasks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every name of every parameter and buffer the split model will hold (those of ``traced``, which holds the
    copies, and the rest of ``root``, less the split layers' members) -> the tasks whose outputs use it, in task
    order (unused: every task)."""
    by_id: dict[int, set[str]] = {}
    for target, tasks_using in uses.items():
        value = attribute(traced, target)
        tensors = [value] if isinstance(value, torch.Tensor) else \
            [*value.parameters(), *value.buffers()] if isinstance(value, nn.Module) else []
        for tensor in tensors:
            by_id.setdefault(id(tensor), set()).update(tasks_using)
    named = [(name, tensor) for module in (traced, root) for name, tensor in
             [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
             if not _replaced(name, replaced)]
    return {name: tuple(t for t in tasks if t in by_id.get(id(tensor), tasks)) for name, tensor in reversed(named)}


def _plain_attributes(traced: nn.Module, root: nn.Module) -> tuple[str, ...]:
    """Public plain-data attributes of the model (``model.tasks = [...]``) that the split model can take as they
    are (names it does not have itself), put on ``traced`` for it."""
    names = []
    for name, value in vars(root).items():
        if not name.startswith("_") and name not in ("training", "meta", COPIES) and isinstance(value, _PLAIN) \
                and not hasattr(SplitModule, name) and not has(traced, name):
            traced.__dict__[name] = value
            names.append(name)
    return tuple(names)
