import copy
import json
import math

import networkx as nx
import pytest
import torch
from torch import nn

import fxsplit
from tests.models import MultiHead, TupleHeads, Twice, assert_unchanged, scoring_cases, snapshot
from tests.reference import reference


def _step_losses(model, tasks, batch):
    out = model(batch[0])
    return {t: loss(out, batch) for t, loss in tasks.items()}


def _monitored(model, tasks, batches, optimizer=None, hooks=False, **options):
    """Train (or probe) ``model`` on ``batches`` with a monitor; its report."""
    monitor = fxsplit.ConflictMonitor(model, tasks, **options)
    for batch in batches:
        losses = _step_losses(model, tasks, batch)
        if hooks:
            for k, (task, loss) in enumerate(losses.items()):
                with monitor.task(task):
                    loss.backward(retain_graph=k < len(losses) - 1)
        else:
            monitor.backward(losses)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return monitor.report()


def _flat(rows):
    return [value for row in rows for value in row]


def _assert_same_state(model, twin, rtol=1e-10):
    for (key, value), expected in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=rtol, atol=1e-12, msg=key)


@pytest.mark.parametrize("name, hooks", [(name, False) for name in sorted(scoring_cases())] +
                         [("cnn-3-tasks", True), ("vit", True)])
def test_monitor_scores_and_trains_like_analyze_and_the_plain_loop(name, hooks):
    model, tasks, batches = scoring_cases()[name]
    graph = fxsplit.layer_graph(model)
    twin, analyzed = copy.deepcopy(model), copy.deepcopy(model)
    sgd = dict(lr=0.1, momentum=0.9)
    report = _monitored(model, tasks, batches, torch.optim.SGD(model.parameters(), **sgd), hooks=hooks,
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
        monitor.backward(_step_losses(model, tasks, batch))
        sum(_step_losses(twin, tasks, batch).values()).backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=name)
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
        monitor.backward(_step_losses(model, tasks, (x,)))
        sum(_step_losses(twin, tasks, (x,)).values()).backward()
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
        monitor.backward(_step_losses(model, tasks, batch), update_grad=False)
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
        losses = _step_losses(model, tasks, batch)
        for k, (task, loss) in enumerate(reversed(list(losses.items()))):  # any task order
            optimizer.zero_grad()  # the authors' loop zeroes the gradients before each task
            with monitor.task(task):
                loss.backward(retain_graph=k < 2)
        assert all(not p._backward_hooks for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
    expected = _monitored(twin, tasks, batches, torch.optim.SGD(twin.parameters(), lr=0.05))
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
            losses = {t: loss / 4 for t, loss in _step_losses(model, tasks, micro).items()}
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
    expected = _monitored(big, tasks, batches, torch.optim.SGD(big.parameters(), lr=0.1), threshold=[0.0, 0.2],
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
        losses = _step_losses(model, tasks, batch)
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
    expected = _monitored(twin, tasks, kept, torch.optim.SGD(twin.parameters(), lr=0.1))
    assert report.counts == expected.counts
    assert _flat(report.whole_cosine) == pytest.approx(_flat(expected.whole_cosine), rel=1e-5)
    _assert_same_state(model, twin, rtol=1e-6)
    assert "skipped: 1 steps" in str(report)


def test_a_split_model_scores_only_its_still_shared_layers():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    split = fxsplit.rewrite(model, ["backbone.block1.conv2"])
    report = _monitored(split, tasks, batches)
    assert report.left_out["copies.a.backbone.block1.conv2"] == "only task 'a' reaches it"
    assert "backbone.block2.conv1" in report.layers


def _detached(out, batch):
    return (out["b"].detach() * torch.ones((), dtype=out["b"].dtype, requires_grad=True)).sum()


@pytest.mark.parametrize("act, error, match", [
    (lambda m, losses: m.backward({**losses, "c": losses["a"]}), fxsplit.TaskError,
     r"'c' is not a task of this monitor; its tasks are \['a', 'b'\]"),
    (lambda m, losses: m.backward({"a": losses["a"]}), fxsplit.TaskError, r"no loss for task\(s\) \['b'\]"),
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
        act(monitor, _step_losses(model, tasks, batches[0]))


def test_hook_style_misuse_is_a_typed_error():
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    losses = _step_losses(model, tasks, batches[0])
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
            fxsplit.ConflictMonitor(model, tasks).backward(_step_losses(model.eval(), tasks, batches[0]))
    assert_unchanged(model.train(), before)


def test_a_nan_loss_is_reported_not_scored():
    model, tasks, batches = scoring_cases()["cnn-bn"]
    monitor = fxsplit.ConflictMonitor(model, tasks)
    for step, batch in enumerate(batches):
        losses = _step_losses(model, tasks, batch)
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
    with pytest.raises(fxsplit.TaskError, match="task names repeat"):
        fxsplit.ConflictMonitor(model, ["a", "b", "a"])
    with pytest.raises(fxsplit.FxsplitError, match=r"threshold must be a cosine in \[-1, 1\]"):
        fxsplit.ConflictMonitor(model, tasks, threshold=2)
    with pytest.raises(fxsplit.FxsplitError, match="distributed must be one of"):
        fxsplit.ConflictMonitor(model, tasks, distributed="everywhere")
    with pytest.raises(fxsplit.FxsplitError, match="no parameter that requires grad"):
        fxsplit.ConflictMonitor(copy.deepcopy(model).requires_grad_(False), tasks)


def test_a_report_of_the_first_format_still_loads(tmp_path):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    report = _monitored(model, tasks, batches)
    data = {**report.to_dict(), "format": "fxsplit.ConflictReport/1"}
    del data["skipped"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    loaded = fxsplit.ConflictReport.load(path)
    assert loaded.skipped == 0 and loaded.scores == report.scores
