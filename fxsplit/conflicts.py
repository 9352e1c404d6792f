"""Per-step conflict statistics of task gradients, accumulated on the gradients' device.

The cosine of two gradient vectors ``a``, ``b`` is ``<a, b> / (max(|a|, eps) * max(|b|, eps))`` with
``eps = 1e-8``, as ``torch.nn.functional.cosine_similarity`` defines it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass
class Tally:
    """What the counter has accumulated, moved to the host."""

    counts: torch.Tensor  # (thresholds, layers, pairs) int64: steps with cosine < threshold
    cosine_sum: torch.Tensor  # (layers, pairs) float64
    histogram: torch.Tensor  # (layers, bins) int64: cosines of every valid pair and step
    whole: torch.Tensor  # (steps, pairs) float64: cosine over the whole shared-parameter vector
    steps: int


class ConflictCounter:
    """Counts, per layer and task pair, the steps whose gradient cosine is below each threshold.

    ``bounds[l]`` is ``(start, end)``: where layer ``l``'s parameters lie in each row of the flat buffer given
    to :meth:`update`; ``reach[l, t]`` says whether task ``t``'s loss reaches layer ``l`` (a pair is only
    counted where both tasks reach the layer).
    """

    def __init__(self, bounds: list[tuple[int, int]], reach: torch.Tensor, thresholds: list[float], bins: int = 20):
        device = reach.device
        tasks = reach.shape[1]
        self.bounds = bounds
        self.first, self.second = (torch.tensor(ix, device=device) for ix in zip(*itertools.combinations(range(tasks), 2)))
        self.valid = reach[:, self.first] & reach[:, self.second]
        self.thresholds = torch.tensor(thresholds, device=device, dtype=torch.float64)
        self.bins = bins
        layers, pairs = self.valid.shape
        self.counts = torch.zeros(len(thresholds), layers, pairs, dtype=torch.int64, device=device)
        self.cosine_sum = torch.zeros(layers, pairs, dtype=torch.float64, device=device)
        self.histogram = torch.zeros(layers, bins, dtype=torch.int64, device=device)
        self.whole: list[torch.Tensor] = []

    def update(self, flat: torch.Tensor) -> None:
        """Add one step: ``flat`` is ``(tasks, parameters)``, each row a task's gradient (zeros where unreached)."""
        tasks = flat.shape[0]
        gram = torch.stack([flat[:, start:end] @ flat[:, start:end].T for start, end in self.bounds]).double() \
            if self.bounds else flat.new_zeros(0, tasks, tasks, dtype=torch.float64)  # no shared layer at all
        cosine = _cosines(gram, self.first, self.second)
        self.counts += (cosine < self.thresholds[:, None, None]) & self.valid
        self.cosine_sum += cosine * self.valid
        index = ((cosine + 1) * (self.bins / 2)).long().clamp_(0, self.bins - 1)
        self.histogram.scatter_add_(1, index, self.valid.long())
        self.whole.append(_cosines(gram.sum(0, keepdim=True), self.first, self.second)[0])

    def tally(self) -> Tally:
        return Tally(self.counts.cpu(), self.cosine_sum.cpu(), self.histogram.cpu(),
                     torch.stack(self.whole).cpu(), len(self.whole))


def _cosines(gram: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pairwise cosines ``(layers, pairs)`` from Gram matrices ``(layers, tasks, tasks)``."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(EPS)
    return gram[:, first, second] / (norms[:, first] * norms[:, second])
