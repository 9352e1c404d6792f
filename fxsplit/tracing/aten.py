"""What a graph node does, as ATen describes it: the ATen operations it stands for, whether its result aliases its
first input (a view), and whether it draws random numbers.

A node of the torch.export route applies an ATen operation, whose schema says all of it. A node of the torch.fx
route calls a tensor method (``h.view(...)``) or a torch function (``torch.transpose``): it stands for the ATen
operations of that name, and their schemas say the same, e.g. ``view(Tensor(a) self, ...) -> Tensor(a)``.
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx

_TORCH_MODULES = ("torch", "torch.functional")  # where torch's own functions live (torch.split is in the second)
_VIEW_ATTRIBUTES = frozenset({"T", "mT", "H", "mH", "real", "imag"})
_SAMPLING_FUNCTIONS = frozenset({F.gumbel_softmax, F.fractional_max_pool2d, F.fractional_max_pool3d})


def overloads(node: fx.Node) -> tuple[torch._ops.OpOverload, ...]:
    """The ATen operations ``node`` applies (every overload of the name, for a method or a torch function)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return (node.target,)
    if node.op == "call_method":
        return _by_name(node.target)
    if node.op == "call_function" and _torch_function(node.target):
        return _by_name(node.target.__name__)
    return ()


def aliases_input(node: fx.Node) -> bool:
    """Whether ``node``'s result shares memory with its first argument without writing to it: a view (``h[:, :4]``,
    ``h.view(...)``, ``h.T``), or a part of a tuple or list (``pair[0]``: the same tensor)."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.op == "call_function" and node.target is operator.getitem:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _VIEW_ATTRIBUTES
    return any(_aliases_first(overload) for overload in overloads(node))


def draws_random(node: fx.Node) -> bool:
    """Whether ``node`` draws from the random number generator (``torch.rand``, ``bernoulli_``, ``exponential_``,
    and the functions of ``torch.nn.functional`` that torch.fx records whole and that sample in either mode)."""
    if node.op == "call_function" and node.target in _SAMPLING_FUNCTIONS:
        return True
    return any(torch.Tag.nondeterministic_seeded in overload.tags for overload in overloads(node))


def _torch_function(target) -> bool:
    name = getattr(target, "__name__", None)
    return name is not None and (getattr(target, "__module__", None) in _TORCH_MODULES
                                 or getattr(torch.Tensor, name, None) is target)


@functools.lru_cache(maxsize=None)
def _by_name(name: str) -> tuple[torch._ops.OpOverload, ...]:
    try:
        packet = getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):  # no ATen operation of that name
        return ()
    if not isinstance(packet, torch._ops.OpOverloadPacket):
        return ()
    return tuple(getattr(packet, overload) for overload in packet.overloads())


def _aliases_first(overload: torch._ops.OpOverload) -> bool:
    arguments = overload._schema.arguments
    alias = arguments[0].alias_info if arguments else None
    return alias is not None and not alias.is_write
