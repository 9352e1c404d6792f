"""Trace a model into a ``torch.fx.GraphModule`` whose nodes carry stable dotted paths.

Every node gets ``node.meta["path"]``: the dotted path of the module whose ``forward`` created it, then the
operation (``"layer1.0.conv1"``, ``"layer1.0.add"``, ``"layer1.0.add_1"``); the generated code uses the same
names with dots turned into underscores. Modules that ``torch.fx`` cannot trace through are called as leaves:
timm's registry of non-traceable modules and functions (when timm is installed) plus the user's own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import fx, nn

from ..errors import PythonStateWarning, TraceError, user_line
from ..modules import saved_buffers, saved_modes
from ..rules import untraceable
from .autograd import check_backward_hooks, recording_autograd
from .dual import DualGraphModule
from .frozen import Read, recording_reads
from .modes import recording_modes
from .mutations import follow_mutations

OPTIONS = ("leaf_modules", "autowrap_functions", "concrete_args")


class PathTracer(fx.Tracer):
    """A tracer that names each node after its dotted module path and honours leaf modules.

    ``leaf_modules`` holds module classes (every instance is a leaf) or qualified names (that one module is).
    Buffers are read as graph values (``get_attr``), so that what ``forward`` does to them is recorded, not done;
    their sizes, dtype and device stay Python values, as they were when buffers were read as tensors.
    """

    proxy_buffer_attributes = True

    def __init__(self, leaf_modules: Iterable[type | str] = (), autowrap_functions: Iterable[Callable] = (),
                 bound: Iterable[str] = ()):
        notrace_modules, notrace_functions = untraceable()
        leaf_modules = tuple(leaf_modules)
        super().__init__(
            autowrap_modules=(math,),
            autowrap_functions=notrace_functions + tuple(autowrap_functions),
        )
        self.leaf_types = notrace_modules + tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
        self.failed_in: str | None = None
        self._bound = {f"{name}_1": name for name in bound}  # torch.fx names a bound argument's placeholder x_1
        self._uses: dict[str, int] = {}

    def trace(self, root: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self._buffers = dict(root.named_buffers())
        check_backward_hooks(root, "")
        with recording_modes(self), recording_autograd(self), self._through_call_overrides(root):
            return super().trace(root, concrete_args)

    @contextlib.contextmanager
    def _through_call_overrides(self, root: nn.Module) -> Iterator[None]:
        """While tracing, the submodules whose class overrides ``nn.Module.__call__`` (PyTorch Geometric's
        ``Aggregation``) are called through :meth:`_call_overriding`: that code runs before ``nn.Module.__call__``,
        where torch.fx would see the call."""
        classes = {type(m) for m in root.modules() if m is not root and type(m).__call__ is not nn.Module.__call__}
        saved = {cls: cls.__dict__.get("__call__") for cls in classes}
        for cls in classes:
            original = cls.__call__
            cls.__call__ = functools.wraps(original)(
                lambda module, *args, _original=original, **kwargs: self._call_overriding(module, _original, args,
                                                                                          kwargs))
        try:
            yield
        finally:
            for cls, own in saved.items():
                if own is None:
                    del cls.__call__
                else:
                    cls.__call__ = own

    def _call_overriding(self, module: nn.Module, original: Callable, args: tuple, kwargs: dict) -> Any:
        """A leaf is called whole, its override included (it runs when the graph runs); the others run their
        override, which a failure inside is laid to."""
        path = self.path_of_module(module)
        if self.is_leaf_module(module, path):
            return self.call_module(module, module.forward, args, kwargs)
        try:
            return original(module, *args, **kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = path
            raise

    def proxy(self, node: fx.Node) -> fx.Proxy:
        if node.op == "get_attr" and node.target in self._buffers:
            return _BufferProxy(node, self, self._buffers[node.target])
        return super().proxy(node)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, self.leaf_types)
            or module_qualified_name in self.leaf_names
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(self, m: nn.Module, forward: Callable, args: Any, kwargs: Any) -> Any:
        path = self.path_of_module(m)
        if not self.is_leaf_module(m, path):
            check_backward_hooks(m, path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module, as the exception unwinds
                self.failed_in = self.path_of_module(m)
            raise

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        bound = kind == "placeholder" and target in self._bound
        if bound:  # keep the argument's own name, so that forward(x, task_name=None) still takes task_name
            target = name = self._bound[target]
        path = self._path(kind, target)
        if kind != "placeholder":  # placeholders keep the argument names of forward()
            name = path.replace(".", "_")
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta["path"] = path
        if bound:
            node.meta["bound"] = True
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


class _BufferProxy(fx.Proxy):
    """A buffer read in a trace: a graph value whose metadata (sizes, dtype, device) are the buffer's own, since
    Python code branches on them (``assert self.periods.numel() == dim``)."""

    _METADATA = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda", "requires_grad", "size", "dim",
                           "numel", "nelement", "is_floating_point", "is_complex", "element_size", "get_device"})

    def __init__(self, node: fx.Node, tracer: fx.Tracer, tensor: torch.Tensor):
        super().__init__(node, tracer)
        self._tensor = tensor

    def __getattr__(self, name: str) -> Any:
        if name in _BufferProxy._METADATA:
            return getattr(self._tensor, name)
        return super().__getattr__(name)


def check_options(tracer_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``tracer_kwargs`` as a dict, after checking that fxsplit's tracer knows every option."""
    if tracer_kwargs is None:
        return {}
    if not isinstance(tracer_kwargs, Mapping):
        raise TraceError(f"tracer_kwargs must be a dict of tracer options {OPTIONS}, got "
                         f"{type(tracer_kwargs).__name__}.")
    unknown = sorted(set(tracer_kwargs) - set(OPTIONS))
    if unknown:
        raise TraceError(f"tracer_kwargs has unknown option(s) {unknown}; fxsplit's tracer takes {list(OPTIONS)}.")
    return dict(tracer_kwargs)


