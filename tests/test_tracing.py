import copy
import pickle
import re

import pytest
import torch
from torch import nn

import fxsplit
from tests.models import MultiHead, SmallCNN, assert_unchanged, snapshot
from tests.mtan import MTAN
from tests.patterns import GraphRegressor, Moded, OptionalInput, SumAggregation, TwoHeads, graph_batch
from tests.reference import assert_per_task


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace this
            return x
        return -x


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.ReLU(), DataDependent())

    def forward(self, x):
        return self.inner(self.lin(x))


def test_node_paths_are_dotted_module_paths():
    gm = fxsplit.trace(SmallCNN())
    paths = [node.meta["path"] for node in gm.graph.nodes]
    assert paths[:4] == ["x", "stem.0", "stem.1", "stem.2"]
    assert "block1.add" in paths and "block2.add" in paths
    assert paths.count("block1.relu") == 2  # a module called twice keeps its path
    assert paths[-2:] == ["flatten", "output"]
    assert {node.name for node in gm.graph.nodes} >= {"block1_add", "block2_down_0", "flatten"}


def test_repeated_operations_get_numbered_paths():
    class Adds(nn.Module):
        def forward(self, x):
            return x + 1 + 2 + 3

    paths = [node.meta["path"] for node in fxsplit.trace(Adds()).graph.nodes]
    assert paths == ["x", "add", "add_1", "add_2", "output"]


def test_trace_is_a_checked_view_of_the_model_and_leaves_it_unchanged():
    model = MultiHead(SmallCNN(), 16).train()
    model.heads.a.register_forward_hook(lambda *args: None)
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    gm = fxsplit.trace(model, x)  # runs both modes against the model: buffers and modes are put back
    assert_unchanged(model, before)
    model.eval(), gm.eval()
    assert all(torch.equal(gm(x)[t], model(x)[t]) for t in "ab")
    shared = dict(model.named_parameters())
    assert all(p is shared[name] for name, p in gm.named_parameters())  # a view: never stale after training
    with torch.no_grad():
        model.heads.b.bias.add_(1.0)
    assert torch.equal(gm(x)["b"], model(x)["b"])


def test_untraceable_module_names_module_line_and_fix():
    with pytest.raises(fxsplit.TraceError) as info:
        fxsplit.trace(Wrapper())
    message = str(info.value)
    assert "'inner.1'" in message and "DataDependent" in message
    assert "test_tracing.py" in message and "if x.sum() > 0" in message
    assert "tracer_kwargs={'leaf_modules': [DataDependent]}" in message


@pytest.mark.parametrize("leaf", [DataDependent, "inner.1"])
def test_leaf_modules_by_class_or_name(leaf):
    gm = fxsplit.trace(Wrapper(), tracer_kwargs={"leaf_modules": [leaf]})
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin", "inner.0", "inner.1"]


def test_concrete_args_fix_an_argument():
    class Scaled(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    gm = fxsplit.trace(Scaled(), tracer_kwargs={"concrete_args": {"double": True}})
    assert torch.equal(gm(torch.ones(2), True), torch.full((2,), 2.0))


def test_timm_registry_makes_leaves():
    timm = pytest.importorskip("timm")
    from timm.layers import get_notrace_modules

    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=4).eval()
    gm = fxsplit.trace(model)
    leaf_types = tuple(get_notrace_modules())
    registered = [name for name, m in model.named_modules() if isinstance(m, leaf_types)]
    outermost = {name for name in registered if not any(name.startswith(f"{other}.") for other in registered)}
    called = [n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")]
    leaves = {target for target in called if target in outermost}
    assert leaves == outermost  # every registered module is called as one node
    assert "MobileVitBlock" in {type(model.get_submodule(leaf)).__name__ for leaf in leaves}
    assert not [target for target in called if any(target.startswith(f"{leaf}.") for leaf in leaves)]  # not entered
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize("training", [True, False])
def test_code_that_reads_the_mode_gets_a_graph_per_mode(training):
    model = Moded(4).train(training)
    x = torch.randn(3, 4)
    gm = fxsplit.trace(model, x)
    assert gm.has_two_graphs and gm.training == training
    for mode in (training, not training, training):
        model.train(mode), gm.train(mode)
        assert torch.equal(gm(x), model(x)), mode
    copied = [copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))]
    for other in copied:
        for mode in (True, False):
            model.train(mode), other.train(mode)
            assert torch.equal(other(x), model(x)), mode


