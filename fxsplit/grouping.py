"""Grouping tasks per layer from their pairwise conflict counts: which tasks may share a copy of a split layer.

This is fxsplit's extension of Recon (the paper gives every task a copy). Per layer, the tasks are clustered by
average linkage on the pairwise conflict rate; cutting the tree into ``g`` groups gives one copy per group, which
removes the conflicts of the pairs it separates at ``(g - 1)`` x the layer's parameters. :func:`within_budget` and
:func:`best_layers` choose the layers and their ``g``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import LayerError, PartitionError

EACH = "each"  # one copy per task, as Recon makes them


@dataclass(frozen=True)
class Merge:
    """One step of average linkage: clusters ``left`` and ``right`` (task indices) joined at ``height``, the
    mean conflict count of their cross pairs; ``conflicts`` is those pairs' total count."""

    left: tuple[int, ...]
    right: tuple[int, ...]
    height: float
    conflicts: int


def average_linkage(counts: np.ndarray) -> list[Merge]:
    """The ``n - 1`` merges of average-linkage agglomerative clustering on the distance ``counts[i, j]`` (the
    conflicts of pair ``i, j``: tasks that conflict often are far apart, agreeing ones close).

    Each step joins the two clusters whose cross pairs have the lowest mean count; ties join the pair whose first
    tasks come first. Cluster ``i`` is named by its lowest task, so the result depends on the task order only
    through ties. Average linkage lies between single and complete linkage: where every pair inside some blocks
    conflicts less than every pair across them, the blocks are the clusters.

    >>> counts = np.array([[0, 1, 9, 8], [1, 0, 7, 9], [9, 7, 0, 2], [8, 9, 2, 0]])
    >>> [(m.left, m.right, m.height) for m in average_linkage(counts)]
    [((0,), (1,), 1.0), ((2,), (3,), 2.0), ((0, 1), (2, 3), 8.25)]
    """
    counts = np.asarray(counts, dtype=np.int64)
    clusters = [(i,) for i in range(len(counts))]
    between = counts.copy()  # between[a, b]: the total count of the pairs across clusters a and b
    merges = []
    while len(clusters) > 1:
        sizes = np.array([len(cluster) for cluster in clusters], dtype=np.float64)
        # exact: a float quotient of two integers is correctly rounded, so equal means compare equal
        mean = between / np.outer(sizes, sizes)
        mean[np.tril_indices(len(clusters))] = np.inf
        a, b = np.unravel_index(np.argmin(mean), mean.shape)  # the first minimum: ties by the lowest tasks
        merges.append(Merge(clusters[a], clusters[b], float(mean[a, b]), int(between[a, b])))
        between[a] += between[b]
        between[:, a] += between[:, b]
        between = np.delete(np.delete(between, b, axis=0), b, axis=1)
        clusters[a] += clusters.pop(b)
    return merges


