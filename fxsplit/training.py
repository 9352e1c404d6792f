"""Train and evaluate one network of a Recon experiment on a classification data set with one target per task.

A network trains with Adam on the gradient of the summed task losses, under ``analyze``, which at every step also
measures how often the task gradients conflict on the parameters the network still shares.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import analyze
from .report import ConflictReport


@dataclass(frozen=True)
class Training:
    """The budget every network of an experiment trains with: same epochs, batches, optimizer and data order.

    ``thresholds`` are the cosines S at which conflicts are counted, the first one the primary S (the one that
    ranks layers in a scoring run).
    """

    epochs: int
    batch_size: int
    lr: float
    thresholds: tuple[float, ...]
    device: str = "cpu"


def task_losses(tasks: Sequence[str]) -> dict:
    """Cross-entropy per task, reading the model's ``{task: logits}`` and column ``i`` of the batch's targets.

    >>> losses = task_losses(["left", "right"])
    >>> batch = (None, torch.tensor([[0, 1]]))
    >>> round(losses["right"]({"left": torch.zeros(1, 2), "right": torch.tensor([[0.0, 9.0]])}, batch).item(), 4)
    0.0001
    """
    return {task: (lambda column, task: lambda out, batch: F.cross_entropy(out[task], batch[1][:, column]))(i, task)
            for i, task in enumerate(tasks)}


def train(model: nn.Module, data: Dataset, tasks: Sequence[str], training: Training, seed: int, name: str,
          progress: bool | None = None) -> ConflictReport:
    """Train ``model`` in place on ``data`` (shuffled by ``seed``) and return the conflicts measured meanwhile.

    ``progress``: ``None`` shows a progress bar when stderr is a terminal and otherwise prints a line per epoch
    with the mean task losses; ``True`` always shows the bar; ``False`` prints nothing.

    >>> from fxsplit.datasets import MultiDigits
    >>> class Toy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk, self.heads = nn.Linear(144, 16), nn.ModuleDict({t: nn.Linear(16, 10) for t in "ab"})
    ...     def forward(self, x):
    ...         return {task: head(self.trunk(x.flatten(1))) for task, head in self.heads.items()}
    >>> budget = Training(epochs=2, batch_size=32, lr=1e-3, thresholds=(0.0,))
    >>> report = train(Toy(), MultiDigits(size=64), ["a", "b"], budget, seed=0, name="toy", progress=False)
    >>> report.steps, report.layers
    (4, ['trunk'])
    """
    model.to(training.device).train()
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=training.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    bar = sys.stderr.isatty() if progress is None else progress
    running = _RunningLosses(task_losses(tasks), name, training.epochs, len(loader),
                             log=progress is not False and not bar)
    if progress is not False:
        print(f"training {name} ({training.epochs} epochs of {len(loader)} steps)", file=sys.stderr, flush=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    return analyze(model, running.losses, _Epochs(loader, training.epochs, running.epoch_done),
                   threshold=list(training.thresholds), optimizer=optimizer, progress=bar)


def accuracy(model: nn.Module, data: Dataset, tasks: Sequence[str], batch_size: int = 256) -> dict[str, float]:
    """Per-task accuracy in eval mode, on the model's device (the model's mode is restored).

    >>> class Constant(nn.Module):
    ...     def forward(self, x):
    ...         return {"a": torch.tensor([[1.0, 0.0]]).expand(len(x), 2)}
    >>> data = torch.utils.data.TensorDataset(torch.zeros(4, 1), torch.tensor([[0], [0], [0], [1]]))
    >>> accuracy(Constant(), data, ["a"])
    {'a': 0.75}
    """
    device = next(model.parameters(), torch.empty(0)).device
    was_training, correct, total = model.training, dict.fromkeys(tasks, 0), 0
    model.eval()
    with torch.no_grad():
        for images, targets in DataLoader(data, batch_size=batch_size):
            out = model(images.to(device))
            for i, task in enumerate(tasks):
                correct[task] += (out[task].argmax(1).cpu() == targets[:, i]).sum().item()
            total += len(targets)
    model.train(was_training)
    return {task: correct[task] / total for task in tasks}


class _Epochs:
    """The loader's batches, epoch after epoch, calling ``epoch_done(epoch)`` once each epoch has been trained on.

    Sized, so that ``analyze``'s progress bar knows the total; the call comes when ``analyze`` asks for the batch
    after an epoch's last one, that is after that batch's step.
    """

    def __init__(self, loader: DataLoader, epochs: int, epoch_done):
        self.loader, self.epochs, self.epoch_done = loader, epochs, epoch_done

    def __len__(self) -> int:
        return self.epochs * len(self.loader)

    def __iter__(self) -> Iterator:
        for epoch in range(1, self.epochs + 1):
            yield from self.loader
            self.epoch_done(epoch)


class _RunningLosses:
    """Task losses that also add up their values over the current epoch, for a progress line per epoch."""

    def __init__(self, losses: dict, name: str, epochs: int, steps: int, log: bool):
        self.name, self.epochs, self.steps, self.log, self.started = name, epochs, steps, log, time.perf_counter()
        self.sums = dict.fromkeys(losses, 0.0)
        self.losses = {task: self._recorded(task, loss) for task, loss in losses.items()}

    def _recorded(self, task: str, loss):
        def recorded(out, batch):
            value = loss(out, batch)
            self.sums[task] += value.detach()  # a tensor: no device synchronisation per step
            return value
        return recorded

    def epoch_done(self, epoch: int) -> None:
        if self.log:
            means = ", ".join(f"{task} {float(total) / self.steps:.3f}" for task, total in self.sums.items())
            print(f"  {self.name}: epoch {epoch}/{self.epochs}, mean loss {means} "
                  f"({time.perf_counter() - self.started:.0f} s)", file=sys.stderr, flush=True)
        self.sums = dict.fromkeys(self.sums, 0.0)
