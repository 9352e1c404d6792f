"""The second tracing route: a model becomes a ``torch.fx`` graph through ``torch.export``.

``torch.fx`` symbolic tracing stops at Python that reads tensor shapes or values (HuggingFace transformers, MTAN's
``if x.size()[-2:] != y.size()[-2:]``); ``torch.export`` runs the real Python on an example input and records the
ATen operations it ran. :func:`exported_graph` calls ``torch.export.export(model, args, kwargs, strict=False)``
with a dynamic batch, records the input checks it makes (:class:`InputGuards`, which pickle), and rebuilds the
graph to meet the contract of the routes (:mod:`.routes`): one placeholder per ``forward`` parameter the example
gives, the output in the model's structure, parameters and buffers read by their qualified names (a tied tensor
under the name its reading module gives it), ``node.meta["path"]`` from each node's module stack, BatchNorm's count
and normalisation fused into one :func:`counted_batch_norm` node. docs/architecture.md ("The torch.export route's
graphs") says what its graphs look like and why each rebuilding step is there.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.export import _unlift
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

from ..errors import TraceError, user_line
from ..modules import copy_module, module_at, owner, persistent, place
from .autograd import watching_export
from .dual import DualGraphModule, adopt_layers
from .frozen import Read, recording_reads, stand_in

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_aten = torch.ops.aten


class ExportedGraphModule(fx.GraphModule):
    """A graph traced through ``torch.export``: its train/eval mode is part of the graph and cannot change."""

    def train(self, mode: bool = True) -> ExportedGraphModule:
        if mode != self.training:
            traced, asked = ("train", "eval") if self.training else ("eval", "train")
            raise TraceError(
                f"this graph was traced through torch.export in {traced} mode, which fixes dropout and BatchNorm "
                f"in the graph: it cannot switch to {asked} mode. Trace the model again with training={mode}."
            )
        return self


class InputGuards(nn.Module):
    """``torch.export``'s checks of a call's inputs (the sizes the graph was traced for, and how they relate),
    kept as their code, so that the module pickles: torch's own holds only a function compiled at run time."""

    _is_impure = True  # it has no users: passes that drop unused nodes must keep it

    def __init__(self, code: list[str], paths: list[pytree.KeyPath]):
        super().__init__()
        self.code, self.paths = list(code), list(paths)
        self._check = _unlift._convert_guards_code_to_fn(self.code, self.paths).forward

    def forward(self, *inputs: Any) -> None:
        self._check(*inputs)

    def __getstate__(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "_check"}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._check = _unlift._convert_guards_code_to_fn(self.code, self.paths).forward


def counted_batch_norm(input, weight, bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
                       cudnn_enabled):
    """``aten.batch_norm`` after counting the batch in ``num_batches_tracked``, as ``nn.BatchNorm``'s ``forward``
    does: one node where ``torch.export`` records two (the count, with no users, and the normalisation), so that a
    pass that applies the normalisation once per branch counts once per branch, as the module would."""
    num_batches_tracked.add_(1)
    return _aten.batch_norm.default(input, weight, bias, running_mean, running_var, training, momentum, eps,
                                    cudnn_enabled)