def symbolic_graph(root: nn.Module, training: bool, options: Mapping[str, Any], given: Iterable[str] = ()
                   ) -> tuple[fx.Graph, list[Read]]:
    """The graph of ``root`` (a private copy: tracing runs its Python code) in train or eval mode, and the plain
    attributes its Python read (:mod:`.frozen`).

    Arguments of ``forward`` with a default that is not a tensor (``task_name=None``, ``flag=False``), unless the
    caller gives them (``given``) or ``concrete_args`` does, are bound to their defaults: a trace cannot stand for
    ``None`` or a Python value with a tensor, and torch.fx guards the bound value at run time.
    """
    concrete = {**_bound_defaults(root, given), **(options.get("concrete_args") or {})}
    restore_modes = saved_modes(root)
    if training != root.training:
        root.train(training)
    tracer = PathTracer(options.get("leaf_modules", ()), options.get("autowrap_functions", ()), bound=concrete)
    effects = _ForwardEffects(root)
    try:
        with recording_reads(root) as reads:
            graph = tracer.trace(root, concrete or None)
    except Exception as error:
        raise _trace_error(root, tracer, error, concrete) from error
    finally:
        rebound = effects.undo()
        restore_modes()  # modules that tracing added take the model's
    if effects.stored:
        warnings.warn(
            f"{type(root).__name__}.forward adds the tensors it computes to Python state "
            f"({', '.join(effects.stored)}: a list, dict or set). A graph records tensor operations only, so a "
            f"trace or a split computes the same outputs but never adds to it: harmless for a cache, wrong if your "
            f"training code reads it (deep-supervision features). Return those tensors from forward instead.",
            PythonStateWarning, stacklevel=2)
    _write_back(graph, rebound)
    follow_mutations(graph, root)
    return graph, reads


def symbolic_module(root: nn.Module, graphs: Mapping[bool, fx.Graph], extras: Mapping[str, Any], class_name: str
                    ) -> fx.GraphModule:
    """The module of the graphs traced from ``root``: both modes in a :class:`~.dual.DualGraphModule`, one in a
    plain ``GraphModule``; it holds the modules and tensors its graphs call and read (the route reads nothing
    else: ``extras`` is empty)."""
    if len(graphs) == 2:
        return DualGraphModule(root, graphs, class_name)
    (graph,) = graphs.values()
    return fx.GraphModule(root, graph, class_name)


