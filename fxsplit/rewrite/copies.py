"""The copies pass: each group of a split layer gets a copy of it, every module and parameter it is made of copied
together so that ties stay tied."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InitError
from ..layers import Layer
from ..modules import attribute, place
from ..split_module import copy_target

if TYPE_CHECKING:
    from .plan import Plan

Init = Union[str, Callable[[Any, str, str], None]]


def check_init(init: Init) -> None:
    if not (callable(init) or init in ("copy", "reset")):
        raise InitError(f"init must be 'copy', 'reset' or a callable init(copy, layer, task), got {init!r}.")


def make_copies(root: nn.Module, plan: Plan, init: Init) -> None:
    """Put on ``root`` (in place) one copy of each split layer per group, under its holder
    (``copies.<holder>.<member>``)."""
    layers = plan.current.layers
    for layer in plan.layers:
        for group in plan.groups[layer]:
            for member, new in _layer_copy(root, layers[layer], _init_key(plan, group), init).items():
                place(root, copy_target(plan.holders[group], member), new)


def _init_key(plan: Plan, group: frozenset[str]) -> str | tuple[str, ...]:
    """What a callable ``init`` is told the copy serves: the task, or a group's tasks in task order."""
    tasks = tuple(task for task in plan.tasks if task in group)
    return tasks[0] if len(tasks) == 1 else tasks


def _layer_copy(root: nn.Module, layer: Layer, serves: str | tuple[str, ...], init: Init
                ) -> dict[str, nn.Module | nn.Parameter]:
    """Member -> its copy for ``serves``; members that share a parameter share its copy (one memo for all)."""
    memo: dict[int, Any] = {}
    copies = {member: _copy(attribute(root, member), memo) for member in layer.members}
    main = copies[layer.name]
    if callable(init):
        init(main, layer.name, serves)
    elif init == "reset":
        _reset(list(copies.values()), layer.name)
    return copies


def _copy(original, memo: dict[int, Any]):
    if isinstance(original, nn.Parameter):  # deepcopy would keep .grad; a copy starts without one
        if id(original) not in memo:
            memo[id(original)] = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
        return memo[id(original)]
    return copy.deepcopy(original, memo)


def _reset(copies: list, layer: str) -> None:
    resettable = [m for c in copies if isinstance(c, nn.Module) for m in c.modules() if hasattr(m, "reset_parameters")]
    if not resettable:
        raise InitError(
            f"layer {layer!r} ({type(copies[0]).__name__}) has no reset_parameters() to re-initialise its copies; "
            f"use init='copy' or a callable init(copy, layer, task)."
        )
    for module in dict.fromkeys(resettable):
        if parametrize.is_parametrized(module):
            _reset_parametrized(module, layer)
        else:
            module.reset_parameters()


def _reset_parametrized(module: nn.Module, layer: str) -> None:
    """``reset_parameters()`` for a module whose weights a parametrization derives: on the module itself it would
    write into a derived tensor, made afresh at each read, and leave the weights as they were. A twin without the
    parametrizations is reset instead, and its tensors are set through them (each parametrization's
    ``right_inverse`` gives the tensors it derives from)."""
    for name, chain in module.parametrizations.items():
        lacking = next((type(p).__name__ for p in chain if not hasattr(p, "right_inverse")), None)
        if lacking is not None:
            raise InitError(
                f"layer {layer!r} ({type(module).__name__}) cannot be reset: the parametrization {lacking} of its "
                f"{name} has no right_inverse, so no reset value can be set through it. Give it one, or use "
                f"init='copy' or a callable init(copy, layer, task).")
    twin = _unparametrized(module)
    twin.reset_parameters()
    with torch.no_grad():
        for name, tensor in [*twin.named_parameters(), *twin.named_buffers()]:
            if name in module.parametrizations:
                setattr(module, name, tensor.detach())  # through right_inverse into what it derives from
            else:
                attribute(module, name).copy_(tensor)


def _unparametrized(module: nn.Module) -> nn.Module:
    """A copy of a parametrized module as its own class, holding the derived weights as plain parameters.
    (``parametrize.remove_parametrizations`` would do it by editing the class, which the module shares.)"""
    derived = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
    twin = copy.deepcopy(module)
    del twin._modules["parametrizations"]
    twin.__class__ = parametrize.type_before_parametrizations(module)
    for name, value in derived.items():
        twin.register_parameter(name, nn.Parameter(value))
    return twin
