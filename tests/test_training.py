"""Training one network: the same parameters as a plain Adam loop on the summed loss (or, with a gradient method,
on torchjd's own update), a progress line per epoch with that loop's mean losses, and per-task accuracy."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxsplit.experiment.training import METHOD_ARGUMENTS, Training, accuracy, task_losses, train
from tests.models import MultiHead

TASKS = ["a", "b"]


def toy() -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(0)
    model = MultiHead(nn.Sequential(nn.Linear(6, 8), nn.Tanh()), 8, TASKS).double()
    data = TensorDataset(torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40, 2)))
    return model, data


def plain_loop(model: nn.Module, data, training: Training, seed: int) -> list[dict[str, float]]:
    """Adam on the summed cross-entropies, batches drawn as ``train`` documents; each epoch's mean losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    loader = DataLoader(data, batch_size=training.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    means = []
    for _ in range(training.epochs):
        sums = dict.fromkeys(TASKS, 0.0)
        for x, y in loader:
            out = model(x)
            losses = {t: F.cross_entropy(out[t], y[:, i]) for i, t in enumerate(TASKS)}
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            for t in TASKS:
                sums[t] += losses[t].item()
        means.append({t: s / len(loader) for t, s in sums.items()})
    return means


def test_train_equals_plain_adam_loop_and_logs_each_epoch(capsys):
    model, data = toy()
    expected = copy.deepcopy(model)
    training = Training(epochs=3, batch_size=16, lr=0.05, thresholds=(0.0, -0.5))
    report = train(model, data, TASKS, training, seed=7, name="toy", progress=None)
    means = plain_loop(expected, data, training, seed=7)

    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, msg=name)
    assert report.steps == 3 * 2 and report.thresholds == [0.0, -0.5] and report.layers == ["backbone.0"]
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training toy (3 epochs of 2 steps)"
    epochs = [re.fullmatch(r"  toy: epoch (\d)/3, mean loss a (\S+), b (\S+), conflicting task pairs (\S+) "
                           r"\(cos < 0\) \(\d+ s\)", line) for line in lines[1:]]
    assert len(epochs) == 3 and all(epochs)
    for epoch, (match, want) in enumerate(zip(epochs, means), 1):
        assert int(match[1]) == epoch
        assert (float(match[2]), float(match[3])) == (round(want["a"], 3), round(want["b"], 3))
    assert epochs[-1][4] == f"{report.conflict_rate(0.0)[('a', 'b')]:.1%}"  # the share over the whole run


@pytest.mark.parametrize("method", ["PCGrad", "CAGrad", "UPGrad"])
def test_train_with_a_method_equals_adam_on_torchjds_mtl_backward(method):
    torchjd = pytest.importorskip("torchjd", reason="gradient methods come from the optional torchjd")
    from torchjd.autojac import jac_to_grad, mtl_backward

    model, data = toy()
    expected = copy.deepcopy(model)
    training = Training(epochs=2, batch_size=16, lr=0.05, thresholds=(0.0,))
    train(model, data, TASKS, training, seed=3, name="toy", progress=False, method=method)

    aggregator = getattr(torchjd.aggregation, method)(**METHOD_ARGUMENTS.get(method, {}))
    optimizer = torch.optim.Adam(expected.parameters(), lr=training.lr)
    loader = DataLoader(data, batch_size=16, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(3))
    shared = list(expected.backbone.parameters())
    torch.manual_seed(3)  # PCGrad draws the order of the tasks
    for _ in range(training.epochs):
        for x, y in loader:
            features = expected.backbone(x)
            losses = [F.cross_entropy(expected.heads[t](features), y[:, i]) for i, t in enumerate(TASKS)]
            optimizer.zero_grad()
            mtl_backward(losses, features=features, shared_params=shared,
                         tasks_params=[list(expected.heads[t].parameters()) for t in TASKS])
            jac_to_grad(shared, aggregator)
            optimizer.step()
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        torch.testing.assert_close(got, want, msg=name)


def test_train_is_silent_without_progress(capsys):
    model, data = toy()
    train(model, data, TASKS, Training(1, 16, 0.01, (0.0,)), seed=0, name="toy", progress=False)
    assert capsys.readouterr() == ("", "")


def test_accuracy_per_task_in_eval_mode_restores_training_mode():
    class Dropper(nn.Module):  # predicts class 1 for a, class 2 for b; dropout would change that in train mode
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(1.0)
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, x):
            base = self.drop(torch.ones(len(x), 3)) * self.w
            return {"a": base * torch.tensor([0.0, 1.0, 0.0]), "b": base * torch.tensor([0.0, 0.0, 1.0])}

    targets = torch.tensor([[1, 2], [1, 0], [0, 2], [1, 2], [2, 2]])
    model = Dropper().train()
    assert accuracy(model, TensorDataset(torch.zeros(5, 1), targets), TASKS, batch_size=2) == {"a": 0.6, "b": 0.8}
    assert model.training


def test_task_losses_read_one_target_column_per_task():
    losses = task_losses(["x", "y", "z"])
    out = {t: torch.randn(4, 5) for t in "xyz"}
    targets = torch.randint(0, 5, (4, 3))
    for i, t in enumerate("xyz"):
        assert torch.equal(losses[t](out, (None, targets)), F.cross_entropy(out[t], targets[:, i]))

