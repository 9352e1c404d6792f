"""Export a (split) model to TorchScript (``.pt``) or ``torch.export`` (``.pt2``), checked after loading back."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from .errors import ExportError
from .modules import attribute, copy_module
from .rewrite.streams import plain_streams
from .tracing.frozen import bare
from .tracing.routes import route_of

FORMATS = {".pt": "torchscript", ".pt2": "export"}


def script(model: nn.Module, example_inputs: tuple | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.script`` a copy of ``model`` in eval mode.

    For a traced or split model, the arguments fixed while tracing (``task_name=None``) and their guards are left out,
    and ``example_inputs`` (a tuple of positional inputs) give the other arguments their types: TorchScript takes an
    argument it knows nothing of for a tensor, so a dict or a list input needs an example. Scripting a fresh copy each
    time, and forgetting the types a failed attempt made, keeps a failed attempt from leaving a half-compiled class
    behind (the next attempt fails for the same reason). Errors name the model's class. A model traced through
    ``torch.export`` cannot be scripted: an :class:`~fxsplit.ExportError` says to save it as ``.pt2``.

    >>> import torch, fxsplit
    >>> gm = fxsplit.trace(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU()))
    >>> fxsplit.script(gm)(torch.ones(1, 3)).shape
    torch.Size([1, 2])
    """
    if not route_of(model).scriptable:
        raise ExportError(
            f"the model was traced through torch.export ({model.meta.get('route_reason', 'asked for')}): its graph "
            f"applies ATen operations, which TorchScript cannot compile. Save it as a .pt2 file instead "
            f"(fxsplit.export(model, 'model.pt2', example_inputs), or format='export'), which torch.export loads."
        )
    model = _exportable(model)
    if isinstance(model, fx.GraphModule):
        _drop_bound_arguments(model)
        if example_inputs is not None:
            _annotate(model, example_inputs)
    try:
        with _torchscript_quietly(), _forgetting_failed_types():
            return torch.jit.script(model)
    except Exception as error:
        raise ExportError(
            f"TorchScript cannot compile {type(model).__name__}: {type(error).__name__}: {error}\n"
            f"torch.export (format='export', a .pt2 file) handles more models."
        ) from error


@contextlib.contextmanager
def _forgetting_failed_types():
    """TorchScript keeps the type it made for each module class; when compiling fails, the half-compiled types are
    forgotten, so that the next attempt compiles afresh and fails for the same reason (not with "Can't redefine
    method")."""
    store = torch.jit._recursive.concrete_type_store.type_store
    known = {cls: list(types) for cls, types in store.items()}
    try:
        yield
    except BaseException:
        for cls in list(store):
            if cls in known:
                store[cls][:] = known[cls]
            else:
                del store[cls]
        raise


def export(
    model: nn.Module, path: str | os.PathLike, example_inputs: tuple | Any, *, format: str | None = None,
    rtol: float = 1e-5, atol: float = 1e-6,
) -> Path:
    """Write ``model`` (in eval mode) to ``path`` and check that the file, loaded back, reproduces it.

    ``format`` is ``"torchscript"`` or ``"export"`` (``torch.export``, with a dynamic batch dimension; it needs
    example inputs with a batch of at least 2); by default the suffix decides (``.pt`` / ``.pt2``). Nothing is
    written unless the check passes. Returns the path.

    >>> import tempfile, torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as out:
    ...     path = fxsplit.export(net, f"{out}/net.pt2", torch.ones(2, 3))
    ...     torch.export.load(path).module()(torch.ones(5, 3)).shape
    torch.Size([5, 2])
    """
    path = Path(path)
    format = format or FORMATS.get(path.suffix)
    if format not in FORMATS.values():
        raise ExportError(f"format must be one of {sorted(FORMATS.values())} (or a path ending in .pt / .pt2), "
                          f"got format={format!r} for {str(path)!r}.")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    model = _exportable(model)
    _check_no_recorded_autocast(model)
    expected = _run(model, inputs, "the model")
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # torch.export.save wants the suffix
    try:
        if format == "torchscript":
            loaded = _write_torchscript(model, inputs, partial)
        else:
            loaded = _write_program(model, inputs, partial)
        _check_same(expected, _run(loaded, inputs, f"the exported {format} file"), rtol, atol)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def _exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode, its batched streams as plain tensor operations (no autograd to keep), and
    the modules its graph does not call (stand-ins, modules kept whole) as plain holders of their tensors."""
    name = type(model).__name__
    model = copy_module(model, share_tensors=False).eval()
    if isinstance(model, fx.GraphModule):
        type(model).__name__ = name  # the copy's class is its own, which copying names GraphModule(Impl)
        plain_streams(model.graph)
        model.recompile()
        called = {node.target for node in model.graph.nodes if node.op == "call_module" or (  # or run by an
            node.op == "get_attr" and isinstance(attribute(model, node.target), nn.Module))}  # operator it is given
        for path, module in list(model.named_modules())[1:]:  # TorchScript compiles every submodule's forward
            if not any(path == target or path.startswith(target + ".") for target in called):
                parent, _, name = path.rpartition(".")
                model.get_submodule(parent)._modules[name] = bare(module)
    return model


def _check_no_recorded_autocast(model: nn.Module) -> None:
    """torch.autocast blocks that the torch.fx route recorded as nodes export to neither format."""
    if isinstance(model, fx.GraphModule) and any(node.target is torch.amp._enter_autocast
                                                 for node in model.graph.nodes):
        raise ExportError(
            f"{type(model).__name__}'s graph holds torch.autocast blocks that the torch.fx route recorded as nodes, "
            f"which neither TorchScript nor torch.export exports again. Split the model on the torch.export route "
            f"(rewrite(model, layers, example_inputs=..., method='export')): its split exports to a .pt2 file.")


def _write_torchscript(model: nn.Module, inputs: tuple, path: Path) -> nn.Module:
    scripted = script(model, inputs)
    with _torchscript_quietly(), _failing_as(f"TorchScript cannot save {type(model).__name__} (torch.export, "
                                             f"a .pt2 file, handles more models)"):
        torch.jit.save(scripted, str(path))
        return torch.jit.load(str(path))


@contextlib.contextmanager
def _failing_as(what: str):
    """Any error inside becomes an ExportError that starts with ``what`` (and chains the original)."""
    try:
        yield
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"{what}: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _torchscript_quietly():
    """TorchScript is deprecated upstream; fxsplit supports it on purpose, so its warnings are noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="The TorchScript type system", category=UserWarning)
        yield


