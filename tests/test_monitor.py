import copy
import itertools
import json
import math
import re

import networkx as nx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st
from torch import nn

import fxsplit
from tests.models import (
    MultiHead, TupleHeads, Twice, assert_unchanged, monitored, scoring_cases, snapshot, step_losses,
)
from tests.reference import reference


def _flat(rows):
    return [value for row in rows for value in row]


def _assert_same_state(model, twin, rtol=1e-10):
    for (key, value), expected in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=rtol, atol=1e-12, msg=key)


def _assert_same_grads(model, twin):
    """Every parameter's ``.grad`` is the twin's (the summed loss's): both set or both not, same dtype, layout and
    values."""
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert (p.grad.dtype, p.grad.shape, p.grad.layout) == (p.dtype, p.shape, q.grad.layout), name
            torch.testing.assert_close(p.grad.to_dense(), q.grad.to_dense(), rtol=1e-12, atol=1e-14, msg=name)


def _step(*optimizers):
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name, hooks", [(name, False) for name in sorted(scoring_cases())] +
                         [("cnn-3-tasks", True), ("vit", True)])
def test_monitor_scores_and_trains_like_analyze_and_the_plain_loop(name, hooks):
    model, tasks, batches = scoring_cases()[name]
    graph = fxsplit.layer_graph(model)
    twin, analyzed = copy.deepcopy(model), copy.deepcopy(model)
    sgd = dict(lr=0.1, momentum=0.9)
    report = monitored(model, tasks, batches, torch.optim.SGD(model.parameters(), **sgd), hooks=hooks,
                        threshold=[0.0, -0.05], graph=graph)
    expected = reference(twin, tasks, batches, graph, [0.0, -0.05], optimizer=torch.optim.SGD(twin.parameters(), **sgd))
    for S in (0.0, -0.05):
        assert report.scores_at(S) == {layer: expected[S].get(layer, 0) for layer in report.scores_at(S)}
        assert set(report.scores_at(S)) == set(expected[S])
    _assert_same_state(model, twin)
    by_analyze = fxsplit.analyze(analyzed, tasks, batches, threshold=[0.0, -0.05], progress=False, graph=graph,
                                 optimizer=torch.optim.SGD(analyzed.parameters(), **sgd))
    assert report.counts == by_analyze.counts and report.steps == by_analyze.steps == len(batches)
    assert _flat(report.whole_cosine) == pytest.approx(_flat(by_analyze.whole_cosine), rel=1e-9)


def _spare_model():
    """Three tasks on Twice, with a frozen layer and a module no task reaches."""
    torch.manual_seed(0)
    model = MultiHead(Twice(), 8, tasks="abc").double()
    model.spare = nn.Linear(3, 3).double()
    model.backbone.inp.requires_grad_(False)
    tasks = {t: (lambda t, i: lambda out, batch: (out[t].sum(1) * batch[1][:, i]).pow(2).mean())(t, i)
             for i, t in enumerate("abc")}
    batches = [(torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)) for _ in range(3)]
    return model, tasks, batches


def _set_grads(model, how):
    for k, p in enumerate(model.parameters()):
        if how == "foreign" or (how == "mixed" and k % 2):
            p.grad = torch.full_like(p, 0.25)


@pytest.mark.parametrize("before", ["none", "foreign", "mixed"])
@pytest.mark.parametrize("between", ["set_to_none", "zero", "keep"])
def test_grad_is_what_the_summed_loss_gives(before, between):
    model, tasks, batches = _spare_model()
    twin = copy.deepcopy(model)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    _set_grads(model, before)
    _set_grads(twin, before)
    for batch in batches:
        monitor.backward(step_losses(model, tasks, batch))
        sum(step_losses(twin, tasks, batch).values()).backward()
        _assert_same_grads(model, twin)
        if between != "keep":
            model.zero_grad(set_to_none=between == "set_to_none")
            twin.zero_grad(set_to_none=between == "set_to_none")
    assert model.spare.weight.grad is None or before != "none"
    assert model.backbone.inp.bias.grad is None or before != "none"


