"""``SplitModule``: what :func:`fxsplit.rewrite` returns, with the facts of its surgery kept as data.

The surgery (the tasks, the split layers, which tasks' outputs use each parameter) is recorded when the split is
made, not re-derived from the graph later; it travels with the module through ``copy.deepcopy``, pickling and
``torch.save``.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import fx, nn

from .errors import TaskError, unknown_layer
from .modules import attribute
from .tracing import DualGraphModule


@dataclass(frozen=True)
class Surgery:
    """What a rewrite did: ``tasks`` in output order, the ``layers`` split (graph order) with the ``members`` each
    copies (modules and parameters, under ``copies.<holder>.<member>``, :func:`copy_holder`), ``owners`` (every name
    of every parameter and buffer -> the tasks whose outputs use it), the model's plain ``attributes`` kept on the
    split model, and the ``route`` that traced the model (``"fx"`` or ``"export"``) with the reason it was taken."""

    tasks: tuple[str, ...]
    layers: tuple[str, ...]
    members: Mapping[str, tuple[str, ...]]
    owners: Mapping[str, tuple[str, ...]]
    attributes: tuple[str, ...] = ()
    route: str = "fx"
    route_reason: str = ""


class SplitModule(DualGraphModule):
    """A multi-task ``GraphModule``: shared modules under their original names, copies under ``copies.<task>``.

    Task ``t``'s copy of a member ``m`` of a split layer is ``copies.<t>.<m>`` (``copies.seg.backbone.conv1``), or
    ``copies.<t>_.<m>`` where ``t`` is an attribute of every ``nn.Module`` (``type``, ``train``, ``forward``), a
    Python keyword, or ends in an underscore (``copies.type_``, ``copies.seg__`` for task ``seg_``): every
    identifier names a task, and no two tasks share a holder. ``split.copy_of(task, layer)`` finds it by name.

    ``forward`` returns ``{task: output}``. It runs the graph of its current mode (a model whose Python code reads
    ``self.training`` traces to two), keeps everything the original model owned at the same path (parameters,
    buffers and submodules that ``forward`` does not use, e.g. loss weights, and the model's plain attributes), and
    pickles, deep-copies, ``torch.save``\\ s and scripts (in eval mode) keeping its class.
    """

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "tasks", "split_layers",
                                 "has_two_graphs", "route", "route_reason"]
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
        """Names of the layers that have one copy per task, in graph order."""
        return self._surgery.layers

    @property
    def route(self) -> str:
        """How the model was traced: ``"fx"`` (``torch.fx``) or ``"export"`` (``torch.export``, one graph per mode)."""
        return self._surgery.route

    @property
    def route_reason(self) -> str:
        """Why that route was taken."""
        return self._surgery.route_reason

    def copy_of(self, task: str, layer: str) -> nn.Module | nn.Parameter:
        """Task ``task``'s copy of the split layer ``layer`` (a module, or a parameter)."""
        self._check_task(task)
        if layer not in self.split_layers:
            raise unknown_layer(layer, self.split_layers, what="split layer")
        return attribute(self, copy_target(task, layer))

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
        tasks = self.parameter_tasks()
        return (p for name, p in self.named_parameters() if tasks[name] == (task,))

    def _frozen_targets(self, path: str) -> list[nn.Module]:
        """A split layer's module is held by its copies (those of the tasks whose outputs use it)."""
        members = [member for layer in self._surgery.members.values() for member in layer]
        if not any(path == member or path.startswith(member + ".") for member in members):
            return super()._frozen_targets(path)
        held = super()._frozen_targets
        return [module for task in self.tasks for module in held(copy_target(task, path))]

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


def copy_target(task: str, target: str) -> str:
    """Qualified name of task ``task``'s copy of a module or parameter ``target``."""
    return f"{COPIES}.{copy_holder(task)}.{target}"
