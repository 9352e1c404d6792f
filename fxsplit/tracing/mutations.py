"""In-place operations in a traced graph: which input each one writes to (through which views), and rewiring later
readers to it."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..rules import writes_first_argument
from . import aten

def follow_mutations(graph: fx.Graph, root: nn.Module) -> None:
    """Make every reader of a tensor that an in-place operation wrote to, after that operation, read its result."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    for node in graph.nodes:
        mutated = mutated_input(root, node)
        if mutated is None:
            continue
        for user in list(mutated.users):
            if position[user] > position[node]:
                user.replace_input_with(mutated, node)


def mutated_input(root: nn.Module, node: fx.Node) -> fx.Node | None:
    """The input node an in-place operation writes to, or ``None``."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if isinstance(node.target, torch._ops.OpOverload):  # an ATen operation says which argument it writes
        written = [i for i, argument in enumerate(node.target._schema.arguments)
                   if argument.alias_info is not None and argument.alias_info.is_write]
        inplace = written == [0]
    elif node.op == "call_function":
        inplace = writes_first_argument(node.target, node.kwargs)
    elif node.op == "call_method":
        inplace = writes_first_argument(node.target, {})
    elif node.op == "call_module":
        inplace = getattr(root.get_submodule(node.target), "inplace", False) is True
    else:
        inplace = False
    return node.args[0] if inplace else None


def written_input(root: nn.Module, node: fx.Node) -> fx.Node | None:
    """The input node that ``node`` writes into: an in-place operation's (:func:`mutated_input`), or the tensor
    that ``h[i] = v`` (``operator.setitem``, which returns nothing) assigns into."""
    if node.op == "call_function" and node.target is operator.setitem:
        return node.args[0]
    return mutated_input(root, node)


def written_tensor(root: nn.Module, node: fx.Node) -> fx.Node | None:
    """The value whose memory an in-place operation writes to, past in-place results and views of it (the
    buffer under ``self.mean.mul_(0.9).add_(x)``, or under ``aten.add_(aten.select(buffer, 0, 0), 1)``)."""
    written = written_input(root, node)
    while written is not None:
        base = mutated_input(root, written) or viewed(written)
        if base is None:
            return written
        written = base
    return None


def viewed(node: fx.Node) -> fx.Node | None:
    """The tensor whose memory ``node``'s result shares, if any: what it is a view of (``h[:, :4]``,
    ``aten.slice(h, ...)``, ``h.transpose(0, 1)``), or the tuple it is an element of (:func:`.aten.aliases_input`)."""
    return node.args[0] if aten.aliases_input(node) else None


def aliases(root: nn.Module, node: fx.Node) -> set[fx.Node]:
    """``node`` and every node whose result shares its memory, through views and in-place results of them."""
    found, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(user for user in current.users
                         if viewed(user) is current or mutated_input(root, user) is current)
    return found
