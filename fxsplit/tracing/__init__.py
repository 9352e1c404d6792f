"""The trace stage: a model becomes a ``torch.fx`` graph whose nodes carry stable dotted paths.

Every node gets ``node.meta["path"]``: the dotted path of the module whose ``forward`` created it, then the
operation (``"layer1.0.conv1"``, ``"layer1.0.add"``, ``"layer1.0.add_1"``). A traced module shares the model's
parameters and buffers (as ``torch.fx.symbolic_trace`` does): it is a view of the model, never a stale copy.

Two routes lead there (``method``): ``torch.fx`` symbolic tracing (:mod:`.symbolic`), and ``torch.export`` on an
example input (:mod:`.exported`), for models whose Python reads tensor sizes or values. ``"auto"`` takes the first,
and the second when the first fails or, given an example, computes something else than the model. The traced
module records the route taken and why in ``gm.meta["route"]`` and ``gm.meta["route_reason"]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import fx, nn

from ..errors import TraceError, TraceMismatchError
from ..modules import canonical_names, check_names, copy_module
from .dual import DualGraphModule
from .exported import ExportedGraphModule, trace_exported
from .mutations import aliases, follow_mutations, mutated_input, viewed, written_input, written_tensor
from .routes import EXPORT, FX, METHODS, ROUTES, Example, Route, check_method, route_of
from .symbolic import OPTIONS, PathTracer, check_options
from .verify import calling, check_trace, example_call, given_arguments, optional_given

__all__ = ["DualGraphModule", "ExportedGraphModule", "METHODS", "OPTIONS", "PARALLEL_WRAPPERS", "PathTracer",
           "as_example", "check_method", "check_options", "mutated_input", "route_of", "trace", "trace_exported",
           "trace_graph", "trace_modes", "unwrapped", "viewed", "written_input", "written_tensor", "aliases"]



def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
    method: str = "auto",
) -> DualGraphModule:
    """Trace ``model`` in train and in eval mode into one module that runs the graph of its current mode.

    The result shares the model's parameters and buffers (it is a view, as ``torch.fx.symbolic_trace``'s is) and
    never runs the model's Python code again. Without an example nothing checks that the graph computes what the
    model computes; with ``example_inputs`` (a tuple of positional inputs, or one input) and ``example_kwargs``,
    as ``torch.export`` takes them, both modes are run against the model (same random state, buffers put back)
    and a :class:`~fxsplit.TraceMismatchError` names the first output that differs.

    ``method``: ``"fx"`` traces with ``torch.fx``; ``"export"`` with ``torch.export`` on the example (which it
    needs), for Python that reads tensor sizes or values (HuggingFace transformers, shape-dependent branches);
    ``"auto"`` (default) with ``torch.fx``, and with ``torch.export`` when ``torch.fx`` fails or, given an example,
    mis-traces. ``gm.meta["route"]`` and ``gm.meta["route_reason"]`` say which route was taken and why.

    A ``DataParallel`` or ``DistributedDataParallel`` wrapper is read through its ``module`` (with a warning), here
    and in ``layer_graph``, ``analyze`` and ``rewrite``.

    ``tracer_kwargs`` (``torch.fx``'s route; as torchvision's feature extraction takes them): ``leaf_modules``
    (classes, or qualified names of single modules, called whole), ``autowrap_functions`` (called whole) and
    ``concrete_args`` (argument values fixed while tracing). Arguments of ``forward`` whose default is not a
    tensor (``task_name=None``) and that the example does not give are fixed to their defaults. timm's registry of
    untraceable modules and functions is honoured when timm is installed. In-place operations alias their input,
    so later readers of the input are made to read the in-place result: the graph shows the real data flow.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = fxsplit.trace(net, torch.randn(3, 4))
    >>> [n.meta["path"] for n in gm.graph.nodes], gm.meta["route"]
    (['input', '0', '1', '2', 'output'], 'fx')
    >>> gm.get_submodule("0").weight is net[0].weight
    True
    >>> gm = fxsplit.trace(net, torch.randn(3, 4), method="export")
    >>> [n.meta["path"] for n in gm.graph.nodes if n.op == "call_function"]
    ['0.linear', '1.relu', '2.linear']
    """
    model = unwrapped(model)
    _check_module(model)
    return trace_modes(model, tracer_kwargs, method=method, example=as_example(example_inputs, example_kwargs))


PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrapped(model: Any, *, quietly: bool = False) -> Any:
    """The module a ``DataParallel`` or ``DistributedDataParallel`` wrapper holds (with a warning, unless
    ``quietly``), or ``model`` itself: a wrapper's ``forward`` scatters inputs and synchronises gradients, which no
    trace can record, and its parameters and layers are its module's."""
    if not isinstance(model, PARALLEL_WRAPPERS):
        return model
    if not quietly:
        warnings.warn(
            f"{type(model).__name__} wraps the model: fxsplit reads model.module ({type(model.module).__name__}), so "
            f"layer names are its own (without 'module.') and a split is a split of model.module: wrap the split "
            f"again to train it in parallel.", stacklevel=3)
    return model.module


