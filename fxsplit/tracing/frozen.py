"""Python values that a graph holds: the plain attributes of modules that traced code read.

A trace runs the model's Python once; what that code read from a module's attributes (``self.training`` of a
module that tracing goes through, timm's ``DropPath.drop_prob``, an ``epoch`` that a training loop sets) is fixed
in the graph as it was. While tracing, every module's class is swapped for a subclass that records those reads
(:func:`recording_reads`); the traced module keeps them (``gm.meta["frozen"]``, per mode) and, before each call,
stops with :class:`~fxsplit.StaleGraphError` where one has changed since (:func:`first_change`), rather than run
a graph that ignores it.

So that such an attribute can be read and set at all, the traced module holds, where ``torch.fx`` would leave an
empty ``nn.Module`` on a path, a *stand-in* of the model's module there (:func:`stand_in`): the same class, its
plain attributes and mode, and the children the graph uses. It is never called; ``isinstance`` loops over
``modules()`` (a drop-path schedule) find it.
"""

from __future__ import annotations

import contextlib
import copy
import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import StaleGraphError

_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_OWN = frozenset(vars(nn.Module())) - {"training"}  # what an nn.Module keeps for itself: children, tensors, hooks
STAND_IN = "_fxsplit_stand_in"
Read = tuple[str, str, Any]  # module path, attribute, the value read

_recording: dict[tuple[int, str], tuple[Any, Any]] | None = None  # (id of module, attribute) -> (value, a copy)
_classes: dict[type, type] = {}


def plain(value: Any) -> bool:
    """Whether ``value`` is a plain Python value: a number, a string, ``None``, a dtype, or a tuple, list or dict
    of such."""
    if isinstance(value, _PLAIN):
        return True
    if type(value) in (tuple, list):
        return all(plain(item) for item in value)
    if type(value) is dict:
        return all(plain(key) and plain(item) for key, item in value.items())
    return False


@contextlib.contextmanager
def recording_reads(root: nn.Module) -> Iterator[list[Read]]:
    """Within the block, reads of the plain public attributes that ``root``'s modules hold themselves are
    recorded: a list, filled when the block ends, of ``(module path, attribute, value first read)``. Values that
    code in the block set are put back as they were read (tracing runs forward on stand-ins: it must not count)."""
    global _recording
    paths = {id(module): path for path, module in root.named_modules()}
    modules = [module for module in root.modules() if type(module).__getattribute__ is object.__getattribute__]
    swapped = [(module, type(module)) for module in modules if _recorder(type(module)) is not None]
    reads: list[Read] = []
    outer, _recording = _recording, {}
    for module, cls in swapped:
        module.__class__ = _classes[cls]
    try:
        yield reads
    finally:
        seen, _recording = _recording, outer
        for module, cls in swapped:
            module.__class__ = cls
        owners = {id(module): module for module, _ in swapped}
        for (owner, name), (value, copied) in seen.items():
            if owner in paths:
                reads.append((paths[owner], name, copied))
                owners[owner].__dict__[name] = value  # the object read: what forward added to it is undone apart


def _recorder(cls: type) -> type | None:
    """The subclass of ``cls`` that records reads of plain attributes (``None`` where one cannot be made)."""
    if cls not in _classes:
        def __getattribute__(self, name):
            value = super(recorder, self).__getattribute__(name)
            if _recording is not None and name[0] != "_" and plain(value) and \
                    name in object.__getattribute__(self, "__dict__") and (id(self), name) not in _recording:
                _recording[id(self), name] = value, copy.deepcopy(value)  # a list changed in place is a change
            return value

        try:
            recorder = type(cls)(cls.__name__, (cls,), {"__getattribute__": __getattribute__,
                                                         "__module__": cls.__module__,
                                                         "__qualname__": cls.__qualname__})
        except Exception:  # a metaclass that takes more, say: its reads go unrecorded
            recorder = None
        _classes[cls] = recorder
    return _classes[cls]


Watch = list[tuple[nn.Module, str, str, Any]]  # module, its path, attribute, the value read


def watched(reads: Iterable[Read], targets: Callable[[str], list[nn.Module]]) -> Watch:
    """The attributes to compare before a call: each read, on every module that ``targets(path)`` gives."""
    return [(module, path, name, value) for path, name, value in reads for module in targets(path)]


def first_change(watch: Watch) -> tuple[str, Any, Any] | None:
    """``(where, value now, value read)`` for the first watched attribute whose value changed (one the module no
    longer holds is taken as unchanged), else ``None``."""
    missing = object()
    for module, path, name, value in watch:
        now = module.__dict__.get(name, missing)
        if now is not missing and now != value:
            return f"{path + '.' if path else ''}{name}", now, value
    return None


def stale(where: str, now: Any, then: Any, training: bool, route: str) -> StaleGraphError:
    mode = "train" if training else "eval"
    if where.endswith("training"):
        module = where.rpartition(".")[0] or "the model"
        return StaleGraphError(
            f"module {module!r} is in {'train' if now else 'eval'} mode, but the {mode}-mode graph (traced by the "
            f"{route} route) went through its code in {'train' if then else 'eval'} mode and holds what that code "
            f"did then. Switch the whole module with .train() / .eval() (each mode has its graph), or trace it again "
            f"in the modes you want (for a module that keeps a mode of its own, make it a leaf, called whole: "
            f"tracer_kwargs={{'leaf_modules': [...]}}).")
    return StaleGraphError(
        f"{where} is {now!r}, but the {mode}-mode graph (traced by the {route} route) was traced with {then!r} and "
        f"holds what the code did with that value: setting it changes nothing in the graph. Put it back to {then!r}, "
        f"or trace (rewrite) again after setting it; a module whose code must read it at each call can be a leaf "
        f"(tracer_kwargs={{'leaf_modules': [...]}}, the torch.fx route).")


def stand_in(original: nn.Module, holder: nn.Module) -> nn.Module:
    """A module of ``original``'s class with its plain attributes and mode, and ``holder``'s children, tensors
    and hooks (``holder``: what a ``GraphModule`` keeps on that path)."""
    module = type(original).__new__(type(original))
    module.__dict__.update({name: value for name, value in vars(original).items()
                            if name not in _OWN and plain(value)})
    module.__dict__.update({name: value for name, value in vars(holder).items() if name in _OWN})
    module.__dict__[STAND_IN] = True
    return module


def bare(module: nn.Module) -> nn.Module:
    """A stand-in as the empty ``nn.Module`` that holds its children (for TorchScript, which compiles every
    submodule's ``forward``)."""
    holder = nn.Module()
    holder.__dict__.update({name: value for name, value in vars(module).items() if name in _OWN})
    holder.training = module.training
    return holder
