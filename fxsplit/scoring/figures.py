"""``StepFigures``: what one scored optimizer step measured, handed to the monitor's ``on_step`` hooks.

The figures are tensors on the gradients' device, as the monitor keeps them: a hook that reads one (``.item()``,
``.tolist()``, ``float()``) waits for the device, so a logger gathers its steps on the device and reads them once
per logging interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class StepFigures:
    """One optimizer step's conflict figures, on the device (see :class:`fxsplit.ConflictMonitor`'s ``on_step``).

    ``step`` counts the monitor's optimizer steps from 0, the unscored ones (non-finite gradients) included.
    ``cosine[l, p]`` is the gradient cosine of task pair ``pairs[p]`` on layer ``layers[l]``, meaningful where
    ``valid[l, p]`` (both tasks reach the layer and have a loss at this step); ``whole[p]`` the cosine over all
    scored layers' parameters together, meaningful where ``present[p]`` (both tasks have a loss); ``conflicts[k, l,
    p]`` what the step adds to ``report.counts[k][l][p]`` (cosine below ``thresholds[k]``, counted only where valid
    and scored); ``scored`` whether the step was scored; ``limits`` the thresholds as a column on the device. The
    layers grow when a task has a loss for the first time (see :class:`fxsplit.ConflictMonitor`).

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> shares = []  # device tensors: nothing is read back during training
    >>> monitor = fxsplit.ConflictMonitor(net, ["a", "b"], threshold=[0.0, -0.5],
    ...                                   on_step=lambda figures: shares.append(figures.conflicting_pairs()))
    >>> for x in torch.randn(3, 16, 4):
    ...     out = net(x)
    ...     monitor.backward({"a": out[:, 0].pow(2).mean(), "b": -out[:, 1].mean()})
    >>> torch.stack(shares).shape  # (steps, thresholds): one read for all of them
    torch.Size([3, 2])
    """

    step: int
    layers: Sequence[str]
    pairs: Sequence[tuple[str, str]]
    thresholds: Sequence[float]
    cosine: torch.Tensor  # (layers, pairs) float64
    valid: torch.Tensor  # (layers, pairs) bool
    whole: torch.Tensor  # (pairs,) float64
    conflicts: torch.Tensor  # (thresholds, layers, pairs) bool
    scored: torch.Tensor  # () bool
    present: torch.Tensor  # (pairs,) bool
    limits: torch.Tensor = field(repr=False)  # (thresholds, 1) float64: the thresholds, on the device

    def conflicting_pairs(self) -> torch.Tensor:
        """Per threshold, the share of the present task pairs whose cosine on all scored layers together is below
        it; NaN at a step not scored, or with no pair present. With every task present at every step, its mean over
        steps is ``report.conflict_rate(threshold)`` averaged over pairs."""
        below = torch.bitwise_and(torch.lt(self.whole, self.limits), self.present)
        share = below.double().sum(1) / self.present.sum().clamp_min(1)
        return torch.where(torch.bitwise_and(self.scored, self.present.any()), share, share.new_full((), float("nan")))

    def layer_cosine(self) -> torch.Tensor:
        """Per scored layer, the mean cosine of the valid task pairs; NaN at a step not scored, or with none."""
        count = self.valid.sum(1)
        mean = torch.where(self.valid, self.cosine, 0.0).sum(1) / count.clamp_min(1)
        return torch.where(torch.bitwise_and(self.scored, count > 0), mean, mean.new_full((), float("nan")))