class _Mixed(nn.Module):
    """A float32 layer feeding a float64 one: the gradient rows are float64, .grad keeps each parameter's dtype."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.second = nn.Linear(4, 2).double()

    def forward(self, x):
        out = self.second(torch.tanh(self.first(x)).double())
        return {"a": out[:, 0], "b": out[:, 1]}


def test_parameters_of_several_dtypes_get_grads_of_their_own_dtype():
    torch.manual_seed(0)
    model = _Mixed()
    twin = copy.deepcopy(model)
    tasks = {"a": lambda out, x: out["a"].pow(2).mean(), "b": lambda out, x: out["b"].sin().mean()}
    x = torch.randn(5, 3)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for _ in range(2):  # .grad None, then accumulated into
        monitor.backward(step_losses(model, tasks, (x,)))
        sum(step_losses(twin, tasks, (x,)).values()).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, q.grad)
    assert monitor.report().layers == ["first", "second"]


def test_scoring_only_leaves_the_model_and_its_grads_alone():
    model, tasks, batches = _spare_model()
    _set_grads(model, "mixed")
    before = snapshot(model)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for batch in batches:
        monitor.backward(step_losses(model, tasks, batch), update_grad=False)
    report = monitor.report()
    assert_unchanged(model, before)
    assert report.steps == 3 and report.left_out["backbone.inp"] == "frozen (no parameter requires grad)"
    assert "spare" not in report.reach


def test_hook_style_restores_grads_and_removes_its_hooks_like_the_authors_loop():
    model, tasks, batches = _spare_model()
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for batch in batches:
        losses = step_losses(model, tasks, batch)
        for k, (task, loss) in enumerate(reversed(list(losses.items()))):  # any task order
            optimizer.zero_grad()  # the authors' loop zeroes the gradients before each task
            with monitor.task(task):
                loss.backward(retain_graph=k < 2)
        assert all(not p._backward_hooks for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    expected = monitored(twin, tasks, batches, torch.optim.SGD(twin.parameters(), lr=0.05))
    assert monitor.report().to_dict() == expected.to_dict()
    _assert_same_state(model, twin)


@pytest.mark.parametrize("hooks", [False, True], ids=["backward", "hooks"])
def test_four_accumulated_micro_batches_equal_one_batch_four_times_as_large(hooks):
    model, tasks, _ = scoring_cases()["vit"]  # LayerNorm: per-sample, so batches split exactly
    batches = [(torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 2, (8, 2))) for _ in range(2)]
    graph = fxsplit.layer_graph(model)
    big = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = fxsplit.ConflictMonitor(model, tasks, threshold=[0.0, 0.2], graph=graph)
    for batch in batches:
        for k, micro in enumerate(zip(batch[0].chunk(4), batch[1].chunk(4))):
            last = k == 3
            losses = {t: loss / 4 for t, loss in step_losses(model, tasks, micro).items()}
            if hooks:
                for j, (task, loss) in enumerate(losses.items()):
                    with monitor.task(task, accumulate=not last):
                        loss.backward(retain_graph=j == 0)
            else:
                monitor.backward(losses, accumulate=not last)
            assert all(p.grad is None for p in model.parameters()) or last  # .grad waits for the step's end
        optimizer.step()
        optimizer.zero_grad()
    report = monitor.report()
    expected = monitored(big, tasks, batches, torch.optim.SGD(big.parameters(), lr=0.1), threshold=[0.0, 0.2],
                          graph=graph)
    assert report.steps == 2 and report.counts == expected.counts
    assert _flat(report.whole_cosine) == pytest.approx(_flat(expected.whole_cosine), rel=1e-9)
    _assert_same_state(model, big, rtol=1e-9)


def test_grad_scaler_steps_score_unscaled_and_skipped_steps_are_not_scored():
    torch.manual_seed(0)
    model = TupleHeads()
    twin = copy.deepcopy(model)
    tasks = {"a": lambda out, batch: out[0].pow(2).mean(), "b": lambda out, batch: (out[1] - 1).pow(2).mean()}
    batches = [(torch.randn(6, 3, 16, 16),) for _ in range(4)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = fxsplit.ConflictMonitor(model, tasks, scaler=scaler)
    for step, batch in enumerate(batches):
        losses = step_losses(model, tasks, batch)
        if step == 2:  # the scaled gradient of this step overflows float32
            losses["a"] = losses["a"] * 1e37
        monitor.backward(losses)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    report = monitor.report()
    assert scaler.get_scale() == 2.0 ** 7  # the scaler skipped one step
    assert report.steps == 3 and report.skipped == 1 and monitor.nonfinite_tasks == ["a"]
    kept = [batches[i] for i in (0, 1, 3)]
    expected = monitored(twin, tasks, kept, torch.optim.SGD(twin.parameters(), lr=0.1))
    assert report.counts == expected.counts
    assert _flat(report.whole_cosine) == pytest.approx(_flat(expected.whole_cosine), rel=1e-5)
    _assert_same_state(model, twin, rtol=1e-6)
    assert "skipped: 1 steps" in str(report)


def test_a_split_model_scores_only_its_still_shared_layers():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    split = fxsplit.rewrite(model, ["backbone.block1.conv2"])
    report = monitored(split, tasks, batches)
    assert report.left_out["copies.a.backbone.block1.conv2"] == "only task 'a' reaches it"
    assert "backbone.block2.conv1" in report.layers


def _detached(out, batch):
    return (out["b"].detach() * torch.ones((), dtype=out["b"].dtype, requires_grad=True)).sum()


@pytest.mark.parametrize("act, error, match", [
    (lambda m, losses: m.backward({**losses, "c": losses["a"]}), fxsplit.TaskError,
     r"'c' is not a task of this monitor; its tasks are \['a', 'b'\]"),
    (lambda m, losses: (m.backward({"a": losses["a"]}), m.report()), fxsplit.TaskError,
     r"task\(s\) \['b'\] had no loss at any step"),
    (lambda m, losses: m.backward([losses["a"], losses["b"]]), fxsplit.TaskError, "backward takes a mapping"),
    (lambda m, losses: m.backward({**losses, "b": losses["b"].detach()}), fxsplit.TaskError,
     "task 'b' does not depend on the model's parameters"),
    (lambda m, losses: m.report(), fxsplit.ScoringError, "no step has been scored yet"),
    (lambda m, losses: m.task("z").__enter__(), fxsplit.TaskError, "'z' is not a task of this monitor"),
])
def test_misuse_is_a_typed_error(act, error, match):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    with pytest.raises(error, match=match):
        act(monitor, step_losses(model, tasks, batches[0]))


def test_hook_style_misuse_is_a_typed_error():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    losses = step_losses(model, tasks, batches[0])
    with monitor.task("a"):
        losses["a"].backward(retain_graph=True)
    with pytest.raises(fxsplit.TaskError, match="task 'a' was already captured in this step"):
        with monitor.task("a"):
            pass
    with pytest.raises(fxsplit.ScoringError, match=r"task\(s\) \['b', 'c'\] are still to be captured"):
        monitor.report()
    with pytest.raises(fxsplit.TaskError, match="give every task the same value"):
        with monitor.task("b", accumulate=True):
            pass
    with pytest.raises(fxsplit.ScoringError, match="not complete"):
        monitor.backward(losses)


@pytest.mark.parametrize("use", ["analyze", "monitor"])
def test_a_loss_that_reaches_no_parameter_names_its_task(use):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    tasks = {**tasks, "b": _detached}
    before = snapshot(model)
    with pytest.raises(fxsplit.TaskError, match="the loss of task 'b' reaches none of the model's trainable"):
        if use == "analyze":
            fxsplit.analyze(model, tasks, batches, progress=False)
        else:
            fxsplit.ConflictMonitor(model, tasks).backward(step_losses(model.eval(), tasks, batches[0]))
    assert_unchanged(model.train(), before)


def test_a_nan_loss_is_reported_not_scored():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for step, batch in enumerate(batches):
        losses = step_losses(model, tasks, batch)
        monitor.backward({**losses, "b": losses["b"] * math.nan} if step == 1 else losses)
    report = monitor.report()
    assert (report.steps, report.skipped, monitor.nonfinite_tasks) == (3, 1, ["b"])
    assert all(sum(row) == 3 for row in report.histogram)


def test_a_model_that_reuses_a_tensor_of_an_earlier_step_in_eval_mode_says_to_train():
    timm = pytest.importorskip("timm", reason="the trap is timm's eval-mode attention-bias cache")
    model = timm.create_model("efficientvit_m0", pretrained=False, num_classes=4, img_size=64).eval()
    tasks = {"a": lambda out, batch: out[:, :2].sum(), "b": lambda out, batch: out[:, 2:].pow(2).sum()}
    images = [torch.randn(2, 3, 64, 64) for _ in range(2)]
    with pytest.raises(fxsplit.ScoringError, match="EfficientVitMsra is in eval mode and reuses a tensor computed at "
                                                   "an earlier step.*call model.train"):
        fxsplit.analyze(model, tasks, images, progress=False, graph=nx.DiGraph())  # the trap is in any graph's step
    monitor = fxsplit.ConflictMonitor(model.train(), tasks, graph=nx.DiGraph())
    for x in images:
        out = model(x)
        monitor.backward({t: loss(out, x) for t, loss in tasks.items()})
    assert monitor.report().steps == 2


def test_construction_errors():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    with pytest.raises(fxsplit.TaskError, match="at least two tasks"):
        fxsplit.ConflictMonitor(model, ["a"])
    with pytest.raises(fxsplit.TaskError, match=r"task name\(s\) \['a'\] given more than once"):
        fxsplit.ConflictMonitor(model, ["a", "b", "a"])
    with pytest.raises(fxsplit.FxsplitError, match=r"threshold must be a cosine in \[-1, 1\]"):
        fxsplit.ConflictMonitor(model, tasks, threshold=2)
    with pytest.raises(fxsplit.FxsplitError, match="distributed must be one of"):
        fxsplit.ConflictMonitor(model, tasks, distributed="everywhere")
    with pytest.raises(fxsplit.FxsplitError, match="no parameter that requires grad"):
        fxsplit.ConflictMonitor(copy.deepcopy(model).requires_grad_(False), tasks)


def test_a_report_of_the_first_format_still_loads(tmp_path):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    report = monitored(model, tasks, batches)
    data = {**report.to_dict(), "format": "fxsplit.ConflictReport/1"}
    del data["skipped"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = fxsplit.ConflictReport.load(path)
    assert loaded.skipped == 0 and loaded.scores == report.scores


# --- under real training: precision, requires_grad that changes, kept .grad, training-only methods, ----------
# --- checkpointing, sparse and complex gradients -------------------------------------------------------------


def _integer_model():
    """Linear layers with small integer weights: on integer inputs every value and gradient is an integer that
    float16 holds exactly, so a float64 copy is an exact oracle for the float16 model's gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    tasks = {"a": lambda out, batch: 8 * out[:, 0].sum(), "b": lambda out, batch: 4 * (out[:, 0] - 2 * out[:, 1]).sum()}
    batches = [(torch.randint(-2, 3, (8, 4)).float(),) for _ in range(3)]
    return model, tasks, batches


