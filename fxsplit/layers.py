"""The layer graph: one node per parametrised layer, edges for the data flow between layers.

A *layer* is a module called in the traced graph that owns parameters (a leaf module owns all of its
own and its children's: the graph cannot see inside it), or a parameter the graph reads directly
(``get_attr``, e.g. a ViT's ``pos_embed``). Its name is the module's (or parameter's) qualified name. A module
called several times is one layer whose ``calls`` lists every call.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator

import networkx as nx
from torch import fx, nn

from .tracing import trace_for_reading

_METADATA_METHODS = {"size", "dim", "numel", "get_device"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}


def layer_of(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The name of the layer ``node`` applies, or ``None`` for a parameter-free node."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return node.target if next(module.parameters(), None) is not None else None
    if node.op == "get_attr":
        return node.target if isinstance(attribute(gm, node.target), nn.Parameter) else None
    return None


def parameter_names(gm: fx.GraphModule, layer: str) -> list[str]:
    """Qualified names of the parameters that make up ``layer`` (weight and bias of a module, ...)."""
    if isinstance(attribute(gm, layer), nn.Parameter):
        return [layer]
    return [f"{layer}.{name}" for name, _ in gm.get_submodule(layer).named_parameters()]


def layer_calls(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Every layer of ``gm``, in graph order of first call, with the nodes that call it."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        layer = layer_of(gm, node)
        if layer is not None:
            calls.setdefault(layer, []).append(node)
    return calls


def layer_graph(model: nn.Module) -> nx.DiGraph:
    """The layer graph of ``model`` (traced with :func:`fxsplit.trace`, or a ``GraphModule`` it made).

    Node attributes: ``kind`` (module class, or ``"Parameter"``), ``params`` (count), ``order`` (graph order of
    the first call), ``calls`` (names of the ``torch.fx`` nodes that apply the layer), ``parameters``
    (qualified parameter names). An edge ``a -> b`` means a value computed by ``a`` reaches ``b`` through
    parameter-free operations only (reading a tensor's shape, dtype or device passes on no values: no edge).

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> g = fxsplit.layer_graph(net)
    >>> list(g.edges), g.nodes["0"]["params"]
    ([('0', '1')], 224)
    """
    gm = trace_for_reading(model)
    calls = layer_calls(gm)
    graph = nx.DiGraph()
    for order, (layer, nodes) in enumerate(calls.items()):
        target = attribute(gm, layer)
        names = parameter_names(gm, layer)
        graph.add_node(
            layer,
            kind="Parameter" if isinstance(target, nn.Parameter) else type(target).__name__,
            params=sum(attribute(gm, name).numel() for name in names),
            order=order,
            calls=[node.name for node in nodes],
            parameters=names,
        )
    graph.add_edges_from(_layer_edges(gm))
    return graph


def _layer_edges(gm: fx.GraphModule) -> Iterator[tuple[str, str]]:
    """Edges between layers, following values through parameter-free nodes."""
    sources: dict[fx.Node, frozenset[str]] = {}  # layers whose values reach a node without another layer between
    for node in gm.graph.nodes:
        if reads_metadata(node):
            sources[node] = frozenset()
            continue
        reaching = frozenset().union(*(sources[arg] for arg in node.all_input_nodes))
        layer = layer_of(gm, node)
        if layer is None:
            sources[node] = reaching
            continue
        sources[node] = frozenset((layer,))
        for source in reaching:
            yield source, layer


def reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's metadata (shape, dtype, device), not its values."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        return node.target is builtins.len or (
            node.target is builtins.getattr and node.args[1] in _METADATA_ATTRIBUTES)
    return False


def attribute(root: nn.Module, target: str):
    """The object at a qualified name under ``root``: a module, a parameter or a buffer."""
    module_path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(module_path), name)
