"""``SplitModule``: what :func:`fxsplit.rewrite` returns, with the facts of its surgery kept as data.

The surgery (the tasks, the split layers, which tasks' outputs use each parameter) is recorded when the split is
made, not re-derived from the graph later; it travels with the module through ``copy.deepcopy``, pickling and
``torch.save``.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from torch import fx, nn

from .errors import TaskError, unknown_layer
from .modules import attribute
from .tracing import DualGraphModule


@dataclass(frozen=True)
class Surgery:
    """What a rewrite did: ``tasks`` in output order, the ``layers`` split (graph order) with the ``members`` each
    copies (modules and parameters), the ``groups`` of each layer (frozensets of tasks, each served by one copy,
    under ``copies.<holder>.<member>`` with ``holders[group]``, :func:`group_holder`), ``owners`` (every name of
    every parameter and buffer -> the tasks whose outputs use it), the model's plain ``attributes`` kept on the
    split model, and the ``route`` that traced the model (``"fx"`` or ``"export"``) with the reason it was taken."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]
    groups: Mapping[str, tuple[frozenset[str], ...]]
    holders: Mapping[frozenset[str], str]
    owners: Mapping[str, tuple[str, ...]]
    attributes: tuple[str, ...] = ()
    route: str = "fx"
    route_reason: str = ""


