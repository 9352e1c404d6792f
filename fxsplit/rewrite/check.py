"""Checking a split model against the original, task by task, in both modes, on an example input, with its copies
moved apart."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import fx, nn

from ..errors import SplitMismatchError
from ..outputs import Path, select
from ..split_module import COPIES, copy_target
from ..tracing import aten
from ..modules import copy_module, owner
from ..rules import drop_attribute, drop_probability, has_running_statistics
from ..tracing.verify import (
    SEED, TOLERANCE, Call, check_trace, first_difference, gradient_difference, mode, run, state_difference,
)



def check_split(model: nn.Module, traced: nn.Module, split: nn.Module, paths: Mapping[str, Path], call: Call) -> None:
    """Raise unless the split keeps every task apart, in eval and in train mode: with every copy moved by its own
    noise (as if the copies had trained apart), each task's output of ``split``, its gradients (of a fixed
    function of that output, for every parameter) and the buffers it updates equal those of the original model
    computing with that task's copies in place of the split layers (norm layers' statistics aside, as documented:
    a shared one in the branches updates once per branch, and a task's copy sees only its own branch).

    Train mode is compared with dropout off; a model that is still random there cannot be compared, and a warning says
    that only eval mode was checked. A model random in eval mode (Gumbel sampling) is compared, and where it differs, a
    warning names the draws (the split's task branches draw their own numbers) instead of an error. When a task differs,
    the trace is checked too, to say whose fault it is.
    """
    model = copy_module(model, share_tensors=True)  # forward may change Python state: never the user's
    surgery = split._surgery
    references = {task: _task_model(model, split, task) for task in surgery.tasks}
    modules = [model, traced, split, *references.values()]
    norms = {name for name, module in model.named_modules() if has_running_statistics(module)}
    names, parameters = zip(*split.named_parameters()) if any(True for _ in split.parameters()) else ((), ())
    for training in (False, True):
        where = f"{'train' if training else 'eval'} mode"
        with mode(modules, training), _no_dropout(modules), _copies_apart(split):
            if training and _random(call, model):
                warnings.warn(f"{type(model).__name__} is random in train mode even without dropout, so the split "
                              f"model was checked in eval mode only.", stacklevel=3)
                continue
            found = _first_task_difference(call, split, references, paths, parameters, names, norms)
            if found is not None and training and _random(call, split):  # drop-path in a torch.export graph
                warnings.warn(f"the split {type(model).__name__} is random in train mode even without dropout, so "
                              f"it was checked in eval mode only.", stacklevel=3)
                continue
            if found is not None and not training and _random(call, model):
                warnings.warn(f"{type(model).__name__} draws random numbers in eval mode "
                              f"({_draws(traced, split, training)}), so the split and the model, run from one seed, "
                              f"do not draw the same numbers for a task: eval mode was not checked.", stacklevel=3)
                continue
        if found is None:
            continue
        check_trace(model, traced, call, modes=(training,))
        task, what, how = found
        if what.startswith("buffer"):
            raise SplitMismatchError(
                f"the split model's {what} differs from the original's for task {task!r} in {where} ({how}): the "
                f"module that owns it runs in the task branches, once per task, and updates it each time (a leaf "
                f"module that keeps state, say). Split only layers after that module, or keep the state in a split "
                f"layer's own module (each task then gets its own copy).")
        route = getattr(split, "meta", {}).get("route", "fx")
        raise SplitMismatchError(
            f"the split model's {what} for task {task!r} differs from what the original computes with task {task!r}'s "
            f"copies in {where} ({how}), though the trace (by the {route} route) matches the model. Beyond "
            f"{TOLERANCE:g} this is no rounding: please report it as an fxsplit bug, with the model. "
            f"batch_branches=False computes bit for bit, if it helps meanwhile."
        )


def _first_task_difference(call: Call, split: nn.Module, references: Mapping[str, nn.Module],
                           paths: Mapping[str, Path], parameters, names, norms) -> tuple[str, str, str] | None:
    """``(task, what, how)`` for the first task whose output, buffers or gradients in ``split`` differ from its
    reference model's, else ``None``."""
    split_state = dict(split.named_buffers())
    try:
        got = run(call, split, split.buffers(), state=split_state, parameters=parameters,
                  parts=lambda output: {task: output[task] for task in references})
    except Exception as error:
        raise SplitMismatchError(
            f"the split model fails where the original runs: {type(error).__name__}: {error}. Please report it as "
            f"an fxsplit bug, with the model; batch_branches=False may help meanwhile.") from error
    for task, reference in references.items():
        path = paths[task]
        expected = run(call, reference, reference.buffers(), state=dict(reference.named_buffers()),
                       parameters=parameters, parts=lambda output: {task: select(output, path, task)})
        found = first_difference(select(expected.output, path, task), got.output[task])
        if found is None:
            held = {name: _split_name(split, task, name) for name in expected.state}
            mine = {held[name]: value for name, value in expected.state.items()
                    if owner(name) not in norms and _updated_for(split, task, held[name])}
            found = state_difference(mine, got.state)
        if found is None:
            found = gradient_difference(expected.gradients[task], got.gradients[task], names)
        if found is not None:
            return (task, *found)
    return None


def _task_model(model: nn.Module, split: nn.Module, task: str) -> nn.Module:
    """A copy of ``model`` that computes with what task ``task`` computes with in ``split``: its (group's) copies
    in place of the split layers' members, the split's own tensors everywhere else (the same tensor objects, so that
    gradients of both are taken with respect to the split's parameters)."""
    reference = copy_module(model, share_tensors=True)
    held = {**dict(split.named_parameters(remove_duplicate=False)), **dict(split.named_buffers(remove_duplicate=False))}
    slots = [(name, "_parameters") for name, _ in reference.named_parameters(remove_duplicate=False)] + \
        [(name, "_buffers") for name, _ in reference.named_buffers(remove_duplicate=False)]
    for name, kind in slots:
        tensor = held.get(_split_name(split, task, name))
        if tensor is not None:
            getattr(reference.get_submodule(owner(name)), kind)[name.rpartition(".")[2]] = tensor
    return reference


def _split_name(split: nn.Module, task: str, name: str) -> str:
    """Where the split keeps what task ``task`` computes with under the model's name ``name``: the copy of its
    group where ``name`` is a split layer's member."""
    layer = next((layer for layer, members in split._surgery.members.items()
                  if any(name == m or name.startswith(m + ".") for m in members)), None)
    holder = None if layer is None else split._holder(task, layer)
    return name if holder is None else copy_target(holder, name)


def _updated_for(split: nn.Module, task: str, name: str) -> bool:
    """Whether the split's buffer ``name`` is to be compared with task ``task``'s reference: a copy of ``task``'s
    or its group's, or a shared buffer that ``task`` is the first to use."""
    holders = {split._holder(task, layer) for layer in split.split_layers} - {None}
    if any(name.startswith(copy_target(holder, "")) for holder in holders):
        return True
    users = split._surgery.owners.get(name, ())
    return bool(users) and users[0] == task


def _draws(traced: nn.Module, split: nn.Module, training: bool) -> str:
    """Where the model draws random numbers in a mode, and how many draws its graph and the split's make: the
    split's task branches each draw their own, where the model draws once."""
    model_draws = [node for node in traced.graph_for(training).nodes if aten.draws_random(node)]
    split_draws = [node for node in split.graph_for(training).nodes if aten.draws_random(node)]
    if not model_draws:
        return "inside a module that the graph calls whole"
    where = ", ".join(dict.fromkeys(node.meta.get("path", node.name) for node in model_draws))
    why = "its task branches draw apart" if len(split_draws) > len(model_draws) else "in another order"
    return (f"at {where}: {len(model_draws)} draw{'s' if len(model_draws) > 1 else ''} in the model's graph, "
            f"{len(split_draws)} in the split's ({why})")


def _random(call: Call, module: nn.Module) -> bool:
    """Whether ``module`` gives another output from another random state."""
    buffers = list(module.buffers())
    return first_difference(run(call, module, buffers).output, run(call, module, buffers, SEED + 1).output) is not None


@contextlib.contextmanager
def _copies_apart(split: nn.Module, scale: float = 0.05) -> Iterator[None]:
    """Every copied parameter of ``split`` moved by its own noise (``scale`` times its root mean square, or
    ``scale`` / 10 where it is all zeros), then back as it was: the copies differ, as after training."""
    generator = torch.Generator().manual_seed(SEED)
    copied = [p for name, p in split.named_parameters() if name.startswith(f"{COPIES}.") and p.is_floating_point()]
    saved = [p.detach().clone() for p in copied]
    with torch.no_grad():
        for p in copied:
            rms = p.double().pow(2).mean().sqrt().item()
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.device)
            p.add_((noise * (scale * rms if rms > 0 else scale / 10)).to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(copied, saved):
                p.copy_(value)


@contextlib.contextmanager
def _no_dropout(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Dropout probabilities 0 in every module that runs its own code (all of a plain module's, those a graph
    calls), and in the dropout operations of graphs traced through torch.export (which hold the probability as a
    number), then back as they were."""
    saved, nodes = [], []
    for module in {id(m): m for root in modules for m in _running(root)}.values():
        name = drop_attribute(module)
        value = getattr(module, name, None) if name else None
        if isinstance(value, float) and value > 0:
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


def _running(module: nn.Module) -> Iterator[nn.Module]:
    """The modules whose code runs when ``module`` runs: a graph's own code stands for the modules it traced
    through (whose attributes it holds), and calls the others."""
    if not isinstance(module, fx.GraphModule):
        yield from module.modules()
        return
    graphs = [module.graph, *([module.graph_for(not module.training)] if hasattr(module, "graph_for") else [])]
    for target in {node.target for graph in graphs for node in graph.nodes if node.op == "call_module"}:
        yield from module.get_submodule(target).modules()


def _set_argument(node: fx.Node, where: int | str, value) -> None:
    if isinstance(where, int):
        node.update_arg(where, value)
    else:
        node.update_kwarg(where, value)
