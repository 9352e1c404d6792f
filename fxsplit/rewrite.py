"""The rewrite pass: give chosen layers one copy per task and fan everything downstream out into branches.

A node that depends on a chosen layer is *tainted*: it is emitted once per task whose output needs it (its
branch), with the task's copy in place of each chosen layer and the one shared set of weights everywhere
else. Untainted nodes are emitted once and shared by every branch. Nodes no task's output needs are dropped.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import fx, nn

from .errors import InitError, LayerError, ReportError, TaskError, unknown_layer
from .layers import attribute, layer_calls
from .report import LayerSelection
from .split_module import SplitModule, copy_target
from .tracing import mutated_input, trace

OutputKey = Union[str, int, tuple]
Init = Union[str, Callable[[Any, str, str], None]]

_NORMS = (nn.modules.batchnorm._NormBase,)
_HEAVY = (nn.modules.conv._ConvNd, nn.Linear)  # worth concatenating the branches for
_ELEMENTWISE = (  # cheap per-sample modules: run on a concatenated stream only when one is at hand
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.LayerNorm, nn.GroupNorm,
)


def rewrite(
    model: nn.Module,
    layers: Iterable[str],
    tasks: Sequence[str] | Mapping[str, Any] | None = None,
    *,
    outputs: Mapping[str, OutputKey] | None = None,
    init: Init = "copy",
    split_norms: bool = False,
    batch_branches: bool = True,
) -> SplitModule:
    """A copy of ``model`` in which each of ``layers`` has one copy per task, and all that follows fans out.

    Args:
        model: any ``nn.Module`` (traced with :func:`fxsplit.trace`; pass a ``GraphModule`` from
            ``fxsplit.trace(model, leaf_modules=...)`` to control tracing). It is never modified.
        layers: layer names, as in ``fxsplit.layer_graph(model)`` (``[]`` splits nothing).
        tasks: task names; optional when the model returns a mapping (its keys are the tasks) or when
            ``layers`` is a selection from a conflict report (its tasks travel with it).
        outputs: which part of the model's output belongs to which task: ``{"seg": 0, "depth": 1}`` for a
            tuple, ``{"seg": "out"}`` for a mapping, a tuple of keys for nested outputs. By default a mapping
            output gives each task its own key and any other output goes whole to every task.
        init: ``"copy"`` (copies start equal to the shared layer: the function is unchanged), ``"reset"``
            (each copy's ``reset_parameters()``) or a callable ``init(copy, layer, task)`` that edits the copy.
        split_norms: also split every normalisation layer with running statistics that lies wholly in the
            fanned-out region, so that each task's statistics see only its own branch.
        batch_branches: in the fanned-out region, run a shared convolution or linear layer (and the per-sample
            modules that follow it: activations, pooling, LayerNorm, ...) once on the branches' batches
            concatenated, instead of once per branch. Mathematically the same (each sample is computed alone),
            but kernels round differently at a larger batch: deep networks can drift by ~1e-5 relative
            (``False`` reproduces the original bit for bit). BatchNorm always runs per branch.

    Returns:
        A :class:`SplitModule` whose ``forward`` returns ``{task: output}``.

    >>> import torch, fxsplit
    >>> class TwoHeads(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    ...         self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 2), "b": torch.nn.Linear(8, 3)})
    ...     def forward(self, x):
    ...         return {task: head(self.trunk(x)) for task, head in self.heads.items()}
    >>> net = TwoHeads()
    >>> split = fxsplit.rewrite(net, ["trunk.2"])
    >>> x = torch.randn(5, 4)
    >>> all(torch.allclose(split(x)[t], net(x)[t]) for t in ("a", "b"))
    True
    >>> sum(p.numel() for p in split.parameters()) - sum(p.numel() for p in net.parameters())
    72
    """
    if isinstance(model, SplitModule):
        raise LayerError("model is already split; rewrite the original model with all the layers at once.")
    if not (callable(init) or init in ("copy", "reset")):
        raise InitError(f"init must be 'copy', 'reset' or a callable init(copy, layer, task), got {init!r}.")
    from_report = isinstance(layers, LayerSelection)
    tasks = layers.tasks if from_report and tasks is None else tasks
    layers = _layer_names(layers)
    gm = trace(model)
    selected = _task_outputs(_output_node(gm).args[0], tasks, outputs)
    calls = layer_calls(gm)
    _check_layers(layers, calls, from_report)
    chosen = {node: layer for layer in layers for node in calls[layer]}
    tainted, clone_first = _taint(gm, chosen)
    needed = {task: _ancestors(value) for task, value in selected.items()}
    if split_norms:
        chosen.update(_norms_in_branches(gm, calls, tainted, needed, set(layers)))
    _check_shared(layers, _users(chosen, needed))
    emitted = _Emitter(gm, selected, chosen, tainted, clone_first, needed, batch_branches)
    for (task, layer), target in emitted.copies.items():
        _install(gm, target, _new_copy(gm, layer, task, init))
    split = SplitModule(gm, emitted.graph, type(model).__name__)
    split.train(model.training)
    return split


def _layer_names(layers: Iterable[str]) -> list[str]:
    if isinstance(layers, str):
        raise LayerError(f"layers must be a list of layer names, got the string {layers!r}; use [{layers!r}].")
    try:
        names = list(layers)
    except TypeError:
        raise LayerError(f"layers must be a list of layer names, got {type(layers).__name__}.") from None
    for name in names:
        if not isinstance(name, str):
            raise LayerError(
                f"layers must be names (str) as in fxsplit.layer_graph(model), got {type(name).__name__} {name!r}."
            )
    repeated = _repeated(names)
    if repeated:
        raise LayerError(f"layer(s) {repeated} given more than once; name each layer once.")
    return names


def _repeated(items) -> list:
    """The items that occur more than once, sorted."""
    return sorted(item for item, n in Counter(items).items() if n > 1)


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return next(node for node in reversed(gm.graph.nodes) if node.op == "output")


def _task_outputs(output: Any, tasks, outputs: Mapping[str, OutputKey] | None) -> dict[str, Any]:
    """Task name -> the part of the traced output (a structure of nodes) that belongs to the task."""
    if isinstance(tasks, Mapping):
        tasks = list(tasks)
    if outputs is not None:
        if not isinstance(outputs, Mapping):
            raise TaskError(f"outputs must map task names to output keys, got {type(outputs).__name__}.")
        tasks = list(outputs) if tasks is None else tasks
        _check_tasks(tasks)
        if set(outputs) != set(tasks):
            raise TaskError(f"outputs names tasks {sorted(outputs)} but the tasks are {sorted(tasks)}.")
        return {task: _select(output, outputs[task], task) for task in tasks}
    if isinstance(output, Mapping):
        tasks = list(output) if tasks is None else tasks
        _check_tasks(tasks)
        missing = [task for task in tasks if task not in output]
        if missing:
            raise TaskError(
                f"task(s) {missing} are not keys of the model's output {list(output)}; name tasks after "
                f"those keys, or say which output is whose with outputs={{task: key}}."
            )
        return {task: output[task] for task in tasks}
    if tasks is None:
        raise TaskError(
            "the model's output is not a mapping, so the tasks cannot be read from it: pass tasks=[...] "
            "(and outputs={task: index} if each task has its own element of the output)."
        )
    _check_tasks(tasks)
    return {task: output for task in tasks}


def _check_tasks(tasks: Collection) -> None:
    if isinstance(tasks, str) or not isinstance(tasks, Collection):
        raise TaskError(f"tasks must be a list of names, got {tasks!r}.")
    bad = [task for task in tasks if not (isinstance(task, str) and task.isidentifier())]
    if bad:
        raise TaskError(f"task names must be Python identifiers (they name modules), got {bad}.")
    repeated = _repeated(tasks)
    if repeated:
        raise TaskError(f"task name(s) {repeated} given more than once.")
    if len(tasks) < 2:
        raise TaskError(f"splitting needs at least two tasks, got {list(tasks)}.")


def _select(output: Any, key: OutputKey, task: str) -> Any:
    for part in key if isinstance(key, tuple) else (key,):
        try:
            output = output[part]
        except (KeyError, IndexError, TypeError):
            keys = list(output) if isinstance(output, Mapping) else f"indices 0..{len(output) - 1}" if isinstance(
                output, (tuple, list)) else f"a single {type(output).__name__}"
            raise TaskError(f"outputs[{task!r}] = {key!r}: the model's output has no {part!r} (it has {keys}).") \
                from None
    return output


def _check_layers(layers: list[str], calls: Mapping[str, list[fx.Node]], from_report: bool) -> None:
    foreign = [layer for layer in layers if layer not in calls]
    if from_report and foreign:
        raise ReportError(
            f"these layers of the conflict report are not layers of this model: {foreign[:3]}"
            f"{' ...' if len(foreign) > 3 else ''}; the report was made for another model. Analyze this one."
        )
    for layer in layers:
        if layer in calls:
            continue
        inside = [name for name in calls if name.startswith(layer + ".")] if layer else list(calls)
        if inside:
            raise LayerError(
                f"{layer!r} is a container of {len(inside)} layers ({', '.join(inside[:3])}"
                f"{', ...' if len(inside) > 3 else ''}), not a layer; name the layers to split."
            )
        raise unknown_layer(layer, calls)


def _taint(gm: fx.GraphModule, chosen: Mapping[fx.Node, str]) -> tuple[set[fx.Node], set[fx.Node]]:
    """Nodes that depend on a chosen layer, and the in-place ones among them that write to a shared tensor
    (each branch must write to its own clone)."""
    tainted: set[fx.Node] = set()
    clone_first: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in chosen or any(arg in tainted for arg in node.all_input_nodes):
            tainted.add(node)
            mutated = mutated_input(gm, node)
            if mutated is not None and mutated not in tainted:
                clone_first.add(node)
    return tainted, clone_first


def _ancestors(value: Any) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack: list[fx.Node] = []
    fx.node.map_arg(value, stack.append)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _users(chosen: Mapping[fx.Node, str], needed: Mapping[str, set[fx.Node]]) -> dict[str, list[str]]:
    """Chosen layer -> the tasks whose outputs use it."""
    users: dict[str, list[str]] = {layer: [] for layer in chosen.values()}
    for task, nodes in needed.items():
        for layer in dict.fromkeys(chosen[node] for node in nodes if node in chosen):
            users[layer].append(task)
    return users


def _norms_in_branches(gm, calls, tainted, needed, layers: set[str]) -> dict[fx.Node, str]:
    """Norm layers with running statistics, used by several tasks, all of whose calls are in the fanned-out region."""
    norms = {
        node: layer
        for layer, nodes in calls.items()
        if layer not in layers and isinstance(attribute(gm, layer), _NORMS) and all(n in tainted for n in nodes)
        for node in nodes
    }
    shared = {layer for layer, tasks in _users(norms, needed).items() if len(tasks) > 1}
    return {node: layer for node, layer in norms.items() if layer in shared}


def _check_shared(layers: list[str], users: Mapping[str, list[str]]) -> None:
    for layer in layers:
        if len(users[layer]) < 2:
            whose = f"only task {users[layer][0]!r} uses it" if users[layer] else "no task's output uses it"
            raise LayerError(f"layer {layer!r} cannot be split: {whose}, so it is already task-specific.")


class _Emitter:
    """Builds the rewritten graph: shared nodes once, tainted nodes once per task that needs them.

    With ``batch``, a shared module in the fanned-out region that treats every index of its input's first
    dimension independently runs once on the branches' inputs concatenated along that dimension; its output
    stays concatenated (a *stream*) for the next such module and is chunked back into branches on demand.
    """

    def __init__(self, gm, selected, chosen, tainted, clone_first, needed, batch: bool):
        self.gm, self.chosen, self.tainted, self.clone_first, self.needed = gm, chosen, tainted, clone_first, needed
        self.tasks, self.batch = list(selected), batch
        self.graph = fx.Graph()
        self.shared: dict[fx.Node, fx.Node] = {}
        self.branch: dict[str, dict[fx.Node, fx.Node]] = {task: {} for task in selected}
        self.stream: dict[fx.Node, tuple[fx.Node, list[str]]] = {}
        self.copies: dict[tuple[str, str], str] = {}
        for node in gm.graph.nodes:
            if node.op != "output":
                self._emit(node)
        self.graph.output({task: fx.node.map_arg(value, self._lookup(task)) for task, value in selected.items()})
        self.graph.lint()

    def _emit(self, node: fx.Node) -> None:
        users = [task for task in self.tasks if node in self.needed[task]]
        if node.op == "placeholder" or (node not in self.tainted and users):
            self.shared[node] = self.graph.node_copy(node, self.shared.__getitem__)
        elif node in self.tainted and not self._emit_batched(node, users):
            for task in users:
                self._emit_branch(node, task)

    def _emit_branch(self, node: fx.Node, task: str) -> None:
        args = fx.node.map_arg(node.args, self._lookup(task))
        if node in self.clone_first:
            args = (self.graph.call_method("clone", (args[0],)),) + tuple(args[1:])
        target = node.target
        if node in self.chosen:
            target = self.copies.setdefault((task, self.chosen[node]), copy_target(task, self.chosen[node]))
        kwargs = fx.node.map_arg(node.kwargs, self._lookup(task))
        new = self.graph.create_node(node.op, target, args, kwargs, f"{task}_{node.name}", node.type)
        new.meta = {**node.meta, "task": task}
        self.branch[task][node] = new

    def _emit_batched(self, node: fx.Node, users: list[str]) -> bool:
        """Run ``node`` once on the concatenated branches if that is exact (and worth it); say whether it did."""
        if not self.batch or len(users) < 2 or node in self.chosen or node.op != "call_module":
            return False
        if node.all_input_nodes != [node.args[0]]:
            return False
        module, source = self.gm.get_submodule(node.target), node.args[0]
        streaming = source in self.stream and self.stream[source][1] == users and _per_sample(module)
        if not streaming and not (isinstance(module, _HEAVY) and source in self.tainted):
            return False
        if not streaming:  # concatenate once; later consumers of the same branches reuse it
            joined = self.graph.call_function(torch.cat, ([self._value(task, source) for task in users],))
            self.stream[source] = (joined, users)
        args = (self.stream[source][0], *node.args[1:])
        new = self.graph.create_node("call_module", node.target, args, dict(node.kwargs), f"batched_{node.name}")
        new.meta = {**node.meta, "tasks": users}
        self.stream[node] = (new, users)
        return True

    def _value(self, task: str, node: fx.Node) -> fx.Node:
        if node not in self.branch[task] and node in self.stream:
            joined, users = self.stream[node]
            # unflatten + unbind, rather than chunk, keeps the batch size symbolic for torch.export
            parts = self.graph.call_method("unbind", (self.graph.call_method("unflatten", (joined, 0, (len(users), -1))),))
            for i, user in enumerate(users):
                self.branch[user][node] = self.graph.call_function(operator.getitem, (parts, i))
        return self.branch[task][node] if node in self.branch[task] else self.shared[node]

    def _lookup(self, task: str) -> Callable[[fx.Node], fx.Node]:
        return lambda node: self._value(task, node)


def _per_sample(module: nn.Module) -> bool:
    """Whether ``module`` treats each index of its input's first dimension independently (exact to batch)."""
    if isinstance(module, nn.Flatten):
        return module.start_dim >= 1
    return isinstance(module, _HEAVY + _ELEMENTWISE)


def _new_copy(gm: fx.GraphModule, layer: str, task: str, init: Init):
    original = attribute(gm, layer)
    if isinstance(original, nn.Parameter):
        new = nn.Parameter(original.detach().clone(), requires_grad=original.requires_grad)
    else:
        new = copy.deepcopy(original)
    if callable(init):
        init(new, layer, task)
    elif init == "reset":
        _reset(new, layer)
    return new


def _reset(copy_: nn.Module | nn.Parameter, layer: str) -> None:
    resettable = [m for m in copy_.modules() if hasattr(m, "reset_parameters")] if isinstance(copy_, nn.Module) else []
    if not resettable:
        raise InitError(
            f"layer {layer!r} ({type(copy_).__name__}) has no reset_parameters() to re-initialise its copies; "
            f"use init='copy' or a callable init(copy, layer, task)."
        )
    for module in resettable:
        module.reset_parameters()


def _install(root: nn.Module, target: str, obj) -> None:
    """Put ``obj`` at qualified name ``target`` under ``root``, creating empty containers on the way."""
    *path, name = target.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    setattr(root, name, obj)