def as_example(example_inputs: Any, example_kwargs: dict[str, Any] | None) -> Example | None:
    """``(args, kwargs)`` of an example call in torch.export's convention, or ``None`` when none is given."""
    if example_inputs is None and not example_kwargs:
        return None
    return example_call(example_inputs, example_kwargs)


def trace_modes(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None = None, given: Iterable[str] | None = None,
                *, private: bool = False, method: str = "auto", example: Example | None = None) -> DualGraphModule:
    """``model`` traced in both modes by ``method`` (checked on ``example``, when given); with ``private``, a
    ``model`` that is already a traced module is a copy nobody else holds, which the result may take over.

    ``given``: the ``forward`` arguments the example gives (by default read from ``example``).
    """
    traced = _traced(model, tracer_kwargs, given, method, example, (True, False), private)
    if not isinstance(model, fx.GraphModule):
        traced.meta["given"] = optional_given(model, *example) if example is not None else {}
    return traced


def trace_graph(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None = None,
                given: Iterable[str] | None = None, *, method: str = "auto",
                example: Example | None = None) -> fx.GraphModule:
    """The graph of ``model`` in its current mode only (one trace), sharing its parameters and buffers: the trace
    stage's one entry point for reading a model. ``method`` and ``example`` (``(args, kwargs)``) as :func:`trace`
    takes them; given an example, the graph is checked against the model on it. ``gm.meta["route"]`` and
    ``gm.meta["route_reason"]`` say which route traced it and why."""
    _check_module(model)
    return _traced(model, tracer_kwargs, given, method, example, (model.training,), private=False)


def _traced(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None, given: Iterable[str] | None, method: str,
            example: Example | None, modes: tuple[bool, ...], private: bool) -> fx.GraphModule:
    """The trace stage's one skeleton: check the options, take a traced module as it is, else trace ``model`` in
    ``modes`` by the route ``method`` picks (a :class:`DualGraphModule` for both modes)."""
    check_method(method)
    options = check_options(tracer_kwargs)
    both = len(modes) == 2
    if isinstance(model, fx.GraphModule):
        return _traced_already(model, options, method, private, both_modes=both)
    _check_module(model)
    check_names(model, DualGraphModule if both else fx.GraphModule, "a traced module")
    given = _given(model, given, example)

    def by(route: Route) -> fx.GraphModule:
        root = _view(model)  # tracing runs Python code that may change a module's attributes: never the model's
        graphs, extras, reads = {}, {}, {}
        for training in modes:
            graphs[training], more, reads[training] = route.graph(root, training, options, given, example)
            extras.update(more)
        traced = route.module(root, graphs, extras, type(model).__name__)
        if both:
            traced.meta["frozen"] = reads
        return traced

    traced = _route(model, method, example, options, modes, by)
    traced.meta["canonical"] = canonical_names(model)
    return traced