@dataclass(eq=False)
class LayerGrouping:
    """The tasks of one layer clustered by their conflicts, and what each number of copies costs and removes.

    ``tasks`` are the layer's users (the tasks whose outputs use it, who get copies), ``counts`` their pairwise
    conflict counts over ``steps`` scored steps (0 for a pair the scores did not count: a task whose loss does not
    reach the layer has no measured conflicts), ``others`` the tasks that do not use the layer (they join the first
    group and get no copy), ``params`` the layer's parameters.
    """

    layer: str
    tasks: tuple[str, ...]
    counts: np.ndarray
    steps: int
    params: int
    others: tuple[str, ...] = ()
    merges: list[Merge] = field(init=False, repr=False)
    total: int = field(init=False)  # the conflicts among the users: what one copy per task removes (Recon's score)

    def __post_init__(self):
        self.merges = average_linkage(self.counts)
        self.total = int(np.triu(self.counts, 1).sum())
        # _kept[g]: the conflicts left within the groups of the cut into g groups (merges join the closest first)
        self._kept = [0] * (len(self.tasks) + 1)
        for groups in range(len(self.tasks) - 1, 0, -1):
            self._kept[groups] = self._kept[groups + 1] + self.merges[len(self.tasks) - groups - 1].conflicts

    @property
    def order(self) -> list[str]:
        """The tasks in the tree's leaf order: every cluster of every cut is a run of it."""
        root = self.merges[-1].left + self.merges[-1].right if self.merges else range(len(self.tasks))
        return [self.tasks[i] for i in root]

    def partition(self, groups: int) -> list[list[str]]:
        """The cut of the tree into ``groups`` groups of users, each in task order, the groups by first task."""
        clusters = [(i,) for i in range(len(self.tasks))]
        for merge in self.merges[:len(self.tasks) - groups]:
            clusters[clusters.index(merge.left)] = merge.left + merge.right
            clusters.remove(merge.right)
        return [[self.tasks[i] for i in sorted(cluster)] for cluster in clusters]

    def removed(self, groups: int) -> int:
        """The conflicts that ``groups`` copies remove: those of the pairs the cut puts in different groups."""
        return self.total - self._kept[groups]

    def added(self, groups: int) -> int:
        """The parameters that ``groups`` copies add: ``(groups - 1)`` x the layer's."""
        return (groups - 1) * self.params

    def value(self, groups: int) -> list[list[str]] | str:
        """The selection's entry for ``groups`` copies: ``"each"`` when every user has its own, else the cut with
        the other tasks in its first group."""
        if groups == len(self.tasks):
            return EACH
        first, *rest = self.partition(groups)
        return [first + list(self.others), *rest]

    def summary(self, value: Sequence[Sequence[str]] | str) -> Summary:
        """What the copies of a selection entry (any partition of the tasks, not only a cut) add and remove."""
        kept = copies(value, self.tasks)
        group_of = {task: k for k, group in enumerate(kept) for task in group}
        within, across = [], []
        for i, j in zip(*np.triu_indices(len(self.tasks), 1)):
            (within if group_of[self.tasks[i]] == group_of[self.tasks[j]] else across).append(int(self.counts[i, j]))
        rate = max(self.steps, 1)
        return Summary(kept, self.added(len(kept)), sum(across), float(np.mean(within)) / rate if within else None,
                       float(np.mean(across)) / rate if across else None)


@dataclass(frozen=True)
class Summary:
    """A layer's split as a selection gives it: the user groups that get a copy, the parameters they add, the
    conflicts they remove, and the mean per-step conflict rate of the pairs within a group and between groups
    (``None`` where there are no such pairs)."""

    copies: list[list[str]]
    added: int
    removed: int
    within: float | None
    between: float | None


def copies(value: Sequence[Sequence[str]] | str, users: Sequence[str]) -> list[list[str]]:
    """The groups of a selection entry that get a copy, restricted to the layer's ``users`` (``"each"``: every user
    alone); a group of tasks that do not use the layer gets none.

    >>> copies([["a", "b"], ["c"], ["d"]], ["a", "b", "c"])
    [['a', 'b'], ['c']]
    """
    if value == EACH:
        return [[task] for task in users]
    return [[task for task in group if task in users] for group in value if any(task in users for task in group)]


def within_budget(groupings: Sequence[LayerGrouping], allowance: float, max_groups: int | None) -> dict[str, int]:
    """Layer -> number of copies, chosen greedily by conflicts removed per added parameter within ``allowance``.

    Every layer starts shared (one copy). Each round takes the move, over all layers and all larger numbers of
    groups (up to ``max_groups`` and the layer's users), that removes the most further conflicts per further
    parameter and still fits, and spends its parameters; ties go to the move that removes more, then to the layer
    first in ``groupings`` (network order). Moves that remove nothing are never taken. A move may skip numbers
    of groups, so a layer whose second group removes little but whose third removes much is still found.
    """
    chosen = {grouping.layer: 1 for grouping in groupings}
    while True:
        best = None  # (gain, cost, grouping, groups)
        for grouping in groupings:
            now = chosen[grouping.layer]
            for groups in range(now + 1, _most(grouping, max_groups) + 1):
                gain = grouping.removed(groups) - grouping.removed(now)
                cost = grouping.added(groups) - grouping.added(now)
                if gain > 0 and cost <= allowance and (best is None or _better(gain, cost, best[0], best[1])):
                    best = gain, cost, grouping, groups
        if best is None:
            return {layer: groups for layer, groups in chosen.items() if groups > 1}
        gain, cost, grouping, groups = best
        chosen[grouping.layer] = groups
        allowance -= cost


def _better(gain: int, cost: int, best_gain: int, best_cost: int) -> bool:
    """Whether ``gain / cost`` beats ``best_gain / best_cost`` (exactly, in integers), a tie by the larger gain; an
    equal move found later (a later layer) loses."""
    if gain * best_cost != best_gain * cost:
        return gain * best_cost > best_gain * cost
    return gain > best_gain


