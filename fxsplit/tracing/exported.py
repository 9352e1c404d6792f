"""The second tracing route: a model becomes a ``torch.fx.GraphModule`` through ``torch.export``.

``torch.fx`` symbolic tracing stops at Python that reads tensor shapes or values (HuggingFace transformers,
``if x.size()[-2:] != y.size()[-2:]`` in MTAN's attention blocks); ``torch.export`` runs the real Python on an
example input and records the ATen operations it ran. :func:`trace_exported` calls
``torch.export.export(model, args, kwargs, strict=False)`` and ``.module()`` (``strict=True`` gives the same graph
and paths on the test models, two to four times slower), then rebuilds the graph to meet the contract of the
``torch.fx`` route (:mod:`fxsplit.tracing.symbolic`):

- it computes what the model computes at the example's sizes, with a dynamic batch (dimension 0 of every tensor
  of the example, in dicts and nested structures too) where the model allows it, in the train/eval mode it was
  traced in. The mode is part of the graph (dropout's ``train`` flag, BatchNorm's batch statistics): switching it
  raises :class:`~fxsplit.errors.TraceError`, so a model needs one graph per mode;
- one placeholder per ``forward`` parameter the example gives, in ``forward``'s order (the others keep their
  defaults); a non-tensor argument (a task name, a flag, ``None``) is fixed at its example value and asserted on
  each call; the output has the model's structure (dict keys, tuple positions; a HuggingFace ``ModelOutput``
  becomes a plain dict with the same keys);
- parameters and buffers are read by ``get_attr`` nodes named by their qualified names in the model; a tensor
  with several names (tied weights) is read under the name its reading module gives it (an embedding reads
  ``embed.weight``, the tied head ``head.weight``; ``torch.export`` itself reads one name everywhere), under its
  first name when the model's own ``forward`` reads it. Every parameter and buffer of the model stays on the graph
  module at its name, read or not (an eval graph reads no ``num_batches_tracked``): ``state_dict()`` has the
  model's keys;
- every node has ``node.meta["path"]``, the dotted path of the module whose ``forward`` created it (from
  ``nn_module_stack``) and the operation, numbered when repeated (``"encoder.layer.0.attention.self.query.linear"``,
  ``"block1.add_1"``); ``get_attr`` nodes have the tensor's name; node names are the paths with underscores;
  ``gm.meta["fxsplit_route"] == "export"``.

What the graph looks like (torch 2.14, the training IR: no ``run_decompositions``):

- A module call is one ATen node in the module's path: a ``Linear`` is ``aten.linear.default(x, weight, bias)``
  reading ``get_attr`` weight and bias (no ``addmm``/transpose), a ``Conv2d`` ``aten.conv2d.default``, an
  ``Embedding`` ``aten.embedding.default(weight, ids)``, a ``LayerNorm`` ``aten.layer_norm.default``; HF attention
  is ``aten.scaled_dot_product_attention.default`` with the padding mask as an argument.
- BatchNorm in train mode: ``aten.add_.Tensor(num_batches_tracked, 1)`` (no users, impure), then
  ``aten.batch_norm.default(x, weight, bias, running_mean, running_var, True, momentum, eps, cudnn)``, which
  updates the running statistics in place as eager does (so a BatchNorm applied to several streams updates them
  once per stream, in graph order). ``torch.fx`` does not count ``batch_norm`` as impure: a pass that drops unused
  nodes drops the update with it. Eval mode: ``training`` is ``False`` and there is no ``add_``.
  (``run_decompositions`` would make BatchNorm functional with ``copy_`` writes at the end of the graph, a Linear
  ``permute`` + ``addmm``: not used.)
- In-place operations on activations stay in place: ``out += x`` is ``aten.add_.Tensor``, ``ReLU(inplace=True)``
  ``aten.relu_.default``. Later readers already read the operation's result (what ``follow_mutations`` does on the
  fx route), but the operation still writes into its input. An ``OpOverload`` says which argument it writes:
  ``target._schema.arguments[i].alias_info.is_write`` (its ``__name__`` is ``"relu_.default"``).
- Stochastic nodes: ``aten.dropout.default(x, p, train)`` with literal ``p`` and ``train``
  (``aten.feature_dropout`` / ``aten.alpha_dropout`` for those modules).
- Sizes: ``aten.sym_size.int(x, 0)`` reads the dynamic batch (its ``meta["val"]`` is a ``SymInt``: metadata, not
  data); other sizes are literal ints (BERT's head reshape is ``[sym_size, 8, -1, 8]``).
- Checks: a ``call_module`` of ``_guards_fn`` after the inputs asserts the sizes the graph was traced for (static
  dimensions, equal batch dimensions, numbers and strings given; a different sequence length fails with
  ``AssertionError: Guard failed: input_ids.size()[1] == 8``); ``aten._assert_tensor_metadata`` checks dtypes;
  ``torch._assert`` nodes check the non-tensor inputs (torch's guards miss ``None``). All have no users and are
  impure: dead-code elimination keeps them. Python-level checks of the model are gone (BatchNorm's "expected more
  than 1 value per channel"); a batch of 1 runs.

After tracing: ``torch.export.export`` of the graph again works with a dynamic batch, after edits too, and so does
``fxsplit.export`` to ``.pt2``. ``torch.jit.script`` cannot compile the graph (``fxsplit.script`` raises
:class:`~fxsplit.errors.ExportError`), and ``torch.save``/pickle fail on torch's guard module: ``.pt2`` is how
this route's graphs are saved. Cost, on a loaded 2-core CPU: 0.8 s for the 2-layer BERT of the tests, 1.8 s for
the MTAN of the tests, about 5 s for a BERT-base (12 layers, width 768) at sequence length 128; the fx route traces
the small CNN of the tests in 0.04 s, this route in 0.5 s. Data-dependent Python control flow (``if x.sum() > 0``)
fails with a :class:`~fxsplit.errors.TraceError` naming the module and the line.
"""

