"""``DualGraphModule``: a ``GraphModule`` with one graph per train/eval mode, switched by ``.train()`` / ``.eval()``.

A trace fixes the Python code that reads ``self.training`` (``F.dropout(x, p, self.training)``, ``if self.training:``),
so a model can trace to one graph in train mode and another in eval mode. A traced module that is used in both
modes therefore keeps both graphs and swaps them when its mode changes; torchvision's feature extraction does the
same (its ``DualGraphModule``). When both modes trace alike there is one graph and nothing is swapped. The second
graph survives ``copy.deepcopy``, pickling and ``torch.save``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _CodeOnlyModule, _copy_attr, _format_import_block, reduce_graph_module
from torch.package import sys_importer

from ..modules import torch_layer
from .frozen import first_change, stale, stand_in, watched
from .verify import check_given


class DualGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose graph follows its mode: ``graphs[True]`` in train mode, ``graphs[False]`` in eval mode.

    A subclass whose ``__init__`` takes more keyword arguments names, in ``_REBUILD_ATTRIBUTES``, the attribute
    that keeps each one, so that deep copies and unpickling can pass them again.

    >>> import torch, fxsplit
    >>> class Noisy(torch.nn.Module):
    ...     def forward(self, x):
    ...         return x + 1 if self.training else x
    >>> gm = fxsplit.trace(Noisy())
    >>> gm(torch.zeros(1)).item(), gm.eval()(torch.zeros(1)).item()
    (1.0, 0.0)
    """

    _REBUILD_ATTRIBUTES: dict[str, str] = {}

    def __init__(self, root: nn.Module, graphs: Mapping[bool, fx.Graph], class_name: str = "GraphModule"):
        training = root.training
        super().__init__(root, graphs[training], class_name)
        other = graphs[not training]
        self._graph_training = training  # the mode self.graph belongs to
        self._other_graph: fx.Graph | None = None
        if other is not graphs[training] and _source(other) != _source(graphs[training]):
            for node in other.nodes:
                if node.op in ("get_attr", "call_module"):
                    _copy_attr(root, self, node.target)
            self._other_graph = other
        adopt_layers(self, root, [graphs[training], other])
        adopt_classes(self, root)

    @property
    def has_two_graphs(self) -> bool:
        """Whether train and eval mode run different graphs."""
        return self._other_graph is not None

    def graph_for(self, training: bool) -> fx.Graph:
        """The graph that runs in train mode (``True``) or eval mode (``False``)."""
        if self._other_graph is None or training == self._graph_training:
            return self.graph
        return self._other_graph

    def train(self, mode: bool = True):
        super().train(mode)
        self._follow_mode()
        return self

    def __call__(self, *args, **kwargs):
        self._follow_mode()  # also when .training was set directly, not through .train()
        self._check_frozen()
        check_given(self.meta.get("given", {}), args, kwargs, type(self).__name__)
        return super().__call__(*args, **kwargs)

    def _check_frozen(self) -> None:
        """Stop before running a graph that holds a Python value which has changed since tracing."""
        watches = self.__dict__.setdefault("_frozen_watch", {})  # resolved once: the check runs every call
        if self.training not in watches:  # one graph may serve both modes: the reads are the mode's
            watches[self.training] = watched(self.meta.get("frozen", {}).get(self.training, ()), self._frozen_targets)
        change = first_change(watches[self.training])
        if change is not None:
            raise stale(*change, self.training, self.meta.get("route", "fx"))

    def _frozen_targets(self, path: str) -> list[nn.Module]:
        """The modules that hold what the model's module at ``path`` held, for the graph."""
        try:
            return [self.get_submodule(path)]
        except AttributeError:
            return []

    def _follow_mode(self) -> None:
        if getattr(self, "_other_graph", None) is not None and self.training != self._graph_training:
            self.graph, self._other_graph = self._other_graph, self.graph  # the setter recompiles forward()
            self._graph_training = self.training

    def _deepcopy_init(self):
        return functools.partial(_init_from_copy, class_name=type(self).__name__)  # the copy's class is new

    def __reduce__(self):
        self._follow_mode()
        rebuild, (body, import_block) = super().__reduce__()
        other = body.pop("_other_graph", None)
        other_code = None
        if other is not None:  # its code may call functions the current graph does not: import them too
            code = other.python_code("self")
            other_code = code.src
            import_block = f"{import_block}\n{_format_import_block(code.globals, sys_importer)}"
        cls = next(c for c in type(self).__mro__ if "GraphModuleImpl" not in c.__qualname__)
        return _rebuild, (cls, type(self).__name__, body, import_block, other_code)