@pytest.mark.parametrize("between", ["set_to_none", "keep"])
def test_a_float16_model_is_scored_in_float32_and_its_grads_stay_float16(between):
    model, tasks, batches = _integer_model()
    oracle, summed = copy.deepcopy(model).double(), copy.deepcopy(model).half()
    model.half()
    half = [(x.half(),) for (x,) in batches]
    graph = fxsplit.layer_graph(model)
    monitor = fxsplit.ConflictMonitor(model, tasks, threshold=[0.0, 0.5], graph=graph)
    for batch, wide in zip(half, batches):
        losses = step_losses(model, tasks, batch)
        grads = torch.autograd.grad(losses["b"], list(model.parameters()), retain_graph=True)
        exact = torch.autograd.grad(step_losses(oracle, tasks, (wide[0].double(),))["b"], list(oracle.parameters()))
        assert all(torch.equal(g.double(), e) for g, e in zip(grads, exact))  # the oracle's gradients are exact
        assert max(g.float().pow(2).sum() for g in grads) > torch.finfo(torch.float16).max  # |g|^2 overflows
        monitor.backward(losses)
        sum(step_losses(summed, tasks, batch).values()).backward()
        for p, q in zip(model.parameters(), summed.parameters()):
            assert p.grad.dtype == torch.float16 and torch.equal(p.grad, q.grad)
        if between == "set_to_none":
            model.zero_grad()
            summed.zero_grad()
    report = monitor.report()
    expected = reference(oracle, tasks, [(x.double(),) for (x,) in batches], graph, [0.0, 0.5])
    assert report.steps == 3 and report.skipped == 0 and monitor.nonfinite_tasks == []
    for S in (0.0, 0.5):
        assert report.scores_at(S) == {layer: expected[S][layer] for layer in report.scores_at(S)}
    assert set(report.layers) == set(expected[0.0]) == {"0", "2"}
    analyzed = fxsplit.analyze(model, tasks, half, threshold=[0.0, 0.5], graph=graph, progress=False)
    assert analyzed.counts == report.counts


