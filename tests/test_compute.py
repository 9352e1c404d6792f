"""What a split costs in FLOPs: the report's count, from the profile analyze measures, against FlopCounterMode on the
real split that fxsplit.rewrite makes."""

import copy

import pytest
import torch
from torch import nn

import fxsplit
from fxsplit.compute import forward_flops
from fxsplit.layers import graph_of, with_profile
from fxsplit.tracing import trace_graph
from tests.models import MultiHead, scoring_cases

TASKS = "abc"


class Trunk(nn.Module):
    """Three linear layers shared by three tasks, a linear head each."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        self.heads = nn.ModuleDict({t: nn.Linear(8, 3) for t in TASKS})

    def forward(self, x):
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


def _losses():
    return {t: (lambda t: lambda out, batch: out[t].pow(2).mean() * (-1) ** k)(t) for k, t in enumerate(TASKS)}


def _added(model, layers, x):
    """FLOPs per sample that the real split of ``layers`` adds, by FlopCounterMode."""
    split = fxsplit.rewrite(model, layers, list(TASKS), example_inputs=x)
    return forward_flops(split, (x,), {}) - forward_flops(model, (x,), {})


def test_splitting_the_last_shared_layer_adds_its_copies_and_the_first_adds_the_whole_trunk_per_task():
    torch.manual_seed(0)
    model, x = Trunk(), torch.randn(5, 6)
    report = fxsplit.analyze(model, _losses(), [torch.randn(5, 6) for _ in range(3)], progress=False)
    T, linear = len(TASKS), lambda cin, cout: 2 * cin * cout  # FlopCounterMode: 2 per multiply-add, no bias
    trunk = linear(6, 16) + linear(16, 16) + linear(16, 8)
    assert report.model_flops == trunk + T * linear(8, 3) == forward_flops(model, (x,), {})
    assert report.flops("trunk.4") == (T - 1) * linear(16, 8) == _added(model, ["trunk.4"], x)
    assert report.flops(["trunk.0"]) == (T - 1) * trunk == _added(model, ["trunk.0"], x)
    assert report.flops(["trunk.2", "trunk.4"]) == report.flops(["trunk.2"]) == _added(model, ["trunk.4", "trunk.2"], x)


def test_every_selection_of_a_residual_cnn_costs_what_its_real_split_adds():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    x = batches[0][0]
    report = fxsplit.analyze(copy.deepcopy(model), tasks, batches, progress=False)
    assert report.model_flops == forward_flops(model, (x,), {})
    first, middle, last = report.layers[0], report.layers[len(report.layers) // 2], report.layers[-1]
    selections = [[first], [middle], [last], [middle, last], [first, last]]  # each a rewrite, checked: slow
    for layers in selections:
        assert report.flops(layers) == pytest.approx(_added(model, list(layers), x), rel=1e-12), layers


def test_within_keeps_to_a_compute_budget_and_takes_todays_parameter_budget_as_before():
    torch.manual_seed(0)
    model = Trunk()
    report = fxsplit.analyze(model, _losses(), [torch.randn(5, 6) for _ in range(25)], progress=False)
    for budget in (0.2, 0.6, 1.0, 3.0):
        chosen = report.within(flops=budget)
        assert report.flops(chosen) <= budget * report.model_flops
        assert all(report.flops([*chosen, layer]) > budget * report.model_flops
                   for layer in report.ranking() if layer not in chosen)
    params = report.within(0.5)
    assert params == report.within(budget=0.5) and set(report.within(0.5, flops=0.2)) <= set(params)
    with pytest.raises(fxsplit.LayerError, match=r"within\(\) needs a budget"):
        report.within()
    with pytest.raises(fxsplit.LayerError, match=r"within\(flops=...\) needs a fraction >= 0"):
        report.within(flops=-1)
    assert "FLOPs per sample (+" in report.describe(report.top(2)) and "FLOPs" in str(report).splitlines()[1]


def test_the_profile_travels_with_the_report_and_its_absence_says_how_to_measure(tmp_path):
    torch.manual_seed(0)
    model, x = Trunk(), torch.randn(5, 6)
    report = fxsplit.analyze(model, _losses(), [x], progress=False)
    loaded = fxsplit.ConflictReport.load(report.save(tmp_path / "report.json"))
    assert loaded.flops(["trunk.2"]) == report.flops(["trunk.2"]) and loaded.model_flops == report.model_flops
    monitor = fxsplit.ConflictMonitor(model, list(TASKS))
    out = model(x)
    monitor.backward({t: loss(out, x) for t, loss in _losses().items()})
    bare = monitor.report()
    with pytest.raises(fxsplit.ReportError, match=r"no compute profile.*graph=fxsplit.layer_graph\(model, "
                                                  r"example_inputs=x\)"):
        bare.flops(["trunk.2"])
    assert "FLOPs" not in bare.describe(["trunk.2"]) and "FLOPs" not in str(bare)
    monitor = fxsplit.ConflictMonitor(model, list(TASKS), graph=fxsplit.layer_graph(model, example_inputs=x))
    monitor.backward({t: loss(model(x), x) for t, loss in _losses().items()})
    assert monitor.report().flops(["trunk.2"]) == report.flops(["trunk.2"])
    with pytest.raises(fxsplit.UnknownLayerError, match="'trunk.9' is not a layer"):
        report.flops(["trunk.9"])


def test_measuring_leaves_the_models_buffers_and_the_random_numbers_as_they_were():
    model = MultiHead(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5)), 8).train()
    x = torch.randn(5, 6)
    traced = trace_graph(model, None)
    graph = graph_of(traced)
    buffers = [b.clone() for b in model.buffers()]
    state = torch.random.get_rng_state()
    with_profile(graph, traced, lambda module: module(x))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(b, saved) for b, saved in zip(model.buffers(), buffers))
    assert graph.graph["compute"]["model"] == forward_flops(model, (x,), {})
