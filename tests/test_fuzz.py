"""Properties of rewrite and analyze on random multi-task architectures (see tests/strategies.py).

CI runs the "ci" hypothesis profile; ``HYPOTHESIS_PROFILE=slow python -m pytest tests/test_fuzz.py`` runs
500 examples per property.
"""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxsplit
from tests.reference import assert_per_task, reference
from tests.models import assert_equivalent, count, task_outputs
from tests.strategies import partitions, programs

BACKWARD_ONLY = ("function", "gradient_hook")  # what torch.export loses, and its route refuses by name


def layer_users(model, x, kwargs) -> dict[str, list[str]]:
    """Layer -> the tasks whose outputs reach it (from which gradients autograd leaves None)."""
    clone = copy.deepcopy(model)
    named = dict(clone.named_parameters())
    outputs = task_outputs(clone, x, kwargs)
    graph = fxsplit.layer_graph(model)
    users = {}
    for task, out in outputs.items():
        grads = dict(zip(named, torch.autograd.grad(out.sum(), list(named.values()), retain_graph=True,
                                                    allow_unused=True)))
        for layer, params in graph.nodes(data="parameters"):
            if any(grads[p] is not None for p in params):
                users.setdefault(layer, []).append(task)
    return users


@given(programs(), st.data())
def test_random_architectures_rewrite_exactly(program, data):
    model, x, kwargs = program
    users = layer_users(model, x, kwargs)
    shared = sorted(layer for layer, tasks in users.items() if len(tasks) > 1)
    layers = data.draw(st.lists(st.sampled_from(shared), unique=True, max_size=4)) if shared else []
    training = data.draw(st.booleans())
    split_norms, batch_branches = data.draw(st.booleans()), data.draw(st.booleans())
    model.train(training)
    split = fxsplit.rewrite(model, layers, split_norms=split_norms, batch_branches=batch_branches,
                            example_inputs=x, **kwargs)
    assert split.route == "fx"
    assert_equivalent(model, split, x, kwargs)
    assert_per_task(model, split, (x,), kwargs.get("outputs"), modes=(training,))

    graph = fxsplit.layer_graph(model)
    extra = sum((len(users[layer]) - 1) * graph.nodes[layer]["params"] for layer in split.split_layers)
    assert count(split.parameters()) == count(model.parameters()) + extra  # layers no task reaches are kept too

    groups = [set(map(id, split.shared_parameters()))] + [set(map(id, split.task_parameters(t))) for t in split.tasks]
    assert sum(map(len, groups)) == len(set().union(*groups)) == len(list(split.parameters()))
    for task in split.tasks:
        split.zero_grad(set_to_none=True)
        split(x)[task].square().sum().backward()
        for other in set(split.tasks) - {task}:
            assert all(p.grad is None for p in split.task_parameters(other)), (task, other)


@given(programs(), st.data())
def test_random_architectures_split_into_random_groups_exactly(program, data):
    """Random partitions of the tasks on random layers: each task computes as the model with its groups' copies,
    each group copy adds its layer's parameters once, and the parameter groups cover every parameter once."""
    model, x, kwargs = program
    users = layer_users(model, x, kwargs)
    shared = sorted(layer for layer, tasks in users.items() if len(tasks) > 1)
    layers = data.draw(st.lists(st.sampled_from(shared), unique=True, max_size=3)) if shared else []
    groups = {layer: data.draw(partitions(users[layer])) for layer in layers}
    training, batch_branches = data.draw(st.booleans()), data.draw(st.booleans())
    model.train(training)
    split = fxsplit.rewrite(model, groups, batch_branches=batch_branches, example_inputs=x, **kwargs)
    assert_equivalent(model, split, x, kwargs)
    assert_per_task(model, split, (x,), kwargs.get("outputs"), modes=(training,))
    graph = fxsplit.layer_graph(model)
    extra = sum((len(split.groups[layer]) - 1) * graph.nodes[layer]["params"] for layer in split.split_layers)
    assert count(split.parameters()) == count(model.parameters()) + extra
    owners = split.parameter_tasks()
    covered = [id(p) for group in set(owners.values()) for p in split.group_parameters(group)]
    assert sorted(covered) == sorted(map(id, split.parameters()))


@given(programs())
def test_random_architectures_score_like_the_reference_loop(program):
    model, x, kwargs = program
    names = kwargs.get("tasks") or list(model(x))
    keys = kwargs.get("outputs") or {name: name for name in names}
    targets = torch.randn(3, 5, 3, dtype=torch.float64)
    tasks = {name: (lambda key, i: lambda out, batch: (out[key][:, i % 3] - batch[1][:, i % 3]).pow(2).mean())(keys[name], i)
             for i, name in enumerate(names)}
    batches = lambda: [(x + 0.1 * k, targets[k]) for k in range(3)]  # noqa: E731  (forward may write into them)
    model.train()
    report = fxsplit.analyze(model, tasks, batches(), threshold=[0.0, -0.1], progress=False)
    expected = reference(copy.deepcopy(model), tasks, batches(), fxsplit.layer_graph(model), [0.0, -0.1])
    for S in (0.0, -0.1):
        assert report.scores_at(S) == {layer: expected[S].get(layer, 0) for layer in report.scores_at(S)}
        assert set(report.scores_at(S)) == set(expected[S])


@settings(max_examples=max(6, settings().max_examples // 4))  # each example traces through torch.export twice
@given(programs(), st.data())
def test_random_architectures_split_alike_on_both_routes(program, data):
    """The torch.export route finds the same layers and splits them as the torch.fx route does: same outputs,
    parameters, owners and buffers after a step in each mode."""
    model, x, kwargs = program
    model.train(data.draw(st.booleans()))
    lost = sorted({kind for kind, _, _ in model.ops if kind in BACKWARD_ONLY})
    if lost:
        with pytest.raises(fxsplit.TraceError, match="torch.export cannot record what Program does in the backward"):
            fxsplit.layer_graph(model, example_inputs=x, method="export")
        return
    graphs = [fxsplit.layer_graph(model), fxsplit.layer_graph(model, example_inputs=x, method="export")]
    assert [dict(g.nodes(data="members")) for g in graphs[1:]] == [dict(graphs[0].nodes(data="members"))]
    assert list(graphs[1].nodes) == list(graphs[0].nodes) and set(graphs[1].edges) == set(graphs[0].edges)
    shared = [layer for layer, users in layer_users(model, x, kwargs).items() if len(users) > 1]
    layers = data.draw(st.lists(st.sampled_from(sorted(shared)), unique=True, max_size=3)) if shared else []
    splits = [fxsplit.rewrite(model, layers, batch_branches=False, method="fx", **kwargs),
              fxsplit.rewrite(model, layers, example_inputs=x, method="export", **kwargs)]
    assert splits[1].route == "export" and splits[1].parameter_tasks() == splits[0].parameter_tasks()
    for training in (True, False):
        outputs = [split.train(training)(x.clone()) for split in splits]  # forward may write into its input
        assert all(torch.equal(outputs[0][task], outputs[1][task]) for task in outputs[0])
    states = [split.state_dict() for split in splits]
    assert set(states[0]) == set(states[1]) and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