def test_a_layer_unfrozen_later_trains_as_the_summed_loss_and_is_left_out_of_the_scores():
    model, tasks, batches = _spare_model()  # backbone.inp frozen
    twin = copy.deepcopy(model)
    optimizer, twin_optimizer = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin))
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for step, batch in enumerate(batches):
        if step == 1:  # gradual unfreezing
            for m in (model, twin):
                m.backbone.inp.requires_grad_(True)
        monitor.backward(step_losses(model, tasks, batch))
        sum(step_losses(twin, tasks, batch).values()).backward()
        _assert_same_grads(model, twin)
        _step(optimizer, twin_optimizer)
    _assert_same_state(model, twin)
    assert model.backbone.inp.weight.grad is None and not torch.equal(model.backbone.inp.weight,
                                                                      _spare_model()[0].backbone.inp.weight)
    report = monitor.report()
    assert report.steps == 3 and "backbone.inp" not in report.layers
    assert report.left_out["backbone.inp"] == ("frozen at the first scored step, which decides the scored layers; "
                                               "unfrozen since: trained, not scored (a new ConflictMonitor scores it)")


def test_the_scores_of_a_probe_with_a_layer_unfrozen_later_are_the_first_steps_layers_by_the_plain_loop():
    model, tasks, batches = _spare_model()
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for step, batch in enumerate(batches):
        model.backbone.inp.requires_grad_(step > 0)
        monitor.backward(step_losses(model, tasks, batch), update_grad=False)
    report = monitor.report()
    del model.spare  # the plain loop differentiates every parameter: all trainable, all used
    expected = reference(model, tasks, batches, report.graph.subgraph(report.layers), [0.0])[0.0]
    assert report.scores == {layer: expected[layer] for layer in report.scores} and set(expected) == set(report.layers)
    assert report.layers == ["backbone.shared", "backbone.mid", "backbone.out"]


def test_a_layer_frozen_later_gets_no_grad_and_a_scored_one_is_a_typed_error():
    model, tasks, batches = _spare_model()
    twin = copy.deepcopy(model)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for step, batch in enumerate(batches[:2]):
        if step == 1:  # a head only task 'a' reaches: left out, so freezing it changes no score
            for m in (model, twin):
                m.heads.a.requires_grad_(False)
        monitor.backward(step_losses(model, tasks, batch))
        sum(step_losses(twin, tasks, batch).values()).backward()
        _assert_same_grads(model, twin)
        model.zero_grad()
        twin.zero_grad()
    model.backbone.mid.bias.requires_grad_(False)
    before = snapshot(model)
    with pytest.raises(fxsplit.ScoringError, match=r"'backbone\.mid\.bias' of the scored layer 'backbone\.mid' no "
                                                   r"longer requires grad.*monitor\.report\(\) before freezing it"):
        monitor.backward(step_losses(model, tasks, batches[2]))
    assert_unchanged(model, before)
    assert monitor.report().steps == 2


def test_requires_grad_changed_between_micro_batches_of_a_step_is_a_typed_error():
    model, tasks, batches = _spare_model()
    monitor = fxsplit.ConflictMonitor(model, tasks)
    monitor.backward(step_losses(model, tasks, batches[0]), accumulate=True)
    model.backbone.inp.requires_grad_(True)
    with pytest.raises(fxsplit.ScoringError, match=r"'backbone\.inp\.weight' .*changed between micro-batches"):
        monitor.backward(step_losses(model, tasks, batches[1]))
    model.backbone.inp.requires_grad_(False)
    monitor.backward(step_losses(model, tasks, batches[1]))  # the failed step was dropped whole
    assert monitor.report().steps == 1


def _let_go(model, how):
    """Let go of the parameters' .grad the way training loops do."""
    for k, p in enumerate(model.parameters()):
        if how == "set_to_none" or (how == "some" and k % 2):
            p.grad = None
        elif how == "replaced":
            p.grad = torch.zeros_like(p)


@pytest.mark.parametrize("how", ["set_to_none", "replaced", "some"])
def test_a_grad_the_user_kept_never_changes_once_let_go(how):
    model, tasks, batches = _spare_model()
    twin = copy.deepcopy(model)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    kept: dict = {}
    for batch in batches:
        held = {name for name, p in model.named_parameters() if name in kept and p.grad is kept[name]}
        values = {name: grad.clone() for name, grad in kept.items()}
        monitor.backward(step_losses(model, tasks, batch))
        sum(step_losses(twin, tasks, batch).values()).backward()
        for name, grad in kept.items():  # what .grad still is accumulates, as autograd accumulates into it
            assert torch.equal(grad, values[name]) == (name not in held), name
        _assert_same_grads(model, twin)
        kept = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        _let_go(model, how)
        _let_go(twin, how)


