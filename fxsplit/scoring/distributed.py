"""Scoring under ``torch.distributed``: where the task gradients of all processes meet.

* ``"global"``: one all-reduce of the gradient rows (tasks x parameters numbers) per scored step. Every rank then holds
  the mean over ranks of each task's gradient, which is the gradient of the global batch when every rank's loss is a
  mean over an equal share of it, and scores exactly what one process scores on the whole batch.
* ``"local"``: each rank scores its own rows; the ``.grad`` update (parameters numbers, the same as DDP sends) is
  all-reduced, and the counts are summed once, in ``report()``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import FxsplitError, ScoringError
from .counter import Tally

MODES = ("global", "local")


def check_not_sharded(named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise for parameters sharded as ``DTensor`` (FSDP2's ``fully_shard``): their task gradients are out of reach."""
    if not dist.is_available():
        return
    from torch.distributed.tensor import DTensor

    sharded = [name for name, p in named if isinstance(p, DTensor)]
    if sharded:
        raise ScoringError(
            f"{len(sharded)} parameters are sharded DTensors (e.g. {sharded[0]!r}, by FSDP2's fully_shard): FSDP2 "
            f"computes with all-gathered copies and hands gradients to the shards only through .grad, one "
            f"reduce-scatter per backward, so the monitor cannot take each task's gradient. Score under "
            f"DistributedDataParallel or in one process; the split model then trains under fully_shard.")


class Reduction:
    """The collectives of one mode over a process group of two or more ranks."""

    def __init__(self, mode: str, group):
        self.mode, self.group = mode, group
        self.world = dist.get_world_size(group)

    def rows(self, flat: torch.Tensor) -> None:
        """Global mode: every rank's rows become the mean over ranks."""
        if self.mode == "global":
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)

    def update(self, vector: torch.Tensor) -> None:
        """Local mode: the ``.grad`` update becomes the mean over ranks, as DDP averages gradients."""
        if self.mode == "local":
            dist.all_reduce(vector, group=self.group)
            vector.div_(self.world)

    def tally(self, tally: Tally) -> Tally:
        """Local mode: the ranks' counts summed, their steps listed one rank after another."""
        if self.mode == "global":
            return tally
        summed = [t.clone() for t in (tally.counts, tally.cosine_sum, tally.histogram, tally.pair_steps)]
        for t in summed:
            dist.all_reduce(t, group=self.group)
        steps = [None] * self.world
        dist.all_gather_object(steps, (tally.whole.cpu(), tally.finite.cpu(), tally.present.cpu()), group=self.group)
        whole, finite, present = (torch.cat(parts).to(tally.whole.device) for parts in zip(*steps))
        counts, cosine_sum, histogram, pair_steps = summed
        return Tally(counts, cosine_sum, histogram, whole, finite, present, pair_steps)

    def check_same_parameters(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """Raise if the ranks start from different parameters: their training would silently diverge."""
        with torch.no_grad():
            sums = torch.stack([p.detach().double().sum() for _, p in named])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        differ = [name for (name, _), same in zip(named, (low == high).tolist()) if not same]
        if differ:
            raise ScoringError(f"the {self.world} processes start from different parameters ({len(differ)} differ, "
                               f"e.g. {differ[0]!r}): give every rank the same weights (the same seed, or rank 0's, "
                               f"as DistributedDataParallel broadcasts them when it wraps the model).")


def reduction(mode: str, group=None) -> Reduction | None:
    """The reduction for ``mode`` under the current process group; ``None`` in a single process."""
    if mode not in MODES:
        raise FxsplitError(f"distributed must be one of {list(MODES)}, got {mode!r}.")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return None
    return Reduction(mode, group)
