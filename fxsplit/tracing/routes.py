"""The tracing routes behind one contract: what a route needs, what its graphs can do, and how it traces a mode.

A route turns a model into one ``torch.fx`` graph per train/eval mode whose nodes carry ``node.meta["path"]``, the
dotted path of the module whose ``forward`` made the node and the operation, numbered when repeated
(``"layer1.0.add_1"``): the torch.fx route names them as its tracer enters modules (:class:`.symbolic.PathTracer`),
the torch.export route from each node's module stack (:mod:`.exported`). Both read parameters and buffers by their
qualified names in the model. The rest of fxsplit reads what differs between routes from the route's fields, never
from its name. A third route is a new :class:`Route` in a file of its own and one entry in :data:`ROUTES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from ..errors import TraceError
from .exported import exported_graph, exported_module
from .frozen import Read
from .symbolic import symbolic_graph, symbolic_module

Example = tuple[tuple, dict]  # (args, kwargs) of one call of the model
Graphs = tuple[fx.Graph, dict[str, Any], list[Read]]  # a mode's graph, what it reads besides the model, reads
Tracer = Callable[[nn.Module, bool, Mapping[str, Any], tuple[str, ...], "Example | None"], Graphs]
Assembler = Callable[[nn.Module, Mapping[bool, fx.Graph], Mapping[str, Any], str], fx.GraphModule]


@dataclass(frozen=True)
class Route:
    """One way to trace a model.

    ``needs_example``: it runs the model on an example call to trace it. ``takes_options``: ``tracer_kwargs``
    apply. ``calls_modules``: its graphs call torch.nn layers as modules, which rewrite may batch across branches
    (the other kind applies ATen operations, with the batch size read once from the input). ``scriptable``:
    TorchScript compiles its graphs. ``modes_per_module``: a graph calls modules that keep a mode of their own
    (the other kind fixes every module's mode in the graph). ``graph(root, training, options, given, example)``
    traces ``root`` (a copy that shares the model's tensors, which tracing may change) in one mode;
    ``module(root, graphs, extras, class_name)`` makes the traced module of one graph per mode traced (a
    :class:`~fxsplit.tracing.DualGraphModule` for both). ``causes`` says what makes a graph of this route differ
    from the model.
    """

    name: str
    needs_example: bool
    takes_options: bool
    calls_modules: bool
    scriptable: bool
    modes_per_module: bool
    graph: Tracer
    module: Assembler
    causes: str


def _by_fx(root: nn.Module, training: bool, options: Mapping[str, Any], given: tuple[str, ...],
           example: Example | None) -> Graphs:
    graph, reads = symbolic_graph(root, training, options, given)
    return graph, {}, reads


def _by_export(root: nn.Module, training: bool, options: Mapping[str, Any], given: tuple[str, ...],
               example: Example | None) -> Graphs:
    return exported_graph(root, *example, training)


FX = Route(
    "fx", needs_example=False, takes_options=True, calls_modules=True, scriptable=True, modes_per_module=True,
    graph=_by_fx, module=symbolic_module, causes=(
        "A trace records one run of the Python code with stand-ins for tensors, so it differs from the model where "
        "that code does what a graph cannot record: isinstance(x, torch.Tensor) checks (a stand-in is no Tensor), "
        "branches on Python state or on a tensor's values (frozen as they went while tracing), Python-side "
        "randomness, an autowrapped function or leaf module that drops an input, or a buffer written through "
        "another attribute than its own. Make the module that holds such code a leaf "
        "(tracer_kwargs={'leaf_modules': [...]}), or fix the Python value it reads with concrete_args."))
EXPORT = Route(
    "export", needs_example=True, takes_options=False, calls_modules=False, scriptable=False, modes_per_module=False,
    graph=_by_export, module=exported_module, causes=(
        "torch.export records one run of the Python code on the example, so the graph differs from the model where "
        "that code does what a graph cannot record: Python-side randomness, or Python state that changes between "
        "calls (a counter, a cache, a module attribute set after tracing). Make the model compute it from tensors."))
ROUTES = {route.name: route for route in (FX, EXPORT)}
METHODS = ("auto", *ROUTES)


def check_method(method: Any) -> str:
    """``method`` if it names a route or ``"auto"``, else a :class:`~fxsplit.TraceError` (before any work)."""
    if method not in METHODS:
        raise TraceError(f"method must be one of {list(METHODS)}, got {method!r}.")
    return method


def route_of(traced: Any) -> Route:
    """The route that traced ``traced`` (a graph module fxsplit made; a plain ``GraphModule`` is torch.fx's)."""
    return ROUTES[getattr(traced, "meta", {}).get("route", FX.name)]
