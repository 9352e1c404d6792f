"""ConflictTrainer and ConflictCallback under a real ``transformers.Trainer`` on the CPU: a tiny two-head BERT
built from a config (no downloads), against the monitor in a plain loop."""

import copy

import pytest
import torch

import fxsplit

transformers = pytest.importorskip("transformers", reason="HuggingFace transformers is an optional extra")
pytest.importorskip("accelerate", reason="the transformers Trainer needs accelerate")
from fxsplit.integrations.huggingface import ConflictCallback, ConflictTrainer  # noqa: E402
from tests.hf_models import BertTaskLosses, labelled_tokens  # noqa: E402

TASKS = ["sentiment", "topic"]
BATCH, ACCUMULATE, STEPS, LR = 4, 2, 3, 0.1


def train(model, data, callback, out, trainer_class=ConflictTrainer, **arguments):
    """``Trainer.train()`` with plain SGD, in data order, saving (the model only) every 2 steps."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    args = transformers.TrainingArguments(
        out, max_steps=STEPS, per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATE,
        train_sampling_strategy="sequential", max_grad_norm=0.0, save_steps=2, save_only_model=True,
        report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", **arguments)
    trainer = trainer_class(model=model, args=args, train_dataset=data, callbacks=[callback],
                            optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)))
    trainer.train()
    return trainer


def plain_loop(model, data, graph):
    """The same steps with the monitor: reports after each optimizer step."""
    monitor = fxsplit.ConflictMonitor(model, TASKS, graph=graph)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    batches = [transformers.default_data_collator(data[i:i + BATCH]) for i in range(0, len(data), BATCH)]
    reports = []
    for step in range(STEPS):
        for k, batch in enumerate(batches[step * ACCUMULATE:(step + 1) * ACCUMULATE]):
            losses = model(**batch)["losses"]
            monitor.backward({t: loss / ACCUMULATE for t, loss in losses.items()}, accumulate=k < ACCUMULATE - 1)
        optimizer.step()
        optimizer.zero_grad()
        reports.append(monitor.report())
    return reports


def test_trainer_scores_as_the_plain_loop_and_saves_reports_beside_the_checkpoints(tmp_path):
    torch.manual_seed(0)
    model, data = BertTaskLosses(), labelled_tokens(BATCH * ACCUMULATE * STEPS)
    twin = copy.deepcopy(model)
    callback = ConflictCallback(TASKS)
    train(model, data, callback, tmp_path)
    assert callback.monitor.graph.graph["route"] == "export"  # traced on the first batch: fx cannot trace BERT
    expected = plain_loop(twin, data, callback.monitor.graph)
    reports = {"monitor": callback.monitor.report(),
               **{path: fxsplit.ConflictReport.load(tmp_path / path) for path in ["checkpoint-3/conflicts.json",
                                                                                  "conflicts.json"]}}
    for where, report in reports.items():
        assert report.layers == expected[-1].layers and len(report.layers) >= 20, where
        assert report.counts == expected[-1].counts and report.steps == STEPS, where
        assert sum(report.whole_cosine, []) == pytest.approx(sum(expected[-1].whole_cosine, []), rel=1e-4), where
    at_2 = fxsplit.ConflictReport.load(tmp_path / "checkpoint-2" / "conflicts.json")
    assert at_2.steps == 2 and at_2.counts == expected[1].counts
    for name, p in twin.named_parameters():  # the Trainer's own backward of the total; the plain loop sums tasks
        torch.testing.assert_close(model.get_parameter(name), p, rtol=1e-5, atol=1e-6, msg=name)


class TwoTasks(torch.nn.Module):
    """A small model that returns what ``returns`` makes of its task losses."""

    def __init__(self, returns=lambda losses: {"loss": sum(losses.values()), "losses": losses}):
        super().__init__()
        self.trunk, self.heads, self.returns = torch.nn.Linear(4, 8), torch.nn.Linear(8, 2), returns

    def forward(self, x):
        out = self.heads(self.trunk(x).tanh())
        return self.returns({"sentiment": out[:, 0].pow(2).mean(), "topic": (out[:, 1] - 1).pow(2).mean()})


def vectors():
    return [{"x": torch.randn(4)} for _ in range(BATCH * ACCUMULATE * STEPS)]


def test_what_the_trainer_cannot_score_is_a_typed_error(tmp_path):
    with pytest.raises(fxsplit.TaskError, match=r"TwoTasks.forward must return the per-task losses beside the "
                                                r"total, .* it returned no 'losses' \(keys \['loss'\]\)"):
        train(TwoTasks(lambda losses: {"loss": sum(losses.values())}), vectors(), ConflictCallback(TASKS), tmp_path)
    with pytest.raises(fxsplit.TaskError, match=r"task\(s\) \['sentiment'\] had no loss at any step"):
        train(TwoTasks(lambda losses: {"loss": losses["topic"], "losses": {"topic": losses["topic"]}}), vectors(),
              ConflictCallback(TASKS), tmp_path)
    with pytest.raises(fxsplit.TaskError, match="got no per-task losses for this optimizer step: train with "
                                                "fxsplit.integrations.huggingface.ConflictTrainer"):
        train(TwoTasks(), vectors(), ConflictCallback(TASKS), tmp_path, trainer_class=transformers.Trainer)
    with pytest.raises(fxsplit.FxsplitError, match=r"pass callbacks=\[ConflictCallback\(tasks\)\]"):
        train(TwoTasks(), vectors(), transformers.PrinterCallback(), tmp_path)
    with pytest.raises(fxsplit.FxsplitError, match="does not take aggregator"):
        ConflictCallback(TASKS, aggregator="UPGrad")
