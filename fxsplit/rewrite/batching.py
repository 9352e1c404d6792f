"""The batching pass: in the fanned-out region, a shared module that treats every sample alone runs once on the
branches' batches concatenated, instead of once per branch: the same arithmetic in fewer, larger calls.

Its output stays concatenated (a *stream*, :mod:`.streams`) for the next such module, and is split back into
branches, by the rows each branch brought, where a branch needs its own part. Only convolutions and linear layers
start a stream; cheap per-sample modules (activations, pooling, LayerNorm, ...) join one when it is at hand.
BatchNorm never does: it would mix the branches' statistics; nor does a module with hooks.
"""

from __future__ import annotations

import operator

from torch import fx, nn
from torch.nn.modules import module as _module_hooks

from ..split_module import COPIES
from ..tracing import mutated_input
from ..modules import torch_layer
from .. import rules
from .streams import join, part

_PLAIN_MODULES = frozenset({"torch", "_operator", "operator", "builtins", "math", "fxsplit"})  # whose functions
_VIEWS = frozenset({  # operations whose result may share its input's memory (methods, or torch functions)
    "view", "view_as", "reshape", "reshape_as", "transpose", "swapaxes", "permute", "movedim", "flatten",
    "unflatten", "unsqueeze", "squeeze", "narrow", "select", "expand", "expand_as", "t", "chunk", "split",
    "unbind", "as_strided", "detach", "contiguous", "diagonal", "unfold", "getitem",
})


def batch_branches(root: nn.Module, graph: fx.Graph) -> None:
    """Run eligible shared modules of a fanned-out ``graph`` once on the joined branches (in place)."""
    parts: dict[fx.Node, tuple[fx.Node, int]] = {}  # part node -> (batched node, index of its branch)
    routes: dict[fx.Node, fx.Node] = {}  # batched node -> the route of its stream
    joined: dict[tuple[fx.Node, ...], tuple[fx.Node, fx.Node]] = {}  # branches joined once, for every module
    plain = _plain_histories(root, graph)
    for group in _branch_groups(root, graph):
        module = root.get_submodule(group[0].target)
        sources = [node.args[0] for node in group]
        stream = _stream(sources, parts)
        if not (rules.per_sample(module) and (stream is not None or rules.batched(module))):
            continue
        if stream is None and not all(source in plain for source in sources):
            continue
        with graph.inserting_before(group[-1].next):
            if stream is None and tuple(sources) not in joined:
                both = graph.call_function(join, (sources,))
                joined[tuple(sources)] = (graph.call_function(operator.getitem, (both, 0)),
                                          graph.call_function(operator.getitem, (both, 1)))
            source, route = (stream, routes[stream]) if stream is not None else joined[tuple(sources)]
            batched = graph.call_module(group[0].target, (source, *group[0].args[1:]), dict(group[0].kwargs))
            batched.meta = {**group[0].meta, "branches": [node.meta["branch"] for node in group]}
            del batched.meta["branch"]
            routes[batched] = route
            for i, node in enumerate(group):
                item = graph.call_function(part, (batched, route, i))
                item.meta = {"branch": node.meta["branch"], "origin": node.meta["origin"]}
                parts[item] = (batched, i)
                node.replace_all_uses_with(item)
                graph.erase_node(node)
    for node in reversed(graph.nodes):  # parts no branch reads (the stream went on whole)
        if node in parts and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        if node in parts and _written_in_place(root, node):
            node.args = (*node.args, True)
    graph.lint()


def _branch_groups(root: nn.Module, graph: fx.Graph) -> list[list[fx.Node]]:
    """Runs of branch nodes that apply the same shared module to one input each, one node per branch; a module with
    hooks is left to each branch, so that its hooks see the rows of one branch at a time."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if "branch" in node.meta and node.op == "call_module" and not node.target.startswith(f"{COPIES}.") and \
                not _hooked(root.get_submodule(node.target)):
            groups.setdefault(node.meta["origin"], []).append(node)
    return [group for group in groups.values()
            if len(group) > 1 and all(node.all_input_nodes == [node.args[0]] for node in group)]


def _plain_histories(root: nn.Module, graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose branch history runs only torch's own autograd.

    Joined branches are one node of autograd's graph: a backward pass that reaches one branch's part also runs the
    other branches' histories, with no gradient. torch's own backward functions pass that on as none, so the
    others' parameters get none; but a custom autograd Function there gets zeros (and gives zeros on), a hook gets
    ``None``. So a branch value whose history holds Python that autograd runs (a recorded Function, a gradient hook,
    a module with backward hooks, a module or function other than torch's, which may hold either) is never
    joined.
    """
    observed = {arg for node in graph.nodes if not _plain_operation(root, node) for arg in node.all_input_nodes}
    plain = set()
    for node in graph.nodes:
        if _plain_operation(root, node) and node not in observed and \
                all(arg in plain or "branch" not in arg.meta for arg in node.all_input_nodes):
            plain.add(node)
    return plain


def _plain_operation(root: nn.Module, node: fx.Node) -> bool:
    """Whether ``node``'s backward is torch's own: a torch.nn layer without hooks, a torch function or method."""
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return torch_layer(module) and not _hooked(module, backward_only=True)
    if node.op == "call_function":
        return node.target in (join, part) or (getattr(node.target, "__module__", None) or "").split(".")[0] in \
            _PLAIN_MODULES
    return True


def _hooked(module: nn.Module, backward_only: bool = False) -> bool:
    """Whether ``module`` has hooks (those that run in the backward pass only, with ``backward_only``)."""
    backward = (module._backward_hooks, module._backward_pre_hooks, _module_hooks._global_backward_hooks,
                _module_hooks._global_backward_pre_hooks)
    forward = (module._forward_hooks, module._forward_pre_hooks, _module_hooks._global_forward_hooks,
               _module_hooks._global_forward_pre_hooks)
    return any(backward) or (not backward_only and any(forward))


def _written_in_place(root: nn.Module, node: fx.Node) -> bool:
    """Whether an in-place operation writes into ``node``'s memory, directly or through a view of it."""
    values = [node]
    while values:
        value = values.pop()
        for user in value.users:
            if mutated_input(root, user) is value:
                return True
            if user.args and user.args[0] is value and _view_name(user) in _VIEWS:
                values.append(user)
    return False


def _view_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return "getitem" if node.target is operator.getitem else getattr(node.target, "__name__", None)
    return None


def _stream(sources: list[fx.Node], parts: dict[fx.Node, tuple[fx.Node, int]]) -> fx.Node | None:
    """The batched node whose branches ``sources`` are, all of them and in order, else ``None``."""
    streams = [parts.get(source) for source in sources]
    if any(s is None for s in streams) or len({batched for batched, _ in streams}) != 1:
        return None
    batched = streams[0][0]
    if [i for _, i in streams] != list(range(len(sources))) or len(batched.meta["branches"]) != len(sources):
        return None
    return batched
