"""Which layers are scored: those whose parameters two or more tasks' losses reach, decided at the first scored step.

On a split model, ``parameter_tasks()`` says which tasks' outputs each parameter serves: a batched stream links the
branches in autograd's graph with zero gradients, which must not count as reaching.

The scope never changes afterwards. A layer frozen at the first scored step and unfrozen later trains but is not
scored; its ``left_out`` reason says so. Modules whose parameters the losses reach but that the layer graph has no
layer for (``forward`` never calls them: the training loop runs another method) are listed as left out too.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

import networkx as nx
import torch
from torch import nn

from ..modules import owner

FROZEN = "frozen (no parameter requires grad)"
UNFROZEN = ("frozen at the first scored step, which decides the scored layers; unfrozen since: trained, not scored "
            "(a new ConflictMonitor scores it)")
OUTSIDE = ("the losses reach its parameters but the layer graph has no layer for it (forward does not call it: the "
           "training loop runs another method, e.g. mmdet's forward_train, or the graph given leaves it out); to "
           "score it, pass graph=fxsplit.layer_graph(m) of a module m whose forward runs what training runs under the "
           "same parameter names (e.g. the model, its class's forward set to forward_train)")


def users_of(tasks: Sequence[str], reached: Sequence[Sequence[bool]], params: Iterable[int],
             owners: Sequence[tuple[str, ...]] | None) -> dict[int, list[str]]:
    """Per parameter of ``params``, the tasks whose losses reached it (``reached[t][i]``), on a split model only
    those whose outputs it serves (``owners[i]``)."""
    return {i: [t for k, t in enumerate(tasks) if reached[k][i] and (owners is None or t in owners[i])]
            for i in params}


class ScoredLayers:
    """The scored layers of ``graph`` and why the others are left out.

    ``index`` maps every name of a trainable parameter (aliases of a shared parameter included) to its position in
    the monitor's parameter list; ``reached[t][i]`` says whether task ``t``'s loss reached parameter ``i``;
    ``owners[i]``, on a split model, the tasks whose outputs depend on parameter ``i``.
    """

    def __init__(self, graph: nx.DiGraph, index: Mapping[str, int], tasks: Sequence[str],
                 reached: Sequence[Sequence[bool]], owners: Sequence[tuple[str, ...]] | None = None):
        self.tasks = list(tasks)
        self.users = users_of(self.tasks, reached, range(len(reached[0])), owners)
        self.reach: dict[str, list[str]] = {}
        self.left_out: dict[str, str] = {}
        self.layers: list[str] = []
        self.parameters: list[list[int]] = []  # per scored layer, its parameters (a tied one once)
        self._frozen: dict[str, list[str]] = {}  # per layer frozen at the first scored step, its parameters' names
        for layer, names in graph.nodes(data="parameters"):
            params = list(dict.fromkeys(index[name] for name in names if name in index))
            users = sorted({t for i in params for t in self.users[i]}, key=self.tasks.index)
            self.reach[layer] = users
            if not params:
                self.left_out[layer] = FROZEN
                self._frozen[layer] = list(names)
            elif len(users) < 2:
                self.left_out[layer] = f"only task {users[0]!r} reaches it" if users else "no task's loss reaches it"
            else:
                self.layers.append(layer)
                self.parameters.append(params)

    def layer_of(self) -> dict[int, str]:
        """Each scored parameter's layer."""
        return {i: layer for layer, params in zip(self.layers, self.parameters) for i in params}

    def unfrozen(self, trained: Collection[str]) -> dict[str, str]:
        """The layers frozen at the first scored step some of whose parameters (``trained``: names) trained since,
        with why they are not scored."""
        return {layer: UNFROZEN for layer, names in self._frozen.items() if any(name in trained for name in names)}

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


def outside_layers(model: nn.Module, graph: nx.DiGraph, names: Sequence[str], reach: Mapping[int, Collection[str]],
                   tasks: Sequence[str]) -> tuple[nx.DiGraph, dict[str, list[str]], dict[str, str]]:
    """For the modules (or bare parameters) whose parameters the losses reached but no layer of ``graph`` holds
    (``reach[i]``: the tasks that reached parameter ``i``, named ``names[i]``): ``graph`` with a node for each, and
    their ``reach`` and ``left_out`` entries."""
    modules: dict[str, tuple[nn.Module | None, list[int]]] = {}
    for i in reach:
        held_by = owner(names[i])
        key, module = (held_by, model.get_submodule(held_by)) if held_by and held_by not in graph else \
            (names[i], None)
        modules.setdefault(key, (module, []))[1].append(i)
    graph = graph.copy()
    for order, (name, (module, params)) in enumerate(modules.items(), start=len(graph)):
        graph.add_node(name, kind=type(module).__name__ if module is not None else "Parameter",
                       params=sum(model.get_parameter(names[i]).numel() for i in params), order=order, calls=[],
                       parameters=[names[i] for i in params], members=[name])
    reached = {name: [t for t in tasks if any(t in reach[i] for i in params)] for name, (_, params) in modules.items()}
    return graph, reached, dict.fromkeys(modules, OUTSIDE)
