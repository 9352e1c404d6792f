"""``SplitModule``: the ``GraphModule`` that :func:`fxsplit.rewrite` returns, with its parameter groups.

Everything it knows is read off its graph: the tasks are the keys of the output mapping, the split layers are
the targets under ``copies.<task>.``, and a parameter belongs to the tasks whose outputs its module reaches.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import torch
from torch import fx, nn

from .errors import TaskError, unknown_layer
from .layers import attribute

COPIES = "copies"


def copy_target(task: str, layer: str) -> str:
    """Qualified name of task ``task``'s copy of ``layer``."""
    return f"{COPIES}.{task}.{layer}"


class SplitModule(fx.GraphModule):
    """A multi-task ``GraphModule``: shared modules under their original names, copies under ``copies.<task>``.

    ``forward`` returns ``{task: output}``. It pickles, deep-copies, saves with ``torch.save`` and scripts with
    ``torch.jit.script`` like any ``GraphModule``, and keeps its class through all of them.
    """

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "tasks", "split_layers"]

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in output order."""
        return tuple(self._output_map())

    @property
    def split_layers(self) -> tuple[str, ...]:
        """Names of the layers that have one copy per task, in graph order."""
        prefix = f"{COPIES}."
        layers = (_node_target(n).split(".", 2)[2] for n in self.graph.nodes if _node_target(n).startswith(prefix))
        return tuple(dict.fromkeys(layers))

    def copy_of(self, task: str, layer: str) -> nn.Module | nn.Parameter:
        """Task ``task``'s copy of the split layer ``layer`` (a module, or a parameter)."""
        self._check_task(task)
        if layer not in self.split_layers:
            raise unknown_layer(layer, self.split_layers, what="split layer")
        return attribute(self, copy_target(task, layer))

    def parameter_tasks(self) -> dict[str, tuple[str, ...]]:
        """Parameter name -> the tasks whose outputs depend on it, in task order."""
        owners: dict[int, tuple[str, ...]] = {}
        for task, value in self._output_map().items():
            for param in self._reached_parameters(value):
                owners[id(param)] = owners.get(id(param), ()) + (task,)
        return {name: owners.get(id(p), ()) for name, p in self.named_parameters()}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that two or more tasks' outputs depend on."""
        tasks = self.parameter_tasks()
        return (p for name, p in self.named_parameters() if len(tasks[name]) > 1)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters that only ``task``'s output depends on: its copies and its own head."""
        self._check_task(task)
        tasks = self.parameter_tasks()
        return (p for name, p in self.named_parameters() if tasks[name] == (task,))

    def _check_task(self, task: str) -> None:
        if task not in self.tasks:
            raise TaskError(f"{task!r} is not a task of this model; its tasks are {list(self.tasks)}.")

    def _output_map(self) -> dict:
        (output,) = (n for n in self.graph.nodes if n.op == "output")
        return output.args[0]

    def _reached_parameters(self, value) -> set[nn.Parameter]:
        """Parameters of the modules (and parameters read directly) that ``value`` depends on.

        The walk follows each branch through the batched streams (``cat`` -> per-sample modules -> ``unflatten``
        -> ``unbind`` -> item ``i``), so that branch ``i`` depends only on the ``i``-th part of a stream.
        """
        params: set[nn.Parameter] = set()
        seen: set[tuple[fx.Node, int | None]] = set()
        stack: list[tuple[fx.Node, int | None]] = []
        fx.node.map_arg(value, lambda node: stack.append((node, None)))
        while stack:
            node, part = stack.pop()
            if (node, part) in seen:
                continue
            seen.add((node, part))
            stack.extend(_inputs(node, part))
            if node.op == "call_module":
                params.update(self.get_submodule(node.target).parameters())
            elif node.op == "get_attr":
                attr = attribute(self, node.target)
                if isinstance(attr, nn.Parameter):
                    params.add(attr)
        return params

    def __reduce__(self):
        rebuild, args = super().__reduce__()
        return _rebuild_split_module, (rebuild, args)


def _rebuild_split_module(rebuild, args) -> SplitModule:
    """Unpickle: rebuild the plain ``GraphModule``, then give it back its class."""
    gm = rebuild(*args)
    split = SplitModule(gm, gm.graph, type(gm).__name__)
    split.train(gm.training)
    return split


def _inputs(node: fx.Node, part: int | None) -> list[tuple[fx.Node, int | None]]:
    """What ``node`` (or only its ``part``-th branch, on a batched stream) reads."""
    if part is None and _unstacked(node):
        return [(node.args[0].args[0].args[0], node.args[1])]
    if part is not None and node.op == "call_function" and node.target is torch.cat:
        return [(node.args[0][part], None)]
    if part is not None and node.op == "call_module" and len(node.all_input_nodes) == 1:
        return [(node.args[0], part)]
    return [(arg, None) for arg in node.all_input_nodes]


def _unstacked(node: fx.Node) -> bool:
    """Whether ``node`` is ``x.unflatten(0, (n, -1)).unbind()[i]``: branch ``i`` of a batched stream ``x``."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)):
        return False
    unbind = node.args[0]
    if not (isinstance(unbind, fx.Node) and unbind.op == "call_method" and unbind.target == "unbind"
            and len(unbind.args) == 1 and not unbind.kwargs):
        return False
    unflatten = unbind.args[0]
    return (isinstance(unflatten, fx.Node) and unflatten.op == "call_method" and unflatten.target == "unflatten"
            and unflatten.args[1] == 0)


def _node_target(node: fx.Node) -> str:
    return node.target if node.op in ("call_module", "get_attr") else ""