def _source(graph: fx.Graph) -> str:
    return graph.python_code("self").src


def _init_from_copy(module: DualGraphModule, root: nn.Module, graph: fx.Graph, class_name: str) -> None:
    """``copy.deepcopy``'s way into ``__init__``: ``root`` holds a deep copy of the original's attributes, and
    ``class_name`` is the original's (the model's class name, which messages show)."""
    other = root.__dict__.pop("_other_graph", None)
    mode = root.__dict__.pop("_graph_training")
    graphs = {mode: graph, not mode: other if other is not None else graph}
    type(module).__init__(module, root, graphs, class_name, **_arguments(type(module), root))


def _rebuild(cls: type, class_name: str, body: dict, import_block: str, other_code: str | None) -> DualGraphModule:
    """Unpickle: re-create each mode's graph from its code (as ``GraphModule`` does for its one graph)."""
    root = _CodeOnlyModule(dict(body))
    graph = _graph_from_code(root, body, import_block)
    other = graph if other_code is None else _graph_from_code(root, {**body, "_code": other_code}, import_block)
    module = cls.__new__(cls)
    mode = root.__dict__.pop("_graph_training")
    cls.__init__(module, root, {mode: graph, not mode: other}, class_name, **_arguments(cls, root))
    module.meta = dict(body.get("meta", {}))
    return module


def _graph_from_code(root: nn.Module, body: dict, import_block: str) -> fx.Graph:
    """The graph that ``body``'s code traces to, its constants put on ``root`` under names of their own: tracing
    code runs what reads no input (``torch.arange(8)``) and keeps the result as a constant."""
    traced = reduce_graph_module(dict(body), import_block)
    owned = {*body, *body["_modules"], *body["_parameters"], *body["_buffers"]}
    for node in traced.graph.find_nodes(op="get_attr"):
        if node.target.split(".")[0] not in owned:
            name = next(name for i in itertools.count() if (name := f"_code_constant{i}") not in root._buffers)
            root.register_buffer(name, getattr(traced, node.target), persistent=False)
            node.target = name
    return traced.graph


def _arguments(cls: type, root: nn.Module) -> dict[str, Any]:
    """The subclass's extra ``__init__`` arguments, read back from the attributes the original stored them in."""
    return {name: root.__dict__[attribute] for name, attribute in cls._REBUILD_ATTRIBUTES.items()}


def adopt_classes(module: nn.Module, root: nn.Module) -> None:
    """Where ``GraphModule`` made an empty module to hold children on a path, put a stand-in of ``root``'s module
    there (:func:`~fxsplit.tracing.frozen.stand_in`): its class, mode and plain attributes, never called."""
    for path, holder in list(module.named_modules()):
        if not path or type(holder) is not nn.Module:
            continue
        try:
            original = root.get_submodule(path)
        except AttributeError:
            continue
        if type(original) is not nn.Module and not torch_layer(original):
            parent, _, name = path.rpartition(".")
            module.get_submodule(parent)._modules[name] = stand_in(original, holder)


def adopt_layers(module: fx.GraphModule, root: nn.Module, graphs: list[fx.Graph]) -> None:
    """Where ``GraphModule`` made an empty module to hold a tensor that a ``get_attr`` reads, put the module of
    ``root`` that owns it, when that one is a torch.nn layer (a ``Linear``, a ``BatchNorm2d``...): layers keep their
    kind, and the copies a split makes of them are real modules. Buffers stay as persistent as ``root`` has them."""
    for graph in graphs:
        for node in graph.find_nodes(op="get_attr"):
            path, _, name = node.target.rpartition(".")
            try:
                owner = root.get_submodule(path)
            except AttributeError:
                continue
            holder = module.get_submodule(path)
            if holder is owner:
                continue
            if path and torch_layer(owner):
                parent, _, child = path.rpartition(".")
                setattr(module.get_submodule(parent), child, owner)
            elif name in owner._non_persistent_buffers_set:
                holder._non_persistent_buffers_set.add(name)
