"""Which layers are scored: those whose parameters two or more tasks' losses reach, decided at the first scored step.

On a split model, ``parameter_tasks()`` says which tasks' outputs each parameter serves: a batched stream links the
branches in autograd's graph with zero gradients, which must not count as reaching.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import torch


class ScoredLayers:
    """The scored layers of ``graph`` and why the others are left out.

    ``index`` maps every name of a trainable parameter (aliases of a shared parameter included) to its position in
    the monitor's parameter list; ``reached[t][i]`` says whether task ``t``'s loss reached parameter ``i``;
    ``owners[i]``, on a split model, the tasks whose outputs depend on parameter ``i``.
    """

    def __init__(self, graph: nx.DiGraph, index: Mapping[str, int], tasks: Sequence[str],
                 reached: Sequence[Sequence[bool]], owners: Sequence[tuple[str, ...]] | None = None):
        self.tasks = list(tasks)
        self.users = [[t for k, t in enumerate(tasks) if reached[k][i] and (owners is None or t in owners[i])]
                      for i in range(len(reached[0]))]
        self.reach: dict[str, list[str]] = {}
        self.left_out: dict[str, str] = {}
        self.layers: list[str] = []
        self.parameters: list[list[int]] = []  # per scored layer, its parameters (a tied one once)
        for layer, names in graph.nodes(data="parameters"):
            params = list(dict.fromkeys(index[name] for name in names if name in index))
            users = sorted({t for i in params for t in self.users[i]}, key=self.tasks.index)
            self.reach[layer] = users
            if not params:
                self.left_out[layer] = "frozen (no parameter requires grad)"
            elif len(users) < 2:
                self.left_out[layer] = f"only task {users[0]!r} reaches it" if users else "no task's loss reaches it"
            else:
                self.layers.append(layer)
                self.parameters.append(params)

    def shared(self) -> list[int]:
        """Parameters that two or more tasks reach, in parameter order."""
        return [i for i, users in enumerate(self.users) if len(users) > 1]

    def reach_matrix(self, device: torch.device) -> torch.Tensor:
        """``(layers, tasks)`` bool: which tasks reach each scored layer."""
        return torch.tensor([[t in self.reach[layer] for t in self.tasks] for layer in self.layers],
                            dtype=torch.bool, device=device).reshape(len(self.layers), len(self.tasks))

    def gram(self, slot: Mapping[int, int], dtype: torch.dtype, device: torch.device):
        """A function from the parameters' flattened Gram matrices ``(parameters, tasks * tasks)``, in ``slot``
        order, to the scored layers' and, last, to that of all scored parameters together: one matrix product."""
        combine = torch.zeros(len(self.layers) + 1, len(slot), dtype=dtype, device=device)
        for layer, params in enumerate(self.parameters):
            for i in params:
                combine[layer, slot[i]] = 1
                combine[-1, slot[i]] = 1

        return lambda grams: torch.mm(combine, grams)