def test_same_graph_in_both_modes_is_one_graph():
    assert not fxsplit.trace(SmallCNN()).has_two_graphs


def test_not_a_module():
    with pytest.raises(fxsplit.TraceError, match="got function"):
        fxsplit.trace(lambda x: x)


def test_a_model_holding_tensors_from_an_earlier_forward_traces():
    """timm's EfficientViT caches attention biases (tensors with a history) in eval mode; deepcopy refuses those."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientvit_m0", pretrained=False, num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    model(x)
    def cache() -> list[torch.Tensor]:
        return [t for m in model.modules() for t in getattr(m, "attention_bias_cache", {}).values()]

    cached = cache()
    assert cached and all(t.grad_fn is not None for t in cached)
    with pytest.raises(RuntimeError, match="deepcopy"):
        copy.deepcopy(model)
    assert torch.equal(fxsplit.trace(model)(x), model(x))
    graph = fxsplit.layer_graph(model)
    layer = list(graph)[-2]
    split = fxsplit.rewrite(model, [layer], tasks=["a", "b"], example_inputs=x)
    assert split.split_layers == (layer,) and split.tasks == ("a", "b")
    out, expected = split(x), model(x)
    assert set(out) == {"a", "b"} and all(torch.equal(out[task], expected) for task in ("a", "b"))
    assert len(cache()) == len(cached) and all(t is c for t, c in zip(cache(), cached))  # the model keeps its cache


# Route choice: method="auto" | "fx" | "export".

def test_auto_takes_torch_fx_where_it_traces_and_records_why():
    model, x = MultiHead(SmallCNN(), 16), torch.randn(2, 3, 8, 8)
    checked, unchecked = fxsplit.trace(model, x), fxsplit.trace(model)
    assert (checked.meta["route"], checked.meta["route_reason"]) == (
        "fx", "torch.fx traced it, and its graph matches the model")
    assert unchecked.meta["route_reason"] == "torch.fx traced it; not checked: no example input"
    assert not any(isinstance(n.target, torch._ops.OpOverload) for n in checked.graph.nodes)
    reread = fxsplit.trace(checked)  # a traced module keeps its route
    assert reread.meta["route"] == "fx" and reread.meta["route_reason"] == checked.meta["route_reason"]


def test_auto_takes_torch_export_where_torch_fx_fails_and_records_why():
    model, x = MTAN(), torch.randn(2, 3, 16, 16)
    with pytest.raises(fxsplit.TraceError, match=r"'attention.segmentation.1' \(TaskAttention\).* Or give an example "
                                                 r"input, and fxsplit tries the torch.export route.*ConflictMonitor "
                                                 r"\(analyze takes its first batch\)"):
        fxsplit.layer_graph(model)
    graph = fxsplit.layer_graph(model, example_inputs=x)
    assert graph.graph["route"] == "export"
    assert re.match(r"torch.fx cannot trace module 'attention.segmentation.1' \(TaskAttention\): .*mtan.py:\d+: "
                    r"if previous.size\(\)\[-2:\] != middle.size\(\)\[-2:\]", graph.graph["route_reason"])
    assert str(graph).startswith(f"50 layers, {graph.number_of_edges()} edges, traced through torch.export (torch.fx")


def test_when_both_routes_fail_the_error_says_why_for_each():
    with pytest.raises(fxsplit.TraceError, match=r"torch.fx cannot trace module 'inner.1' .* The torch.export route, "
                                                 r"tried next on the example, fails too: torch.export cannot trace "
                                                 r"module 'inner.1' \(DataDependent\)"):
        fxsplit.trace(Wrapper(), torch.randn(3, 4))


@pytest.mark.parametrize("call, message", [
    (lambda: fxsplit.trace(MTAN(), method="export"), r"method='export' traces the model by running it on an "
                                                    r"example: give one \(example_inputs=\.\.\., example_kwargs"),
    (lambda: fxsplit.trace(SmallCNN(), torch.randn(2, 3, 8, 8), method="onnx"),
     r"method must be one of \['auto', 'fx', 'export'\], got 'onnx'"),
    (lambda: fxsplit.trace(Wrapper(), torch.randn(3, 4), method="export",
                           tracer_kwargs={"leaf_modules": [DataDependent]}),
     r"tracer_kwargs \['leaf_modules'\] are options of the torch.fx route"),
    (lambda: fxsplit.trace(fxsplit.trace(SmallCNN()), torch.randn(2, 3, 8, 8), method="export"),
     r"already a GraphModule traced by the fx route: method='export' applies to the nn.Module"),
    (lambda: fxsplit.trace(MTAN(), method="fx"), r"torch.fx cannot trace module 'attention.segmentation.1'.*To fix: "
                                                 r"make it a leaf[^O]*$"),
])
def test_method_errors(call, message):
    with pytest.raises(fxsplit.TraceError, match=message):
        call()


def test_the_export_route_gives_a_checked_view_with_a_graph_per_mode():
    model = MultiHead(SmallCNN(), 16).train()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    gm = fxsplit.trace(model, x, method="export")
    assert_unchanged(model, before)
    assert gm.meta["route"] == "export" and gm.has_two_graphs
    shared = dict(model.named_parameters())
    assert all(p is shared[name] for name, p in gm.named_parameters())
    assert set(gm.state_dict()) == set(model.state_dict())
    for training in (False, True, False):
        model.train(training), gm.train(training)
        expected, got = copy.deepcopy(model)(x), copy.deepcopy(gm)(x)
        assert all(torch.equal(got[t], expected[t]) for t in "ab"), training


def test_an_example_is_recorded_from_a_call_for_the_export_route():
    """analyze calls the model through ``forward(model, batch)``: the model's own arguments are recorded from it."""
    from fxsplit.tracing import trace_graph
    from fxsplit.tracing.verify import recorded_example

    model = MultiHead(SmallCNN(), 16).train()
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    args, kwargs = recorded_example(model, lambda module: module(x)["a"].softmax(1))
    assert_unchanged(model, before)
    assert len(args) == 1 and args[0] is x and kwargs == {}
    graph = trace_graph(model, method="export", example=(args, kwargs))
    assert graph.meta["route"] == "export" and graph.training  # the model's current mode, only
    with pytest.raises(fxsplit.TraceError, match="traced through torch.export in train mode"):
        graph.eval()
    with pytest.raises(fxsplit.TraceError, match="the example call never calls MultiHead"):
        recorded_example(model, lambda module: x)


