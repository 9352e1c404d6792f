"""Trace a model into a ``torch.fx.GraphModule`` whose nodes carry stable dotted paths.

Every node gets ``node.meta["path"]``: the dotted path of the module whose ``forward`` created it, then the
operation (``"layer1.0.conv1"``, ``"layer1.0.add"``, ``"layer1.0.add_1"``); the generated code uses the same
names with dots turned into underscores. Modules that ``torch.fx`` cannot trace through are called as leaves:
timm's registry of non-traceable modules and functions (when timm is installed) plus the user's own.
"""

from __future__ import annotations

import copy
import math
import os
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import fx, nn

from ..errors import TraceError
from .mutations import follow_mutations

_TORCH_DIR = os.path.dirname(torch.__file__)


def _registry() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's non-traceable modules and functions, or nothing when timm is not installed."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))


class PathTracer(fx.Tracer):
    """A tracer that names each node after its dotted module path and honours leaf modules.

    ``leaf_modules`` holds module classes (every instance is a leaf) or qualified names (that one module is).
    """

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable[Callable] = ()):
        notrace_modules, notrace_functions = _registry()
        leaf_modules = tuple(leaf_modules)
        super().__init__(
            autowrap_modules=(math,),
            autowrap_functions=notrace_functions + tuple(autowrap_functions),
        )
        self.leaf_types = notrace_modules + tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.failed_in: str | None = None
        self._uses: dict[str, int] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module, as the exception unwinds
                self.failed_in = self.path_of_module(m)
            raise

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        path = self._path(kind, target)
        if kind != "placeholder":  # placeholders keep the argument names of forward()
            name = path.replace(".", "_")
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["path"] = path
        return node

    def _path(self, kind: str, target: Any) -> str:
        if kind in ("call_module", "get_attr"):
            return target
        if kind == "placeholder":
            return target
        if kind == "output":
            return "output"
        op = target if isinstance(target, str) else getattr(target, "__name__", "op")
        scope = self.scope.module_path
        path = f"{scope}.{op.strip('_')}" if scope else op.strip("_")
        uses = self._uses.get(path, 0)
        self._uses[path] = uses + 1
        return f"{path}_{uses}" if uses else path


def trace(
    model: nn.Module,
    *,
    leaf_modules: Iterable[type | str] = (),
    autowrap_functions: Iterable[Callable] = (),
    concrete_args: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace a deep copy of ``model`` (the model itself is never touched) in its current train/eval mode.

    Python code that reads ``self.training`` is fixed at trace time, so the graph is the one of the model's
    current mode; a warning says so when the other mode would trace differently (trace again after
    ``model.train()`` / ``model.eval()`` to get that one). Leaf modules (classes or qualified names) are kept
    as single calls, ``autowrap_functions`` as single function calls, ``concrete_args`` fixes inputs. An
    in-place operation's result aliases its input, so later readers of the input are made to read the result:
    the graph then shows the real data flow. A ``GraphModule`` is copied, not traced again.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = fxsplit.trace(net)
    >>> [n.meta["path"] for n in gm.graph.nodes]
    ['input', '0', '1', '2', 'output']
    """
    return _trace(model, tuple(leaf_modules), tuple(autowrap_functions), concrete_args, share_tensors=False)


def trace_for_reading(model: nn.Module) -> fx.GraphModule:
    """Like :func:`trace`, but the graph module shares the model's parameters and buffers: only to be read."""
    return _trace(model, (), (), None, share_tensors=True)


def _trace(model, leaf_modules, autowrap_functions, concrete_args, share_tensors: bool) -> fx.GraphModule:
    if isinstance(model, fx.GraphModule):
        return follow_mutations(_copy(model, share_tensors))
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxsplit traces an nn.Module, got {type(model).__name__}.")
    kwargs = dict(leaf_modules=leaf_modules, autowrap_functions=autowrap_functions)
    traced = _trace_copy(model, model.training, kwargs, concrete_args, share_tensors)
    other = _trace_copy(model, not model.training, kwargs, concrete_args, share_tensors=True)
    if other.code != traced.code:
        mode, other_mode = ("train", "eval") if model.training else ("eval", "train")
        warnings.warn(
            f"{type(model).__name__} traces to a different graph in {other_mode} mode (its Python code reads "
            f"self.training); the graph of {mode} mode was kept. Trace again after model.{other_mode}() "
            f"to get the other one.",
            stacklevel=3,
        )
    return traced


def _copy(model: nn.Module, share_tensors: bool) -> nn.Module:
    """A deep copy of ``model``; with ``share_tensors`` its parameters and buffers stay the model's own
    (tracing writes none of them, and copying the weights of a large model costs more than tracing it)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_tensors else {}
    return copy.deepcopy(model, memo)


def _trace_copy(model: nn.Module, training: bool, tracer_kwargs: dict, concrete_args, share_tensors: bool):
    root = _copy(model, share_tensors).train(training)
    tracer = PathTracer(**tracer_kwargs)
    try:
        graph = tracer.trace(root, concrete_args)
    except Exception as error:
        raise _trace_error(root, tracer, error) from error
    return follow_mutations(fx.GraphModule(tracer.root, graph, type(model).__name__))


def _trace_error(root: nn.Module, tracer: PathTracer, error: Exception) -> TraceError:
    """A :class:`TraceError` that names the module, the source line and the leaf to register."""
    where = tracer.failed_in
    module = root.get_submodule(where) if where else root
    line = _user_line(error)
    name = type(module).__name__
    fix = (
        f"register it as a leaf: fxsplit.trace(model, leaf_modules=[{name}]) (or leaf_modules=['{where}']), "
        f"then pass the traced GraphModule to fxsplit."
        if where
        else "the failing code is the model's own forward(); pass concrete_args= for arguments that steer "
        "Python control flow, or wrap the offending function with autowrap_functions=."
    )
    return TraceError(
        f"torch.fx cannot trace {'module ' + repr(where) if where else 'the model'} ({name}): "
        f"{type(error).__name__}: {error}{' at ' + line if line else ''}. To fix: {fix}"
    )


def _user_line(error: Exception) -> str:
    """``file:line: code`` of the innermost frame outside torch that raised ``error``."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(_TORCH_DIR)]
    frames = [f for f in frames if os.path.abspath(f.filename) != os.path.abspath(__file__)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"

