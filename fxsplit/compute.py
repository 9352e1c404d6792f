"""What a split costs in compute: the model's FLOPs per traced node, measured once on an example, and the rule that
turns them into the FLOPs a selection of layers adds.

Recon's split network runs one stream per task from the first split layer on: a node that a split layer's value
reaches (the split layer's own call among them) runs once for every task whose output it feeds, every other node
once. So splitting ``layers`` adds, per sample, the sum over the nodes downstream of any of them of (tasks fed - 1)
x the node's FLOPs, as ``torch.utils.flop_counter.FlopCounterMode`` counts them in the forward pass (matrix
products, convolutions, attention; elementwise operations count 0). The profile is kept on the layer graph as
``graph.graph["compute"]``: the model's FLOPs per sample and, per node that has FLOPs and feeds an output, its FLOPs
per sample, the output paths it feeds and the layers upstream of it (by their ``order``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from . import structure


class _Counting(fx.Interpreter):
    """Runs a traced module node by node under a ``FlopCounterMode``, keeping each node's FLOPs."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter, self.flops = counter, {}

    def run_node(self, node: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        result = super().run_node(node)
        self.flops[node] = self.counter.get_total_flops() - before
        return result


class _Stand(nn.Module):
    """Stands in for the model in a call ``call(module)``: runs the traced graph node by node; keeps the batch
    size, the first dimension of the first tensor it is given."""

    def __init__(self, interpreter: _Counting):
        super().__init__()
        self.interpreter, self.batch = interpreter, None
        self.signature = inspect.signature(interpreter.module.forward)

    def forward(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self.batch = self.batch or batch_size(bound.args, bound.kwargs)
        return self.interpreter.run(*bound.args, *bound.kwargs.values())


def batch_size(args: tuple, kwargs: Mapping) -> int:
    """The first dimension of the first tensor of a call (1 without one): what "per sample" divides by."""
    tensor = next((x for _, _, x in structure.leaves((args, kwargs)) if isinstance(x, torch.Tensor) and x.dim()),
                  None)
    return tensor.shape[0] if tensor is not None else 1


def forward_flops(module: nn.Module, args: tuple, kwargs: Mapping) -> float:
    """The FLOPs per sample of ``module(*args, **kwargs)``'s forward, as ``FlopCounterMode`` counts them.

    >>> forward_flops(torch.nn.Linear(3, 2), (torch.ones(4, 3),), {})  # 2 x 3 x 2 multiply-adds a sample
    12.0
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*args, **kwargs)
    return counter.get_total_flops() / batch_size(args, kwargs)


def profile(gm: fx.GraphModule, graph, call: Callable[[nn.Module], Any], leaves: Mapping[tuple, set[fx.Node]],
            metadata: Callable[[fx.Node], bool]) -> dict | None:
    """The compute profile of ``gm``, whose layer graph is ``graph``, on the example ``call``, or ``None`` when the
    call cannot run the graph node by node (it reads more of the model than its ``forward``). ``leaves`` maps the
    output's key paths to the nodes they are computed from; ``metadata`` says which nodes pass on no values."""
    counter = FlopCounterMode(display=False)
    stand = _Stand(_Counting(gm, counter))
    buffers = [(b, b.detach().clone()) for b in gm.buffers()]
    cuda = sorted({p.device.index or 0 for p in gm.parameters() if p.is_cuda})
    try:  # the model's state and the random numbers stay as they were: scoring then runs as without the profile
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), counter:
            call(stand)
    except Exception:  # noqa: BLE001 - the profile is optional: selections then say compute was not measured
        return None
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    flops, batch = stand.interpreter.flops, stand.batch or 1
    order = {name: data["order"] for name, data in graph.nodes(data=True)}
    layer_of = {node: name for name, data in graph.nodes(data=True) for node in data["calls"]}
    upstream: dict[fx.Node, frozenset[int]] = {}
    nodes = []
    for node in gm.graph.nodes:
        own = frozenset([order[layer_of[node.name]]]) if node.name in layer_of else frozenset()
        inputs = () if metadata(node) else (upstream[a] for a in node.all_input_nodes)
        upstream[node] = own.union(*inputs)
        fed = [list(path) for path, ancestors in leaves.items() if node in ancestors]
        if flops.get(node) and fed:
            nodes.append([flops[node] / batch, fed, sorted(upstream[node])])
    return {"model": sum(flops.values()) / batch, "nodes": nodes}


def added(compute: Mapping, orders: Iterable[int], tasks_fed: Callable[[list], int]) -> float:
    """FLOPs per sample that splitting the layers of ``orders`` adds, by the profile ``compute``; ``tasks_fed``
    counts the tasks whose outputs a node feeds (from its output paths)."""
    chosen = set(orders)
    return sum(flops * (tasks_fed(fed) - 1) for flops, fed, upstream in compute["nodes"]
               if chosen.intersection(upstream))