def test_the_export_route_refuses_modules_in_another_mode_than_the_model():
    model = MultiHead(SmallCNN(), 16).train()
    model.backbone.stem[1].eval()  # a frozen BatchNorm: a graph of the export route would fix it in train mode
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(fxsplit.TraceError, match=r"in train mode but its module 'backbone.stem.1' \(BatchNorm2d\) is "
                                                 r"in eval mode: the torch.export route fixes every module's mode"):
        fxsplit.rewrite(model, ["backbone.stem.0"], example_inputs=x, method="export")
    split = fxsplit.rewrite(model, ["backbone.stem.0"], example_inputs=x)  # the fx route calls the module
    assert split.route == "fx" and not split.get_submodule("backbone.stem.1").training


def _entry_points(wrapped: nn.Module, x: torch.Tensor) -> dict:
    """What each entry point gives for ``wrapped`` (trace, layer graph, split, report)."""
    tasks = {t: (lambda t: lambda out, batch: out[t].pow(2).mean())(t) for t in "ab"}
    return {"trace": fxsplit.trace(wrapped, x), "layer_graph": fxsplit.layer_graph(wrapped),
            "rewrite": fxsplit.rewrite(wrapped, ["trunk.2"], example_inputs=x),
            "analyze": fxsplit.analyze(wrapped, tasks, [x, x], progress=False)}


