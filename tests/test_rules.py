import copy
import warnings

import pytest
import torch
from torch import fx, nn

import fxsplit
from fxsplit import rules
from fxsplit.tracing import mutated_input
from tests.reference import assert_per_task


@pytest.fixture(autouse=True)
def rules_as_shipped(monkeypatch):
    """Every test here registers things: the rules are put back as fxsplit ships them."""
    for kind in (rules.has_running_statistics, rules.batched, rules._cheap):
        monkeypatch.setattr(kind, "classes", kind.classes)
    for name in ("_DROPOUTS", "_DROP_PROBABILITIES", "_IN_PLACE_FUNCTIONS", "_UNTRACEABLE_MODULES",
                 "_UNTRACEABLE_FUNCTIONS"):
        monkeypatch.setattr(rules, name, copy.copy(getattr(rules, name)))


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), Scale(), nn.Linear(8, 8))
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "ab"})

    def forward(self, x):
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


def _calls(split, target):
    return sum(node.op == "call_module" and node.target == target for node in split.graph.nodes)


def test_a_registered_per_sample_layer_joins_the_batched_stream():
    torch.manual_seed(0)
    model, x = Chain(), torch.randn(5, 4)
    leaves = {"leaf_modules": [Scale]}
    before = fxsplit.rewrite(model, ["trunk.0"], example_inputs=x, tracer_kwargs=leaves)
    assert _calls(before, "trunk.2") == 2 and _calls(before, "trunk.1") == 1  # one call per branch: a stream breaks
    assert rules.register_per_sample(Scale) is Scale
    after = fxsplit.rewrite(model, ["trunk.0"], example_inputs=x, tracer_kwargs=leaves)
    assert _calls(after, "trunk.2") == 1 and _calls(after, "trunk.3") == 1  # on the stream, and so is what follows
    assert_per_task(model, after, (x,))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_a_registered_untraceable_module_is_called_whole():
    model = nn.Sequential(nn.Linear(3, 3), Gate())
    with pytest.raises(fxsplit.TraceError, match="torch.fx cannot trace module '1' \\(Gate\\)"):
        fxsplit.trace(model, method="fx")
    rules.register_untraceable(Gate)
    traced = fxsplit.trace(model, torch.randn(2, 3), method="fx")
    assert [node.target for node in traced.graph.nodes if node.op == "call_module"] == ["0", "1"]


def bump(x):
    return x.mul_(2)


def test_a_registered_function_writes_its_first_argument():
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(bump, (x,))
    assert mutated_input(nn.Module(), node) is None  # its name says nothing
    rules.register_in_place(bump)
    assert mutated_input(nn.Module(), node) is x


class Stochastic(nn.Module):
    """Drops at the rate it holds, in train mode: a dropout layer fxsplit does not know by its class."""

    def __init__(self):
        super().__init__()
        self.rate = 0.5

    def forward(self, x):
        return x * (torch.rand_like(x) >= self.rate) if self.training else x


class Noisy(Chain):
    def __init__(self):
        super().__init__()
        self.trunk[2] = Stochastic()


def test_a_registered_dropout_is_switched_off_while_a_split_is_checked_in_train_mode():
    torch.manual_seed(0)
    model, x = Noisy(), torch.randn(5, 4)
    leaves = {"leaf_modules": [Stochastic]}
    with pytest.warns(UserWarning, match="random in train mode even without dropout"):
        fxsplit.rewrite(model, ["trunk.1"], example_inputs=x, tracer_kwargs=leaves)
    assert rules.register_dropout(Stochastic, "rate") is Stochastic
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked in both modes: no warning
        split = fxsplit.rewrite(model, ["trunk.1"], example_inputs=x, tracer_kwargs=leaves)
    assert model.trunk[2].rate == 0.5 and split.get_submodule("trunk.2").rate == 0.5  # put back after the check
    assert rules.drop_attribute(nn.Dropout()) == "p" and rules.drop_attribute(nn.Linear(1, 1)) is None


def test_a_registered_norm_counts_as_one_with_running_statistics_as_batch_norm_does():
    class Running(nn.Module):
        pass
    assert not rules.has_running_statistics(Running())
    rules.register_norm(Running)
    assert rules.has_running_statistics(Running()) and rules.has_running_statistics(copy.deepcopy(Running()))
    assert rules.has_running_statistics(nn.BatchNorm2d(3)) and not rules.has_running_statistics(nn.LayerNorm(3))


@pytest.mark.parametrize("register, argument, message", [
    (rules.register_norm, int, "registering a norm with running statistics takes an nn.Module subclass, got "
                               "<class 'int'>"),
    (rules.register_per_sample, nn.ReLU(), "registering a per-sample layer takes an nn.Module subclass"),
    (rules.register_dropout, Stochastic(), "register_dropout takes an nn.Module subclass"),
    (lambda cls: rules.register_dropout(cls, "drop rate"), Stochastic,
     "register_dropout takes the name of the attribute holding the probability, got 'drop rate'"),
    (rules.register_in_place, 3, "register_in_place takes a function, got 3"),
    (rules.register_untraceable, "Gate", "register_untraceable takes an nn.Module subclass or a function"),
    (lambda op: rules.register_dropping_operation(op, "p"), torch.ops.aten.relu.default,
     r"has no argument 'p' \(\['self'\]\)"),
])
def test_registering_something_else_is_an_error_naming_it(register, argument, message):
    with pytest.raises(fxsplit.FxsplitError, match=message):
        register(argument)
