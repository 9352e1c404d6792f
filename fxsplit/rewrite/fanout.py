"""The fan-out pass: from the first chosen layer on, values travel as one stream per branch.

A node that depends on a chosen layer is *tainted*: it is emitted once per branch, the set of tasks whose outputs
need it and which have passed through the same copies so far (the same inputs, and at a chosen layer the same
group's copy): with that group's copy in place of each chosen layer's module or parameter, and the one shared set
of weights everywhere else. A stream splits only where a chosen layer's groups separate its tasks; with one group
per task, a branch is a task. Untainted nodes are emitted once and shared by every branch. Nodes no task's output
needs are dropped, except side effects (checks of the inputs, writes to buffers, a backward pass ``forward`` runs),
which go with the values they read. Each emitted node records the original node it came from (``meta["origin"]``)
and, in a branch, its tasks (``meta["branch"]``, a frozenset), for the passes that follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from ..split_module import copy_target
from ..errors import LayerError
from ..modules import owner
from ..rules import has_running_statistics

if TYPE_CHECKING:
    from .plan import GraphPlan, Plan
from ..tracing import aliases, mutated_input, viewed, written_input, written_tensor
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
    needed = {task: ancestors(select(output, path, task)) for task, path in paths.items()}
    used = set().union(*needed.values())
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        if node.users or not _side_effect(root, node, position):
            continue
        before = ancestors(node)
        read = {arg for own in before - used for arg in own.all_input_nodes
                if arg in used and arg.op not in ("placeholder", "get_attr")}
        tasks = [task for task, nodes in needed.items() if read <= nodes] or \
                [task for task, nodes in needed.items() if read & nodes]
        for task in tasks:
            needed[task].update(before)
    return needed


def _side_effect(root: nn.Module, node: fx.Node, position: Mapping[fx.Node, int]) -> bool:
    """Whether ``node`` does something besides computing a value: a check (torch.export's checks of the inputs,
    an assertion), a backward pass (it adds to parameters' ``.grad``), or a write that is read afterwards (into a
    buffer, an input, or a tensor read later)."""
    if _runs_backward(node):
        return True
    if node.op == "call_module":
        return getattr(root.get_submodule(node.target), "_is_impure", False) is True
    written = written_input(root, node)
    if written is None:
        return node.op == "call_function" and node.is_impure(impure_random=False)
    while written.op not in ("placeholder", "get_attr"):
        if any(position[user] > position[node] for user in written.users):
            return True
        written = mutated_input(root, written) or viewed(written)
        if written is None:  # a write into a tensor that nothing reads afterwards
            return False
    return True


def _runs_backward(node: fx.Node) -> bool:
    """Whether ``node`` runs a backward pass (``loss.backward()``, ``torch.autograd.backward``), as a regulariser
    inside ``forward`` does."""
    return (node.op == "call_method" and node.target == "backward") or (
        node.op == "call_function" and node.target in (torch.autograd.backward, torch.Tensor.backward))


def fan_out(root: nn.Module, plan: Plan, graph: GraphPlan) -> FanOut:
    """The graph in which every node that reads a split layer applies the copy of its branch's group, and
    everything after it fans out into branches."""
    position = {node: i for i, node in enumerate(graph.graph.nodes)}
    _check_no_backward_in_branches(graph.tainted)
    clone_first = _writes_into_shared(root, graph.tainted, position)
    emitter = _Emitter(root, plan, graph, clone_first, position)
    for node in graph.graph.nodes:
        if node.op != "output":
            emitter.emit(node)
    output = output_node(graph.graph).args[0]
    emitter.graph.output({task: fx.node.map_arg(select(output, path, task), emitter.lookup(task))
                          for task, path in plan.paths.items()})
    emitter.graph.lint()
    return FanOut(emitter.graph, emitter.uses)


def tainted_by(graph: fx.Graph, sources: Mapping[fx.Node, str]) -> dict[fx.Node, str]:
    """Every node that depends on one of ``sources`` (node -> a name), with the name of the first it depends on."""
    tainted: dict[fx.Node, str] = {}
    for node in graph.nodes:
        source = sources.get(node) or next((tainted[arg] for arg in node.all_input_nodes if arg in tainted), None)
        if source is not None:
            tainted[node] = source
    return tainted


def _check_no_backward_in_branches(tainted: Mapping[fx.Node, str]) -> None:
    """Refuse a backward pass that ``forward`` runs after a split layer: each branch would run it, adding to the
    ``.grad`` of every shared parameter it reaches once per task, where the model adds once."""
    node = next((node for node in tainted if _runs_backward(node)), None)
    if node is not None:
        raise LayerError(
            f"forward runs a backward pass at {_where(node)} after the split layer {tainted[node]!r}: each task's "
            f"branch would run it, once per task, adding to the .grad of the shared parameters it reaches each time, "
            f"so no split computes what the model computes. Split only layers that the backward pass does not "
            f"depend on (after it, or beside it).")


def _writes_into_shared(root: nn.Module, tainted: Mapping[fx.Node, str], position: Mapping[fx.Node, int]
                        ) -> set[fx.Node]:
    """The in-place nodes of the branches that write to a tensor of the shared part, each branch into its own
    clone; a shared buffer that the branches would update is refused (BatchNorm statistics aside), and so is a
    write whose tensor the shared part reads afterwards through another view of its memory (a clone would not
    be what it reads)."""
    clone_first = set()
    for node, layer in tainted.items():
        mutated = written_input(root, node)
        if mutated is None or mutated in tainted:
            continue
        written = written_tensor(root, node)
        if written.op == "get_attr" and written not in tainted and not has_running_statistics(
                root.get_submodule(owner(written.target))):
            raise LayerError(
                f"buffer {written.target!r} is updated in forward after the split layer {layer!r} (at "
                f"{_where(node)}): each task's branch would update the one buffer in turn, so "
                f"no split computes what the model computes. Split only layers after that update, or keep the state "
                f"in a split layer's own module (each task then gets its own copy).")
        reader = _read_unwritten(root, node, written, position)
        if reader is not None:
            raise LayerError(
                f"the in-place write at {_where(node)} writes a value computed after the split layer {layer!r} into "
                f"{_where(mutated)}, memory of {_where(written)}, which the tasks share and which is read afterwards "
                f"(at {_where(reader)}): each task's branch would write into it in turn, so no split computes what "
                f"the model computes. Split only layers after that write, or write out of place (h = h + update, "
                f"torch.cat, torch.where) so that each branch computes its own value.")
        if mutated.op != "get_attr":  # a shared value: each branch writes into its own clone
            clone_first.add(node)
    return clone_first


def _read_unwritten(root: nn.Module, write: fx.Node, written: fx.Node, position: Mapping[fx.Node, int]
                    ) -> fx.Node | None:
    """The first node after ``write`` that reads the memory it writes (of ``written``) other than through the
    write's own result (which each branch's clone gives), if any."""
    through_write = aliases(root, write)
    stale = aliases(root, written) - through_write
    readers = [user for alias in stale for user in alias.users
               if position[user] > position[write] and user not in through_write]
    return min(readers, key=position.__getitem__, default=None)


def _where(node: fx.Node) -> str:
    return node.meta.get("path", node.name)


def ancestors(value: Any) -> set[fx.Node]:
    """Every node that ``value`` (a node, or a structure of them) depends on, itself included."""
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
    """Builds the fanned-out graph: shared nodes once, tainted nodes once per branch that needs them."""

    def __init__(self, root: nn.Module, plan: Plan, graph: GraphPlan, clone_first: set[fx.Node],
                 position: Mapping[fx.Node, int]):
        self.root, self.plan, self.source, self.clone_first, self.position = root, plan, graph, clone_first, position
        self.graph = fx.Graph()
        self.shared: dict[fx.Node, fx.Node] = {}
        self.branch: dict[str, dict[fx.Node, fx.Node]] = {task: {} for task in graph.needed}
        self.uses: dict[str, set[str]] = {}

    def emit(self, node: fx.Node) -> None:
        users = [task for task, nodes in self.source.needed.items() if node in nodes]
        tainted = self.source.tainted
        if node.op == "placeholder" or (node not in tainted and users) or self._guards(node):
            new = self.graph.node_copy(node, self.shared.__getitem__)
            new.meta["origin"] = node.name
            self.shared[node] = new
            self._use(new, users)
        elif node in tainted:
            streams: dict[tuple, list[str]] = {}
            for task in users:
                if all(arg in self.branch[task] or arg in self.shared for arg in node.all_input_nodes):
                    streams.setdefault(self._stream(node, task), []).append(task)  # a side effect goes where all
                    # it reads is
            for tasks in streams.values():
                self._emit_branch(node, tasks, [task for other in streams.values() if other is not tasks
                                                for task in other])

    def _stream(self, node: fx.Node, task: str) -> tuple:
        """What ``task``'s value of ``node`` is computed from: tasks with the same share one node."""
        layer = self.source.chosen.get(node)
        return (*map(self.lookup(task), node.all_input_nodes), layer and self.plan.group_of(layer, task))

    def _guards(self, node: fx.Node) -> bool:
        """Whether ``node`` checks a value bound while tracing (``task_name=None``): kept, though no output needs it."""
        inputs = node.all_input_nodes
        return bool(inputs) and all(arg.meta.get("bound") for arg in inputs) and node.meta.setdefault("bound", True)

    def lookup(self, task: str) -> Callable[[fx.Node], fx.Node]:
        return lambda node: self.branch[task][node] if node in self.branch[task] else self.shared[node]

    def _emit_branch(self, node: fx.Node, tasks: list[str], others: list[str]) -> None:
        """Emit ``node`` for the branch ``tasks`` (``others``: the tasks of its other branches)."""
        lookup = self.lookup(tasks[0])
        args = fx.node.map_arg(node.args, lookup)
        if node in self.clone_first or self._writes_into_stream(node, lookup, others):
            args = (self.graph.call_method("clone", (args[0],)),) + tuple(args[1:])
        layer = self.source.chosen.get(node)
        target = node.target if layer is None else \
            copy_target(self.plan.holders[self.plan.group_of(layer, tasks[0])], node.target)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        new = self.graph.create_node(node.op, target, args, kwargs, f"{'_'.join(tasks)}_{node.name}", node.type)
        new.meta = {**node.meta, "branch": frozenset(tasks), "origin": node.name}
        for task in tasks:
            self.branch[task][node] = new
        self._use(new, tasks)

    def _writes_into_stream(self, node: fx.Node, lookup: Callable[[fx.Node], fx.Node], others: list[str]) -> bool:
        """Whether ``node`` writes in place into a value of a stream that another of its branches writes into too
        (each branch then writes into its own clone); refused where that value's memory is read afterwards other
        than through the write."""
        mutated = written_input(self.root, node)
        if mutated is None or mutated not in self.source.tainted or \
                not any(self.lookup(task)(mutated) is lookup(mutated) for task in others):
            return False
        reader = _read_unwritten(self.root, node, written_tensor(self.root, node), self.position)
        if reader is not None:
            raise LayerError(
                f"the in-place write at {_where(node)} writes into {_where(mutated)}, a value that several groups of "
                f"tasks share before a later split layer separates them, and which is read afterwards (at "
                f"{_where(reader)}): each group's branch would write into it in turn. Write out of place (h = h + "
                f"update), or give those tasks one group at the layers after {_where(mutated)}.")
        return True

    def _use(self, node: fx.Node, tasks: list[str]) -> None:
        if node.op in ("call_module", "get_attr"):
            self.uses.setdefault(node.target, set()).update(tasks)
