"""Streams: branches concatenated along the batch for a shared layer to run once, and split back into branches.

What the batching pass (:mod:`.batching`) puts in a graph, and what the graph runs. A stream keeps what the
branches would have been apart:

- its rows: each branch's part is cut by the sizes recorded when the branches were joined, so that branches that
  kept different rows (after ``h[h[:, 0] > 0]``, with copies that trained apart) never trade rows;
- autograd's reach: a backward pass that reaches only some branches' parts (one task's loss) gives no gradient,
  rather than zeros, to the others' inputs, as branches apart would (an optimizer skips a parameter whose
  ``.grad`` is ``None``, but applies momentum and weight decay to a zero one);
- in-place writes: a part that a branch writes into in place is the branch's own tensor, not a view of the
  stream (autograd forbids in-place writes into a view that others share the memory of).

TorchScript and ``torch.export`` cannot take the Python objects that carry this: :func:`plain_streams` turns a
graph's streams into ``torch.cat`` and ``narrow``, for export (eval mode, where nothing backpropagates).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import fx


class Route:
    """How a stream was joined (each branch's rows) and, per backward pass, the branches it reached."""

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.reached: dict[int, set[int]] = {}  # autograd's graph task -> the branches whose parts got a gradient

    def mark(self, branch: int):
        """A tensor hook that records that a backward pass reached ``branch``'s part."""
        def hook(grad: torch.Tensor | None) -> None:
            if grad is not None:  # autograd calls hooks with None where a pass brings no gradient
                self.reached.setdefault(torch._C._current_graph_task_id(), set()).add(branch)
        return hook


class _Join(torch.autograd.Function):
    """``torch.cat`` of the branches, whose backward gives a branch the gradient only if one of its parts got one."""

    @staticmethod
    def forward(ctx, route: Route, *sources: torch.Tensor) -> torch.Tensor:
        ctx.route = route
        return torch.cat(sources)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        reached = ctx.route.reached.pop(torch._C._current_graph_task_id(), set())
        parts = grad.split(ctx.route.sizes)
        return (None, *(part if branch in reached else None for branch, part in enumerate(parts)))


def join(sources: list[torch.Tensor]) -> tuple[torch.Tensor, Route]:
    """The branches' values concatenated along the batch, and the route that splits the stream back."""
    if isinstance(sources[0], fx.Proxy):  # the graph is being made again from its code (unpickling)
        return sources[0].tracer.create_proxy("call_function", join, (sources,), {})
    route = Route([source.shape[0] for source in sources])
    return _Join.apply(route, *sources), route


def part(stream: torch.Tensor, route: Route, branch: int, own: bool = False) -> torch.Tensor:
    """Branch ``branch``'s rows of ``stream`` (a tensor of its own where ``own``: the branch writes into it)."""
    if isinstance(stream, fx.Proxy):
        return stream.tracer.create_proxy("call_function", part, (stream, route, branch, own), {})
    rows = stream.narrow(0, route.offsets[branch], route.sizes[branch])
    if own:
        rows = rows.clone()
    if rows.requires_grad:
        rows.register_hook(route.mark(branch))
    return rows


def plain_join(sources: List[torch.Tensor]) -> Tuple[torch.Tensor, List[int]]:
    """:func:`join` for export: the concatenation, and the sizes as its route."""
    return torch.cat(sources), [source.shape[0] for source in sources]


def plain_part(stream: torch.Tensor, sizes: List[int], branch: int, own: bool = False) -> torch.Tensor:
    """:func:`part` for export."""
    start = 0
    for size in sizes[:branch]:
        start += size
    return stream.narrow(0, start, sizes[branch])


_PLAIN = {join: plain_join, part: plain_part}


def plain_streams(graph: fx.Graph) -> None:
    """Turn the streams of ``graph`` into plain tensor operations (in place), for TorchScript and torch.export."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _PLAIN:
            node.target = _PLAIN[node.target]
    graph.lint()

