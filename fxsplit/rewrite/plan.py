"""The plan of a rewrite: pure data, computed once from the traced model, that the passes apply.

Which layers split, into which groups of tasks (a *branch*: the set of tasks one copy or one stream serves), which
tasks use each layer, and per graph (one per mode) the nodes that read the split layers, the nodes each task's
output needs and the nodes that depend on a split layer. A per-task split is the case where every group is one
task.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, FrozenSet, Union

from torch import fx, nn

from ..errors import LayerError, MissingTaskError, RepeatedTaskError, ReportError, UnknownTaskError, unknown_layer
from ..layers import Layer, find_layers
from ..modules import attribute
from ..outputs import Path, repeated_items
from ..rules import has_running_statistics
from ..split_module import group_holder
from .fanout import ancestors, needed_nodes, tainted_by

Branch = FrozenSet[str]  # the tasks that one copy, or one stream of values, serves
Partition = Union[str, Iterable[Iterable[str]]]  # "each", or groups of task names
EACH = "each"


@dataclass(frozen=True)
class GraphPlan:
    """One mode's graph: its ``layers``, the nodes that read split layers (``chosen``, node -> layer), the nodes
    each task's output needs (``needed``) and those that depend on a split layer (``tainted``, node -> the first
    split layer it depends on)."""

    graph: fx.Graph
    layers: Mapping[str, Layer]
    chosen: Mapping[fx.Node, str]
    needed: Mapping[str, set[fx.Node]]
    tainted: Mapping[fx.Node, str]


@dataclass(frozen=True)
class Plan:
    """What a rewrite does: the task ``paths`` (output order), the split ``layers`` (graph order) with their
    ``groups`` (branches of the tasks that use them, in task order), the ``holders`` of the copies (branch -> the
    name under ``copies``) and the ``graphs`` per mode (``True``: train; one object where both modes trace alike),
    the model's mode ``training``."""

    paths: Mapping[str, Path]
    layers: tuple[str, ...]
    groups: Mapping[str, tuple[Branch, ...]]
    holders: Mapping[Branch, str]
    graphs: Mapping[bool, GraphPlan]
    training: bool

    @property
    def current(self) -> GraphPlan:
        """The graph of the model's mode."""
        return self.graphs[self.training]

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.paths)

    def group_of(self, layer: str, task: str) -> Branch:
        """The group of ``layer`` that ``task`` is in."""
        return next(group for group in self.groups[layer] if task in group)

    def distinct_graphs(self) -> list[GraphPlan]:
        return list({id(graph): graph for graph in self.graphs.values()}.values())


def selection(layers: Iterable[str] | Mapping[str, Partition]) -> dict[str, Partition]:
    """Layer name -> its partition (``"each"``: one group per task), from a list of names or a mapping."""
    if isinstance(layers, str):
        raise LayerError(f"layers must be a list of layer names, got the string {layers!r}; use [{layers!r}].")
    if isinstance(layers, Mapping):
        names, partitions = list(layers), dict(layers)
    else:
        try:
            names = list(layers)
        except TypeError:
            raise LayerError(f"layers must be a list of layer names, got {type(layers).__name__}.") from None
        partitions = {name: EACH for name in names if isinstance(name, str)}
    for name in names:
        if not isinstance(name, str):
            raise LayerError(
                f"layers must be names (str) as in fxsplit.layer_graph(model), got {type(name).__name__} {name!r}."
            )
    repeated = repeated_items(names)
    if repeated:
        raise LayerError(f"layer(s) {repeated} given more than once; name each layer once.")
    return partitions


def plan(root: nn.Module, graphs: Mapping[bool, fx.Graph], paths: Mapping[str, Path],
         partitions: Mapping[str, Partition], *, training: bool, split_norms: bool, from_report: bool) -> Plan:
    """The plan of splitting ``partitions`` (layer -> partition) in ``graphs`` (one per mode), the current one
    that of ``training``; ``split_norms`` adds the norm layers that lie wholly in the fanned-out region, one copy per
    task."""
    distinct = list({id(graph): graph for graph in graphs.values()}.values())
    found = {id(graph): find_layers(root, graph) for graph in distinct}
    needed = {id(graph): needed_nodes(root, graph, paths) for graph in distinct}
    current = graphs[training]
    _check_layers(list(partitions), found[id(current)], from_report)
    partitions = dict(partitions)
    if split_norms:
        partitions.update(dict.fromkeys(_norms_in_branches(root, current, found[id(current)], needed[id(current)],
                                                           list(partitions), paths), EACH))
    layers = tuple(layer for layer in found[id(current)] if layer in partitions)  # graph order
    users = _users(distinct, found, needed, layers, paths)
    checked = {layer: _groups(layer, partitions[layer], users[layer], tuple(paths)) for layer in partitions}
    groups = {layer: checked[layer] for layer in layers}
    by_graph = {}
    for graph in distinct:
        chosen = _chosen(found[id(graph)], layers)
        by_graph[id(graph)] = GraphPlan(graph, found[id(graph)], chosen, needed[id(graph)], tainted_by(graph, chosen))
    branches = dict.fromkeys(group for layer in layers for group in groups[layer])
    return Plan(dict(paths), layers, groups, group_holder(branches, tuple(paths)),
                {mode: by_graph[id(graph)] for mode, graph in graphs.items()}, training)


