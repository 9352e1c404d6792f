"""ConflictCallback under a real ``lightning.pytorch.Trainer`` on the CPU, against the monitor in a plain loop."""

import copy
import csv

import pytest
import torch
import torch.nn.functional as F

import fxsplit
from tests.models import MultiHead, SmallCNN, monitored, step_losses

L = pytest.importorskip("lightning.pytorch", reason="Lightning is an optional extra")
from fxsplit.integrations._convention import share_key  # noqa: E402
from fxsplit.integrations.lightning import ConflictCallback  # noqa: E402

TASKS = {"a": lambda out, batch: F.cross_entropy(out["a"], batch[1][:, 0]),
         "b": lambda out, batch: F.cross_entropy(out["b"], batch[1][:, 1])}
THRESHOLDS = [0.0, -0.05]
SGD = dict(lr=0.1, momentum=0.9)


class TwoTasks(L.LightningModule):
    """A two-task network trained by Lightning: ``training_step`` returns the losses beside their total, or, with
    ``manual``, calls ``manual_backward(losses)`` and steps itself; ``returns`` replaces what it returns."""

    def __init__(self, net, manual=False, returns=None):
        super().__init__()
        self.net, self.returns = net, returns
        self.automatic_optimization = not manual

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        losses = step_losses(self.net, TASKS, batch)
        if self.returns is not None:
            return self.returns(losses)
        if self.automatic_optimization:
            return {"loss": sum(losses.values()), "losses": losses}
        optimizer = self.optimizers()
        self.manual_backward(losses)
        optimizer.step()
        optimizer.zero_grad()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), **SGD)


def batches(count=4):
    torch.manual_seed(0)
    return [(torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6, 2))) for _ in range(count)]


def fit(module, data, callback, **trainer_options):
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, callbacks=[callback], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        **{"logger": False, **trainer_options})
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))  # the batches as they are, in order
    return trainer