class _TrainsThroughAnotherMethod(nn.Module):
    """mmdet style: the training loop calls forward_train, which runs a module (``aux``) that forward never calls."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 8)
        self.aux = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in "ab"})

    def forward(self, x):
        return {t: head(torch.tanh(self.backbone(x))) for t, head in self.heads.items()}

    def forward_train(self, x):
        h = torch.tanh(self.backbone(x))
        return {t: head(h + self.aux(h)) for t, head in self.heads.items()}


class _TrainingForward(_TrainsThroughAnotherMethod):
    forward = _TrainsThroughAnotherMethod.forward_train


def _trained_through_forward_train(model, tasks, graph=None):
    torch.manual_seed(1)
    monitor = fxsplit.ConflictMonitor(model, tasks, graph=graph)
    for _ in range(2):
        out = model.forward_train(torch.randn(5, 6, dtype=torch.float64))
        monitor.backward({t: loss(out) for t, loss in tasks.items()})
    return monitor.report()


def test_modules_the_losses_reach_outside_the_layer_graph_are_left_out_with_how_to_score_them(tmp_path):
    torch.manual_seed(0)
    model = _TrainsThroughAnotherMethod().double()
    tasks = {"a": lambda out: out["a"].pow(2).mean(), "b": lambda out: out["b"].sin().mean()}
    report = _trained_through_forward_train(model, tasks)  # the graph is traced from forward
    assert report.layers == ["backbone"] and report.reach["aux.0"] == ["a", "b"]
    assert report.left_out["aux.0"].startswith("the losses reach its parameters but the layer graph has no layer for "
                                               "it (forward does not call it")
    assert "graph=fxsplit.layer_graph(" in report.left_out["aux.0"]
    assert report.graph.nodes["aux.0"]["params"] == 72 and report.graph.nodes["aux.0"]["kind"] == "Linear"
    assert fxsplit.ConflictReport.load(report.save(tmp_path / "report.json")).left_out == report.left_out
    assert "not scored" in str(report)
    training = copy.copy(model)  # what the reason advises: the same modules, forward_train as forward
    training.__class__ = _TrainingForward
    scored = _trained_through_forward_train(model, tasks, graph=fxsplit.layer_graph(training))
    assert scored.layers == ["backbone", "aux.0"] and "aux.0" not in scored.left_out


class _Checkpointed(nn.Module):
    """A stem, then a block run under torch.utils.checkpoint (``reentrant``: True, False or None: no checkpoint)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Linear(6, 8)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in "ab"})

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        if self.reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return {t: head(h) for t, head in self.heads.items()}


def _checkpoint_case(reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(reentrant).double()
    tasks = {"a": lambda out, batch: out["a"].pow(2).mean(), "b": lambda out, batch: (out["b"] - 1).pow(2).mean()}
    batches = [(torch.randn(5, 6, dtype=torch.float64),) for _ in range(3)]
    return model, tasks, batches


@pytest.mark.parametrize("frozen_stem", [False, True], ids=["trainable-stem", "frozen-stem-input-requires-grad"])
def test_reentrant_checkpoint_is_a_typed_error_for_backward_and_exact_by_the_per_task_style(frozen_stem):
    model, tasks, batches = _checkpoint_case(reentrant=True)
    plain = copy.deepcopy(model)
    plain.reentrant = None
    graph = fxsplit.layer_graph(plain)
    model.stem.requires_grad_(not frozen_stem)
    if frozen_stem:  # the PEFT idiom: the input requires grad so that the reentrant checkpoint gives gradients
        batches = [(x.requires_grad_(),) for (x,) in batches]
    monitor = fxsplit.ConflictMonitor(model, tasks, graph=graph)
    with pytest.raises(fxsplit.ScoringError, match=r"_Checkpointed runs torch\.utils\.checkpoint with "
                                                   r"use_reentrant=True.*use_reentrant=False.*monitor\.task"):
        monitor.backward(step_losses(model, tasks, batches[0]))
    assert all(p.grad is None for p in model.parameters())
    sgd = dict(lr=0.1, momentum=0.9)
    report = monitored(model, tasks, batches, torch.optim.SGD(model.parameters(), **sgd), hooks=True, graph=graph)
    stem = list(plain.stem.parameters())  # the plain loop differentiates every parameter: a frozen stem keeps lr 0
    optimizer = torch.optim.SGD([{"params": stem, "lr": 0.0 if frozen_stem else 0.1},
                                 {"params": [p for p in plain.parameters() if all(p is not q for q in stem)]}], **sgd)
    expected = reference(plain, tasks, batches, graph.subgraph(report.layers), [0.0], optimizer=optimizer)[0.0]
    assert report.steps == 3 and report.scores == {layer: expected[layer] for layer in report.scores}
    assert set(report.layers) == {"block.0", "block.2"} | (set() if frozen_stem else {"stem"})
    _assert_same_state(model, plain)


def test_non_reentrant_checkpoint_is_scored_by_backward_as_without_it():
    model, tasks, batches = _checkpoint_case(reentrant=False)
    plain = copy.deepcopy(model)
    plain.reentrant = None
    graph = fxsplit.layer_graph(plain)
    report = monitored(model, tasks, batches, torch.optim.SGD(model.parameters(), lr=0.1), graph=graph)
    expected = monitored(plain, tasks, batches, torch.optim.SGD(plain.parameters(), lr=0.1), graph=graph)
    assert report.counts == expected.counts and report.layers == expected.layers
    _assert_same_state(model, plain)


class _Tower(nn.Module):
    """A recommender tower: an embedding bag of ids (sparse gradients with ``sparse=True``), a shared layer, heads."""

    def __init__(self, sparse):
        super().__init__()
        self.embedding = nn.Embedding(20, 6, sparse=sparse)
        self.mid = nn.Linear(6, 8)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in "ab"})

    def forward(self, ids):
        h = torch.tanh(self.mid(self.embedding(ids).mean(1)))
        return {t: head(h) for t, head in self.heads.items()}


