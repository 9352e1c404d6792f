"""Checking a split model against the original, task by task, in both modes, on an example input."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping

from torch import nn

from ..errors import SplitMismatchError
from ..tracing.verify import SEED, TOLERANCE, Call, check_trace, difference, first_difference, mode, run
from ..outputs import Path, select

_DROP_ATTRIBUTES = ("p", "drop_prob")  # nn.Dropout*, torchvision's StochasticDepth; timm's DropPath


def check_split(model: nn.Module, traced: nn.Module, split: nn.Module, paths: Mapping[str, Path], call: Call) -> None:
    """Raise unless every task's output of ``split`` equals its part of ``model``'s output, in eval and in train mode.

    Train mode is compared with dropout off; a model that is still random there cannot be compared, and a warning
    says that only eval mode was checked. When a task differs, the trace is checked too, to say whose fault it is.
    """
    modules = [model, traced, split]
    for training in (False, True):
        with mode(modules, training), _no_dropout(modules):
            expected = run(call, model, model.buffers())
            if training and first_difference(expected, run(call, model, model.buffers(), SEED + 1)):
                warnings.warn(f"{type(model).__name__} is random in train mode even without dropout, so the split "
                              f"model was checked in eval mode only.", stacklevel=3)
                continue
            got = run(call, split, split.buffers())
            for task, path in paths.items():
                how = difference(select(expected, path, task), got[task])
                if how is not None:
                    check_trace(model, traced, call, modes=(training,))
                    raise SplitMismatchError(
                        f"the split model's output for task {task!r} differs from the original's in "
                        f"{'train' if training else 'eval'} mode ({how}), though the trace matches the model. "
                        f"Beyond {TOLERANCE:g} this is no rounding: please report it as an fxsplit bug, with the "
                        f"model. batch_branches=False computes bit for bit, if it helps meanwhile."
                    )


@contextlib.contextmanager
def _no_dropout(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Dropout probabilities 0 in every module, then back as they were."""
    saved = []
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        for name in _DROP_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0 and _drops(module):
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _drops(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or "drop" in type(module).__name__.lower() \
        or type(module).__name__ == "StochasticDepth"