def trace_exported(model: nn.Module, args: Any = (), kwargs: dict[str, Any] | None = None, *,
                   training: bool | None = None) -> ExportedGraphModule:
    """Trace a deep copy of ``model`` through ``torch.export`` on the example ``model(*args, **kwargs)``.

    ``training`` picks the mode the graph computes (default: the model's current mode); the model itself is
    never touched. ``args`` that is not a tuple is one positional argument.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = trace_exported(net, torch.randn(3, 4))
    >>> [n.meta["path"] for n in gm.graph.nodes if n.op == "call_function"]
    ['0.linear', '1.relu', '2.linear']
    >>> gm(torch.randn(5, 4)).shape  # the batch is dynamic
    torch.Size([5, 2])
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxsplit traces an nn.Module, got {type(model).__name__}.")
    training = model.training if training is None else training
    root = copy_module(model, share_tensors=False)
    graph, extras, _ = exported_graph(root, args, kwargs, training)
    gm = exported_module(root, {training: graph}, extras, type(model).__name__)
    gm.meta["route"] = "export"
    return gm


def exported_module(root: nn.Module, graphs: Mapping[bool, fx.Graph], extras: Mapping[str, Any], class_name: str
                    ) -> fx.GraphModule:
    """The module of the graphs traced from ``root``: both modes in a :class:`~.dual.DualGraphModule`, one in an
    :class:`ExportedGraphModule` fixed in its mode. It holds every parameter and buffer of the model (the graphs
    read tensors one by one) and ``extras``, the trace's constants, as buffers outside ``state_dict()``."""
    for name, value in extras.items():
        place(root, name, value, persistent=False)
    if len(graphs) == 2:
        traced = DualGraphModule(root, graphs, class_name)
    else:
        ((training, graph),) = graphs.items()
        traced = ExportedGraphModule(root, graph, class_name)
        adopt_layers(traced, root, [graph])
        nn.Module.train(traced, training)
    keep_state(traced, root)
    return traced


def exported_graph(root: nn.Module, args: Any, kwargs: dict[str, Any] | None, training: bool
                   ) -> tuple[fx.Graph, dict[str, Any], list[Read]]:
    """The graph of ``root`` through ``torch.export`` in train or eval mode, what it reads that ``root`` lacks
    (torch.export's input checks, constants), named for the mode (``_guards_fn_train``), and the plain attributes
    of modules that the model's Python read (:mod:`.frozen`).

    The graph reads ``root``'s parameters and buffers by their names; ``root`` itself is not run (a copy that
    shares its tensors is). ``args`` that is not a tuple is one positional argument.
    """
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    _check_one_mode(root)
    copy = copy_module(root, share_tensors=True).train(training)
    given = _argument_names(copy, args, kwargs)
    dynamic = {name: pytree.tree_map(_batch_dim, value) for name, value in given.items()}
    guards: list[tuple[list[str], list]] = []
    try:
        with watching_export(copy) as lost, recording_reads(copy) as reads:
            program = torch.export.export(copy, args, kwargs, dynamic_shapes=dynamic, strict=False)
        with _recording_guards(guards):
            exported = program.module()
    except Exception as error:
        raise _export_error(copy, error) from error
    if lost:
        raise TraceError(
            f"torch.export cannot record what {type(root).__name__} does in the backward pass: {lost[0]}"
            f"{f' (and {len(lost) - 1} more)' if len(lost) > 1 else ''}. Its graph would compute other gradients. "
            f"The torch.fx route records custom autograd Functions and gradient hooks registered in forward "
            f"(method='fx'; a hook must not depend on a test of requires_grad, which a trace cannot read), and calls "
            f"a module with backward hooks whole when it is a leaf (tracer_kwargs={{'leaf_modules': [...]}}).")
    graph, extras = _contract_graph(exported, copy, (args, kwargs), list(given), "train" if training else "eval",
                                    guards)
    return graph, extras, reads


def _check_one_mode(root: nn.Module) -> None:
    """Refuse a model whose modules are not all in its mode (a BatchNorm frozen in eval mode in a model in train
    mode): each graph fixes every module's mode, so the graph would not compute what the model computes."""
    other = next((name for name, module in root.named_modules() if module.training != root.training), None)
    if other is not None:
        module = root.get_submodule(other)
        raise TraceError(
            f"{type(root).__name__} is in {'train' if root.training else 'eval'} mode but its module {other!r} "
            f"({type(module).__name__}) is in {'train' if module.training else 'eval'} mode: the torch.export route "
            f"fixes every module's mode in its graph (one graph per mode of the whole model). Put the model in one "
            f"mode, or trace it with torch.fx (method='fx'), whose graph calls modules that keep their own mode."
        )


