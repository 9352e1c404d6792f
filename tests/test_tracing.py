import torch
import pytest
from torch import nn

import fxsplit
from tests.models import MultiHead, SmallCNN, assert_unchanged, snapshot


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


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x = self.lin(x)
        return x * 2 if self.training else x


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


def test_trace_matches_model_and_leaves_it_unchanged():
    model = MultiHead(SmallCNN(), 16).train()
    model.heads.a.register_forward_hook(lambda *args: None)
    before = snapshot(model)
    gm = fxsplit.trace(model)
    assert_unchanged(model, before)
    x = torch.randn(2, 3, 8, 8)
    model.eval(), gm.eval()
    assert all(torch.equal(gm(x)[t], model(x)[t]) for t in "ab")
    assert all(p is not q for p, q in zip(gm.parameters(), model.parameters()))


def test_untraceable_module_names_module_line_and_fix():
    with pytest.raises(fxsplit.TraceError) as info:
        fxsplit.trace(Wrapper())
    message = str(info.value)
    assert "'inner.1'" in message and "DataDependent" in message
    assert "test_tracing.py" in message and "if x.sum() > 0" in message
    assert "leaf_modules=[DataDependent]" in message


@pytest.mark.parametrize("leaf", [DataDependent, "inner.1"])
def test_leaf_modules_by_class_or_name(leaf):
    gm = fxsplit.trace(Wrapper(), leaf_modules=[leaf])
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["lin", "inner.0", "inner.1"]


def test_concrete_args_fix_an_argument():
    class Scaled(nn.Module):
        def forward(self, x, double: bool = False):
            return x * 2 if double else x

    gm = fxsplit.trace(Scaled(), concrete_args={"double": True})
    assert torch.equal(gm(torch.ones(2), True), torch.full((2,), 2.0))


def test_timm_registry_makes_leaves():
    timm = pytest.importorskip("timm")
    from timm.layers import get_notrace_modules

    model = timm.create_model("mobilevit_xxs", pretrained=False, num_classes=4)
    gm = fxsplit.trace(model)
    leaf_types = tuple(get_notrace_modules())
    leaves = [n.target for n in gm.graph.nodes
              if n.op == "call_module" and isinstance(gm.get_submodule(n.target), leaf_types)]
    assert leaves, "mobilevit's MobileVitBlock is in timm's registry and must stay a leaf"


@pytest.mark.parametrize("training", [True, False])
def test_traces_current_mode_and_warns_when_other_differs(training):
    model = ModeDependent().train(training)
    with pytest.warns(UserWarning, match="different graph in (eval|train) mode"):
        gm = fxsplit.trace(model)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    assert gm.training == training


def test_same_graph_in_both_modes_does_not_warn(recwarn):
    fxsplit.trace(SmallCNN())
    assert not [w for w in recwarn if "different graph" in str(w.message)]


def test_not_a_module():
    with pytest.raises(fxsplit.TraceError, match="got function"):
        fxsplit.trace(lambda x: x)