def assert_same_weights(module, twin):
    for (name, value), expected in zip(module.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(value, expected), name


def assert_same_scores(report, expected):
    assert report.layers == expected.layers and report.counts == expected.counts
    assert report.steps == expected.steps and report.whole_cosine == expected.whole_cosine


def test_automatic_optimization_scores_and_trains_as_the_plain_loop(tmp_path):
    module = TwoTasks(MultiHead(SmallCNN(), 16))
    twin, data = copy.deepcopy(module), batches()
    callback = ConflictCallback(TASKS, threshold=THRESHOLDS, path=tmp_path / "conflicts.json")
    fit(module, data, callback, logger=L.loggers.CSVLogger(tmp_path), log_every_n_steps=1)
    expected = monitored(twin, TASKS, data, torch.optim.SGD(twin.parameters(), **SGD), threshold=THRESHOLDS)
    report = callback.monitor.report()
    assert_same_scores(report, expected)
    assert_same_weights(module, twin)
    assert fxsplit.ConflictReport.load(tmp_path / "conflicts.json").counts == expected.counts
    assert not {"backward", "training_step"} & set(vars(module))  # the module's own methods again
    logged = list(csv.DictReader((tmp_path / "lightning_logs" / "version_0" / "metrics.csv").open()))
    for threshold in THRESHOLDS:
        shares = [sum(cosine < threshold for cosine in step) / len(step) for step in expected.whole_cosine]
        assert [float(row[share_key(threshold)]) for row in logged] == pytest.approx(shares, abs=0)


def test_accumulated_batches_are_scored_once_per_optimizer_step():
    module = TwoTasks(MultiHead(SmallCNN(), 16))
    twin, data = copy.deepcopy(module), batches(5)  # steps of 2, 2 and 1 batches
    callback = ConflictCallback(TASKS)
    fit(module, data, callback, accumulate_grad_batches=2)
    monitor = fxsplit.ConflictMonitor(twin, TASKS)
    optimizer = torch.optim.SGD(twin.parameters(), **SGD)
    for i, batch in enumerate(data):
        last = i % 2 == 1 or i == len(data) - 1
        monitor.backward({t: loss / 2 for t, loss in step_losses(twin, TASKS, batch).items()}, accumulate=not last)
        if last:
            optimizer.step()
            optimizer.zero_grad()
    assert callback.monitor.report().steps == 3
    assert_same_scores(callback.monitor.report(), monitor.report())
    assert_same_weights(module, twin)


def test_manual_optimization_with_an_aggregator_scores_and_trains_as_the_plain_loop():
    net = MultiHead(SmallCNN(), 16)
    module, twin, data = TwoTasks(net, manual=True), copy.deepcopy(net), batches()
    callback = ConflictCallback(TASKS, model=net, aggregator="UPGrad")
    fit(module, data, callback)
    expected = monitored(twin, TASKS, data, torch.optim.SGD(twin.parameters(), **SGD), aggregator="UPGrad")
    assert_same_scores(callback.monitor.report(), expected)
    assert_same_weights(net, twin)
    assert "manual_backward" not in vars(module)


@pytest.mark.parametrize("returns, message", [
    (lambda losses: sum(losses.values()), r"training_step must return the per-task losses beside the total, as "
                                          r"\{\"loss\": sum\(losses.values\(\)\), \"losses\": \{task: loss\}\}; it "
                                          r"returned a Tensor"),
    (lambda losses: {"loss": sum(losses.values())}, r"it returned no 'losses' \(keys \['loss'\]\)"),
    (lambda losses: {"loss": losses["a"] + 2 * losses["b"], "losses": losses},
     r"'loss' .* is not the sum of its 'losses' .* with any task weights inside the losses"),
], ids=["a-tensor", "no-losses", "a-weighted-total"])
def test_a_training_step_without_the_per_task_losses_is_a_task_error(returns, message):
    module = TwoTasks(MultiHead(SmallCNN(), 16), returns=returns)
    with pytest.raises(fxsplit.TaskError, match=message):
        fit(module, batches(1), ConflictCallback(TASKS))
    assert not {"backward", "training_step"} & set(vars(module))


class PartlyLabelled(TwoTasks):
    """Task "b" has no labels in the batches ``unlabelled`` picks (by index): its loss is None there."""

    def __init__(self, net, manual, unlabelled):
        super().__init__(net, manual)
        self.unlabelled = unlabelled

    def training_step(self, batch, batch_idx):
        losses = {**step_losses(self.net, TASKS, batch), **({"b": None} if self.unlabelled(batch_idx) else {})}
        if self.automatic_optimization:
            return {"loss": sum(loss for loss in losses.values() if loss is not None), "losses": losses}
        self.manual_backward(losses)
        self.optimizers().step()
        self.optimizers().zero_grad()


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_a_task_without_labels_in_some_batches_is_scored_at_the_others_and_in_none_is_a_task_error(manual):
    net = MultiHead(SmallCNN(), 16)
    twin, data = copy.deepcopy(net), batches()
    callback = ConflictCallback(TASKS, model=net)
    fit(PartlyLabelled(net, manual, lambda i: i % 2 == 0), data, callback)
    monitor, optimizer = fxsplit.ConflictMonitor(twin, TASKS), torch.optim.SGD(twin.parameters(), **SGD)
    for i, batch in enumerate(data):
        monitor.backward({**step_losses(twin, TASKS, batch), **({"b": None} if i % 2 == 0 else {})})
        optimizer.step()
        optimizer.zero_grad()
    report = callback.monitor.report()
    assert report.pair_steps == monitor.report().pair_steps == [2]
    assert_same_scores(report, monitor.report())
    assert_same_weights(net, twin)
    callback = ConflictCallback(TASKS)
    fit(PartlyLabelled(MultiHead(SmallCNN(), 16), manual, lambda i: True), batches(1), callback)
    with pytest.raises(fxsplit.TaskError, match=r"task\(s\) \['b'\] had no loss at any step"):
        callback.monitor.report()


def test_manual_backward_of_the_total_is_a_task_error():
    class Total(TwoTasks):
        def training_step(self, batch, batch_idx):
            self.manual_backward(sum(step_losses(self.net, TASKS, batch).values()))

    with pytest.raises(fxsplit.TaskError, match=r"calls self.manual_backward\(losses\) with the mapping"):
        fit(Total(MultiHead(SmallCNN(), 16), manual=True), batches(1), ConflictCallback(TASKS))


def test_what_the_callback_cannot_train_is_refused_before_the_first_step():
    class OwnBackward(TwoTasks):
        def backward(self, loss, *args, **kwargs):
            loss.backward()

    with pytest.raises(fxsplit.FxsplitError, match="OwnBackward overrides backward"):
        fit(OwnBackward(MultiHead(SmallCNN(), 16)), batches(1), ConflictCallback(TASKS))
    module = TwoTasks(MultiHead(SmallCNN(), 16))
    with pytest.raises(fxsplit.FxsplitError, match="the optimizer trains 'net.heads.a.weight', which the scored "
                                                   "SmallCNN does not hold"):
        fit(module, batches(1), ConflictCallback(TASKS, model=module.net.backbone))
    with pytest.raises(fxsplit.FxsplitError, match="takes the GradScaler of Lightning's precision plugin"):
        ConflictCallback(TASKS, scaler=torch.amp.GradScaler("cpu"))