def _assert_read_through_the_wrapper(model: nn.Module, wrapped: nn.Module, x: torch.Tensor) -> None:
    with pytest.warns(UserWarning, match=rf"{type(wrapped).__name__} wraps the model: fxsplit reads model.module "
                                         r"\(TwoHeads\).*wrap the split again") as caught:
        got = _entry_points(wrapped, x)
    assert len(caught) == 4
    expected = _entry_points(model, x)
    assert all(torch.equal(got["trace"](x)[task], model(x)[task]) for task in ("a", "b"))
    assert list(got["layer_graph"].nodes) == list(expected["layer_graph"].nodes)
    assert got["rewrite"].split_layers == ("trunk.2",)
    assert_per_task(model, got["rewrite"], (x,))
    assert got["analyze"].counts == expected["analyze"].counts and got["analyze"].layers == ["trunk.0", "trunk.2"]


def test_a_data_parallel_model_is_read_through_its_module():
    torch.manual_seed(0)
    model = TwoHeads(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)))
    _assert_read_through_the_wrapper(model, nn.DataParallel(model), torch.randn(6, 4))


@pytest.fixture
def one_process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_a_distributed_data_parallel_model_is_read_through_its_module(one_process_group):
    torch.manual_seed(0)
    model = TwoHeads(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)))
    _assert_read_through_the_wrapper(model, nn.parallel.DistributedDataParallel(model), torch.randn(6, 4))


@pytest.mark.parametrize("name", ["mask", "gate"])
def test_an_optional_input_the_example_gives_must_be_given_to_the_trace_and_the_split(name):
    torch.manual_seed(0)
    model, x, given = OptionalInput(variadic=name == "gate"), torch.randn(5, 4), {name: torch.ones(5, 8)}
    traced = fxsplit.trace(model, x, example_kwargs=given)
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=x, example_kwargs=given)
    assert all(torch.equal(traced(x, **given)[task], model(x, **given)[task]) for task in ("a", "b"))
    assert_per_task(model, split, (x,), kwargs=given)
    for module in (traced, split, copy.deepcopy(split)):
        with pytest.raises(fxsplit.TraceError, match=rf"traced with {name} given \(the example gave it\).*give "
                                                     rf"{name} in every call"):
            module(x)


def test_a_module_that_overrides_call_is_named_and_becomes_a_leaf_when_asked():
    torch.manual_seed(0)
    model, (x, batch) = GraphRegressor(), graph_batch()
    with pytest.raises(fxsplit.TraceError, match=r"module 'pool' \(SumAggregation\).*int\(index.max\(\)\).*"
                                                 r"overrides nn.Module.__call__.*'leaf_modules': \[SumAggregation\]"):
        fxsplit.trace(model, method="fx")
    leaves = {"leaf_modules": [SumAggregation]}
    traced = fxsplit.trace(model, (x, batch), tracer_kwargs=leaves)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"][-3] == "pool"
    assert torch.equal(traced(x, batch)["mu"], model(x, batch)["mu"])
    split = fxsplit.rewrite(model, ["node.2"], tracer_kwargs=leaves, example_inputs=(x, batch))
    assert split.route == "fx"
    assert_per_task(model, split, (x, batch))


class Uncopyable(nn.Linear):
    def __deepcopy__(self, memo):
        raise AssertionError("the model was copied")


@pytest.mark.parametrize("call, message", [
    (lambda model: fxsplit.rewrite(model, ["weight"], method="onnx"), "method must be one of"),
    (lambda model: fxsplit.rewrite(model, ["weight"], tracer_kwargs={"leaves": []}), r"unknown option\(s\) \['leaves'\]"),
    (lambda model: fxsplit.trace(model, method="onnx"), "method must be one of"),
    (lambda model: fxsplit.layer_graph(model, method="onnx"), "method must be one of"),
])
def test_a_bad_method_or_option_is_refused_before_the_model_is_copied(call, message):
    with pytest.raises(fxsplit.TraceError, match=message):
        call(Uncopyable(2, 2))
