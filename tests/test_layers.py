import networkx as nx
import pytest
import torch
from torch import nn

import fxsplit
from tests.models import MultiHead, SmallCNN, Twice, TupleHeads, small_models
from tests.patterns import Parametrized, TwoHeads
from tests.real_models import CASES
from tests.reference import assert_per_task


def test_one_node_per_parametrised_module_in_graph_order():
    model = MultiHead(SmallCNN(), 16)
    graph = fxsplit.layer_graph(model)
    with_params = [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    assert sorted(graph.nodes) == sorted(with_params)
    assert [graph.nodes[n]["order"] for n in graph.nodes] == list(range(len(with_params)))
    assert list(graph.nodes)[:3] == ["backbone.stem.0", "backbone.stem.1", "backbone.block1.conv1"]
    assert sum(graph.nodes[n]["params"] for n in graph) == sum(p.numel() for p in model.parameters())
    assert graph.nodes["backbone.stem.1"]["kind"] == "BatchNorm2d"
    assert graph.nodes["backbone.stem.0"]["parameters"] == ["backbone.stem.0.weight", "backbone.stem.0.bias"]


def test_edges_follow_data_through_parameter_free_ops():
    graph = fxsplit.layer_graph(SmallCNN())
    # relu between stem.1 and block1.conv1 collapses; the residual add carries stem.1 on into block2
    assert set(graph.successors("stem.1")) == {"block1.conv1", "block2.conv1", "block2.down.0"}
    assert set(graph.predecessors("block2.conv1")) == {"block1.bn2", "stem.1"}
    assert set(graph.predecessors("block2.down.0")) == {"block1.bn2", "stem.1"}
    assert set(graph.predecessors("block2.bn2")) == {"block2.conv2"}
    assert nx.is_directed_acyclic_graph(graph)


def test_parameters_read_directly_are_layers():
    graph = fxsplit.layer_graph(TupleHeads())
    assert graph.nodes["vit.pos_embed"]["kind"] == "Parameter"
    assert graph.nodes["vit.pos_embed"]["params"] == 17 * 16
    assert graph.nodes["vit.cls_token"]["parameters"] == ["vit.cls_token"]
    assert {"vit.embed", "vit.cls_token"} <= set(graph.predecessors("vit.blocks.0.norm1"))
    # the residual stream carries pos_embed to every norm; reading x.shape in attention is no edge to proj
    assert set(graph.successors("vit.pos_embed")) == {
        "vit.blocks.0.norm1", "vit.blocks.0.norm2", "vit.blocks.1.norm1", "vit.blocks.1.norm2", "vit.norm"}


def test_module_called_twice_is_one_layer_with_two_calls():
    graph = fxsplit.layer_graph(Twice())
    assert graph.nodes["shared"]["calls"] == ["shared", "shared_1"]
    assert set(graph.successors("shared")) == {"mid", "out"}
    assert set(graph.successors("inp")) == {"shared", "out"}
    assert set(graph.successors("mid")) == {"out"}  # through the in-place add into g, which relu(g) reads


def test_leaf_module_is_one_layer_with_all_its_parameters():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x):
            return self.b(self.a(x))

    model = nn.Sequential(Opaque(), nn.Linear(3, 1))
    leaves = {"leaf_modules": [Opaque]}
    graph = fxsplit.layer_graph(model, tracer_kwargs=leaves)
    traced = fxsplit.trace(model, tracer_kwargs=leaves)
    assert dict(fxsplit.layer_graph(traced).nodes(data=True)) == dict(graph.nodes(data=True))
    assert list(graph.nodes) == ["0", "1"]
    assert graph.nodes["0"]["params"] == 24 and graph.nodes["0"]["kind"] == "Opaque"


def test_buffers_read_directly_are_not_layers():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x):
            return self.lin(x) * self.scale

    assert list(fxsplit.layer_graph(WithBuffer()).nodes) == ["lin"]


