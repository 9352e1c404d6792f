"""Checks of what the user hands to the scoring stage: task names, thresholds, loss values and their graph."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import FxsplitError, ScoringError, TaskError


def whole_number(name: str, value, minimum: int, unit: str = "") -> int:
    """``value`` if it is a whole number (a bool is not) of at least ``minimum``, else an :class:`FxsplitError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FxsplitError(f"{name} must be a whole number{unit} >= {minimum}, got {value!r}.")
    return value


def thresholds(threshold) -> list[float]:
    """S as a list of distinct cosines in [-1, 1], the primary one first."""
    values = [threshold] if isinstance(threshold, (int, float)) else list(threshold)
    bad = [v for v in values if not (isinstance(v, (int, float)) and -1.0 <= v <= 1.0)]
    if not values or bad:
        raise FxsplitError(f"threshold must be a cosine in [-1, 1] (or a list of them), got {threshold!r}.")
    return [float(v) for v in dict.fromkeys(values)]


def step_hooks(on_step) -> tuple[Callable, ...]:
    """The monitor's ``on_step`` hooks as a tuple: ``None``, one callable, or an iterable of them."""
    hooks = () if on_step is None else (on_step,) if callable(on_step) else tuple(on_step)
    bad = [hook for hook in hooks if not callable(hook)]
    if bad:
        raise FxsplitError(f"on_step takes a function of the step's figures, or several; got {bad[0]!r}.")
    return hooks


def loss_value(task: str, value) -> torch.Tensor:
    """A task's loss as a 0-d tensor that depends on parameters, or a TaskError that says what is wrong."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise TaskError(f"the loss of task {task!r} must be a scalar tensor, got {shape}; reduce it (e.g. .mean()).")
    if not value.requires_grad:
        raise TaskError(f"the loss of task {task!r} does not depend on the model's parameters (it has no gradient); "
                        f"compute it from the model's output.")
    return value if value.dim() == 0 else value.reshape(())


def no_reentrant_checkpoint(model: nn.Module, losses: Sequence[torch.Tensor]) -> None:
    """Raise if the losses' graph runs through a reentrant ``torch.utils.checkpoint``.

    Its backward reruns the checkpointed forward and differentiates that by ``backward()``, which a
    ``torch.autograd.grad`` call cannot do: autograd raises when the checkpoint lies between the losses and other
    parameters asked for, and, when none does (a frozen stem before it, its input made to require grad), the
    checkpointed parameters' gradients are silently missing. The whole graph is read, as autograd would run it.
    """
    reentrant = torch.utils.checkpoint.CheckpointFunction._backward_cls
    seen, nodes = set(), [loss.grad_fn for loss in losses]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        if isinstance(node, reentrant):
            raise ScoringError(
                f"{type(model).__name__} runs torch.utils.checkpoint with use_reentrant=True, through which the "
                f"monitor's torch.autograd.grad (one per task) cannot differentiate: the checkpointed parameters' "
                f"gradients would be lost. Pass use_reentrant=False to checkpoint (what torch recommends), or capture "
                f"each task's loss.backward() with monitor.task(name).")
        seen.add(node)
        nodes.extend(parent for parent, _ in node.next_functions)
