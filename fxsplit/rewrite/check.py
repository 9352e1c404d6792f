"""Checking a split model against the original, task by task, in both modes, on an example input."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping

from torch import fx, nn

from ..errors import SplitMismatchError
from ..outputs import Path, select
from ..tracing.exported import drop_probability
from ..tracing.symbolic import copy_module
from ..tracing.verify import (
    SEED, TOLERANCE, Call, check_trace, difference, first_difference, mode, run, run_with_state, state_difference,
)
from .fanout import NORMS

_DROP_ATTRIBUTES = ("p", "drop_prob")  # nn.Dropout*, torchvision's StochasticDepth; timm's DropPath


def check_split(model: nn.Module, traced: nn.Module, split: nn.Module, paths: Mapping[str, Path], call: Call) -> None:
    """Raise unless every task's output of ``split`` equals its part of ``model``'s output, and every buffer the
    split keeps at the model's path has the model's value after the call, in eval and in train mode (norm layers'
    statistics aside: a shared one in the branches updates once per branch, as documented).

    Train mode is compared with dropout off; a model that is still random there cannot be compared, and a warning
    says that only eval mode was checked. When a task differs, the trace is checked too, to say whose fault it is.
    """
    model = copy_module(model, share_tensors=True)  # forward may change Python state: never the user's
    modules = [model, traced, split]
    norms = {name for name, module in model.named_modules() if isinstance(module, NORMS)}
    for training in (False, True):
        where = f"{'train' if training else 'eval'} mode"
        with mode(modules, training), _no_dropout(modules):
            expected, expected_state = run_with_state(call, model, dict(model.named_buffers()))
            if training and _random(call, model, expected):
                warnings.warn(f"{type(model).__name__} is random in train mode even without dropout, so the split "
                              f"model was checked in eval mode only.", stacklevel=3)
                continue
            got, got_state = run_with_state(call, split, dict(split.named_buffers()))
            task, how = next(((task, how) for task, path in paths.items()
                              if (how := difference(select(expected, path, task), got[task])) is not None),
                             (None, None))
            state = state_difference(expected_state, got_state, skip=lambda name: name.rpartition(".")[0] in norms)
            if how is None and state is None:
                continue
            if how is not None and training and _random(call, split, got):  # drop-path in a torch.export graph
                warnings.warn(f"the split {type(model).__name__} is random in train mode even without dropout, so "
                              f"it was checked in eval mode only.", stacklevel=3)
                continue
            check_trace(model, traced, call, modes=(training,))
            if state is not None:
                buffer, how = state
                raise SplitMismatchError(
                    f"the split model's {buffer} differs from the original's in {where} ({how}): the module that "
                    f"owns it runs in the task branches, once per task, and updates it each time (a leaf module "
                    f"that keeps state, say). Split only layers after that module, or keep the state in a split "
                    f"layer's own module (each task then gets its own copy).")
            route = getattr(split, "meta", {}).get("route", "fx")
            raise SplitMismatchError(
                f"the split model's output for task {task!r} differs from the original's in {where} ({how}), though "
                f"the trace (by the {route} route) matches the model. Beyond {TOLERANCE:g} this is no rounding: "
                f"please report it as an fxsplit bug, with the model. batch_branches=False computes bit for bit, "
                f"if it helps meanwhile."
            )


def _random(call: Call, module: nn.Module, first) -> bool:
    """Whether ``module`` gives another output than ``first`` from another random state."""
    return first_difference(first, run(call, module, module.buffers(), SEED + 1)) is not None


@contextlib.contextmanager
def _no_dropout(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Dropout probabilities 0 in every module, and in the dropout operations of graphs traced through
    torch.export (which hold the probability as a number), then back as they were."""
    saved, nodes = [], []
    for module in {id(m): m for root in modules for m in root.modules()}.values():
        for name in _DROP_ATTRIBUTES:
            value = getattr(module, name, None)
            if isinstance(value, float) and value > 0 and _drops(module):
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    graphs = [m for m in modules if isinstance(m, fx.GraphModule)]
    for graph in graphs:
        for node in graph.graph.nodes:
            where, p = drop_probability(node) or (None, 0.0)
            if p > 0:
                nodes.append((node, where, p))
                _set_argument(node, where, 0.0)
        graph.recompile()
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        for node, where, p in nodes:
            _set_argument(node, where, p)
        for graph in graphs:
            graph.recompile()


def _set_argument(node: fx.Node, where: int | str, value) -> None:
    if isinstance(where, int):
        node.update_arg(where, value)
    else:
        node.update_kwarg(where, value)


def _drops(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.dropout._DropoutNd) or "drop" in type(module).__name__.lower() \
        or type(module).__name__ == "StochasticDepth"
