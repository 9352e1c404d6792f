"""One home for fxsplit's rules about modules and operations, each with a ``register_*`` extension point.

A model with layers of its own tells fxsplit about them here, once, before tracing or rewriting:

- :func:`register_norm`: a layer with running statistics (BatchNorm-like). A shared one runs and updates its
  statistics once per branch, as the model would once per call, and is never batched across branches.
- :func:`register_batched`: a layer that computes every sample alone and is worth batching: the branches'
  inputs are concatenated and it runs once (convolutions and linear layers are).
- :func:`register_per_sample`: a cheap layer that computes every sample alone (activations, pooling,
  LayerNorm): it joins a batched stream that is at hand, never starts one.
- :func:`register_dropout`: a module class that drops at random, and the attribute that holds its probability
  (set to 0 while a split is checked in train mode); :func:`register_dropping_operation` the same for an ATen
  operation on the torch.export route.
- :func:`register_in_place`: a Python function that writes into its first argument (beyond torch's ``add_``-style
  methods and ``operator.iadd``-style functions, which are known).
- :func:`register_untraceable`: a module class torch.fx must call whole, or a function it must not trace into
  (timm's own registry of such is read when timm is installed).

>>> import torch, fxsplit
>>> class MyNorm(torch.nn.BatchNorm1d):
...     pass
>>> fxsplit.rules.has_running_statistics(MyNorm(4))  # a subclass of a registered class is covered
True
>>> class Scale(torch.nn.Module):
...     def forward(self, x):
...         return 2 * x
>>> fxsplit.rules.per_sample(Scale())
False
>>> _ = fxsplit.rules.register_per_sample(Scale)
>>> fxsplit.rules.per_sample(Scale())
True
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from .errors import FxsplitError

_aten = torch.ops.aten


class ModuleKinds:
    """The module classes a rule covers (subclasses included); :meth:`register` adds one."""

    def __init__(self, what: str, *classes: type):
        self.what, self.classes = what, tuple(classes)

    def register(self, cls: type) -> type:
        """Cover ``cls`` (an ``nn.Module`` subclass) from now on; returns it, so that it serves as a decorator."""
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise FxsplitError(f"registering {self.what} takes an nn.Module subclass, got {cls!r}.")
        if cls not in self.classes:
            self.classes += (cls,)
        return cls

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.classes)


has_running_statistics = ModuleKinds("a norm with running statistics", nn.modules.batchnorm._NormBase)
batched = ModuleKinds("a batched layer", nn.modules.conv._ConvNd, nn.Linear)
_cheap = ModuleKinds(
    "a per-sample layer",
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.LayerNorm, nn.GroupNorm,
)
register_norm = has_running_statistics.register
register_batched = batched.register
register_per_sample = _cheap.register


def per_sample(module: nn.Module) -> bool:
    """Whether ``module`` treats each index of its input's first dimension alone (exact to batch)."""
    if isinstance(module, nn.Flatten):
        return module.start_dim >= 1
    return batched(module) or _cheap(module)


_DROPOUTS: dict[type, str] = {nn.modules.dropout._DropoutNd: "p"}  # class -> the attribute holding its probability
_NAMED_DROP_ATTRIBUTES = ("p", "drop_prob")  # torchvision's StochasticDepth, timm's DropPath and DropBlock


