"""Rewriting zoo models with copied weights reproduces every task's output, in eval mode and in train mode.

``pytest tests/test_zoo.py`` runs a sample across families; ``pytest tests/test_zoo.py --zoo=full`` runs every
torchvision classifier under 100M parameters and every timm model of ``zoo.TIMM``. Each model is split at its
first layer, a middle one, its last shared layer (its classifier, which feeds the heads), and three at once.
"""

from __future__ import annotations

import functools

import pytest

import fxsplit
from tests import zoo
from tests.models import assert_equivalent, count
from tests.reference import assert_per_task

MODES = ("eval", "train")
SAMPLE_CHOICES = ("first", "spread")  # the sample keeps CI short; --zoo=full runs every choice
KINDS = {"cnn", "vit", "mlp", "hybrid"}


def pytest_generate_tests(metafunc):
    if "entry" not in metafunc.fixturenames:
        return
    full = metafunc.config.getoption("--zoo") == "full"
    metafunc.parametrize(("entry", "mode", "choice"), [
        pytest.param(entry, mode, choice, id=f"{entry.name}-{mode}-{choice}")
        for entry in zoo.entries() if full or entry.sample
        for mode in MODES
        for choice in (zoo.CHOICES if full else SAMPLE_CHOICES)
    ])


@functools.lru_cache(maxsize=1)
def prepared(entry: zoo.Entry, mode: str):
    """``entry``'s model (put in ``mode``), its input and its layer graph."""
    model, x = zoo.build(entry)
    model.train(mode == "train")
    return model, x, fxsplit.layer_graph(model)


@pytest.mark.filterwarnings("ignore:.*traces to a different graph:UserWarning")
def test_copied_rewrite_reproduces_every_task(entry: zoo.Entry, mode: str, choice: str):
    """Split at ``choice``: same outputs per task, the per-task contract once the copies differ (outputs and
    gradients), and each chosen layer's parameters once more per extra task."""
    try:
        model, x, graph = prepared(entry, mode)
    except fxsplit.TraceError as error:
        if entry.library != "torchvision":
            raise
        pytest.skip(f"{entry.name} does not trace in {mode} mode: {error}")
    model.train(mode == "train")
    layers = zoo.choose([layer for layer in graph if not layer.startswith("heads.")], choice)
    rounding = (mode, choice) in zoo.ROUNDING.get(entry.name, {})
    if rounding:  # the batched split rounds apart from the model by more than 1e-5, but by rounding only
        assert_equivalent(model, fxsplit.rewrite(model, layers), x, {}, tolerance=zoo.ROUNDING_TOLERANCE)
    split = fxsplit.rewrite(model, layers, batch_branches=not rounding)

    assert split.split_layers == tuple(layers)
    assert_equivalent(model, split, x, {})
    assert_per_task(model, split, (x,), modes=(mode == "train",))
    tasks, chosen = len(model.heads), sum(graph.nodes[layer]["params"] for layer in layers)
    assert count(split.parameters()) == count(model.parameters()) + (tasks - 1) * chosen
    assert count(split.shared_parameters()) == count(model.backbone.parameters()) - chosen
    for task, head in model.heads.items():
        assert count(split.task_parameters(task)) == count(head.parameters()) + chosen


def test_zoo_spans_the_families():
    """At least 25 timm models of every kind, many with modules from timm's leaf registry; the sample spans them."""
    timm = [entry for entry in zoo.entries() if entry.library == "timm"]
    assert len(timm) >= 25
    assert {entry.kind for entry in timm} == {entry.kind for entry in timm if entry.sample} == KINDS
    leaves = {entry: zoo.registry_leaves(entry) - {"BatchNormAct2d"} for entry in timm}
    assert len([entry for entry in timm if leaves[entry]]) >= 10
    assert len([entry for entry in timm if leaves[entry] and entry.sample]) >= 5
    torchvision = [entry for entry in zoo.entries() if entry.library == "torchvision"]
    assert {entry.kind for entry in torchvision if entry.sample} == {"cnn", "vit"}
    names = {entry.name for entry in zoo.entries()}
    assert set(zoo.ROUNDING) <= names
    assert {case for cases in zoo.ROUNDING.values() for case in cases} <= {(m, c) for m in MODES for c in zoo.CHOICES}