def _route(model: nn.Module, method: str, example: Example | None, options: Mapping[str, Any],
           modes: tuple[bool, ...], by: Callable[[Route], fx.GraphModule]) -> fx.GraphModule:
    """The model traced by the route ``method`` picks, checked on ``example`` in ``modes`` when there is one:
    torch.fx first on ``"auto"``, then torch.export on the example when torch.fx fails or mis-traces."""
    if method != "auto" and ROUTES[method].needs_example and example is None:
        raise TraceError(f"method={method!r} traces the model by running it on an example: give one "
                         "(example_inputs=..., example_kwargs=...).")
    if method != "auto" and options and not ROUTES[method].takes_options:
        raise TraceError(f"tracer_kwargs {sorted(options)} are options of the torch.fx route; the torch.export "
                         f"route (method={method!r}) takes none.")
    if method == EXPORT.name:
        return _checked(model, by(EXPORT), EXPORT, f"asked for (method={method!r})", example, modes)
    try:
        traced = by(FX)
    except TraceError as error:
        if method == FX.name:
            raise
        if example is None:
            raise TraceError(f"{error} Or give an example input, and fxsplit tries the torch.export route, which "
                             f"runs the model's Python on it: example_inputs=... (and example_kwargs=...) to trace, "
                             f"layer_graph, rewrite and ConflictMonitor (analyze takes its first batch).") from error
        return _second_route(model, by, error, example, modes, options)
    if example is None:
        return _recorded(traced, FX, "asked for (method='fx'), not checked: no example input" if method == FX.name
                         else "torch.fx traced it; not checked: no example input")
    reason = "asked for (method='fx')" if method == FX.name else "torch.fx traced it, and its graph matches the model"
    try:
        return _checked(model, traced, FX, reason, example, modes)
    except TraceMismatchError as error:
        if method == FX.name:
            raise
        return _second_route(model, by, error, example, modes, options)


def _second_route(model: nn.Module, by: Callable[[Route], fx.GraphModule], error: TraceError, example: Example,
                  modes: tuple[bool, ...], options: Mapping[str, Any]) -> fx.GraphModule:
    """The torch.export route, after torch.fx failed with ``error``."""
    reason = _gist(error) + (f" (tracer_kwargs {sorted(options)}, torch.fx's options, do not apply)" if options
                             else "")
    try:
        traced = by(EXPORT)
    except TraceError as second:
        raise TraceError(f"{error} The torch.export route, tried next on the example, fails too: {second}") \
            from second
    return _checked(model, traced, EXPORT, reason, example, modes)


def _checked(model: nn.Module, traced: fx.GraphModule, route: Route, reason: str, example: Example,
             modes: tuple[bool, ...]) -> fx.GraphModule:
    _recorded(traced, route, reason)
    check_trace(model, traced, calling(*example), modes=modes)
    return traced


def _recorded(traced: fx.GraphModule, route: Route, reason: str) -> fx.GraphModule:
    traced.meta.update(route=route.name, route_reason=reason)
    return traced


def _gist(error: TraceError) -> str:
    """The first part of an error's message: what failed and where, without the advice."""
    return str(error).split(" To fix:")[0].split(" A trace records")[0].strip()


def _traced_already(model: fx.GraphModule, options: Mapping[str, Any], method: str, private: bool,
                    both_modes: bool) -> fx.GraphModule:
    """A model that is already a traced module, with its route: as a :class:`DualGraphModule` for ``both_modes``."""
    if options:
        raise TraceError(f"model is already a GraphModule: tracer options {sorted(options)} apply to the "
                         f"nn.Module it was traced from.")
    route = route_of(model).name
    if method not in ("auto", route):
        raise TraceError(f"model is already a GraphModule traced by the {route} route: method={method!r} applies "
                         f"to the nn.Module it was traced from.")
    traced = model if private else _view(model)
    if both_modes and not isinstance(traced, DualGraphModule):
        if isinstance(traced, ExportedGraphModule):
            raise TraceError("model is a graph traced through torch.export in one mode only: trace the nn.Module "
                             "it came from with fxsplit.trace(model, example, method='export') for both modes.")
        single = DualGraphModule(traced, {True: traced.graph, False: traced.graph}, type(model).__name__)
        single.meta = dict(traced.meta)
        traced = single
    traced.meta.setdefault("canonical", canonical_names(traced))
    traced.meta.setdefault("route", route)
    traced.meta.setdefault("route_reason", "traced before: the model given is a GraphModule")
    return traced


def _given(model: nn.Module, given: Iterable[str] | None, example: Example | None) -> tuple[str, ...]:
    if given is not None:
        return tuple(given)
    return tuple(given_arguments(model, *example)) if example is not None else ()


def _view(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that shares its parameters and buffers: tracing runs Python code that may
    change a module's attributes, and a view never goes stale."""
    view = copy_module(model, share_tensors=True)
    if isinstance(view, fx.GraphModule):
        follow_mutations(view.graph, view)
        view.recompile()
    return view


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxsplit traces an nn.Module, got {type(model).__name__}.")
