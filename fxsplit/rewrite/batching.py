"""The batching pass: in the fanned-out region, a shared module that treats every sample alone runs once on the
branches' batches concatenated, instead of once per branch: the same arithmetic in fewer, larger calls.

Its output stays concatenated (a *stream*) for the next such module, and is split back into branches
(``unflatten`` + ``unbind``, which keep the batch size symbolic for torch.export) where a branch needs its own
part. Only convolutions and linear layers start a stream; cheap per-sample modules (activations, pooling,
LayerNorm, ...) join one when it is at hand. BatchNorm never does: it would mix the branches' statistics.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..split_module import COPIES

_HEAVY = (nn.modules.conv._ConvNd, nn.Linear)
_PER_SAMPLE = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd, nn.LayerNorm, nn.GroupNorm,
)


def batch_branches(root: nn.Module, graph: fx.Graph) -> None:
    """Run eligible shared modules of a fanned-out ``graph`` once on the concatenated branches (in place)."""
    parts: dict[fx.Node, tuple[fx.Node, int]] = {}  # getitem node -> (batched node, index of its branch)
    splits: list[fx.Node] = []
    joined: dict[tuple[fx.Node, ...], fx.Node] = {}  # branches concatenated once, for every module that reads them
    for group in _branch_groups(graph):
        module = root.get_submodule(group[0].target)
        sources = [node.args[0] for node in group]
        stream = _stream(sources, parts)
        if not (_per_sample(module) and (stream is not None or isinstance(module, _HEAVY))):
            continue
        with graph.inserting_before(group[-1].next):
            if stream is None and tuple(sources) not in joined:
                joined[tuple(sources)] = graph.call_function(torch.cat, (sources,))
            source = stream if stream is not None else joined[tuple(sources)]
            batched = graph.call_module(group[0].target, (source, *group[0].args[1:]), dict(group[0].kwargs))
            batched.meta = {**group[0].meta, "tasks": [node.meta["task"] for node in group]}
            del batched.meta["task"]
            unflattened = graph.call_method("unflatten", (batched, 0, (len(group), -1)))
            unbound = graph.call_method("unbind", (unflattened,))
            splits += [unflattened, unbound]
            for i, node in enumerate(group):
                item = graph.call_function(operator.getitem, (unbound, i))
                parts[item] = (batched, i)
                node.replace_all_uses_with(item)
                graph.erase_node(node)
    for node in reversed(graph.nodes):  # parts no branch reads (the stream went on whole)
        if not node.users and (node in parts or node in splits):
            graph.erase_node(node)
    graph.lint()


def _branch_groups(graph: fx.Graph) -> list[list[fx.Node]]:
    """Runs of branch nodes that apply the same shared module to one input each, one node per task."""
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if "task" in node.meta and node.op == "call_module" and not node.target.startswith(f"{COPIES}."):
            groups.setdefault(node.meta["origin"], []).append(node)
    return [group for group in groups.values()
            if len(group) > 1 and all(node.all_input_nodes == [node.args[0]] for node in group)]


def _stream(sources: list[fx.Node], parts: dict[fx.Node, tuple[fx.Node, int]]) -> fx.Node | None:
    """The batched node whose branches ``sources`` are, all of them and in order, else ``None``."""
    streams = [parts.get(source) for source in sources]
    if any(s is None for s in streams) or len({batched for batched, _ in streams}) != 1:
        return None
    batched = streams[0][0]
    if [i for _, i in streams] != list(range(len(sources))) or len(batched.meta["tasks"]) != len(sources):
        return None
    return batched


def _per_sample(module: nn.Module) -> bool:
    """Whether ``module`` treats each index of its input's first dimension independently (exact to batch)."""
    if isinstance(module, nn.Flatten):
        return module.start_dim >= 1
    return isinstance(module, _HEAVY + _PER_SAMPLE)