@pytest.mark.parametrize("hooks", [False, True], ids=["backward", "hooks"])
def test_sparse_embedding_gradients_are_scored_dense_and_grad_stays_sparse(hooks):
    torch.manual_seed(0)
    model = _Tower(sparse=True).double()
    summed, dense = copy.deepcopy(model), copy.deepcopy(model)
    dense.embedding.sparse = False
    tasks = {"a": lambda out, batch: out["a"].pow(2).sum(), "b": lambda out, batch: out["b"].sin().sum()}
    batches = [(torch.randint(0, 20, (6, 4)),) for _ in range(3)]
    graph = fxsplit.layer_graph(model)
    optimizer, summed_optimizer = (torch.optim.SGD(m.parameters(), lr=0.02) for m in (model, summed))
    monitor = fxsplit.ConflictMonitor(model, tasks, graph=graph)
    for k, batch in enumerate(batches):
        losses = step_losses(model, tasks, batch)
        if hooks:
            for j, (task, loss) in enumerate(losses.items()):
                with monitor.task(task, accumulate=k == 0):  # the first two batches are one accumulated step
                    loss.backward(retain_graph=j == 0)
        else:
            monitor.backward(losses, accumulate=k == 0)
        sum(step_losses(summed, tasks, batch).values()).backward()
        if k == 0:
            continue
        _assert_same_grads(model, summed)
        _step(optimizer, summed_optimizer)
    assert model.embedding.weight.grad is None
    report = monitor.report()
    accumulated = [tuple(torch.cat(parts) for parts in zip(*batches[:2])), batches[2]]  # summed losses: exact
    expected = reference(dense, tasks, accumulated, graph, [0.0],
                         optimizer=torch.optim.SGD(dense.parameters(), lr=0.02))
    assert report.steps == 2 and "embedding" in report.layers
    assert report.scores == {layer: expected[0.0][layer] for layer in report.scores}
    _assert_same_state(model, summed)


class _ComplexMix(nn.Module):
    """A complex linear map; with ``real_view`` its weight is stored as ``torch.view_as_real`` of the complex one."""

    def __init__(self, real_view):
        super().__init__()
        weight = torch.randn(8, 6, dtype=torch.complex128) / 3
        self.weight = nn.Parameter(torch.view_as_real(weight).clone() if real_view else weight)
        self.real_view = real_view

    def forward(self, z):
        return z @ (torch.view_as_complex(self.weight) if self.real_view else self.weight).T


class _Spectral(nn.Module):
    def __init__(self, real_view=False):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.mix = _ComplexMix(real_view)
        self.heads = nn.ModuleDict({t: nn.Linear(8, 2) for t in "ab"})

    def forward(self, x):
        h = self.mix(torch.tanh(self.inp(x)).to(torch.complex128)).abs()
        return {t: head(h) for t, head in self.heads.items()}


def test_complex_parameters_are_scored_by_the_real_cosine_and_get_complex_grads():
    torch.manual_seed(0)
    model = _Spectral().double()
    summed, real = copy.deepcopy(model), _Spectral(real_view=True).double()
    real.load_state_dict({k: torch.view_as_real(v) if v.is_complex() else v for k, v in model.state_dict().items()})
    tasks = {"a": lambda out, batch: out["a"].pow(2).mean(), "b": lambda out, batch: out["b"].sin().mean()}
    batches = [(torch.randn(5, 6, dtype=torch.float64),) for _ in range(3)]
    graph = fxsplit.layer_graph(model)
    assert "mix.weight" in graph and set(graph) == set(fxsplit.layer_graph(real))
    monitor = fxsplit.ConflictMonitor(model, tasks, threshold=[0.0, 0.3], graph=graph)
    optimizer, summed_optimizer = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, summed))
    for batch in batches:
        monitor.backward(step_losses(model, tasks, batch))
        sum(step_losses(summed, tasks, batch).values()).backward()
        assert model.mix.weight.grad.dtype == torch.complex128
        _assert_same_grads(model, summed)
        _step(optimizer, summed_optimizer)
    report = monitor.report()
    expected = reference(real, tasks, batches, graph, [0.0, 0.3], optimizer=torch.optim.SGD(real.parameters(), lr=0.1))
    for S in (0.0, 0.3):
        assert report.scores_at(S) == {layer: expected[S][layer] for layer in report.scores_at(S)}
    assert set(report.layers) == set(expected[0.0]) == {"inp", "mix.weight"}
    _assert_same_state(model, summed)
    torch.testing.assert_close(torch.view_as_real(model.mix.weight), real.mix.weight, rtol=1e-10, atol=1e-12)


def test_a_sparse_gradient_an_aggregator_combines_is_given_dense():
    torch.manual_seed(0)
    model = _Tower(sparse=True).double()
    summed = copy.deepcopy(model)
    tasks = {"a": lambda out, batch: out["a"].pow(2).sum(), "b": lambda out, batch: out["b"].sin().sum()}
    batch = (torch.randint(0, 20, (6, 4)),)
    monitor = fxsplit.ConflictMonitor(model, tasks, aggregator=lambda jacobian: jacobian.sum(0))  # the plain sum
    monitor.backward(step_losses(model, tasks, batch))
    sum(step_losses(summed, tasks, batch).values()).backward()
    assert model.embedding.weight.grad.layout == torch.strided and summed.embedding.weight.grad.is_sparse
    for (name, p), q in zip(model.named_parameters(), summed.parameters()):
        torch.testing.assert_close(p.grad, q.grad.to_dense(), rtol=1e-12, atol=1e-14, msg=name)


