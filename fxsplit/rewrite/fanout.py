"""The fan-out pass: from the first chosen layer on, values travel as one stream per task.

A node that depends on a chosen layer is *tainted*: it is emitted once per task whose output needs it (its
branch), with the task's copy in place of each chosen layer's module or parameter, and the one shared set of
weights everywhere else. Untainted nodes are emitted once and shared by every branch. Nodes no task's output
needs are dropped, except side effects (checks of the inputs, writes to buffers), which go with the values they
read. Each emitted node records the original node it came from (``meta["origin"]``) and, in a branch, its task
(``meta["task"]``), for the passes that follow.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from ..split_module import copy_target
from ..tracing import mutated_input
from ..outputs import Path, select

@dataclass
class FanOut:
    """A fanned-out graph and, for every module or tensor it reads, the tasks whose outputs use it."""

    graph: fx.Graph
    uses: dict[str, set[str]] = field(default_factory=dict)


def output_node(graph: fx.Graph) -> fx.Node:
    return next(node for node in reversed(graph.nodes) if node.op == "output")


def needed_nodes(root: nn.Module, graph: fx.Graph, paths: Mapping[str, Path]) -> dict[str, set[fx.Node]]:
    """Task -> every node its part of the output depends on, and the side effects that go with it.

    A side effect (a check, a write that is read afterwards) that no value depends on goes with the tasks that
    need every value it reads, or if none does, with those that need any; one that reads only inputs and
    parameters (torch.export's checks of the inputs) goes with every task.
    """
    output = output_node(graph).args[0]
    needed = {task: _ancestors(select(output, path, task)) for task, path in paths.items()}
    used = set().union(*needed.values())
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.users or not _side_effect(root, node, position):
            continue
        ancestors = _ancestors(node)
        read = {arg for own in ancestors - used for arg in own.all_input_nodes
                if arg in used and arg.op not in ("placeholder", "get_attr")}
        tasks = [task for task, nodes in needed.items() if read <= nodes] or \
                [task for task, nodes in needed.items() if read & nodes]
        for task in tasks:
            needed[task].update(ancestors)
    return needed


def _side_effect(root: nn.Module, node: fx.Node, position: Mapping[fx.Node, int]) -> bool:
    """Whether ``node`` does something besides computing a value: a check (torch.export's checks of the inputs,
    an assertion), or a write that is read afterwards (into a buffer, an input, or a tensor read later)."""
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "_is_impure", False) is True
    if node.op != "call_function" or not node.is_impure(impure_random=False):
        return False
    written = node.args[0] if node.target is operator.setitem else mutated_input(root, node)
    while written is not None and written.op not in ("placeholder", "get_attr"):
        if any(position[user] > position[node] for user in written.users):
            return True
        written = _viewed(written)
        if written is None:  # a write into a tensor that nothing reads afterwards
            return False
    return True


def _viewed(node: fx.Node) -> fx.Node | None:
    """The tensor that ``node`` is a view of (an ATen operation whose result aliases its first input), if any."""
    schema = getattr(node.target, "_schema", None)
    aliased = schema is not None and schema.arguments and schema.arguments[0].alias_info is not None
    return node.args[0] if aliased and not schema.arguments[0].alias_info.is_write else None


def fan_out(root: nn.Module, graph: fx.Graph, paths: Mapping[str, Path], chosen: Collection[fx.Node]) -> FanOut:
    """The graph in which every node in ``chosen`` applies a per-task copy and everything after it fans out."""
    tainted, clone_first = _taint(root, graph, chosen)
    emitter = _Emitter(chosen, tainted, clone_first, needed_nodes(root, graph, paths))
    for node in graph.nodes:
        if node.op != "output":
            emitter.emit(node)
    output = output_node(graph).args[0]
    emitter.graph.output({task: fx.node.map_arg(select(output, path, task), emitter.lookup(task))
                          for task, path in paths.items()})
    emitter.graph.lint()
    return FanOut(emitter.graph, emitter.uses)


def _taint(root: nn.Module, graph: fx.Graph, chosen: Collection[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes that depend on a chosen layer, and the in-place ones among them that write to a shared tensor
    (each branch must write to its own clone)."""
    tainted: set[fx.Node] = set()
    clone_first: set[fx.Node] = set()
    for node in graph.nodes:
        if node in chosen or any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
            mutated = mutated_input(root, node)
            if mutated is not None and mutated not in tainted and mutated.op != "get_attr":  # a buffer's update
                clone_first.add(node)  # sees every branch, as a BatchNorm's running statistics do
    return tainted, clone_first


def _ancestors(value: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack: list[fx.Node] = []
    fx.node.map_arg(value, stack.append)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


class _Emitter:
    """Builds the fanned-out graph: shared nodes once, tainted nodes once per task that needs them."""

    def __init__(self, chosen, tainted, clone_first, needed: Mapping[str, set[fx.Node]]):
        self.chosen, self.tainted, self.clone_first, self.needed = chosen, tainted, clone_first, needed
        self.graph = fx.Graph()
        self.shared: dict[fx.Node, fx.Node] = {}
        self.branch: dict[str, dict[fx.Node, fx.Node]] = {task: {} for task in needed}
        self.uses: dict[str, set[str]] = {}

    def emit(self, node: fx.Node) -> None:
        users = [task for task, nodes in self.needed.items() if node in nodes]
        if node.op == "placeholder" or (node not in self.tainted and users) or self._guards(node):
            new = self.graph.node_copy(node, self.shared.__getitem__)
            new.meta["origin"] = node.name
            self.shared[node] = new
            self._use(new, users)
        elif node in self.tainted:
            for task in users:
                if all(arg in self.branch[task] or arg in self.shared for arg in node.all_input_nodes):
                    self._emit_branch(node, task)  # a side effect goes where all it reads is

    def _guards(self, node: fx.Node) -> bool:
        """Whether ``node`` checks a value bound while tracing (``task_name=None``): kept, though no output needs it."""
        inputs = node.all_input_nodes
        return bool(inputs) and all(arg.meta.get("bound") for arg in inputs) and node.meta.setdefault("bound", True)

    def lookup(self, task: str) -> Callable[[fx.Node], fx.Node]:
        return lambda node: self.branch[task][node] if node in self.branch[task] else self.shared[node]

    def _emit_branch(self, node: fx.Node, task: str) -> None:
        args = fx.node.map_arg(node.args, self.lookup(task))
        if node in self.clone_first:
            args = (self.graph.call_method("clone", (args[0],)),) + tuple(args[1:])
        target = copy_target(task, node.target) if node in self.chosen else node.target
        kwargs = fx.node.map_arg(node.kwargs, self.lookup(task))
        new = self.graph.create_node(node.op, target, args, kwargs, f"{task}_{node.name}", node.type)
        new.meta = {**node.meta, "task": task, "origin": node.name}
        self.branch[task][node] = new
        self._use(new, [task])

    def _use(self, node: fx.Node, tasks: list[str]) -> None:
        if node.op in ("call_module", "get_attr"):
            self.uses.setdefault(node.target, set()).update(tasks)
