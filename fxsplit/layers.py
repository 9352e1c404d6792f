"""The layer graph: one node per layer, edges for the data flow between layers.

A *layer* is what splitting copies as one unit:
- a module called in the traced graph that owns parameters (a leaf module owns all of its own and its children's:
  the graph cannot see inside it);
- a parameter read directly (``get_attr``): it belongs to its module's layer when that module is one of torch.nn's
  own layers (``F.linear(h, self.embed.weight)`` applies layer ``embed``: weight and bias are one vector), and is
  a layer of its own otherwise (a ViT's ``pos_embed``, an entry of a ``ParameterDict``); a parameter that a
  ``torch.nn.utils.parametrize`` parametrization derives a weight from belongs to the parametrized module's
  layer (``l.parametrizations.weight.original0`` to ``l``, as torch.fx calls ``l`` whole);
- parameters shared by identity (tied weights: ``decoder.weight = encoder.weight``) join every module and direct
  read that uses them into one layer, named after the first in graph order.
A module called several times is one layer whose ``calls`` lists every call.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from . import compute, structure
from .errors import FxsplitError
from .modules import attribute, canonical_names, owner, torch_layer
from .tracing import as_example, route_of, trace_graph, unwrapped

_METADATA_METHODS = {"size", "dim", "numel", "get_device"}
_METADATA_ATTRIBUTES = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_OPERATIONS = {  # as torch.export records reading a size (the batch's, which may vary) or checking a dtype
    torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default, torch.ops.aten.sym_stride.int,
    torch.ops.aten.sym_storage_offset.default, torch.ops.aten._assert_tensor_metadata.default,
}


@dataclass(frozen=True)
class Layer:
    """One layer of a traced module: its name, the graph targets copied together when it is split (module paths
    and parameter paths), its parameters' names (as ``named_parameters()`` gives them), the nodes that read it
    (module calls and ``get_attr`` reads: a split points them at the copies) and the nodes that compute with it
    (module calls, the operations that read its modules' tensors, a parameter read directly)."""

    name: str
    members: tuple[str, ...]
    parameters: tuple[str, ...]
    reads: tuple[fx.Node, ...]
    calls: tuple[fx.Node, ...]
    kind: str
    size: int


def find_layers(gm: fx.GraphModule, graph: fx.Graph | None = None) -> dict[str, Layer]:
    """Every layer of ``gm`` (of its ``graph``, by default its own), in graph order of first call."""
    graph = gm.graph if graph is None else graph
    reads: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        member = _member(gm, node)
        if member is not None:
            reads.setdefault(member, []).append(node)
    for node in graph.nodes:  # a buffer read directly (BatchNorm statistics) is applied with its module's layer
        layer = _buffer_owner(gm, node, reads)
        if layer is not None:
            reads[layer].append(node)
    calls = {member: _calls(nodes, member) for member, nodes in reads.items()}
    position = _position(graph)
    members = sorted(reads, key=lambda member: min(position(use) for node in reads[member]
                                                    for use in (node.users if node.op == "get_attr" else ())
                                                    or (node,)))
    canonical = gm.meta.get("canonical")
    canonical = canonical_names(gm) if canonical is None else canonical
    layers = {}
    for group in _tied_groups(gm, members):
        tensors = {id(p): (canonical.get(name, name), p) for member in group for name, p in _parameters(gm, member)}
        first = attribute(gm, group[0])
        layers[group[0]] = Layer(
            name=group[0],
            members=tuple(group),
            parameters=tuple(dict.fromkeys(name for name, _ in tensors.values())),
            reads=tuple(sorted((n for m in group for n in reads[m]), key=position)),
            calls=tuple(sorted({n for m in group for n in calls[m]}, key=position)),
            kind="Parameter" if isinstance(first, nn.Parameter) else type(first).__name__,
            size=sum(p.numel() for _, p in tensors.values()),
        )
    return layers


def _calls(reads: list[fx.Node], member: str) -> list[fx.Node]:
    """The nodes that compute with a member, from the nodes that read it: a module call computes; a read of one of
    a module's tensors is computed with by its users (``aten.linear(x, weight, bias)``); a parameter read directly
    is the value it adds (``tokens + pos_embed``)."""
    return [user for node in reads for user in (node.users if node.op == "get_attr" and node.target != member
                                                 else (node,))]


class LayerGraph(nx.DiGraph):
    """The layer graph (a ``networkx.DiGraph``): ``print(graph)`` lists the layers, :meth:`to_dot` and :meth:`draw`
    picture them.

    Node attributes: ``kind`` (module class, or ``"Parameter"``), ``params`` (count, tied weights once), ``order``
    (graph order of the first call), ``calls`` (names of the traced graph's nodes that compute with the layer: module
    calls on the ``torch.fx`` route, ATen operations on the ``torch.export`` route), ``parameters`` (qualified names, as
    ``named_parameters()`` gives them), ``members`` (the modules and parameters a split copies) and ``outputs`` (the key
    paths of the output's leaves computed with the layer). An edge ``a -> b`` means a value computed by ``a`` reaches
    ``b`` through parameter-free operations only (reading a tensor's shape, dtype or device passes on no values: no
    edge). Graph attributes: ``route`` (``"fx"`` or ``"export"``) and ``route_reason``, how the model was traced and
    why, and ``outputs``, the key paths of all the output's leaves.
    """

    def __str__(self) -> str:
        header = f"{'order':>5}  {'layer':<48} {'kind':<18} {'params':>10}"
        rows = [f"{data['order']:>5}  {name:<48} {data['kind']:<18} {data['params']:>10,}"
                for name, data in self.nodes(data=True)]
        route = f", traced through torch.export ({self.graph['route_reason']})" \
            if self.graph.get("route") == "export" else ""
        return "\n".join([f"{self.number_of_nodes()} layers, {self.number_of_edges()} edges{route}", header,
                          "-" * len(header), *rows])

    def to_dot(self) -> str:
        """The graph in Graphviz DOT (``dot -Tpng layers.dot -o layers.png``)."""
        lines = ["digraph layers {", "  rankdir=TB; node [shape=box, fontsize=10];"]
        lines += [f'  "{name}" [label="{name}\\n{data["kind"]} ({data["params"]:,})"];'
                  for name, data in self.nodes(data=True)]
        lines += [f'  "{a}" -> "{b}";' for a, b in self.edges]
        return "\n".join(lines + ["}"]) + "\n"

    def draw(self, path: str | Path) -> Path:
        """Draw the graph into a PNG, top to bottom in data-flow order (needs matplotlib)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise FxsplitError("drawing the layer graph needs matplotlib: pip install matplotlib") from error
        depths = nx.topological_generations(self) if nx.is_directed_acyclic_graph(self) else [[n] for n in self]
        layered = nx.DiGraph(self)
        for depth, names in enumerate(depths):
            for name in names:
                layered.nodes[name]["depth"] = depth
        positions = {name: (x, -y) for name, (x, y) in
                     nx.multipartite_layout(layered, subset_key="depth", align="horizontal").items()}
        figure = Figure(figsize=(8, max(4, 0.25 * self.number_of_nodes())))
        axes = figure.subplots()
        nx.draw_networkx(self, positions, ax=axes, node_size=60, font_size=6, arrowsize=6)
        axes.set_axis_off()
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        return Path(path)


def layer_graph(model: nn.Module, *, tracer_kwargs: Mapping[str, Any] | None = None, example_inputs: Any = None,
                example_kwargs: dict[str, Any] | None = None, method: str = "auto") -> LayerGraph:
    """The layer graph of ``model``, traced in its current mode (``method``, the example and ``tracer_kwargs`` as
    :func:`fxsplit.trace` takes them; with an example, the trace is checked against the model on it).

    Both routes give the same layers under the same names. ``graph.graph["route"]`` and
    ``graph.graph["route_reason"]`` say which route traced the model and why; with an example,
    ``graph.graph["compute"]`` is the model's compute profile on it (see ``fxsplit.compute``), which a
    :class:`~fxsplit.ConflictMonitor` given this graph passes on to its report.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> g = fxsplit.layer_graph(net)
    >>> list(g.edges), g.nodes["0"]["params"], g.graph["route"]
    ([('0', '1')], 224, 'fx')
    >>> print(g)
    2 layers, 1 edges
    order  layer                                            kind                   params
    -------------------------------------------------------------------------------------
        0  0                                                Conv2d                    224
        1  1                                                BatchNorm2d                16
    >>> g = fxsplit.layer_graph(net, example_inputs=torch.randn(2, 3, 8, 8), method="export")
    >>> list(g.edges), g.nodes["0"]["params"], g.graph["route"]
    ([('0', '1')], 224, 'export')
    """
    model = unwrapped(model)
    example = as_example(example_inputs, example_kwargs)
    traced = trace_graph(model, tracer_kwargs, method=method, example=example)
    graph = graph_of(traced)
    return graph if example is None else with_profile(graph, traced, lambda module: module(*example[0], **example[1]))


def graph_of(gm: fx.GraphModule) -> LayerGraph:
    """The layer graph of a traced module."""
    layers = find_layers(gm)
    leaves = _output_leaves(gm.graph)
    graph = LayerGraph(route=route_of(gm).name, route_reason=gm.meta.get("route_reason", ""),
                       outputs=[list(path) for path in leaves])
    for order, layer in enumerate(layers.values()):
        graph.add_node(layer.name, kind=layer.kind, params=layer.size, order=order,
                       calls=[node.name for node in layer.calls], parameters=list(layer.parameters),
                       members=list(layer.members), outputs=_outputs_fed(layer, leaves))
    graph.add_edges_from(_layer_edges(gm.graph, layers))
    return graph


def with_profile(graph: LayerGraph, gm: fx.GraphModule, call) -> LayerGraph:
    """``graph``, the layer graph of ``gm``, with ``graph.graph["compute"]``: the FLOPs profile of ``gm`` on the
    example ``call(module)`` (see ``fxsplit.compute``), ``None`` where the call cannot run the graph alone."""
    graph.graph["compute"] = compute.profile(gm, graph, call, _output_leaves(gm.graph), reads_metadata)
    return graph


def _output_leaves(graph: fx.Graph) -> dict[tuple, set[fx.Node]]:
    """Key path of every leaf of the graph's output -> the nodes it is computed from (itself among them)."""
    output = next(node for node in reversed(graph.nodes) if node.op == "output").args[0]
    leaves = {}
    for path, _, value in structure.leaves(output):
        ancestors, stack = set(), [value] if isinstance(value, fx.Node) else []
        while stack:
            node = stack.pop()
            if node not in ancestors:
                ancestors.add(node)
                stack.extend(node.all_input_nodes)
        leaves[path] = ancestors
    return leaves


def _outputs_fed(layer: Layer, leaves: Mapping[tuple, set[fx.Node]]) -> list[list]:
    """The key paths of the output leaves that are computed with ``layer``."""
    return [list(path) for path, ancestors in leaves.items() if not ancestors.isdisjoint(layer.reads)]


def _member(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module or parameter (its graph target) that ``node`` applies, or ``None`` for a parameter-free node."""
    if node.op == "call_module":
        return node.target if next(gm.get_submodule(node.target).parameters(), None) is not None else None
    if node.op != "get_attr" or not isinstance(attribute(gm, node.target), nn.Parameter):
        return None
    parametrized = _parametrized_module(gm, node.target)
    if parametrized is not None:
        return parametrized
    module = owner(node.target)
    return module if module and torch_layer(gm.get_submodule(module)) else node.target


def _parametrized_module(gm: fx.GraphModule, target: str) -> str | None:
    """The module whose weight a parameter derives (``l.parametrizations.weight.original0`` -> ``l``), if the
    parameter is one that ``torch.nn.utils.parametrize`` keeps: torch.fx calls a parametrized module whole (its
    class comes from torch.nn), torch.export reads the parameters the parametrization derives from."""
    path, found, _ = target.rpartition(".parametrizations.")
    if not (found and path) or not parametrize.is_parametrized(gm.get_submodule(path)):
        return None
    return path


def _parameters(gm: fx.GraphModule, member: str) -> list[tuple[str, nn.Parameter]]:
    target = attribute(gm, member)
    if isinstance(target, nn.Parameter):
        return [(member, target)]
    return list(target.named_parameters(prefix=member, remove_duplicate=False))


def _tied_groups(gm: fx.GraphModule, members: list[str]) -> list[list[str]]:
    """``members`` (in graph order) grouped by shared parameters, each group in graph order."""
    parent = {member: member for member in members}

    def root(member: str) -> str:
        while parent[member] != member:
            parent[member] = parent[parent[member]]
            member = parent[member]
        return member

    first: dict[int, str] = {}
    for member in members:
        for _, parameter in _parameters(gm, member):
            other = first.setdefault(id(parameter), member)
            a, b = sorted((root(member), root(other)), key=members.index)
            parent[b] = a
    groups: dict[str, list[str]] = {}
    for member in members:
        groups.setdefault(root(member), []).append(member)
    return list(groups.values())


def _buffer_owner(gm: fx.GraphModule, node: fx.Node, members: Mapping[str, Any]) -> str | None:
    """The member module that owns the buffer ``node`` reads directly, if any."""
    if node.op != "get_attr" or not isinstance(attribute(gm, node.target), torch.Tensor) or node.target in members:
        return None
    parts = node.target.split(".")
    owners = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    return next((owner for owner in owners if owner in members), None)


def _position(graph: fx.Graph):
    position = {node: i for i, node in enumerate(graph.nodes)}
    return position.__getitem__


def _layer_edges(graph: fx.Graph, layers: Mapping[str, Layer]) -> Iterator[tuple[str, str]]:
    """Edges between layers, following values through parameter-free nodes."""
    applied: dict[fx.Node, frozenset[str]] = {}  # node -> the layers it computes with
    for layer in layers.values():
        for node in layer.calls:
            applied[node] = applied.get(node, frozenset()) | {layer.name}
    sources: dict[fx.Node, frozenset[str]] = {}  # layers whose values reach a node without another layer between
    for node in graph.nodes:
        if reads_metadata(node):
            sources[node] = frozenset()
            continue
        reaching = frozenset().union(*(sources[arg] for arg in node.all_input_nodes))
        here = applied.get(node)
        if here is None:
            sources[node] = reaching
            continue
        sources[node] = here
        for layer in here:
            for source in reaching - here:
                yield source, layer


def reads_metadata(node: fx.Node) -> bool:
    """Whether ``node`` reads only a tensor's metadata (shape, dtype, device), not its values."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    if node.op == "call_function":
        return node.target is builtins.len or node.target in _METADATA_OPERATIONS or (
            node.target is builtins.getattr and node.args[1] in _METADATA_ATTRIBUTES)
    return False
