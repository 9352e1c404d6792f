"""Train and evaluate one network of a Recon experiment on a classification data set with one target per task.

A network trains with Adam in a plain loop through :class:`fxsplit.ConflictMonitor`: forward, the task losses,
``monitor.backward(losses)`` (the gradient of the summed losses, or a gradient method's update of the shared
parameters), ``optimizer.step()``. The monitor also measures, at every step, how often the task gradients conflict
on the parameters the network still shares.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..progress import ConflictShare
from ..report import ConflictReport
from ..scoring import ConflictMonitor
from ..scoring.methods import Aggregator, aggregator_of

METHOD_ARGUMENTS = {"CAGrad": {"c": 0.2}}  # CAGrad's c as the Recon authors' MultiFashion+MNIST script sets it


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


def aggregator(method: str | None) -> Aggregator | None:
    """A new torchjd aggregator of class ``method``, with its ``METHOD_ARGUMENTS``; ``None`` for ``None``."""
    return None if method is None else aggregator_of(method, **METHOD_ARGUMENTS.get(method, {}))


def train(model: nn.Module, data: Dataset, tasks: Sequence[str], training: Training, seed: int, name: str,
          progress: bool | None = None, method: str | None = None) -> ConflictReport:
    """Train ``model`` in place on ``data`` (shuffled by ``seed``) and return the conflicts measured meanwhile.

    ``method``: a torchjd aggregator's class name (``"UPGrad"``): the shared parameters step on its combination of
    the task gradients, each task's own parameters on that task's gradient; ``None``: the summed losses' gradient.
    ``progress``: ``None`` shows a progress bar when stderr is a terminal and otherwise prints a line per epoch
    with the mean task losses and the share of conflicting task pairs so far; ``True`` always shows the bar;
    ``False`` prints nothing.

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
    from tqdm.auto import tqdm

    device = torch.device(training.device)
    model.to(device).train()
    torch.manual_seed(seed)
    loader = DataLoader(data, batch_size=training.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    bar = sys.stderr.isatty() if progress is None else progress
    if progress is not False:
        print(f"training {name} ({training.epochs} epochs of {len(loader)} steps)", file=sys.stderr, flush=True)
    losses_of = task_losses(tasks)
    share = ConflictShare()  # read once an epoch
    monitor = ConflictMonitor(model, tasks, threshold=list(training.thresholds), aggregator=aggregator(method),
                              on_step=share if progress is not False else None)
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    started = time.perf_counter()
    with tqdm(total=training.epochs * len(loader), desc=name, unit="step", disable=not bar) as steps:
        for epoch in range(1, training.epochs + 1):
            sums = dict.fromkeys(tasks, 0.0)
            for images, targets in loader:
                batch = (images.to(device), targets.to(device))
                out = model(batch[0])
                losses = {task: loss(out, batch) for task, loss in losses_of.items()}
                optimizer.zero_grad()
                monitor.backward(losses)
                optimizer.step()
                for task, value in losses.items():
                    sums[task] += value.detach()  # a tensor: no device synchronisation per step
                steps.update()
            if progress is not False and not bar:
                means = ", ".join(f"{task} {float(total) / len(loader):.3f}" for task, total in sums.items())
                print(f"  {name}: epoch {epoch}/{training.epochs}, mean loss {means}, conflicting task pairs "
                      f"{share.read():.1%} (cos < {training.thresholds[0]:g}) ({time.perf_counter() - started:.0f} s)",
                      file=sys.stderr, flush=True)
    return monitor.report()


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
