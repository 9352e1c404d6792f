"""Checking a traced or rewritten module against the model it came from, on example inputs.

A trace is an assumption about the model (Python code runs once, with stand-ins for tensors); running both on the
same inputs, from the same random state and with the same buffers, turns it into a checked fact.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from .. import structure
from ..errors import TraceError, TraceMismatchError
from ..modules import copy_module, saved_buffers, saved_modes

TOLERANCE = 1e-4  # relative error (Frobenius norms) an output tensor may have: rounding, not a different function
SEED = 20230211  # any fixed seed: both runs draw the same random numbers in the same order

Call = Callable[[nn.Module], Any]  # runs a module on the example: module -> output


def example_call(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from torch.export's convention: a tuple of positional inputs (or one input) and a dict."""
    if example_inputs is None:
        args = ()
    else:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    return args, dict(example_kwargs or {})


def calling(args: tuple, kwargs: dict) -> Call:
    """The :data:`Call` that gives a module copies of ``args`` and ``kwargs`` (a forward that writes into its
    inputs, ``x.div_(2)``, never changes the caller's, and every run starts from the same inputs)."""
    return lambda module: module(*fresh(args), **fresh(kwargs))


def forwarding(forward: Callable[[nn.Module, Any], Any], batch: Any) -> Call:
    """The :data:`Call` that runs ``forward(module, batch)`` on a copy of ``batch``."""
    return lambda module: forward(module, fresh(batch))


def fresh(value: Any) -> Any:
    """``value`` with every tensor in it copied (keeping ``requires_grad``)."""
    return tree_map(lambda x: x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor)
                    else x, value)


