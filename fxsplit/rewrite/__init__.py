"""The rewrite stage: give chosen layers one copy per task and fan everything downstream out into branches.

Passes, each a graph to a graph: trace (both modes) -> fan out (:mod:`.fanout`) -> batch branches
(:mod:`.batching`, optional); then the copies are made (:mod:`.copies`) and the result is checked against the
model when an example input is given (:mod:`.check`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import LayerError, ReportError, unknown_layer
from ..layers import Layer, attribute, find_layers
from ..report import LayerSelection
from ..split_module import SplitModule, Surgery, copy_target
from ..tracing import as_example, trace_modes, unwrapped
from ..tracing.frozen import stand_in
from ..tracing.symbolic import check_names, copy_module
from ..tracing.verify import calling
from .batching import batch_branches as batch_pass
from .check import check_split
from .copies import Init, check_init, container, install, layer_copy
from .fanout import NORMS, fan_out, needed_nodes, output_node, tainted_by
from ..outputs import OutputKey, Path, repeated_items, task_paths

__all__ = ["rewrite"]

_PLAIN = (type(None), bool, int, float, complex, str, bytes, tuple, list, dict, set, frozenset)


def rewrite(
    model: nn.Module,
    layers: Iterable[str],
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
    """A copy of ``model`` in which each of ``layers`` has one copy per task, and all that follows fans out.

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
            from JSON has no example).
        tasks: task names; optional when the model returns a mapping (its keys are the tasks) or ``layers``
            comes from a report.
        outputs: which part of the model's output belongs to which task: ``{"seg": 0, "depth": 1}`` for a
            tuple, ``{"seg": "out"}`` for a mapping (or a namedtuple's or dataclass's field), a tuple of keys for
            nested outputs, a list of those for several parts (``{"seg": ["seg", ("aux", "seg")]}``: the task's
            branch returns the output pruned to them). Needed when the model returns a tuple, a list or a mapping
            not keyed by task; a single tensor goes whole to every task.
        init: ``"copy"`` (copies start equal to the shared layer: the function is unchanged), ``"reset"``
            (each copy's ``reset_parameters()``) or a callable ``init(copy, layer, task)`` that edits the copy.
        split_norms: also split every normalisation layer with running statistics that lies wholly in the
            fanned-out region, so that each task's statistics see only its own branch.
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
    check_names(model, SplitModule, "a split model")
    from_report = isinstance(layers, LayerSelection)
    example, reason = as_example(example_inputs, example_kwargs), None
    if from_report:
        tasks = layers.tasks if tasks is None else tasks
        outputs = getattr(layers, "outputs", None) if outputs is None else outputs
        _check_report_model(model, layers)
        example = layers.example if example is None else example
        if method is None and example is not None and layers.route is not None:
            method, reason = layers.route, f"as the report's trace: {layers.route_reason}"
    method = "auto" if method is None else method
    names = _layer_names(layers)
    root = copy_module(model, share_tensors=False)
    traced = trace_modes(root, tracer_kwargs, private=True, method=method, example=example)
    graphs = {training: traced.graph_for(training) for training in (True, False)}
    current = graphs[model.training]
    paths = task_paths(output_node(current).args[0], tasks, outputs)
    found = {id(graph): find_layers(traced, graph) for graph in graphs.values()}
    _check_layers(names, found[id(current)], from_report)
    if split_norms:
        names += _norms_in_branches(traced, current, found[id(current)], names, paths)
    split_layers = [layer for layer in found[id(current)] if layer in names]  # graph order
    plan = {id(graph): _chosen(found[id(graph)], split_layers) for graph in graphs.values()}
    users = _users(graphs.values(), found, split_layers, {id(graph): needed_nodes(traced, graph, paths)
                                                           for graph in graphs.values()}, paths)
    _check_shared(names, users)

    fanned = {id(graph): fan_out(traced, graph, paths, plan[id(graph)]) for graph in graphs.values()}
    for layer in split_layers:
        for task in users[layer]:
            for member, new in layer_copy(traced, found[id(current)][layer], task, init).items():
                install(traced, copy_target(task, member), new)
    if batch_branches:
        for result in fanned.values():
            batch_pass(traced, result.graph)
    uses = {}
    for result in fanned.values():
        for target, tasks_using in result.uses.items():
            uses.setdefault(target, set()).update(tasks_using)
    members = {layer: found[id(current)][layer].members for layer in split_layers}
    route = traced.meta["route"], reason or traced.meta["route_reason"]
    split = SplitModule(traced, {training: fanned[id(graph)].graph for training, graph in graphs.items()},
                        type(model).__name__, surgery=Surgery(tuple(paths), tuple(split_layers), members, {}))
    _keep_the_rest(split, root, [m for layer in members.values() for m in layer])
    split._surgery = Surgery(tuple(paths), tuple(split_layers), members, _owners(split, uses, tuple(paths)),
                             _plain_attributes(split, root), *route)
    split.meta.update(route=route[0], route_reason=route[1], frozen=traced.meta.get("frozen", {}),
                      given=traced.meta.get("given", {}))
    if example is not None:
        check_split(model, traced, split, paths, calling(*example))
    return split


def _layer_names(layers: Iterable[str]) -> list[str]:
    if isinstance(layers, str):
        raise LayerError(f"layers must be a list of layer names, got the string {layers!r}; use [{layers!r}].")
    try:
        names = list(layers)
    except TypeError:
        raise LayerError(f"layers must be a list of layer names, got {type(layers).__name__}.") from None
    for name in names:
        if not isinstance(name, str):
            raise LayerError(
                f"layers must be names (str) as in fxsplit.layer_graph(model), got {type(name).__name__} {name!r}."
            )
    repeated = repeated_items(names)
    if repeated:
        raise LayerError(f"layer(s) {repeated} given more than once; name each layer once.")
    return names


def _check_report_model(model: nn.Module, selection: LayerSelection) -> None:
    """Before the model is traced (or run on the report's example): each chosen layer holds the same parameters
    in ``model`` as in the report's model."""
    named = dict(model.named_parameters(remove_duplicate=False))
    foreign = [layer for layer, (parameters, count) in selection.parameters.items()
               if not all(name in named for name in parameters)
               or sum({id(named[name]): named[name].numel() for name in parameters}.values()) != count]
    _refuse_foreign(foreign)


def _refuse_foreign(foreign: list[str]) -> None:
    if foreign:
        raise ReportError(
            f"these layers of the conflict report are not layers of this model, or hold other parameters: {foreign[:3]}"
            f"{' ...' if len(foreign) > 3 else ''}; the report was made for another model. Analyze this one."
        )


def _check_layers(names: list[str], layers: Mapping[str, Layer], from_report: bool) -> None:
    foreign = [name for name in names if name not in layers]
    if from_report:
        _refuse_foreign(foreign)
    for name in foreign:
        owner = next((layer for layer in layers.values() if name in layer.members), None)
        if owner is not None:
            raise LayerError(f"{name!r} shares its parameters with {owner.members[0]!r} (tied weights): they are "
                             f"one layer, named {owner.name!r}; split that.")
        inside = [layer for layer in layers if layer.startswith(name + ".")] if name else list(layers)
        if inside:
            raise LayerError(
                f"{name!r} is a container of {len(inside)} layers ({', '.join(inside[:3])}"
                f"{', ...' if len(inside) > 3 else ''}), not a layer; name the layers to split."
            )
        raise unknown_layer(name, layers)


def _chosen(layers: Mapping[str, Layer], names: list[str]) -> dict[fx.Node, str]:
    """The nodes that read the chosen layers in one graph, each with its layer's name (a layer absent from this
    mode's graph has none)."""
    return {node: name for name in names if name in layers for node in layers[name].reads}


def _users(graphs, found: Mapping[int, Mapping[str, Layer]], names: list[str],
           needed: Mapping[int, Mapping[str, set[fx.Node]]], paths: Mapping[str, Path]) -> dict[str, list[str]]:
    """Layer -> the tasks whose outputs use it, in either mode's graph (deep supervision reads a layer in train
    mode only), in task order."""
    using = {name: set() for name in names}
    for graph in graphs:
        layers = found[id(graph)]
        for name in names:
            if name in layers:
                using[name].update(task for task, nodes in needed[id(graph)].items()
                                   if nodes.intersection(layers[name].reads))
    return {name: [task for task in paths if task in tasks] for name, tasks in using.items()}


def _check_shared(names: list[str], users: Mapping[str, list[str]]) -> None:
    for name in names:
        if len(users[name]) < 2:
            whose = f"only task {users[name][0]!r} uses it" if users[name] else "no task's output uses it"
            raise LayerError(f"layer {name!r} cannot be split: {whose}, so it is already task-specific.")


def _norms_in_branches(root, graph, layers: Mapping[str, Layer], names: list[str], paths) -> list[str]:
    """Norm layers with running statistics, used by several tasks, all of whose calls lie in the fanned-out
    region of ``names``."""
    tainted = tainted_by(graph, _chosen(layers, names))
    norms = [name for name, layer in layers.items() if name not in names
             and isinstance(attribute(root, name), NORMS) and all(node in tainted for node in layer.calls)]
    users = _users([graph], {id(graph): layers}, norms, {id(graph): needed_nodes(root, graph, paths)}, paths)
    return [name for name in norms if len(users[name]) > 1]


def _keep_the_rest(split: SplitModule, root: nn.Module, replaced: list[str]) -> None:
    """Give ``split`` every module, parameter and buffer of ``root`` it lacks, at the same path, except the
    members of split layers (their copies replace them)."""
    def replaced_path(path: str) -> bool:
        return any(path == member or path.startswith(member + ".") for member in replaced)

    for path, module in root.named_modules():
        if not path or replaced_path(path) or _has(split, path):
            continue
        holds_replaced = any(member.startswith(path + ".") for member in replaced)
        install(split, path, stand_in(module, nn.Module()) if holds_replaced else module)  # then its other
        # children, one by one
    for path, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        if not replaced_path(path) and not _has(split, path):
            owner_path, _, name = path.rpartition(".")
            if isinstance(tensor, nn.Parameter):
                install(split, path, tensor)
            else:
                persistent = name not in root.get_submodule(owner_path)._non_persistent_buffers_set
                container(split, owner_path).register_buffer(name, tensor, persistent=persistent)


def _has(module: nn.Module, path: str) -> bool:
    try:
        attribute(module, path)
    except AttributeError:
        return False
    return True


def _owners(split: SplitModule, uses: Mapping[str, set[str]], tasks: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every name of every parameter and buffer -> the tasks whose outputs use it, in task order (unused: every
    task)."""
    by_id: dict[int, set[str]] = {}
    for target, tasks_using in uses.items():
        value = attribute(split, target)
        tensors = [value] if isinstance(value, torch.Tensor) else \
            [*value.parameters(), *value.buffers()] if isinstance(value, nn.Module) else []
        for tensor in tensors:
            by_id.setdefault(id(tensor), set()).update(tasks_using)
    named = [*split.named_parameters(remove_duplicate=False), *split.named_buffers(remove_duplicate=False)]
    return {name: tuple(t for t in tasks if t in by_id.get(id(tensor), tasks)) for name, tensor in named}


def _plain_attributes(split: SplitModule, root: nn.Module) -> tuple[str, ...]:
    """Public plain-data attributes of the model (``model.tasks = [...]``) that the split model can take as they
    are: names it does not have already."""
    names = []
    for name, value in vars(root).items():
        if not name.startswith("_") and name != "training" and isinstance(value, _PLAIN) and not hasattr(split, name):
            setattr(split, name, value)
            names.append(name)
    return tuple(names)
