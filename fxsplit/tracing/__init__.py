"""The trace stage: a model becomes a ``torch.fx`` graph whose nodes carry stable dotted paths.

Every node gets ``node.meta["path"]``: the dotted path of the module whose ``forward`` created it, then the
operation (``"layer1.0.conv1"``, ``"layer1.0.add"``, ``"layer1.0.add_1"``). A traced module shares the model's
parameters and buffers (as ``torch.fx.symbolic_trace`` does): it is a view of the model, never a stale copy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from ..errors import TraceError
from .dual import DualGraphModule
from .exported import ExportedGraphModule, trace_exported, trace_exported_for_reading
from .mutations import follow_mutations, mutated_input
from .symbolic import (
    OPTIONS, PathTracer, canonical_names, check_names, check_options, copy_module, symbolic_graph,
)
from .verify import calling, check_trace, example_call, given_arguments

__all__ = ["DualGraphModule", "ExportedGraphModule", "OPTIONS", "PathTracer", "mutated_input", "trace",
           "trace_exported", "trace_exported_for_reading", "trace_graph", "trace_modes"]


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    tracer_kwargs: Mapping[str, Any] | None = None,
) -> DualGraphModule:
    """Trace ``model`` in train and in eval mode into one module that runs the graph of its current mode.

    The result shares the model's parameters and buffers (it is a view, as ``torch.fx.symbolic_trace``'s is) and
    never runs the model's Python code again. Without an example nothing checks that the graph computes what the
    model computes; with ``example_inputs`` (a tuple of positional inputs, or one input) and ``example_kwargs``,
    as ``torch.export`` takes them, both modes are run against the model (same random state, buffers put back)
    and a :class:`~fxsplit.TraceMismatchError` names the first output that differs.

    ``tracer_kwargs`` (as torchvision's feature extraction takes them): ``leaf_modules`` (classes, or qualified
    names of single modules, called whole), ``autowrap_functions`` (called whole) and ``concrete_args`` (argument
    values fixed while tracing). Arguments of ``forward`` whose default is not a tensor (``task_name=None``) and
    that the example does not give are fixed to their defaults. timm's registry of untraceable modules and
    functions is honoured when timm is installed. In-place operations alias their input, so later readers of the
    input are made to read the in-place result: the graph shows the real data flow.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = fxsplit.trace(net, torch.randn(3, 4))
    >>> [n.meta["path"] for n in gm.graph.nodes]
    ['input', '0', '1', '2', 'output']
    >>> gm.get_submodule("0").weight is net[0].weight
    True
    """
    _check_module(model)
    args, kwargs = example_call(example_inputs, example_kwargs)
    given = () if isinstance(model, fx.GraphModule) else given_arguments(model, args, kwargs)
    traced = trace_modes(model, tracer_kwargs, given)
    if example_inputs is not None or example_kwargs:
        check_trace(model, traced, calling(args, kwargs), modes=(True, False))
    return traced


def trace_modes(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None = None, given: tuple[str, ...] = (), *,
                private: bool = False) -> DualGraphModule:
    """``model`` traced in both modes; with ``private``, ``model`` is a copy nobody else holds, and the traced
    module takes its modules over instead of a view of them."""
    options = check_options(tracer_kwargs)
    if isinstance(model, fx.GraphModule):
        if options:
            raise TraceError(f"model is already a GraphModule: tracer options {sorted(options)} apply to the "
                             f"nn.Module it was traced from.")
        traced = model if private else _view(model)
        if isinstance(traced, DualGraphModule):
            return traced
        single = DualGraphModule(traced, {True: traced.graph, False: traced.graph}, type(model).__name__)
        single.meta = {**traced.meta, "canonical": canonical_names(traced)}
        return single
    _check_module(model)
    check_names(model, DualGraphModule, "a traced module")
    root = model if private else _view(model)
    graphs = {training: symbolic_graph(root, training, options, given) for training in (True, False)}
    traced = DualGraphModule(root, graphs, type(model).__name__)
    traced.meta["canonical"] = canonical_names(root)
    return traced


def trace_graph(model: nn.Module, tracer_kwargs: Mapping[str, Any] | None = None,
                given: tuple[str, ...] = ()) -> fx.GraphModule:
    """The graph of ``model`` in its current mode only (one trace), sharing its parameters and buffers."""
    if isinstance(model, fx.GraphModule):
        return trace_modes(model, tracer_kwargs)
    options = check_options(tracer_kwargs)
    _check_module(model)
    check_names(model, fx.GraphModule, "a traced module")
    root = _view(model)
    traced = fx.GraphModule(root, symbolic_graph(root, model.training, options, given), type(model).__name__)
    traced.meta["canonical"] = canonical_names(root)
    return traced


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