def best_layers(groupings: Sequence[LayerGrouping], k: int, max_groups: int | None) -> dict[str, int]:
    """Layer -> number of copies for the ``k`` layers whose split into at most ``max_groups`` groups removes the
    most conflicts (ties in ``groupings`` order), each with the fewest groups that remove that many; layers whose
    split removes nothing are left out. Without ``max_groups`` these are the layers ``top(k)`` takes, with no more
    copies than needed to remove all of their conflicts."""
    fewest = {}
    for grouping in groupings:
        most = _most(grouping, max_groups)
        if grouping.removed(most) > 0:
            fewest[grouping.layer] = next(g for g in range(2, most + 1)
                                          if grouping.removed(g) == grouping.removed(most))
    removed = {grouping.layer: grouping.removed(fewest[grouping.layer]) for grouping in groupings
               if grouping.layer in fewest}
    ranked = sorted(removed, key=lambda layer: -removed[layer])  # stable: ties in network order
    return {layer: fewest[layer] for layer in ranked[:k]}


def _most(grouping: LayerGrouping, max_groups: int | None) -> int:
    return len(grouping.tasks) if max_groups is None else min(max_groups, len(grouping.tasks))


def check_partition(layer: object, value: object, tasks: Sequence[str]) -> list[list[str]] | str:
    """A selection entry checked: ``"each"``, or a partition of ``tasks`` (a list of groups of task names, every
    task in exactly one group, at least two groups) as a list of lists; a :class:`~fxsplit.PartitionError` names
    what is wrong.

    >>> check_partition("conv", [["a", "b"], ("c",)], ["a", "b", "c"])
    [['a', 'b'], ['c']]
    >>> check_partition("conv", [["a", "b"], ["b", "c"]], ["a", "b", "c"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxsplit.errors.PartitionError: task 'b' is named twice in the groups of layer 'conv'; put each task in ...
    """
    if not isinstance(layer, str):
        raise LayerError(f"a grouped selection maps layer names (str) to groups, got the key {layer!r}.")
    if value == EACH:
        return EACH
    where = f"of layer {layer!r}"
    if isinstance(value, (str, Mapping)) or not isinstance(value, Iterable):
        raise PartitionError(f"the groups {where} must be a list of lists of task names, or {EACH!r} (one copy per "
                             f"task), got {value!r}.")
    groups = [_group(group, where) for group in value]
    seen = set()
    for group in groups:
        for task in group:
            if task not in tasks:
                close = difflib.get_close_matches(task, tasks, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise PartitionError(f"task {task!r} in the groups {where} is not one of the tasks "
                                     f"{list(tasks)}.{hint}")
            if task in seen:
                raise PartitionError(f"task {task!r} is named twice in the groups {where}; put each task in exactly "
                                     f"one group.")
            seen.add(task)
    missing = [task for task in tasks if task not in seen]
    if missing:
        raise PartitionError(f"task(s) {missing} are in no group {where}; every task must be in one group (a group "
                             f"of its own for a copy of its own).")
    if len(groups) < 2:
        raise PartitionError(f"one group {where} splits nothing; give two groups or more, or leave {layer!r} out "
                             f"of the selection.")
    return groups


def _group(group: object, where: str) -> list[str]:
    if isinstance(group, str) or not isinstance(group, Iterable):
        raise PartitionError(f"each group {where} must be a list of task names, got {group!r}; write "
                             f"[[{group!r}, ...], ...].")
    group = list(group)
    if not group:
        raise PartitionError(f"the groups {where} include an empty group; every group needs a task.")
    for task in group:
        if not isinstance(task, str):
            raise PartitionError(f"groups {where} list task names (str), got {type(task).__name__} {task!r}.")
    return group


def streams(partitions: Mapping[str, list[list[str]] | str], tasks: Sequence[str]) -> list[list[list[str]]]:
    """The streams of tasks after each layer of ``partitions`` (in its order): a stream is the tasks that have
    passed the same copies so far, so each layer splits every stream along its groups.

    >>> streams({"l1": [["a", "b"], ["c", "d"]], "l2": [["a", "c"], ["b", "d"]]}, "abcd")
    [[['a', 'b'], ['c', 'd']], [['a'], ['b'], ['c'], ['d']]]
    """
    current, depths = [list(tasks)], []
    for value in partitions.values():
        groups = [[task] for task in tasks] if value == EACH else value
        current = [[task for task in stream if task in group] for stream in current for group in groups]
        current = [stream for stream in current if stream]
        depths.append(current)
    return depths
