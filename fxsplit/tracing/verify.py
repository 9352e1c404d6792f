"""Checking a traced or rewritten module against the model it came from, on example inputs.

A trace is an assumption about the model (Python code runs once, with stand-ins for tensors); running both on the
same inputs, from the same random state and with the same buffers, turns it into a checked fact.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import keystr, tree_flatten_with_path

from ..errors import TraceError, TraceMismatchError
from .symbolic import copy_module

TOLERANCE = 1e-4  # relative error (Frobenius norms) an output tensor may have: rounding, not a different function
SEED = 20230211  # any fixed seed: both runs draw the same random numbers in the same order

TRACE_CAUSES = (
    "A trace records one run of the Python code with stand-ins for tensors, so it differs from the model where "
    "that code does what a graph cannot record: isinstance(x, torch.Tensor) checks (a stand-in is no Tensor), "
    "branches on Python state or on a tensor's values (frozen as they went while tracing), Python-side randomness, "
    "an autowrapped function or leaf module that drops an input, or a buffer written through another attribute "
    "than its own. Make the module that holds such code a leaf "
    "(tracer_kwargs={'leaf_modules': [...]}), or fix the Python value it reads with concrete_args."
)
EXPORT_CAUSES = (
    "torch.export records one run of the Python code on the example, so the graph differs from the model where "
    "that code does what a graph cannot record: Python-side randomness, or Python state that changes between "
    "calls (a counter, a cache, a module attribute set after tracing). Make the model compute it from tensors."
)


Call = Callable[[nn.Module], Any]  # runs a module on the example: module -> output


def example_call(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from torch.export's convention: a tuple of positional inputs (or one input) and a dict."""
    if example_inputs is None:
        args = ()
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return args, dict(example_kwargs or {})


def calling(args: tuple, kwargs: dict) -> Call:
    """The :data:`Call` that gives a module ``args`` and ``kwargs``."""
    return lambda module: module(*args, **kwargs)