from __future__ import annotations

import inspect
import operator
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils import _pytree as pytree

from ..errors import TraceError
from .symbolic import _user_line, copy_module

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


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
    return _trace(model, args, kwargs, training, share_tensors=False)


def trace_exported_for_reading(model: nn.Module, args: Any = (), kwargs: dict[str, Any] | None = None, *,
                               training: bool | None = None) -> ExportedGraphModule:
    """Like :func:`trace_exported`, but the graph reads the model's own parameters and buffers: only to be read."""
    return _trace(model, args, kwargs, training, share_tensors=True)


def _trace(model, args, kwargs, training, share_tensors: bool) -> ExportedGraphModule:
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxsplit traces an nn.Module, got {type(model).__name__}.")
    args = args if isinstance(args, tuple) else (args,)
    kwargs = dict(kwargs or {})
    training = model.training if training is None else training
    root = copy_module(model, share_tensors).train(training)
    given = _argument_names(root, args, kwargs)
    dynamic = {name: pytree.tree_map(_batch_dim, value) for name, value in given.items()}
    try:
        program = torch.export.export(root, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise _export_error(root, error) from error
    return _contract_module(program.module(), root, (args, kwargs), list(given), training)


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
        owner = frame.f_locals.get("self")
        if id(owner) in modules:
            where = modules[id(owner)]  # the innermost module wins, as the frames go deeper
    module = root.get_submodule(where) if where else root
    line = _user_line(error)
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


def _contract_module(exported: fx.GraphModule, root: nn.Module, example: tuple[tuple, dict], given: list[str],
                     training: bool) -> ExportedGraphModule:
    """The graph of ``exported`` (flat inputs and outputs, pytree code) rebuilt to meet fxsplit's contract."""
    graph, paths, modules = fx.Graph(), _PathNames(), {name for name, _ in root.named_modules()}
    values = _structured_inputs(graph, exported.graph, root, example, given, paths)
    for node in exported.graph.nodes:
        if node.op == "placeholder" or node.op == "get_attr" and not node.users:  # export reads every parameter
            continue
        if node.op == "output":
            flat = fx.map_arg(node.args[0], values.__getitem__)
            out = graph.output(pytree.tree_unflatten(list(flat), exported.graph._codegen.pytree_info.out_spec))
            out.meta["path"] = "output"
            continue
        if node.op in ("get_attr", "call_module"):
            path = node.target
        else:
            path = paths(_scope(node, modules), _op_name(node.target))
        new = graph.create_node(node.op, node.target, fx.map_arg(node.args, values.__getitem__),
                                fx.map_arg(node.kwargs, values.__getitem__), path.replace(".", "_"), node.type)
        new.meta = {**node.meta, "path": path}
        values[node] = new
    _read_ties_by_owner(graph, root, modules)
    targets = {node.target for node in graph.nodes if node.op in ("get_attr", "call_module")}
    gm = ExportedGraphModule({t: _attribute((root, exported), t) for t in targets}, graph, type(root).__name__)
    _keep_state(gm, root)
    nn.Module.train(gm, training)
    gm.meta["fxsplit_route"] = "export"
    gm.graph.lint()
    return gm


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
            owned = [name for name in aliases if name.rpartition(".")[0] == _scope(user, modules)]
            name = owned[0] if owned else aliases[0]
            if name != node.target:
                with graph.inserting_after(node):
                    read = graph.get_attr(name)
                read.meta = {**node.meta, "path": name}
                user.replace_input_with(node, read)
        if not node.users:
            graph.erase_node(node)


def _keep_state(gm: fx.GraphModule, root: nn.Module) -> None:
    """Every parameter and buffer of the model at its qualified name, read by the graph or not (an eval graph
    reads no ``num_batches_tracked``), buffers as persistent as in the model: ``state_dict()`` has the model's keys."""
    for path, module in root.named_modules(remove_duplicate=False):
        holder = gm
        for part in path.split(".") if path else ():
            if part not in holder._modules:
                holder.add_module(part, nn.Module())
            holder = holder._modules[part]
        for name, parameter in module.named_parameters(recurse=False):
            holder.register_parameter(name, parameter)
        for name, buffer in module.named_buffers(recurse=False):
            holder.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)


def _attribute(roots: tuple[nn.Module, ...], target: str) -> Any:
    """The object at the qualified name ``target`` of the first of ``roots`` that has it."""
    for root in roots:
        try:
            return operator.attrgetter(target)(root)
        except AttributeError:
            continue
    raise TraceError(f"the exported graph reads {target!r}, which the model does not have.")


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
