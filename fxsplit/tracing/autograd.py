"""What autograd does beyond the operations a trace records: backward passes of custom ``torch.autograd.Function``
classes, gradient hooks registered in ``forward``, and backward hooks on modules.

``torch.fx`` runs a Function's ``forward`` on stand-ins and records its operations, so the Function's own
``backward`` (a gradient reversal, a straight-through estimator) would be lost; ``h.register_hook(fn)`` cannot be
recorded at all. While tracing, both become calls of small modules that do them at run time
(:class:`FunctionCall`, :class:`GradientHook`), placed next to the module whose code made the call
(``trunk.ReverseGradient``). A backward hook on a module that tracing goes through (one that is not a leaf) fires
on no recorded operation: it is refused, with the fix (make the module a leaf, called whole with its hooks).

``torch.export`` loses all three: :func:`watching_export` names what a model does of them, so that the route can
refuse it rather than give a graph with other gradients.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules import module as _modules
from torch.utils._pytree import tree_leaves

from ..errors import TraceError

_APPLY = torch._C._FunctionBase.__dict__["apply"]  # the classmethod every Function inherits
_TORCH_DIR = os.path.dirname(torch.__file__)


class FunctionCall(nn.Module):
    """Calls a custom ``torch.autograd.Function`` whole, so that its ``backward`` is the Function's own."""

    def __init__(self, function: type[torch.autograd.Function]):
        super().__init__()
        self.function = function

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function.apply(*args, **kwargs)


class GradientHook(nn.Module):
    """``tensor.register_hook(hook)`` as ``forward`` called it: on a tensor that needs a gradient (where none is
    needed, under ``no_grad``, the model's own call would fail; the graph registers nothing)."""

    _is_impure = True  # it has no users: passes that drop unused nodes must keep it

    def __init__(self, hook: Callable[[torch.Tensor], torch.Tensor | None]):
        super().__init__()
        self.hook = hook

    def forward(self, tensor: torch.Tensor) -> None:
        if tensor.requires_grad:
            tensor.register_hook(self.hook)


@contextlib.contextmanager
def recording_autograd(tracer: fx.Tracer) -> Iterator[None]:
    """Within the block, Function calls on traced values and ``register_hook`` on them become module calls in
    ``tracer``'s graph."""

    def apply(cls, *args, **kwargs):
        if not any(isinstance(value, fx.Proxy) for value in tree_leaves((args, kwargs))):
            return _APPLY.__get__(None, cls)(*args, **kwargs)
        path = _holder(tracer, cls.__name__, lambda held: isinstance(held, FunctionCall) and held.function is cls,
                       lambda: FunctionCall(cls))
        return tracer.create_proxy("call_module", path, args, kwargs)

    def register_hook(proxy: fx.Proxy, hook: Callable) -> None:
        captured = [value for value in _captured(hook) if isinstance(value, fx.Proxy)]
        if captured:
            raise TraceError(
                f"forward registers a gradient hook ({_name(hook)}) that reads values computed in forward "
                f"({', '.join(str(value) for value in captured)}), which a graph cannot hand to a hook. Compute "
                f"them in the hook from its gradient, or make the module a leaf (tracer_kwargs={{'leaf_modules': "
                f"[...]}}).")
        path = _holder(tracer, "gradient_hook", lambda held: False, lambda: GradientHook(hook))
        tracer.create_proxy("call_module", path, (proxy,), {})

    saved = torch.autograd.Function.__dict__["apply"]
    torch.autograd.Function.apply = classmethod(apply)
    fx.Proxy.register_hook = register_hook
    try:
        yield
    finally:
        torch.autograd.Function.apply = saved
        del fx.Proxy.register_hook


def check_backward_hooks(module: nn.Module, path: str) -> None:
    """Refuse a module that tracing goes through but that has backward hooks: no recorded operation fires them."""
    hooks = [("backward hook", hook) for hook in module._backward_hooks.values()] + \
        [("backward pre-hook", hook) for hook in module._backward_pre_hooks.values()] + \
        [("global backward hook", hook) for hook in (*_modules._global_backward_hooks.values(),
                                                     *_modules._global_backward_pre_hooks.values())]
    if not hooks:
        return
    kind, hook = hooks[0]
    fix = (f"Make it a leaf, called whole with its hooks: tracer_kwargs={{'leaf_modules': [{path!r}]}} (its "
           f"parameters then form one layer); or remove the hook." if path else
           "Remove the hook from the model (and register it on the traced or split module, whose call fires it).")
    raise TraceError(
        f"{'module ' + repr(path) if path else 'the model'} ({type(module).__name__}) has a {kind} ({_name(hook)}), "
        f"which fires on the module's own call; a trace goes through the module and records the operations inside, "
        f"which fire no module hook. {fix}")


@contextlib.contextmanager
def watching_export(root: nn.Module) -> Iterator[list[str]]:
    """Within the block (a ``torch.export`` run of ``root``), what the model does that torch.export's graph loses:
    a list, filled as it runs, of descriptions (``"the custom autograd Function ReverseGradient at file:line"``)."""
    seen: list[str] = []
    for path, module in root.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            seen.append(f"a backward hook on module {path!r} ({type(module).__name__})")

    def apply(cls, *args, **kwargs):
        seen.append(f"the custom autograd Function {cls.__name__}{_at()}")
        return _APPLY.__get__(None, cls)(*args, **kwargs)

    def register_hook(tensor: torch.Tensor, hook: Callable):
        seen.append(f"a gradient hook that forward registers (tensor.register_hook: {_name(hook)}){_at()}")
        return original_hook(tensor, hook)

    saved, original_hook = torch.autograd.Function.__dict__["apply"], torch.Tensor.register_hook
    torch.autograd.Function.apply = classmethod(apply)
    torch.Tensor.register_hook = register_hook
    try:
        yield seen
    finally:
        torch.autograd.Function.apply = saved
        torch.Tensor.register_hook = original_hook


def _holder(tracer: fx.Tracer, name: str, fits: Callable[[nn.Module], bool], make: Callable[[], nn.Module]) -> str:
    """The path of a module that does what ``make`` makes, placed in the module whose code is being traced (one
    that ``fits`` is taken again): ``trunk.ReverseGradient``, ``trunk.gradient_hook_1``."""
    scope = tracer.scope.module_path
    owner = tracer.root.get_submodule(scope)
    for i in range(len(owner._modules) + 1):
        candidate = f"{name}_{i}" if i else name
        held = getattr(owner, candidate, None)
        if held is None:
            owner.add_module(candidate, make())
            break
        if fits(held):
            break
    return f"{scope}.{candidate}" if scope else candidate


def _captured(function: Callable) -> list[Any]:
    cells = [cell.cell_contents for cell in getattr(function, "__closure__", None) or () if _filled(cell)]
    return [*cells, *(getattr(function, "__defaults__", None) or ()), *getattr(function, "args", ())]


def _filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


def _name(function: Callable) -> str:
    code = getattr(function, "__code__", None)
    where = f" at {code.co_filename}:{code.co_firstlineno}" if code is not None else ""
    return f"{getattr(function, '__qualname__', type(function).__name__)}{where}"


def _at() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if not f.filename.startswith(_TORCH_DIR)
              and os.path.dirname(f.filename) != os.path.dirname(__file__)]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
