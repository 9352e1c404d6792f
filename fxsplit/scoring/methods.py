"""Gradient methods on the shared parameters: a torchjd aggregator turns the tasks' gradients into one update.

torchjd is optional (``pip install 'fxsplit[methods]'``): it is imported only when an aggregator is named by its class
name; an aggregator object is any callable from a ``(tasks, parameters)`` Jacobian to a ``(parameters,)`` vector.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import FxsplitError

Aggregator = Callable[[torch.Tensor], torch.Tensor]


def aggregator_of(aggregator: Aggregator | str | None, **arguments) -> Aggregator | None:
    """The aggregator itself, or a new torchjd aggregator of that class name (e.g. ``"UPGrad"``) built with
    ``arguments`` (e.g. ``c=0.4`` for ``"CAGrad"``)."""
    if aggregator is None or callable(aggregator):
        return aggregator
    if not isinstance(aggregator, str):
        raise FxsplitError(f"aggregator must be a torchjd aggregator (or its class name), got {aggregator!r}.")
    try:
        from torchjd import aggregation
    except ImportError as error:
        raise FxsplitError(f"the aggregator {aggregator!r} comes from torchjd, which is not installed: "
                           f"pip install 'fxsplit[methods]'") from error
    names = sorted(name for name in aggregation.__all__ if isinstance(getattr(aggregation, name), type)
                   and issubclass(getattr(aggregation, name), aggregation.Aggregator)
                   and getattr(aggregation, name) is not aggregation.Aggregator)
    if aggregator not in names:
        raise FxsplitError(f"torchjd has no aggregator {aggregator!r}; it has {names}.")
    try:
        return getattr(aggregation, aggregator)(**arguments)
    except TypeError as error:  # CAGrad has no default for c
        raise FxsplitError(f"torchjd's {aggregator} cannot be built from its name alone ({error}): pass an aggregator "
                           f"object, e.g. aggregator=torchjd.aggregation.{aggregator}(...).") from error


def aggregate(aggregator: Aggregator, jacobian: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """``aggregator`` applied to the unscaled ``jacobian`` (a GradScaler's ``scale`` divided out, then put back, so that
    the update is the one the unscaled losses give); ``None`` when the Jacobian is not finite (the scaler's overflow
    step, which it will skip)."""
    if not bool(jacobian.isfinite().all()):  # an aggregator's solver fails on inf / nan
        return None
    unscaled = jacobian if scale is None else jacobian / scale
    update = aggregator(unscaled)
    if not isinstance(update, torch.Tensor) or update.shape != jacobian.shape[1:]:
        shape = tuple(update.shape) if isinstance(update, torch.Tensor) else type(update).__name__
        raise FxsplitError(f"the aggregator {aggregator!r} returned {shape} for a {tuple(jacobian.shape)} Jacobian; "
                           f"it must return one vector of {jacobian.shape[1]} entries.")
    return update if scale is None else update * scale