def test_on_step_hooks_get_every_steps_figures_as_the_report_counts_them():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    thresholds = [0.0, -0.05]
    seen, steps = [], []
    report = monitored(model, tasks, batches, threshold=thresholds,
                       on_step=[seen.append, lambda figures: steps.append(figures.step)])
    assert steps == [figures.step for figures in seen] == list(range(len(batches)))
    assert all(figures.layers == report.layers and list(map(list, figures.pairs)) == report.pairs for figures in seen)
    assert torch.stack([figures.conflicts for figures in seen]).sum(0).tolist() == report.counts
    assert torch.stack([figures.whole for figures in seen]).tolist() == report.whole_cosine
    assert torch.stack([figures.conflicting_pairs() for figures in seen]).tolist() == \
        [[sum(cosine < t for cosine in step) / len(step) for t in thresholds] for step in report.whole_cosine]
    layer_means = torch.stack([figures.layer_cosine() for figures in seen]).mean(0).tolist()
    pair_means = [[c for c in row if c is not None] for row in report.mean_cosine]
    assert layer_means == pytest.approx([sum(row) / len(row) for row in pair_means], rel=1e-12)


def test_a_step_not_scored_hands_over_nan_figures_and_no_conflicts():
    net = nn.Linear(3, 2)
    seen = []
    monitor = fxsplit.ConflictMonitor(net, ["a", "b"], on_step=seen.append)
    out = net(torch.randn(4, 3))
    monitor.backward({"a": out[:, 0].sum() * math.inf, "b": out[:, 1].sum()})
    (figures,) = seen
    assert not figures.scored and not figures.conflicts.any()
    assert figures.conflicting_pairs().isnan().all() and figures.layer_cosine().isnan().all()
    with pytest.raises(fxsplit.FxsplitError, match="on_step takes a function of the step's figures"):
        fxsplit.ConflictMonitor(net, ["a", "b"], on_step=[print, "not a function"])


def test_retain_graph_leaves_the_losses_graph_to_the_loops_own_backward():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    twin = copy.deepcopy(model)
    monitor = fxsplit.ConflictMonitor(model, tasks)
    losses = step_losses(model, tasks, batches[0])
    monitor.backward(losses, update_grad=False, retain_graph=True)
    sum(losses.values()).backward()
    sum(step_losses(twin, tasks, batches[0]).values()).backward()
    _assert_same_grads(model, twin)
    assert monitor.report().steps == 1


def test_a_data_parallel_model_is_scored_through_its_module():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    model.train()
    reports = []
    for wrapped in (model, nn.DataParallel(model)):
        monitor = fxsplit.ConflictMonitor(wrapped, list(tasks))
        for batch in batches:
            out = wrapped(batch[0])
            monitor.backward({t: loss(out, batch) for t, loss in tasks.items()}, update_grad=False)
        reports.append(monitor.report())
    assert reports[1].counts == reports[0].counts and reports[1].layers == reports[0].layers
    assert len(reports[0].layers) > 5


# --- steps where only some tasks have a loss -----------------------------------------------------------------

def _partial_reference(model, tasks, batches, masks, graph, optimizer):
    """The plain loop on partly labelled steps: per step, each present task's gradient by its own autograd.grad;
    per layer and pair of present tasks that reach it, the cosine (weight and bias as one vector); then a step on
    the present losses' sum. Returns {(layer, pair): cosines} and {pair: steps at which both tasks were present}."""
    named = dict(model.named_parameters())
    cosines, pair_steps = {}, dict.fromkeys(itertools.combinations(tasks, 2), 0)
    for batch, mask in zip(batches, masks):
        out = model(batch[0])
        losses = {t: loss(out, batch) for t, loss in tasks.items() if mask[t]}
        grads = {t: dict(zip(named, torch.autograd.grad(value, list(named.values()), retain_graph=True,
                                                        allow_unused=True))) for t, value in losses.items()}
        for pair in itertools.combinations(losses, 2):
            pair_steps[pair] += 1
        for layer, params in graph.nodes(data="parameters"):
            users = [t for t in losses if any(grads[t][p] is not None for p in params)]
            for a, b in itertools.combinations(users, 2):
                va, vb = (torch.cat([(grads[t][p] if grads[t][p] is not None else torch.zeros_like(named[p]))
                                     .reshape(-1) for p in params]) for t in (a, b))
                cosines.setdefault((layer, (a, b)), []).append(F.cosine_similarity(va, vb, dim=0).item())
        optimizer.zero_grad()
        if losses:
            sum(losses.values()).backward()
        optimizer.step()
    return cosines, pair_steps


MASKS = st.lists(st.fixed_dictionaries({t: st.booleans() for t in "abcd"}), min_size=4, max_size=4)