def _without_calls(graph: fxsplit.LayerGraph) -> dict:
    """A layer graph's layers with their attributes but ``calls``, which name the route's own graph nodes."""
    return {name: {key: value for key, value in data.items() if key != "calls"} for name, data in graph.nodes(data=True)}


@pytest.mark.parametrize("name", ["cnn", "vit", "twice", "tied-lm", "dict-batch"])
def test_both_routes_give_the_same_layer_graph(name):
    """Same layers, names, kinds, parameters, members and order, and the same edges: on the torch.export route the
    ATen operations that read a layer's weights compute with it, and reading the batch size (``sym_size``, as the
    ViT's reshapes do) passes on no values."""
    if name in CASES:
        torch.manual_seed(0)
        model, x = CASES[name].build(), CASES[name].inputs()
    else:
        model, x, _ = small_models()[name]
    by_fx, by_export = fxsplit.layer_graph(model), fxsplit.layer_graph(model, example_inputs=(x,), method="export")
    assert (by_fx.graph["route"], by_export.graph["route"]) == ("fx", "export")
    assert list(by_export.nodes) == list(by_fx.nodes)
    assert _without_calls(by_export) == _without_calls(by_fx)
    assert set(by_export.edges) == set(by_fx.edges)


def test_export_route_layers_are_computed_with_by_aten_operations():
    model, x, _ = small_models()["cnn"]
    graph = fxsplit.layer_graph(model, example_inputs=x, method="export")
    assert graph.nodes["backbone.stem.0"]["calls"] == ["backbone_stem_0_conv2d"]
    assert graph.nodes["backbone.stem.1"]["calls"] == ["backbone_stem_1_batch_norm"]
    assert graph.nodes["heads.a"]["calls"] == ["heads_a_linear"]
    assert graph.nodes["backbone.stem.1"]["kind"] == "BatchNorm2d"


def test_reading_a_size_as_torch_export_records_it_is_no_edge():
    root = nn.ModuleDict({name: nn.Linear(4, 4) for name in ("first", "second", "third")})
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    batch = graph.call_function(torch.ops.aten.sym_size.int, (graph.call_module("first", (x,)), 0))
    second = graph.call_module("second", (x,))
    graph.output(graph.call_module("third", (graph.call_function(torch.ops.aten.view.default, (second, [batch, -1])),)))
    assert set(fxsplit.layer_graph(torch.fx.GraphModule(root, graph)).edges) == {("second", "third")}


def test_both_routes_name_a_parametrized_layer_after_its_module():
    torch.manual_seed(0)
    model, x = TwoHeads(Parametrized()), torch.randn(5, 4)
    by_fx, by_export = fxsplit.layer_graph(model), fxsplit.layer_graph(model, example_inputs=x, method="export")
    assert list(by_fx.nodes) == ["trunk.stem", "trunk.symmetric", "trunk.normed", "trunk.plain", "heads.a", "heads.b"]
    assert list(by_export.nodes) == list(by_fx.nodes)
    assert _without_calls(by_export) == _without_calls(by_fx)
    assert set(by_export.edges) == set(by_fx.edges)
    assert by_export.nodes["trunk.plain"]["parameters"] == [
        "trunk.plain.bias", "trunk.plain.parametrizations.weight.original0",
        "trunk.plain.parametrizations.weight.original1"]
    layers = ["trunk.symmetric", "trunk.normed", "trunk.plain"]
    for method in ("fx", "export"):
        split = fxsplit.rewrite(model, layers, example_inputs=x, method=method)
        assert split.split_layers == tuple(layers)
        assert_per_task(model, split, (x,))


def test_the_printout_lists_every_layer_under_column_headers():
    graph = fxsplit.layer_graph(MultiHead(SmallCNN(), 16))
    lines = str(graph).splitlines()
    assert lines[0] == f"{len(graph)} layers, {graph.number_of_edges()} edges"
    assert lines[1].split() == ["order", "layer", "kind", "params"] and set(lines[2]) == {"-"}
    assert [line.split() for line in lines[3:]] == [
        [str(data["order"]), name, data["kind"], f"{data['params']:,}"] for name, data in graph.nodes(data=True)]
