"""What the integrations read from a training framework and the names they log under.

A training step (Lightning's ``training_step``, a transformers model's ``forward``) returns its per-task losses
beside the total: ``{"loss": total, "losses": {task: loss}}``, ``None`` (or no entry) for a task without labels in
the batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import TaskError

CONVENTION = '{"loss": sum(losses.values()), "losses": {task: loss}}'


def task_losses(output, source: str) -> dict[str, torch.Tensor]:
    """The ``{task: loss}`` mapping that ``source`` returned under ``"losses"``, or a TaskError that says how; a task
    given ``None`` (a batch without its labels) has no loss at this step and is left out.

    >>> task_losses({"loss": torch.tensor(3.0), "losses": {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}}, "f")
    {'a': tensor(1.), 'b': tensor(2.)}
    >>> task_losses({"loss": torch.tensor(1.0), "losses": {"a": torch.tensor(1.0), "b": None}}, "f")
    {'a': tensor(1.)}
    >>> task_losses(torch.tensor(3.0), "training_step")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxsplit.errors.TaskError: training_step must return the per-task losses beside the total, ...; it returned a Tensor.
    """
    if isinstance(output, Mapping):
        losses = output.get("losses")
        if isinstance(losses, Mapping):
            return {task: loss for task, loss in losses.items() if loss is not None}
        got = f"no 'losses' (keys {list(output)})" if losses is None else f"'losses' as {type(losses).__name__}"
    else:
        got = f"a {type(output).__name__}"
    raise TaskError(f"{source} must return the per-task losses beside the total, as {CONVENTION}; it returned {got}.")


def share_key(threshold: float) -> str:
    """The name of the share of conflicting task pairs below cosine ``threshold``, e.g.
    ``fxsplit/conflicting_pairs_below_0``."""
    return f"fxsplit/conflicting_pairs_below_{threshold:g}"


def layer_rate_key(layer: str) -> str:
    """The name of a layer's conflict rate: ``fxsplit/layer_conflict_rate/backbone.conv1``."""
    return f"fxsplit/layer_conflict_rate/{layer}"


HEAT_MAP_KEY = "fxsplit/layer_cosine"