def recorded_example(model: nn.Module, call: Call) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` that ``call`` gives ``model``'s ``forward`` (its first call), from one run; buffers
    are put back. An example for the torch.export route from a ``forward(model, batch)``."""
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


def optional_given(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, int | None]:
    """The inputs an example call gives that ``forward`` could go without (a parameter with a default, a keyword
    that ``**kwargs`` takes), each with its position when it can be passed by position: a trace holds the path
    ``forward`` takes with them, so a traced module must be given them."""
    parameters = inspect.signature(model.forward).parameters
    positional = [name for name, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    optional = {}
    for name in given_arguments(model, args, kwargs):
        parameter = parameters.get(name)
        if parameter is None or parameter.kind == parameter.VAR_KEYWORD or parameter.default is not parameter.empty:
            optional[name] = positional.index(name) if name in positional else None
    return optional


def check_given(needed: Mapping[str, int | None], args: tuple, kwargs: Mapping[str, Any], name: str) -> None:
    """Raise :class:`TraceError` unless a call gives every input in ``needed`` (from :func:`optional_given`)."""
    missing = [arg for arg, position in needed.items()
               if arg not in kwargs and (position is None or position >= len(args))]
    if missing:
        raise TraceError(
            f"{name} was traced with {', '.join(missing)} given (the example gave it), so its graph holds the path "
            f"forward takes with {'them' if len(missing) > 1 else 'it'} (code that tests `is None` or "
            f"kwargs.get(...) runs once while tracing): give {', '.join(missing)} in every call, or trace (and "
            f"rewrite) with an example without {'them' if len(missing) > 1 else 'it'} for calls without.")


@contextlib.contextmanager
def mode(modules: Iterable[nn.Module], training: bool) -> Iterator[None]:
    """Put ``modules`` in train or eval mode, then give every submodule back its own mode."""
    modules = list(modules)
    restores = [saved_modes(module) for module in modules]
    for module in modules:
        module.train(training)
    try:
        yield
    finally:
        for restore in restores:
            restore()


@dataclass
class Outcome:
    """What one run of a module gave: its ``output`` (detached), the value of each buffer asked for after the call
    (``state``), and per part of the output the ``gradients`` of a fixed linear function of it (:func:`probe`)
    with respect to each parameter asked for (``None`` where it does not reach one)."""

    output: Any
    state: dict[str, torch.Tensor]
    gradients: dict[str, list[torch.Tensor | None]]


def run(call: Call, module: nn.Module, restore: Iterable[torch.Tensor] = (), seed: int = SEED, *,
        state: Mapping[str, torch.Tensor] | None = None, parts: Callable[[Any], Mapping[str, Any]] | None = None,
        parameters: Sequence[torch.Tensor] = ()) -> Outcome:
    """``call(module)`` as training runs it (gradients on) from a fixed random state, with the buffers of
    ``restore`` and ``state`` put back and every parameter's ``.grad`` left as it was (a forward may call
    ``backward`` itself).

    ``state``: name -> buffer, whose values after the call are kept. ``parts``: output -> {name: part}, whose
    gradients (of :func:`probe` of each part) with respect to ``parameters`` are taken.
    """
    state = dict(state or {})
    restore_buffers = saved_buffers([*restore, *state.values()])
    owned = list({id(p): p for p in module.parameters()}.values())
    grads = [p.grad for p in owned]
    for p in owned:
        p.grad = None
    try:
        with torch.enable_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            output = call(module)
            after = {name: b.detach().clone() for name, b in state.items()}
            gradients = {name: _gradients(part, parameters) for name, part in (parts(output) if parts else {}).items()}
        return Outcome(tree_map(lambda x: x.detach() if isinstance(x, torch.Tensor) else x, output), after, gradients)
    finally:
        restore_buffers()
        for p, grad in zip(owned, grads):
            p.grad = grad


def probe(value: Any) -> torch.Tensor | None:
    """A fixed linear function of every floating-point tensor in ``value`` that has a gradient (each summed with
    fixed random weights, in float64), or ``None`` when none has: what gradients are compared on."""
    total = None
    for i, (_, _, leaf) in enumerate(structure.leaves(value)):
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad and leaf.is_floating_point():
            generator = torch.Generator().manual_seed(SEED + i)
            weights = torch.randn(leaf.shape, generator=generator, dtype=torch.float64).to(leaf.device)
            term = (leaf.double() * weights).sum()
            total = term if total is None else total + term
    return total


def _gradients(part: Any, parameters: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
    target = probe(part)
    trainable = [i for i, p in enumerate(parameters) if p.requires_grad]
    gradients: list[torch.Tensor | None] = [None] * len(parameters)
    if target is None or not trainable:
        return gradients
    found = torch.autograd.grad(target, [parameters[i] for i in trainable], retain_graph=True, allow_unused=True)
    for i, gradient in zip(trainable, found):
        gradients[i] = gradient
    return gradients


def first_difference(expected: Any, got: Any) -> tuple[str, str] | None:
    """``(output, how it differs)`` for the first output of ``got`` that differs from ``expected``, else ``None``.

    Outputs are matched by key path (:mod:`fxsplit.structure`), so containers of another type with the same keys
    (an ``OrderedDict`` for a ``dict``) are the same output; dataclasses are compared field by field.
    """
    expected_leaves, got_leaves = structure.leaves(expected), structure.leaves(got)
    if _keys(expected_leaves) != _keys(got_leaves):
        return "the output structure", f"{_keys(got_leaves)} instead of {_keys(expected_leaves)}"
    for (_, shown, a), (_, _, b) in zip(expected_leaves, got_leaves):
        how = difference(a, b)
        if how is not None:
            return f"output{shown}", how
    return None


def state_difference(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor],
                     skip: Callable[[str], bool] = lambda name: False) -> tuple[str, str] | None:
    """``(buffer, how it differs)`` for the first buffer (by name, in both) whose value after a call differs."""
    for name, value in expected.items():
        if name in got and not skip(name):
            how = difference(value, got[name])
            if how is not None:
                return f"buffer {name} after the call", how
    return None


def gradient_difference(expected: Sequence[torch.Tensor | None], got: Sequence[torch.Tensor | None],
                        names: Sequence[str]) -> tuple[str, str] | None:
    """``(parameter, how its gradient differs)`` for the first parameter whose gradient differs: one reaches it
    and the other not, or the values differ beyond the tolerance (relative to the parameter's own gradient, or
    to a thousandth of the whole gradient where that one is smaller)."""
    whole = math.sqrt(sum(e.double().pow(2).sum().item() for e in expected if e is not None))
    for name, e, g in zip(names, expected, got):
        if (e is None) != (g is None):
            return f"the gradient of {name}", "none" if g is None else "one where the model gives none"
        how = None if e is None else difference(e, g, floor=1e-3 * whole)
        if how is not None:
            return f"the gradient of {name}", how
    return None


def check_trace(model: nn.Module, traced: nn.Module, call: Call, modes: Iterable[bool]) -> None:
    """Raise :class:`TraceMismatchError` unless ``traced`` computes what ``model`` computes in each mode: the
    same outputs, the same gradients (of a fixed function of the outputs, for every parameter), and the same
    buffers after the call (state that ``forward`` updates). The model runs as a copy that shares its tensors,
    so that Python state its ``forward`` changes stays as it was."""
    model = copy_module(model, share_tensors=True)
    model_state = dict(model.named_buffers())
    traced_state = {**model_state, **dict(traced.named_buffers())}  # what the graph does not hold, it leaves alone
    buffers = [*model.buffers(), *traced.buffers()]
    names, expected_parameters, traced_parameters = _same_parameters(model, traced)
    whole = lambda output: {"output": output}  # noqa: E731
    from .routes import route_of  # the routes' modules import this one
    route = route_of(traced)
    causes, route = route.causes, route.name
    for training in modes:
        where = f"{'train' if training else 'eval'} mode"
        with mode([model, traced], training):
            expected = run(call, model, buffers, state=model_state, parts=whole, parameters=expected_parameters)
            try:
                got = run(call, traced, buffers, state=traced_state, parts=whole, parameters=traced_parameters)
            except Exception as error:
                raise TraceMismatchError(
                    f"the graph of {type(model).__name__} traced by the {route} route fails in {where} where the "
                    f"model runs: {type(error).__name__}: {error}. {causes}") from error
        found = first_difference(expected.output, got.output) or state_difference(expected.state, got.state) or \
            gradient_difference(expected.gradients["output"], got.gradients["output"], names)
        if found is not None:
            what, how = found
            raise TraceMismatchError(
                f"the graph of {type(model).__name__} traced by the {route} route does not compute what the model "
                f"computes in {where}: {what} differs ({how}). {causes}"
            )


def _same_parameters(model: nn.Module, traced: nn.Module) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor]]:
    """The model's trainable parameters (first names), and the traced module's tensor under one of each one's
    names (a stand-in that needs no gradient where the graph reads none of them)."""
    held = dict(traced.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    names, mine, theirs = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            mine.append(p)
            theirs.append(next((held[a] for a in aliases[id(p)] if a in held), torch.zeros(())))
    return names, mine, theirs


def tolerance(dtype: torch.dtype) -> float:
    """The relative error a value of ``dtype`` may have: :data:`TOLERANCE`, or eight units of roundoff for the
    coarser floating-point types (float16, bfloat16), whose kernels round differently at another batch size."""
    return max(TOLERANCE, 8 * torch.finfo(dtype).eps) if dtype.is_floating_point else TOLERANCE


def difference(expected: Any, got: Any, floor: float = 0.0) -> str | None:
    """How one output value differs from the expected one (beyond :func:`tolerance`), or ``None``.

    Errors are computed in float64 (a float16 norm overflows at 65504), relative to the expected value's norm or
    to ``floor`` where that is larger, over the places where the expected value is finite.
    """
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
    wide = torch.complex128 if expected.is_complex() else torch.float64
    e, g = expected[finite].to(wide), got[finite].to(wide)
    scale = max(e.norm().item(), floor)
    error = (e - g).norm().item() / scale if scale > 0 else (e - g).norm().item()
    allowed = tolerance(expected.dtype)
    return None if error <= allowed else f"relative error {error:.2g}, more than {allowed:g}"


def _keys(leaves: list) -> list[str]:
    return [shown for _, shown, _ in leaves]