def recorded_example(model: nn.Module, call: Call) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` that ``call`` gives ``model``'s ``forward`` (its first call), from one run without
    gradients; buffers are put back. An example for the torch.export route from a ``forward(model, batch)``."""
    seen = []
    model = copy_module(model, share_tensors=True)  # forward may change Python state
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        run(call, model, model.buffers())
    finally:
        hook.remove()
    if not seen:
        raise TraceError(f"the example call never calls {type(model).__name__}: give the call that runs the model.")
    return seen[0]


def given_arguments(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """Names of the ``forward`` arguments that an example call gives."""
    names = [name for name, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names[:len(args)] + list(kwargs)


@contextlib.contextmanager
def mode(modules: Iterable[nn.Module], training: bool) -> Iterator[None]:
    """Put ``modules`` in train or eval mode, then give every submodule back its own mode."""
    modules = list(modules)
    saved = [{name: m.training for name, m in module.named_modules()} for module in modules]
    for module in modules:
        module.train(training)
    try:
        yield
    finally:
        for module, modes in zip(modules, saved):
            module.train(modes[""])
            for name, m in module.named_modules():
                m.training = modes[name]


def run(call: Call, module: nn.Module, buffers: Iterable[torch.Tensor], seed: int = SEED,
        after: list | None = None) -> Any:
    """``call(module)`` without gradients, from a fixed random state; ``buffers`` are put back after (their values
    after the call are appended to ``after`` first, when given)."""
    buffers = list(buffers)
    unique = list({id(b): b for b in buffers}.values())
    saved = [b.detach().clone() for b in unique]
    try:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            return call(module)
    finally:
        if after is not None:
            after.extend(b.detach().clone() for b in buffers)
        with torch.no_grad():
            for buffer, value in zip(unique, saved):
                buffer.copy_(value)


def first_difference(expected: Any, got: Any) -> tuple[str, str] | None:
    """``(output, how it differs)`` for the first output of ``got`` that differs from ``expected``, else ``None``.

    Outputs are matched by key path, so containers of another type with the same keys (an ``OrderedDict`` for a
    ``dict``) are the same output.
    """
    expected_leaves, got_leaves = tree_flatten_with_path(expected)[0], tree_flatten_with_path(got)[0]
    if _keys(expected_leaves) != _keys(got_leaves):
        return "the output structure", f"{_keys(got_leaves)} instead of {_keys(expected_leaves)}"
    for (path, a), (_, b) in zip(expected_leaves, got_leaves):
        how = difference(a, b)
        if how is not None:
            return f"output{keystr(path)}", how
    return None


def run_with_state(call: Call, module: nn.Module, state: Mapping[str, torch.Tensor],
                   buffers: Iterable[torch.Tensor] = ()) -> tuple[Any, dict]:
    """:func:`run` on ``module`` with ``state`` (name -> buffer) and ``buffers`` put back after, and the value each
    buffer of ``state`` had after the call."""
    after: list[torch.Tensor] = []
    output = run(call, module, [*state.values(), *buffers], after=after)
    return output, dict(zip(state, after))


def state_difference(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                     skip: Callable[[str], bool] = lambda name: False) -> tuple[str, str] | None:
    """``(buffer, how it differs)`` for the first buffer (by name, in both) whose value after a call differs."""
    for name, value in expected.items():
        if name in got and not skip(name):
            how = difference(value, got[name])
            if how is not None:
                return f"buffer {name} after the call", how
    return None


def check_trace(model: nn.Module, traced: nn.Module, call: Call, modes: Iterable[bool]) -> None:
    """Raise :class:`TraceMismatchError` unless ``traced`` computes what ``model`` computes in each mode: the
    same outputs, and the same buffers after the call (state that ``forward`` updates). The model runs as a copy
    that shares its tensors, so that Python state its ``forward`` changes stays as it was."""
    model = copy_module(model, share_tensors=True)
    model_state = dict(model.named_buffers())
    traced_state = {**model_state, **dict(traced.named_buffers())}  # what the graph does not hold, it leaves alone
    buffers = [*model.buffers(), *traced.buffers()]
    route = getattr(traced, "meta", {}).get("route", "fx")
    causes = EXPORT_CAUSES if route == "export" else TRACE_CAUSES
    for training in modes:
        where = f"{'train' if training else 'eval'} mode"
        with mode([model, traced], training):
            expected, expected_state = run_with_state(call, model, model_state, buffers)
            try:
                got, got_state = run_with_state(call, traced, traced_state, buffers)
            except Exception as error:
                raise TraceMismatchError(
                    f"the graph of {type(model).__name__} traced by the {route} route fails in {where} where the "
                    f"model runs: {type(error).__name__}: {error}. {causes}") from error
        found = first_difference(expected, got) or state_difference(expected_state, got_state)
        if found is not None:
            what, how = found
            raise TraceMismatchError(
                f"the graph of {type(model).__name__} traced by the {route} route does not compute what the model "
                f"computes in {where}: {what} differs ({how}). {causes}"
            )


def difference(expected: Any, got: Any) -> str | None:
    """How one output value differs from the expected one (beyond :data:`TOLERANCE`), or ``None``."""
    if not isinstance(expected, torch.Tensor):
        return None if type(expected) is type(got) and expected == got else f"{got!r} instead of {expected!r}"
    if not isinstance(got, torch.Tensor):
        return f"a {type(got).__name__} instead of a tensor"
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"{got.dtype} {tuple(got.shape)} instead of {expected.dtype} {tuple(expected.shape)}"
    if not expected.is_floating_point() and not expected.is_complex():
        return None if torch.equal(expected, got) else "different values"
    if not torch.equal(expected.isfinite(), got.isfinite()):
        return "non-finite values in other places"
    finite = expected.isfinite()
    error = ((expected - got)[finite].norm() / expected[finite].norm().clamp_min(1e-30)).item()
    return None if error <= TOLERANCE else f"relative error {error:.2g}, more than {TOLERANCE:g}"


def _keys(leaves: list) -> list[str]:
    return [keystr(path) for path, _ in leaves]