@settings(max_examples=12, deadline=None)
@example(masks=[dict.fromkeys("abcd", True)] * 4)
@example(masks=[{"a": True, "b": False, "c": True, "d": False}, {"a": False, "b": True, "c": True, "d": True}] * 2)
@given(masks=MASKS)
def test_partly_labelled_steps_score_each_pair_at_the_steps_both_its_tasks_have_a_loss(masks):
    model, tasks, batches = scoring_cases()["called-twice-4-tasks"]
    graph = fxsplit.layer_graph(model)
    twin = copy.deepcopy(model)
    monitor = fxsplit.ConflictMonitor(model, tasks, threshold=[0.0, 0.3], graph=graph)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for k, (batch, mask) in enumerate(zip(batches, masks)):
        losses = step_losses(model, tasks, batch)
        # an absent task: no entry at even steps, None at odd ones
        monitor.backward({t: loss for t, loss in losses.items() if mask[t]} if k % 2 == 0 else
                         {t: loss if mask[t] else None for t, loss in losses.items()})
        _step(optimizer)
    never = [t for t in tasks if not any(mask[t] for mask in masks)]
    if never:
        with pytest.raises(fxsplit.TaskError, match=re.escape(f"task(s) {never!r} had no loss at any step")):
            monitor.report()
        return
    report = monitor.report()
    cosines, pair_steps = _partial_reference(twin, tasks, batches, masks, graph, torch.optim.SGD(twin.parameters(),
                                                                                                 lr=0.05))
    _assert_same_state(model, twin)  # .grad was the present losses' sum
    pairs = [tuple(pair) for pair in report.pairs]
    assert report.pair_steps == [pair_steps[pair] for pair in pairs]
    assert {layer for layer, _ in cosines} <= set(report.layers)
    for k, S in enumerate([0.0, 0.3]):
        for l, layer in enumerate(report.layers):
            assert report.counts[k][l] == [sum(c < S for c in cosines.get((layer, pair), [])) for pair in pairs]
        rates = {layer: sum(n / steps for n, steps in zip(report.counts[k][l], report.pair_steps) if steps)
                 for l, layer in enumerate(report.layers)}
        assert report.rates_at(S) == pytest.approx(rates, rel=1e-12)
    for l, layer in enumerate(report.layers):
        for p, pair in enumerate(pairs):
            values = cosines.get((layer, pair))
            assert report.mean_cosine[l][p] == (pytest.approx(sum(values) / len(values), rel=1e-9) if values else None)
    by = report.scores if len(set(report.pair_steps)) == 1 else report.rates_at()
    assert report.top(len(report.layers)) == sorted(report.layers, key=lambda layer: (-by[layer],
                                                                                       report.layers.index(layer)))
    assert all(step[p] is None for step, mask in zip(report.whole_cosine, masks) for p, (a, b) in enumerate(pairs)
               if not (mask[a] and mask[b]))
    str(report)  # prints without dividing by zero, whatever pairs were never scored


def test_fully_labelled_steps_give_the_plain_loops_counts_and_rank_by_score():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    graph = fxsplit.layer_graph(model)
    report = monitored(copy.deepcopy(model), tasks, batches, graph=graph)
    expected = reference(model, tasks, batches, graph, [0.0])[0.0]
    assert report.scores == {layer: expected.get(layer, 0) for layer in report.scores}
    assert report.pair_steps == [len(batches)] * 3 and report.equal_pair_steps
    assert report.top(5) == list(report.scores)[:5] and report.ranking() == report.scores
    assert "rate" not in str(report)


def _recording(calls):
    def aggregator(jacobian):
        calls.append(jacobian.clone())
        return jacobian.mean(0)
    return aggregator


def test_an_aggregator_combines_the_present_tasks_only_and_one_present_task_trains_on_its_own_gradient():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    calls = []
    monitor = fxsplit.ConflictMonitor(model, tasks, aggregator=_recording(calls))
    trunk = dict(model.backbone.named_parameters())
    for present in ("abc", "ac", "b"):
        model.zero_grad(set_to_none=True)
        losses = step_losses(model, tasks, batches[0])
        expected = {t: torch.autograd.grad(losses[t], list(trunk.values()), retain_graph=True) for t in present}
        monitor.backward({t: losses[t] for t in present})
        if len(present) > 1:
            jacobian = calls.pop()
            assert jacobian.shape[0] == len(present)
            combined = torch.stack([torch.cat([g.reshape(-1) for g in expected[t]]) for t in present]).mean(0)
            assert torch.cat([p.grad.reshape(-1) for p in trunk.values()]).sort().values == \
                pytest.approx(combined.sort().values, rel=1e-10)  # the rows' column order is the monitor's own
        else:
            assert not calls
            for p, g in zip(trunk.values(), expected["b"]):
                torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
        assert model.heads["a"].weight.grad is None if "a" not in present else model.heads["a"].weight.grad.abs().sum()


def test_a_step_with_no_task_is_recorded_and_changes_no_grad():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    monitor.backward({"a": None, "b": None})
    assert all(p.grad is None for p in model.parameters())
    monitor.backward(step_losses(model, tasks, batches[0]))
    report = monitor.report()
    assert report.steps == 2 and report.pair_steps == [1] and report.whole_cosine[0] == [None]


def test_a_report_without_pair_steps_loads_as_fully_labelled(tmp_path):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    report = monitored(model, tasks, batches)
    data = report.to_dict()
    del data["pair_steps"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = fxsplit.ConflictReport.load(path)
    assert loaded.pair_steps == [len(batches)] and loaded.top(3) == report.top(3)


def test_partly_labelled_steps_need_every_task_under_a_process_group(monkeypatch):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    monkeypatch.setattr(monitor, "_reduction", object())  # as under an initialized process group of 2 ranks
    with pytest.raises(fxsplit.ScoringError, match=r"no loss for task\(s\) \['b'\].*under a process group"):
        monitor.backward({"a": step_losses(model, tasks, batches[0])["a"]})