class SplitModule(DualGraphModule):
    """A multi-task ``GraphModule``: shared modules under their original names, copies under ``copies.<holder>``.

    Each split layer has one copy per group of the tasks that use it (per task by default). Task ``t``'s copy of a
    member ``m`` of a split layer is ``copies.<t>.<m>`` (``copies.seg.backbone.conv1``), or ``copies.<t>_.<m>``
    where ``t`` is an attribute of every ``nn.Module`` (``type``, ``train``, ``forward``), a Python keyword, or ends
    in an underscore (``copies.type_``, ``copies.seg__`` for task ``seg_``): every identifier names a task, and no
    two tasks share a holder. A group's copy is held by its tasks' holders joined by ``_`` in task order
    (``copies.seg_depth``; with one more trailing underscore where that is an attribute of every ``nn.Module`` or a
    keyword); a split whose holders would clash is refused. ``split.holder(task, layer)`` and
    ``split.copy_of(task, layer)`` find them from the split's records, ``split.groups`` lists them and
    ``print(split.tree())`` shows the branches.

    ``forward`` returns ``{task: output}``. It runs the graph of its current mode (a model whose Python code reads
    ``self.training`` traces to two), keeps everything the original model owned at the same path (parameters,
    buffers and submodules that ``forward`` does not use, e.g. loss weights, and the model's plain attributes), and
    pickles, deep-copies, ``torch.save``\\ s and scripts (in eval mode) keeping its class.
    """

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "tasks", "split_layers",
                                 "has_two_graphs", "route", "route_reason", "groups"]
    _REBUILD_ATTRIBUTES = {"surgery": "_surgery"}

    def __init__(self, root: nn.Module, graphs: Mapping[bool, fx.Graph], class_name: str = "GraphModule", *,
                 surgery: Surgery):
        super().__init__(root, graphs, class_name)
        self._surgery = surgery
        for name in surgery.attributes:
            if name in root.__dict__:
                setattr(self, name, root.__dict__[name])

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in output order."""
        return self._surgery.tasks

    @property
    def split_layers(self) -> tuple[str, ...]:
        """Names of the layers that have one copy per task (or per group of tasks), in graph order."""
        return self._surgery.layers

    @property
    def route(self) -> str:
        """How the model was traced: ``"fx"`` (``torch.fx``) or ``"export"`` (``torch.export``, one graph per mode)."""
        return self._surgery.route

    @property
    def route_reason(self) -> str:
        """Why that route was taken."""
        return self._surgery.route_reason

    @property
    def groups(self) -> dict[str, tuple[tuple[str, ...], ...]]:
        """Split layer -> its groups: the tasks each of its copies serves (in task order).

        A per-task split has groups of one task each."""
        order = self.tasks.index
        return {layer: tuple(tuple(sorted(group, key=order)) for group in groups)
                for layer, groups in self._surgery.groups.items()}

    def holder(self, task: str, layer: str) -> str:
        """The name under ``copies`` of the module holding the copy of ``layer`` that serves ``task``.

        ``"seg"`` for task ``seg``'s own copy, ``"seg_depth"`` for the copy of the group of ``seg`` and ``depth``."""
        self._check_task(task)
        if layer not in self.split_layers:
            raise unknown_layer(layer, self.split_layers, what="split layer")
        holder = self._holder(task, layer)
        if holder is None:
            raise TaskError(f"task {task!r} does not use the split layer {layer!r}: it has no copy of it; the "
                            f"tasks that do are {[t for t in self.tasks if self._holder(t, layer) is not None]}.")
        return holder

    def _holder(self, task: str, layer: str) -> str | None:
        group = next((group for group in self._surgery.groups[layer] if task in group), None)
        return None if group is None else self._surgery.holders[group]

    def copy_of(self, task: str, layer: str) -> nn.Module | nn.Parameter:
        """The copy of the split layer ``layer`` that serves ``task``: the task's own, or its group's.

        A module, or a parameter for a layer that is one."""
        return attribute(self, copy_target(self.holder(task, layer), layer))

    def tree(self) -> str:
        """The branch tree as text: how the tasks' branches split, layer by layer in graph order.

        Each line is a copy that a branch passes: the layer, the copy's holder under ``copies``, the branch's tasks.
        """
        lines = [", ".join(self.tasks)]
        self._branches(frozenset(self.tasks), 0, "", lines)
        return "\n".join(lines)

    def _branches(self, stream: frozenset[str], start: int, indent: str, lines: list[str]) -> None:
        """Add to ``lines`` the branches of ``stream`` from split layer ``start`` on."""
        order = self.tasks.index
        for i, layer in enumerate(self.split_layers[start:], start):
            parts = [(group & stream, self._surgery.holders[group]) for group in self._surgery.groups[layer]]
            parts = [(part, holder) for part, holder in parts if part]
            rest = stream - frozenset().union(*(part for part, _ in parts))
            if not parts:
                continue
            if rest:
                parts.append((rest, None))
            for j, (part, holder) in enumerate(parts):
                last = j == len(parts) - 1
                where = f"{layer} [{holder}]" if holder is not None else f"(not {layer})"
                tasks = ", ".join(sorted(part, key=order))
                lines.append(f"{indent}{'└── ' if last else '├── '}{where}: {tasks}")
                self._branches(part, i + 1, indent + ("    " if last else "│   "), lines)
            return

    def parameter_tasks(self) -> dict[str, tuple[str, ...]]:
        """Parameter name -> the tasks whose outputs depend on it, in task order (parameters ``forward`` does not
        use, such as loss weights, count as every task's)."""
        owners = self._surgery.owners
        return {name: owners.get(name, ()) for name, _ in self.named_parameters()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that two or more tasks' outputs depend on."""
        tasks = self.parameter_tasks()
        return (p for name, p in self.named_parameters() if len(tasks[name]) > 1)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only ``task``'s output depends on: its copies and its own head."""
        self._check_task(task)
        return self.group_parameters([task])

    def group_parameters(self, group: Iterable[str]) -> Iterator[nn.Parameter]:
        """Parameters that exactly the tasks of ``group`` depend on: a group's copies, and what only they use.

        Every parameter is in the group of the tasks that depend on it: ``task_parameters(t)`` is
        ``group_parameters([t])``, and ``shared_parameters()`` the groups of two or more tasks."""
        group = tuple(group)
        for task in group:
            self._check_task(task)
        wanted = tuple(task for task in self.tasks if task in group)
        tasks = self.parameter_tasks()
        return (p for name, p in self.named_parameters() if tasks[name] == wanted)

    def _frozen_targets(self, path: str) -> list[nn.Module]:
        """A split layer's module is held by its copies (those of the groups of tasks whose outputs use it)."""
        layer = next((layer for layer, members in self._surgery.members.items()
                      if any(path == member or path.startswith(member + ".") for member in members)), None)
        if layer is None:
            return super()._frozen_targets(path)
        held = super()._frozen_targets
        return [module for group in self._surgery.groups[layer]
                for module in held(copy_target(self._surgery.holders[group], path))]

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskError(f"{task!r} is not a task of this model; its tasks are {list(self.tasks)}.")


COPIES = "copies"
_TAKEN = frozenset(dir(nn.Module()))  # attribute names every module has: no child module can take them


def copy_holder(task: str) -> str:
    """The name of the module under ``copies`` that holds task ``task``'s copies: the task's own name, with one
    more trailing underscore where that name is an attribute of every ``nn.Module`` (``type``, ``train``), a Python
    keyword, or ends in an underscore already (so that ``seg`` and ``seg_`` stay apart)."""
    if not (task in _TAKEN or keyword.iskeyword(task) or task.endswith("_")):
        return task
    holder = task + "_"
    if holder in _TAKEN:  # a dunder of nn.Module less its last underscore: the one name the rule cannot hold
        raise TaskError(f"task name {task!r} cannot name the module that holds its copies ({holder!r} is an "
                        f"attribute of every nn.Module); rename the task.")
    return holder


def group_holder(groups: Iterable[frozenset[str]], tasks: tuple[str, ...]) -> dict[frozenset[str], str]:
    """Group -> the name of the module under ``copies`` that holds its copies: a task's :func:`copy_holder`, or
    for a group its tasks' joined by ``_`` in task order (with one more trailing underscore where that is an
    attribute of every ``nn.Module`` or a keyword). Two groups whose names would clash are refused."""
    holders, by_name = {}, {}
    for group in groups:
        ordered = [task for task in tasks if task in group]
        name = "_".join(map(copy_holder, ordered))
        if len(ordered) > 1 and (name in _TAKEN or keyword.iskeyword(name)):
            name += "_"
        clash = by_name.setdefault(name, ordered)
        if clash != ordered:
            raise TaskError(f"the copies of the groups {clash} and {ordered} would both be held at "
                            f"'{COPIES}.{name}': rename a task so that the names of their tasks, joined by '_', "
                            f"differ.")
        holders[group] = name
    return holders


def copy_target(holder: str, target: str) -> str:
    """Qualified name of the copy of a module or parameter ``target`` held by ``holder`` (:func:`group_holder`)."""
    return f"{COPIES}.{holder}.{target}"
