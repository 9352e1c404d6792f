"""Module trees: what every stage does with a model's modules, parameters and buffers.

Dotted paths name them as ``named_modules()`` and ``named_parameters()`` do (``"layer1.0.conv1.weight"``).
:func:`attribute` reads one, :func:`owner` names its module, :func:`place` puts one (making the modules on its
way); :func:`copy_module` copies a tree, sharing its tensors or not; :func:`saved_buffers` and :func:`saved_modes`
put a tree's buffers and modes back after a run; :func:`canonical_names` and :func:`torch_layer` say what a tree
ties and which of its modules are torch's own layers; :func:`check_names` refuses names a wrapper class would
shadow.

>>> from torch import nn
>>> root = nn.Module()
>>> place(root, "encoder.scale", torch.ones(2), persistent=False)
>>> attribute(root, "encoder.scale").tolist(), list(root.state_dict())
([1.0, 1.0], [])
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import fx, nn

from .errors import TraceError

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def attribute(root: nn.Module, target: str):
    """The object at a dotted path under ``root``: a module, a parameter, a buffer or a plain attribute."""
    module_path, _, name = target.rpartition(".")
    return getattr(root.get_submodule(module_path), name)


def owner(target: str) -> str:
    """The path of the module that holds what the dotted path ``target`` names (``""``: the root)."""
    return target.rpartition(".")[0]


def has(root: nn.Module, target: str) -> bool:
    """Whether ``root`` holds something at the dotted path ``target``."""
    try:
        attribute(root, target)
    except AttributeError:
        return False
    return True


def module_at(root: nn.Module, path: str, holder: Callable[[str], nn.Module] = lambda path: nn.Module()
              ) -> nn.Module:
    """The module at the dotted path ``path`` under ``root``; missing modules on the way are made by
    ``holder(path)``."""
    where = []
    for part in path.split(".") if path else ():
        where.append(part)
        if part not in root._modules:
            root.add_module(part, holder(".".join(where)))
        root = root._modules[part]
    return root


def place(root: nn.Module, target: str, value: Any, persistent: bool = True,
          holder: Callable[[str], nn.Module] = lambda path: nn.Module()) -> None:
    """Put ``value`` at the dotted path ``target`` under ``root``: a module as a child, a parameter as a
    parameter, any other tensor as a buffer (in ``state_dict()`` if ``persistent``), anything else as a plain
    attribute. Missing modules on the way are made by ``holder(path)``."""
    path, _, name = target.rpartition(".")
    owner = module_at(root, path, holder)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(name, value, persistent=persistent)
    else:
        setattr(owner, name, value)


def persistent(root: nn.Module, target: str) -> bool:
    """Whether the buffer at ``target`` is in ``state_dict()`` (a parameter always is)."""
    path, _, name = target.rpartition(".")
    return name not in root.get_submodule(path)._non_persistent_buffers_set


def saved_buffers(buffers: Iterable[torch.Tensor]) -> Callable[[], None]:
    """Save the values of ``buffers`` now; the function returned puts them back (the same tensors, in place)."""
    buffers = list({id(b): b for b in buffers}.values())
    values = [b.detach().clone() for b in buffers]

    def restore() -> None:
        with torch.no_grad():
            for buffer, value in zip(buffers, values):
                buffer.copy_(value)
    return restore


def saved_modes(root: nn.Module) -> Callable[[], None]:
    """Save the train/eval mode of every module under ``root`` now; the function returned gives each its mode
    back (a module added since takes ``root``'s)."""
    modes = {name: module.training for name, module in root.named_modules()}

    def restore() -> None:
        for name, module in root.named_modules():
            module.training = modes.get(name, modes[""])
    return restore


def copy_module(model: nn.Module, share_tensors: bool) -> nn.Module:
    """A deep copy of ``model``; with ``share_tensors`` its parameters and buffers stay the model's own.

    Tensors a module keeps from an earlier forward (timm's attention-bias caches in eval mode) have a history,
    which deepcopy refuses: they are copied without it.
    """
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())} if share_tensors else {}
    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                for tensor in _tensors_with_history(value):
                    memo[id(tensor)] = tensor.detach() if share_tensors else tensor.detach().clone()
    return copy.deepcopy(model, memo)


def _tensors_with_history(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        if value.grad_fn is not None:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_with_history(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_with_history(item)


def canonical_names(root: nn.Module) -> dict[str, str]:
    """Second and later names of tied parameters -> the first name ``root.named_parameters()`` gives them."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in root.named_parameters(remove_duplicate=False):
        aliases[name] = first.setdefault(id(parameter), name)
    return {alias: name for alias, name in aliases.items() if alias != name}


def torch_layer(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.nn's own layers (a Linear, a Conv2d, ...), as torch.fx counts leaves."""
    return (type(module) is not nn.Module  # the empty holders GraphModule makes on a path
            and fx.Tracer().is_leaf_module(module, "") and not isinstance(module, _CONTAINERS))


def check_names(model: nn.Module, cls: type, what: str) -> None:
    """Raise unless every top-level module, parameter and buffer name of ``model`` is free on ``cls``."""
    reserved = ({n for n in dir(cls) if not n.startswith("_")} - set(dir(nn.Module))) | {"meta", "shape_env"}
    names = [*model._modules, *model._parameters, *model._buffers]
    taken = sorted(name for name in names if name in reserved)
    if taken:
        raise TraceError(f"{type(model).__name__} has {', '.join(map(repr, taken))} at its top level, a name that "
                         f"{what} ({cls.__name__}) uses itself; rename it in the model (or wrap the model in a "
                         f"module that holds it under another name).")
