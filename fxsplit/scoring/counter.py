"""Per-step conflict statistics of the scored layers, kept on the gradients' device and read once at the end.

The cosine of two gradient vectors ``a``, ``b`` is ``<a, b> / (max(|a|, eps) * max(|b|, eps))`` with
``eps = 1e-8``, as ``torch.nn.functional.cosine_similarity`` defines it. A step costs a fixed few dozen operators,
whatever the number of layers, and no read back to the host.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

EPS = 1e-8


@dataclass
class Tally:
    """What the counter has accumulated, still on the device."""

    counts: torch.Tensor  # (thresholds, layers, pairs) int64: scored steps with cosine < threshold
    cosine_sum: torch.Tensor  # (layers, pairs) float64
    histogram: torch.Tensor  # (layers, bins) int64: cosines of every valid pair and scored step
    whole: torch.Tensor  # (steps, pairs) float64: cosine over all scored layers' parameters, at every step
    finite: torch.Tensor  # (steps,) bool: whether the step was scored (its gradients were finite)
    present: torch.Tensor  # (steps, pairs) bool: whether both tasks of the pair had a loss at the step
    pair_steps: torch.Tensor  # (pairs,) int64: scored steps at which both tasks of the pair had a loss


class ConflictCounter:
    """Counts, per scored layer and task pair, the steps whose gradient cosine is below each threshold.

    ``reach[l, t]`` says whether task ``t``'s loss reaches layer ``l``: a pair is only counted where both tasks
    reach the layer. :meth:`update` takes one more Gram matrix than there are layers: the last one is of all scored
    parameters together (the whole shared vector). A step whose gradients are not all finite (a ``GradScaler``
    overflow) is recorded but not scored; at a step where some tasks have no loss, only the pairs of tasks that have
    one are scored. :meth:`grown` carries the counts over to a counter of more layers (a task that had no loss so
    far reaches them).
    """

    def __init__(self, reach: torch.Tensor, thresholds: list[float], bins: int = 20):
        device = reach.device
        tasks = reach.shape[1]
        first, second = zip(*itertools.combinations(range(tasks), 2))
        self.first, self.second = (torch.tensor(ix, device=device) for ix in (first, second))
        # in a flattened Gram matrix: each pair's dot product, then its two tasks' squared norms
        self.gather = torch.cat([self.first * tasks + self.second, self.first * (tasks + 1),
                                 self.second * (tasks + 1)]).view(3, -1).T.flatten()
        whole = torch.zeros(1, len(first), dtype=torch.bool, device=device)  # the whole vector is not a layer
        self.valid = torch.cat([reach[:, self.first] & reach[:, self.second], whole])
        self.thresholds = torch.tensor(thresholds, device=device, dtype=torch.float64)[:, None, None]
        self.bins = bins
        self.edges = torch.linspace(-1, 1, bins + 1, dtype=torch.float64, device=device)[1:-1]  # inner bin edges
        self.overflow = torch.full(self.valid.shape, bins, device=device)  # the bin of what is not counted
        self.one = torch.ones(self.valid.shape, dtype=torch.int64, device=device)
        self.zero = torch.zeros((), dtype=torch.float64, device=device)
        layers, pairs = self.valid.shape
        self.counts = torch.zeros(len(thresholds), layers, pairs, dtype=torch.int64, device=device)
        self.cosine_sum = torch.zeros(layers, pairs, dtype=torch.float64, device=device)
        self.histogram = torch.zeros(layers, bins + 1, dtype=torch.int64, device=device)
        self.pair_steps = torch.zeros(pairs, dtype=torch.int64, device=device)
        self.whole: list[torch.Tensor] = []
        self.finite: list[torch.Tensor] = []
        self.present: list[torch.Tensor] = []

    def pairs_of(self, tasks: torch.Tensor) -> torch.Tensor:
        """``(pairs,)`` bool: the pairs both of whose tasks are among ``tasks`` (``(tasks,)`` bool)."""
        return torch.bitwise_and(tasks[self.first], tasks[self.second])

    def update(self, gram: torch.Tensor, finite: torch.Tensor,
               present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one step: ``gram`` is ``(layers + 1, tasks * tasks)`` float64, the flattened Gram matrices of the
        task gradients on each layer and on all of them; ``finite`` a bool scalar, whether the step's gradients
        were; ``present`` ``(pairs,)`` bool, the pairs both of whose tasks have a loss. Returns the step's cosines
        ``(layers + 1, pairs)`` and what it added to the counts ``(thresholds, layers + 1, pairs)``, still on the
        device."""
        cosine = self._cosines(gram)
        counted = torch.bitwise_and(present, finite)
        scored = torch.bitwise_and(self.valid, counted)
        conflicts = torch.bitwise_and(torch.lt(cosine, self.thresholds), scored)
        self.counts.add_(conflicts)
        self.cosine_sum.add_(torch.where(scored, cosine, self.zero))
        bins = torch.where(scored, torch.searchsorted(self.edges, cosine, right=True), self.overflow)
        self.histogram.scatter_add_(1, bins, self.one)
        self.pair_steps.add_(counted)
        self.whole.append(cosine[-1])
        self.finite.append(finite)
        self.present.append(present)
        return cosine, conflicts

    def grown(self, reach: torch.Tensor, rows: list[int]) -> ConflictCounter:
        """A counter of the layers ``reach`` describes, holding this one's tallies: its layer ``l`` is the new
        one's ``rows[l]``. Exact when the new counter's pairs that this one did not count involve a task that had
        no loss at any step so far."""
        counter = ConflictCounter(reach, self.thresholds.flatten().tolist(), self.bins)
        at = torch.tensor(rows + [len(counter.valid) - 1], device=reach.device)  # the whole vector stays last
        counter.counts[:, at] = self.counts
        counter.cosine_sum[at] = self.cosine_sum
        counter.histogram[at] = self.histogram
        counter.pair_steps.copy_(self.pair_steps)
        counter.whole, counter.finite, counter.present = self.whole, self.finite, self.present
        return counter

    def tally(self) -> Tally:
        pairs = self.valid.shape[1]
        whole = torch.stack(self.whole) if self.whole else self.cosine_sum.new_zeros(0, pairs)
        finite = torch.stack(self.finite) if self.finite else self.valid.new_zeros(0)
        present = torch.stack(self.present) if self.present else self.valid.new_zeros(0, pairs)
        return Tally(self.counts[:, :-1], self.cosine_sum[:-1], self.histogram[:-1, :-1], whole, finite, present,
                     self.pair_steps)

    def _cosines(self, gram: torch.Tensor) -> torch.Tensor:
        """Pairwise cosines ``(layers, pairs)`` from flattened Gram matrices ``(layers, tasks * tasks)``."""
        dot, squares = gram.index_select(1, self.gather).view(len(gram), -1, 3).split([1, 2], dim=2)
        return dot.squeeze(2) / squares.clamp_min(0).sqrt().clamp_min(EPS).prod(2)