def register_dropout(cls: type, attribute: str = "p") -> type:
    """Modules of class ``cls`` drop at random with the probability (a float) held in ``attribute``: a split is
    checked in train mode with it set to 0. Returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FxsplitError(f"register_dropout takes an nn.Module subclass, got {cls!r}.")
    if not (isinstance(attribute, str) and attribute.isidentifier()):
        raise FxsplitError(f"register_dropout takes the name of the attribute holding the probability, got "
                           f"{attribute!r}.")
    _DROPOUTS[cls] = attribute
    return cls


def drop_attribute(module: nn.Module) -> str | None:
    """The attribute that holds ``module``'s drop probability: a registered class's, or, for a class whose name
    says it drops (``DropPath``, ``StochasticDepth``), ``p`` or ``drop_prob``; ``None`` for a module that does
    not drop."""
    for cls, attribute in _DROPOUTS.items():
        if isinstance(module, cls):
            return attribute
    name = type(module).__name__
    if "drop" in name.lower() or name == "StochasticDepth":
        return next((a for a in _NAMED_DROP_ATTRIBUTES if isinstance(getattr(module, a, None), float)), None)
    return None


# The operations that drop at random, as torch.export records them, and the argument that holds the probability
# (a number in the graph: setting the module's attribute later changes nothing).
_DROP_PROBABILITIES: dict[Any, str] = {
    **{getattr(_aten, name).default: "p" for name in (
        "dropout", "dropout_", "feature_dropout", "feature_dropout_", "alpha_dropout", "alpha_dropout_",
        "feature_alpha_dropout", "feature_alpha_dropout_")},
    _aten.scaled_dot_product_attention.default: "dropout_p",
}


def register_dropping_operation(operation: torch._ops.OpOverload, argument: str) -> None:
    """An ATen operation that drops at random with the probability its ``argument`` holds."""
    names = [a.name for a in getattr(getattr(operation, "_schema", None), "arguments", [])]
    if argument not in names:
        raise FxsplitError(f"register_dropping_operation takes an ATen operation (torch.ops.aten.<op>.<overload>) "
                           f"and one of its arguments; {operation!r} has no argument {argument!r} ({names}).")
    _DROP_PROBABILITIES[operation] = argument


def drop_probability(node: fx.Node) -> tuple[int | str, float] | None:
    """Where a node of a torch.export graph holds the probability it drops with (an argument's index, or its
    keyword) and that probability; ``None`` for a node that does not drop."""
    name = _DROP_PROBABILITIES.get(node.target)
    if name is None:
        return None
    index = [argument.name for argument in node.target._schema.arguments].index(name)
    return (index, node.args[index]) if index < len(node.args) else (name, node.kwargs.get(name, 0.0))


_IN_PLACE_FUNCTIONS: set[Callable] = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod,
    operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul,
}


def register_in_place(function: Callable) -> Callable:
    """A function that writes into its first argument; returns it, so that it serves as a decorator."""
    if not callable(function):
        raise FxsplitError(f"register_in_place takes a function, got {function!r}.")
    _IN_PLACE_FUNCTIONS.add(function)
    return function


def writes_first_argument(target: Any, kwargs: dict) -> bool:
    """Whether a call of the Python function or tensor method ``target`` writes into its first argument: a
    registered function, ``inplace=True``, or torch's naming of in-place methods (``add_``, not ``__add__``)."""
    if target in _IN_PLACE_FUNCTIONS or kwargs.get("inplace") is True:
        return True
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name.endswith("_") and not name.startswith("_")


_UNTRACEABLE_MODULES: list[type] = []
_UNTRACEABLE_FUNCTIONS: list[Callable] = []


def register_untraceable(item: type | Callable) -> type | Callable:
    """A module class that torch.fx calls whole (a leaf), or a function it calls without tracing into it."""
    if isinstance(item, type) and issubclass(item, nn.Module):
        _UNTRACEABLE_MODULES.append(item)
    elif callable(item):
        _UNTRACEABLE_FUNCTIONS.append(item)
    else:
        raise FxsplitError(f"register_untraceable takes an nn.Module subclass or a function, got {item!r}.")
    return item


def untraceable() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """The module classes and functions torch.fx must not trace into: registered here, and timm's registry
    when timm is installed."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:
        modules, functions = (), ()
    else:
        modules, functions = tuple(get_notrace_modules()), tuple(f for f in get_notrace_functions() if callable(f))
    return modules + tuple(_UNTRACEABLE_MODULES), functions + tuple(_UNTRACEABLE_FUNCTIONS)