@contextlib.contextmanager
def _recording_guards(record: list):
    """Record the code of the input checks that ``ExportedProgram.module()`` makes (torch keeps only the function
    compiled from it, which does not pickle)."""
    convert = _unlift._convert_guards_code_to_fn

    def recording(code, paths):
        record.append((list(code), list(paths)))
        return convert(code, paths)

    _unlift._convert_guards_code_to_fn = recording
    try:
        yield
    finally:
        _unlift._convert_guards_code_to_fn = convert


def _argument_names(root: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """``forward``'s parameter name -> example value, in ``forward``'s order, for the parameters given."""
    signature = inspect.signature(root.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TraceError(
            f"the example input does not fit {type(root).__name__}.forward{signature}: {error}. Give the example "
            f"as the model is called: args=(...) for positional arguments, kwargs={{...}} for keywords."
        ) from error
    variadic = [name for name in bound.arguments if signature.parameters[name].kind in _VARIADIC]
    if variadic:
        raise TraceError(
            f"the example input fills {type(root).__name__}.forward's variadic parameter(s) {variadic}: the traced "
            f"graph needs one named parameter per input. Pass the inputs by the names forward() declares, or wrap "
            f"the model in a module whose forward names them."
        )
    return dict(bound.arguments)


def _batch_dim(value: Any) -> dict | None:
    """Dimension 0 of a tensor may vary (torch.export keeps it static where the model fixes it)."""
    return {0: Dim.AUTO} if isinstance(value, torch.Tensor) and value.dim() > 0 else None


def _export_error(root: nn.Module, error: Exception) -> TraceError:
    """A :class:`TraceError` that names the module being run when ``torch.export`` failed, and the line."""
    modules = {id(module): name for name, module in root.named_modules()}
    where = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        running = frame.f_locals.get("self")
        if id(running) in modules:
            where = modules[id(running)]  # the innermost module wins, as the frames go deeper
    module = root.get_submodule(where) if where else root
    line = user_line(error)
    if isinstance(error, GuardOnDataDependentSymNode):
        fix = ("a Python branch or size depends on tensor values, which no graph holds: compute both sides and "
               "select with torch.where, or use torch.cond.")
    else:
        fix = ("check that model(*args, **kwargs) runs on this example; otherwise the chained torch.export error "
               "says which operation it does not support.")
    reason = str(error).strip().split("\n")[0]
    return TraceError(
        f"torch.export cannot trace {'module ' + repr(where) if where else 'the model'} ({type(module).__name__}): "
        f"{type(error).__name__}: {reason}{' at ' + line if line else ''}. To fix: {fix}"
    )


def _contract_graph(exported: fx.GraphModule, root: nn.Module, example: tuple[tuple, dict], given: list[str],
                    mode: str, guards: list[tuple[list[str], list]]) -> tuple[fx.Graph, dict[str, Any]]:
    """The graph of ``exported`` (flat inputs and outputs, pytree code) rebuilt to meet fxsplit's contract, and what
    it reads that ``root`` does not own, named for the ``mode``: three passes (copy with structured inputs and
    paths, fuse BatchNorm's count into its normalisation, read tied tensors by their owners)."""
    modules = {name for name, _ in root.named_modules()}
    graph, extras = _copied_graph(exported, root, example, given, mode, guards, modules)
    _fuse_batch_counts(graph)
    _read_ties_by_owner(graph, root, modules)
    graph.lint()
    return graph, extras


def _copied_graph(exported: fx.GraphModule, root: nn.Module, example: tuple[tuple, dict], given: list[str],
                  mode: str, guards: list[tuple[list[str], list]], modules: set[str]
                  ) -> tuple[fx.Graph, dict[str, Any]]:
    """``exported``'s nodes in a new graph: one placeholder per ``forward`` parameter given, the output in the
    model's structure, each node named by its path; what ``root`` does not own is named for the ``mode``."""
    graph, paths = fx.Graph(), _PathNames()
    owned = modules | {name for name, _ in (*root.named_parameters(remove_duplicate=False),
                                            *root.named_buffers(remove_duplicate=False))}
    values = _structured_inputs(graph, exported.graph, root, example, given, paths)
    extras: dict[str, Any] = {}
    for node in exported.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr" and not node.users:  # export reads every parameter
            continue
        if node.op == "output":
            flat = fx.map_arg(node.args[0], values.__getitem__)
            out = graph.output(pytree.tree_unflatten(list(flat), exported.graph._codegen.pytree_info.out_spec))
            out.meta["path"] = "output"
            continue
        target, args = node.target, fx.map_arg(node.args, values.__getitem__)
        if node.op in ("get_attr", "call_module"):
            if target not in owned:
                target = f"{target.replace('.', '_')}_{mode}"
                extras[target] = _guards(guards) if node.target == "_guards_fn" and guards else \
                    operator.attrgetter(node.target)(exported)
            path = target
        else:
            path = paths(_scope(node, modules), _op_name(node.target))
        new = graph.create_node(node.op, target, args, fx.map_arg(node.kwargs, values.__getitem__),
                                path.replace(".", "_"), node.type)
        new.meta = {**node.meta, "path": path}
        values[node] = new
    return graph, extras


def _fuse_batch_counts(graph: fx.Graph) -> None:
    """Each BatchNorm's ``num_batches_tracked += 1`` and the normalisation that follows become one
    :func:`counted_batch_norm` node (in place), which a pass can apply once per branch as the module would."""
    counts: dict[str, fx.Node] = {}  # BatchNorm path -> its count of batches, not yet fused
    for node in list(graph.nodes):
        if _counts_batches(node):
            counts[owner(node.args[0].target)] = node
        elif node.target is _aten.batch_norm.default and isinstance(node.args[3], fx.Node):
            count = counts.pop(owner(node.args[3].target), None)
            if count is not None:
                node.target = counted_batch_norm
                node.args = (*node.args[:5], count.args[0], *node.args[5:])
                graph.erase_node(count)


def _counts_batches(node: fx.Node) -> bool:
    """Whether ``node`` is a BatchNorm's ``num_batches_tracked += 1`` (in train mode, before it normalises)."""
    return (node.target is _aten.add_.Tensor and not node.users and node.args[0].op == "get_attr"
            and node.args[0].target.rpartition(".")[2] == "num_batches_tracked" and node.args[1] == 1)


def _guards(recorded: list[tuple[list[str], list]]) -> InputGuards:
    code, paths = recorded[-1]
    return InputGuards(code, paths)


def _structured_inputs(graph: fx.Graph, exported: fx.Graph, root: nn.Module, example: tuple[tuple, dict],
                       given: list[str], paths: _PathNames) -> dict[fx.Node, fx.Node]:
    """One placeholder per ``forward`` parameter given; each flat input of ``exported`` read out of them.

    A non-tensor input (a number, a string, ``None``) is fixed in the graph: an assertion checks it on each call.
    """
    positional = list(inspect.signature(root.forward).parameters)
    placeholders = {}
    for name in given:
        placeholders[name] = graph.placeholder(name)
        placeholders[name].meta["path"] = name
    leaves = pytree.tree_flatten_with_path(example)[0]
    flat = exported.find_nodes(op="placeholder")
    if len(leaves) != len(flat):
        raise TraceError(f"torch.export read {len(flat)} inputs from an example with {len(leaves)}: fxsplit cannot "
                         f"match them. Pass tensors, numbers, strings and None in tuples, lists and dicts.")
    values, reads = {}, {}
    for (path, value), old in zip(leaves, flat):
        (side, first, *keys) = path
        name = positional[first.idx] if side.idx == 0 else first.key
        node = placeholders[name]
        for depth, key in enumerate(keys):
            where = (name, *keys[:depth + 1])
            if where not in reads:
                reads[where] = _read(graph, node, key, name, paths)
            node = reads[where]
        node.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")})
        if not isinstance(value, torch.Tensor):
            _assert_fixed(graph, node, value, name + pytree.keystr(tuple(keys)), paths)
        values[old] = node
    return values


def _read(graph: fx.Graph, node: fx.Node, key: Any, name: str, paths: _PathNames) -> fx.Node:
    """The node that reads ``key`` (a pytree key: index, dict key or attribute) out of ``node``."""
    if isinstance(key, pytree.SequenceKey):
        read = graph.call_function(operator.getitem, (node, key.idx))
    elif isinstance(key, pytree.MappingKey):
        read = graph.call_function(operator.getitem, (node, key.key))
    elif isinstance(key, pytree.GetAttrKey):
        read = graph.call_function(getattr, (node, key.name))
    else:
        raise TraceError(f"fxsplit cannot read {key} out of the input {name!r}: pass tensors in tuples, lists and "
                         f"dicts (or objects with attributes).")
    read.meta["path"] = paths("", read.target.__name__)
    return read


def _assert_fixed(graph: fx.Graph, node: fx.Node, example: Any, where: str, paths: _PathNames) -> None:
    """Assert that a non-tensor input has its example value (``torch.export`` baked that value into the graph)."""
    same = graph.call_function(operator.is_ if example is None else operator.eq, (node, example))
    check = graph.call_function(torch._assert, (same, f"the graph was traced with {where}={example!r}: trace it "
                                                      f"again for another value"))
    same.meta["path"], check.meta["path"] = paths("", same.target.__name__), paths("", "assert")


def _read_ties_by_owner(graph: fx.Graph, root: nn.Module, modules: set[str]) -> None:
    """A tensor with several names (tied weights) is read under the name its reading module gives it.

    ``torch.export`` reads a tied tensor under one of its names everywhere (a tied embedding reads
    ``head.weight``); the layer graph groups parameters by their owning module, so each reader gets its own.
    """
    names: dict[int, list[str]] = {}
    for name, tensor in (*root.named_parameters(remove_duplicate=False),
                         *root.named_buffers(remove_duplicate=False)):
        names.setdefault(id(tensor), []).append(name)
    aliases_of = {name: aliases for aliases in names.values() for name in aliases}
    for node in list(graph.find_nodes(op="get_attr")):
        aliases = aliases_of.get(node.target, [node.target])
        for user in list(node.users):
            owned = [name for name in aliases if owner(name) == _scope(user, modules)]
            name = owned[0] if owned else aliases[0]
            if name != node.target:
                with graph.inserting_after(node):
                    read = graph.get_attr(name)
                read.meta = {**node.meta, "path": name}
                user.replace_input_with(node, read)
        if not node.users:
            graph.erase_node(node)


def keep_state(gm: fx.GraphModule, root: nn.Module) -> None:
    """Every parameter and buffer of the model at its qualified name, read by the graph or not (an eval graph
    reads no ``num_batches_tracked``), buffers as persistent as in the model: ``state_dict()`` has the model's keys.
    Modules the graph module lacks are stand-ins of the model's (:func:`.frozen.stand_in`)."""
    def holder(path: str) -> nn.Module:
        return stand_in(root.get_submodule(path), nn.Module())

    for path, module in root.named_modules(remove_duplicate=False):
        module_at(gm, path, holder)
    for name, tensor in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        place(gm, name, tensor, persistent(root, name))


def _scope(node: fx.Node, modules: set[str]) -> str:
    """The dotted path of the module whose ``forward`` created ``node`` (``""``: the model's own forward).

    ``modules`` are the model's module paths: torch.export marks some nodes it makes itself with a stack entry
    that is no module (``_empty_nn_module_stack_from_metadata_hook`` on the batch's ``sym_size``).
    """
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path in modules]
    return paths[-1] if paths else ""


def _op_name(target: Any) -> str:
    """``aten.add_.Tensor`` -> ``add``; a Python function -> its name without underscores around it."""
    packet = getattr(target, "overloadpacket", target)
    return getattr(packet, "__name__", "op").strip("_")


class _PathNames:
    """Numbered dotted paths, as the ``torch.fx`` route gives them: ``encoder.add``, ``encoder.add_1``."""

    def __init__(self):
        self._uses: dict[str, int] = {}

    def __call__(self, scope: str, op: str) -> str:
        path = f"{scope}.{op}" if scope else op
        uses = self._uses.get(path, 0)
        self._uses[path] = uses + 1
        return f"{path}_{uses}" if uses else path