class _ForwardEffects:
    """What running ``forward`` on stand-ins may do to a module tree, so that it can be undone: buffers rebound
    to a traced value (``self.steps += 1``), attributes set to one (``self.cache = h``), lists and dicts added to
    (``self.features.append(h)``), tensors written in place through a plain attribute. The tree's tensors are
    often the user's model's own."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.attributes = {module: dict(vars(module)) for module in root.modules()}
        self.buffers = {module: dict(module._buffers) for module in root.modules()}
        self.containers = {(module, name): copy.copy(value) for module in root.modules()  # submodules stay: the
                           for name, value in vars(module).items()  # calls that tracing records are modules
                           if type(value) in (list, dict, set) and name != "_modules"}
        self.restore_buffers = saved_buffers(root.buffers())
        self.stored: list[str] = []  # attributes forward added traced values to

    def undo(self) -> dict[str, fx.Node]:
        """Put everything back; return buffer path -> the traced value ``forward`` rebound it to."""
        rebound = {}
        for path, module in self.root.named_modules():
            if module not in self.buffers:
                continue
            for name, value in list(module._buffers.items()):
                if isinstance(value, fx.Proxy):
                    rebound[f"{path}.{name}" if path else name] = value.node
            module._buffers.clear()
            module._buffers.update(self.buffers[module])
            for name, value in list(vars(module).items()):
                if isinstance(value, fx.Proxy):
                    if name in self.attributes[module]:
                        setattr(module, name, self.attributes[module][name])
                    else:
                        delattr(module, name)
                elif (module, name) in self.containers:
                    self._restore(f"{path}.{name}" if path else name, value, self.containers[module, name])
        self.restore_buffers()
        return rebound

    def _restore(self, path: str, container: list | dict | set, saved: list | dict | set) -> None:
        items = container.values() if isinstance(container, dict) else container
        if any(isinstance(item, fx.Proxy) for item in items):
            self.stored.append(path)
        if isinstance(container, list):
            container[:] = saved
        else:
            container.clear()
            container.update(saved)


def _write_back(graph: fx.Graph, rebound: Mapping[str, fx.Node]) -> None:
    """After every other node, copy the value ``forward`` rebound each buffer to into the buffer."""
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    with graph.inserting_before(output):
        for path, value in rebound.items():
            buffer = graph.get_attr(path)
            buffer.meta["path"] = path
            write = graph.call_method("copy_", (buffer, value))
            write.meta["path"] = f"{path}.copy"


def _bound_defaults(root: nn.Module, given: Iterable[str]) -> dict[str, Any]:
    given = set(given)
    bound = {}
    for name, parameter in inspect.signature(root.forward).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD) or name in given:
            continue
        if parameter.default is not parameter.empty and not isinstance(parameter.default, torch.Tensor):
            bound[name] = parameter.default
    return bound


def _trace_error(root: nn.Module, tracer: PathTracer, error: Exception, bound: Mapping[str, Any]) -> TraceError:
    """A :class:`TraceError` that names the module and the source line, with a fix that applies there."""
    where = tracer.failed_in
    module = root.get_submodule(where) if where else root
    line = user_line(error)
    name = type(module).__name__
    if where:
        override = (f" (its class overrides nn.Module.__call__, whose code runs before torch.fx sees the call: as a "
                    f"leaf, {name} is called whole, that code included, when the graph runs)"
                    if type(module).__call__ is not nn.Module.__call__ else "")
        fix = (f"make it a leaf, called whole (its parameters then form one layer){override}: "
               f"tracer_kwargs={{'leaf_modules': [{name}]}} (or ['{where}']).")
    else:
        arguments = [a for a in inspect.signature(root.forward).parameters if a not in bound]
        fix = ("the failing code is the model's own forward(). If it branches on a tensor's values, move that "
               "code into a submodule and make the submodule a leaf (tracer_kwargs={'leaf_modules': [...]}), or "
               "into a function given to tracer_kwargs={'autowrap_functions': [...]}; if it branches on a Python "
               f"argument of forward() ({', '.join(arguments)}), fix its value with "
               "tracer_kwargs={'concrete_args': {name: value}}.")
    return TraceError(
        f"torch.fx cannot trace {'module ' + repr(where) if where else 'the model'} ({name}): "
        f"{type(error).__name__}: {error}{' at ' + line if line else ''}. To fix: {fix}"
    )