def refuse_foreign(foreign: list[str]) -> None:
    """A :class:`~fxsplit.ReportError` for layers of a report that this model lacks (or holds otherwise)."""
    if foreign:
        raise ReportError(
            f"these layers of the conflict report are not layers of this model, or hold other parameters: "
            f"{foreign[:3]}{' ...' if len(foreign) > 3 else ''}; the report was made for another model. Analyze this "
            f"one.")


def _check_layers(names: list[str], layers: Mapping[str, Layer], from_report: bool) -> None:
    foreign = [name for name in names if name not in layers]
    if from_report:
        refuse_foreign(foreign)
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


def _chosen(layers: Mapping[str, Layer], names: Iterable[str]) -> dict[fx.Node, str]:
    """The nodes that read the chosen layers in one graph, each with its layer's name (a layer absent from this
    mode's graph has none)."""
    return {node: name for name in names if name in layers for node in layers[name].reads}


def _users(graphs: list[fx.Graph], found: Mapping[int, Mapping[str, Layer]],
           needed: Mapping[int, Mapping[str, set[fx.Node]]], names: Iterable[str], paths: Mapping[str, Path]
           ) -> dict[str, tuple[str, ...]]:
    """Layer -> the tasks whose outputs use it, in either mode's graph (deep supervision reads a layer in train
    mode only), in task order."""
    using = {name: set() for name in names}
    for graph in graphs:
        layers = found[id(graph)]
        for name in using:
            if name in layers:
                using[name].update(task for task, nodes in needed[id(graph)].items()
                                   if nodes.intersection(layers[name].reads))
    return {name: tuple(task for task in paths if task in tasks) for name, tasks in using.items()}


def _norms_in_branches(root: nn.Module, graph: fx.Graph, layers: Mapping[str, Layer],
                       needed: Mapping[str, set[fx.Node]], names: list[str], paths: Mapping[str, Path]) -> list[str]:
    """Norm layers with running statistics, used by several tasks, all of whose calls lie in the fanned-out
    region of ``names`` (they depend on a node that reads one of them)."""
    reads = set(_chosen(layers, names))
    norms = [name for name, layer in layers.items()
             if name not in names and has_running_statistics(attribute(root, name))
             and all(ancestors(node) & reads for node in layer.calls)]
    users = _users([graph], {id(graph): layers}, {id(graph): needed}, norms, paths)
    return [name for name in norms if len(users[name]) > 1]


def _groups(layer: str, partition: Partition, users: tuple[str, ...], tasks: tuple[str, ...]
            ) -> tuple[Branch, ...]:
    """The groups of ``layer``'s users that ``partition`` gives, in task order; a task that does not use the
    layer may be named (it gets nothing)."""
    if len(users) < 2:
        whose = f"only task {users[0]!r} uses it" if users else "no task's output uses it"
        raise LayerError(f"layer {layer!r} cannot be split: {whose}, so it is already task-specific.")
    if isinstance(partition, str) and partition == EACH:
        return tuple(frozenset({task}) for task in users)
    named = _named_groups(layer, partition)
    flat = [task for group in named for task in group]
    unknown = [task for task in flat if task not in tasks]
    if unknown:
        raise UnknownTaskError(f"the partition of layer {layer!r} names {unknown[0]!r}, which is not a task of this "
                               f"model; its tasks are {list(tasks)}.")
    repeated = repeated_items(flat)
    if repeated:
        raise RepeatedTaskError(f"the partition of layer {layer!r} puts task {repeated[0]!r} in more than one group; "
                                f"put each task in one group.")
    missing = [task for task in users if task not in flat]
    if missing:
        raise MissingTaskError(f"task {missing[0]!r} uses layer {layer!r} but is in none of its groups; add it to "
                               f"one (or give it its own: [..., [{missing[0]!r}]]).")
    groups = [frozenset(task for task in group if task in users) for group in named]
    groups = sorted((group for group in groups if group), key=lambda group: min(map(users.index, group)))
    if len(groups) < 2:
        raise LayerError(f"the partition of layer {layer!r} puts all the tasks that use it ({', '.join(users)}) in "
                         f"one group: it splits nothing. Leave the layer out, or give it two or more groups.")
    return tuple(groups)


def _named_groups(layer: str, partition: Any) -> list[list[str]]:
    """The groups of ``partition`` as lists of names, or a :class:`LayerError` saying what a partition is."""
    what = (f"the partition of layer {layer!r} must be 'each' or a list of groups of task names "
            f"([['a', 'b'], ['c']]), got {partition!r}.")
    if isinstance(partition, str) or not isinstance(partition, Iterable):
        raise LayerError(what)
    groups = [group for group in partition]
    if any(isinstance(group, str) or not isinstance(group, Iterable) for group in groups):
        raise LayerError(what)
    groups = [list(group) for group in groups]
    if any(not group or not all(isinstance(task, str) for task in group) for group in groups):
        raise LayerError(what)
    return groups