def _write_program(model: nn.Module, inputs: tuple, path: Path) -> nn.Module:
    with _failing_as(f"torch.export cannot export {type(model).__name__}"):
        torch.export.save(torch.export.export(model, inputs, dynamic_shapes=dynamic_batch(inputs)), str(path))
        return torch.export.load(str(path)).module()


def dynamic_batch(inputs: tuple) -> tuple:
    """torch.export's ``dynamic_shapes`` for ``inputs`` of any structure: dimension 0 of every tensor whose first
    dimension is the batch (the size most tensors share) is one dynamic ``batch``; other tensors stay static."""
    leaves = [x for x in tree_leaves(inputs) if isinstance(x, torch.Tensor) and x.dim() > 0]
    if not leaves:
        raise ExportError("the example inputs hold no tensor with a batch dimension to export with.")
    size = Counter(x.shape[0] for x in leaves).most_common(1)[0][0]
    if size < 2:
        raise ExportError(f"the example inputs have a batch of {size}: torch.export would fix the batch size. "
                          f"Give examples with a batch of 2 or more.")
    batch = torch.export.Dim("batch")
    return tree_map(lambda x: {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == size
                    else None, inputs)


def _run(model: nn.Module, inputs: tuple, what: str) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as error:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs]
        raise ExportError(f"{what} cannot run on the example inputs {shapes}: {type(error).__name__}: {error}") \
            from error


def _check_same(expected: Any, got: Any, rtol: float, atol: float) -> None:
    flat_expected, spec = torch.utils._pytree.tree_flatten(expected)
    flat_got, got_spec = torch.utils._pytree.tree_flatten(got)
    if len(flat_expected) != len(flat_got):
        raise ExportError(f"the exported file returns {got_spec}, the model returned {spec}.")
    for a, b in zip(flat_expected, flat_got):
        if isinstance(a, torch.Tensor) and not torch.allclose(a, b, rtol=rtol, atol=atol):
            raise ExportError(f"the exported file does not reproduce the model: max |difference| "
                              f"{(a - b).abs().max().item():.3g} (rtol={rtol}, atol={atol}).")


def _annotate(gm: fx.GraphModule, inputs: tuple) -> None:
    """Type the graph's arguments after the example inputs, for TorchScript."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    for node, value in zip(placeholders, inputs):
        if node.type is None:
            node.type = _type_of(value)
    gm.recompile()


def _type_of(value: Any) -> Any:
    """The Python type annotation TorchScript reads for an example value (``Dict[str, Tensor]`` for a dict...)."""
    if isinstance(value, torch.Tensor):
        return torch.Tensor
    if isinstance(value, dict) and value:
        key, item = next(iter(value.items()))
        return Dict[type(key), _type_of(item)]
    if isinstance(value, list) and value:
        return List[_type_of(value[0])]
    if isinstance(value, tuple):
        return Tuple[tuple(_type_of(item) for item in value)]
    return type(value) if isinstance(value, (bool, int, float, str)) else None


def _drop_bound_arguments(gm: fx.GraphModule) -> None:
    """Remove the arguments fixed while tracing (``task_name=None``) and the guards that check them: TorchScript
    types an unannotated argument as a tensor, which ``None`` is not. The scripted module takes the others."""
    bound = [node for node in gm.graph.nodes if node.meta.get("bound") or (
        node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none")]
    for node in reversed(bound):
        if not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
