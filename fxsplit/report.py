"""``ConflictReport``: what :func:`fxsplit.analyze` measured, with rankings, selections, JSON and a plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import networkx as nx
import numpy as np

from .compute import added
from .errors import FxsplitError, LayerError, ReportError, unknown_layer
from .grouping import EACH, LayerGrouping, best_layers, check_partition, copies, streams, within_budget
from .outputs import Paths, part_from_json

FORMAT = "fxsplit.ConflictReport/2"
PRINTED = 20  # rows of the top layers that ``print(report)`` shows
FEW_STEPS = 20  # a report from fewer scored steps warns that its ranking is mostly noise
CHOSEN, SHARED = "tab:red", "tab:blue"  # bar colours of the plot
READABLE = ("fxsplit.ConflictReport/1", FORMAT)  # version 1 files lack ``skipped`` (it was always 0)


class LayerSelection(list):
    """Layer names chosen from a report; carries what ``fxsplit.rewrite(model, selection)`` needs besides: the
    report's tasks, which part of the output each task's loss read, the example call the trace was checked on
    (``example``, ``(args, kwargs)``; ``None`` from a report loaded from JSON), the route that traced the model and
    why (``route``, ``route_reason``), and the parameters each chosen layer holds in the report's model
    (``parameters``: layer -> (names, count)), by which rewrite tells a report for another model."""

    def __init__(self, layers, tasks, outputs=None, *, example=None, route=None, route_reason=None,
                 parameters=None):
        super().__init__(layers)
        _carry(self, tasks, outputs, example, route, route_reason, parameters)


class GroupedSelection(dict):
    """Layer -> the groups of tasks that share each of its copies: a partition of the tasks (``[["a", "b"],
    ["c"]]``: one copy per group) or ``"each"`` (one copy per task). Checked when made: a
    :class:`~fxsplit.PartitionError` names a task that is unknown, in two groups or in none, or a single group.
    Carries what ``rewrite`` takes from the report as :class:`LayerSelection` does.

    ``report.groups(...)`` makes one with the evidence: ``groupings[layer]`` (the layer's task tree, a
    :class:`fxsplit.grouping.LayerGrouping`), ``model_params`` and ``threshold``; ``print(selection)`` then shows,
    per layer in network order, the groups, the conflict rates within and between them, the parameters added
    and the conflicts removed, and :meth:`plot` draws the tree of streams and each layer's pair conflict rates.

    >>> selection = GroupedSelection({"conv": [["a", "b"], ["c"]], "fc": "each"}, ["a", "b", "c"])
    >>> print(selection)
    Grouped split of 2 layers for 3 tasks
    conv: 2 groups, 2 streams after it
      groups: a b | c
    fc: each task its own copy, 3 streams after it
    """

    def __init__(self, groups, tasks, outputs=None, *, groupings=None, model_params=None, threshold=None,
                 example=None, route=None, route_reason=None, parameters=None):
        if not isinstance(groups, Mapping):
            raise LayerError(f"a grouped selection maps layer names to groups of tasks, got {type(groups).__name__}; "
                             f"for one copy per task, pass the layer names as a list.")
        super().__init__({layer: check_partition(layer, value, list(tasks)) for layer, value in groups.items()})
        _carry(self, tasks, outputs, example, route, route_reason, parameters)
        self.groupings: dict[str, LayerGrouping] = dict(groupings or {})
        self.model_params, self.threshold = model_params, threshold

    def __setitem__(self, layer, groups):
        super().__setitem__(layer, check_partition(layer, groups, self.tasks))

    def __str__(self) -> str:
        lines = [f"Grouped split of {len(self)} layer{'s' * (len(self) != 1)} for {len(self.tasks)} tasks"]
        known = {layer: self.groupings[layer].summary(value) for layer, value in self.items()
                 if layer in self.groupings}
        if known and len(known) == len(self):
            groupings = [self.groupings[layer] for layer in known]
            added = sum(summary.added for summary in known.values())
            share = f" ({added / self.model_params:.1%} of the model's {self.model_params:,})" \
                if self.model_params else ""
            lines[0] += f": adds {added:,} parameters{share}"
            each = sum(grouping.added(len(grouping.tasks)) for grouping in groupings)
            lines.append(f"removes {sum(summary.removed for summary in known.values()):,} conflicts (cosine < "
                         f"{self.threshold}, {groupings[0].steps} steps); one copy per task on these layers: adds "
                         f"{each:,}, removes {sum(grouping.total for grouping in groupings):,}")
        for (layer, value), after in zip(self.items(), streams(self, self.tasks)):
            lines += self._describe(layer, value, len(after), known.get(layer))
        return "\n".join(lines)

    def _describe(self, layer: str, value, streams_after: int, summary) -> list[str]:
        split = "each task its own copy" if value == EACH else f"{len(value)} groups"
        lines = [f"{layer}: {split}, {streams_after} streams after it"]
        if summary is not None:
            grouping = self.groupings[layer]
            lines[0] += (f"; {len(summary.copies)} copies of {grouping.params:,} parameters add {summary.added:,} and "
                         f"remove {summary.removed:,} of its {grouping.total:,} conflicts")
        if value != EACH:
            lines.append("  groups: " + " | ".join(" ".join(group) for group in value))
        if summary is not None:
            lines.append(f"  conflict rate per step: within groups {_rate(summary.within)}, "
                         f"between groups {_rate(summary.between)}")
        return lines

    def plot(self, path: str | os.PathLike | None = None):
        """The tree of task streams by depth (the selection's layers in order: each splits the streams along its
        groups) and, per layer with evidence, the heat map of its pair conflict rates with its groups framed
        (needs matplotlib); saved to ``path`` if given."""
        plt = _pyplot(path)
        maps = [self.groupings[layer] for layer in self if layer in self.groupings]
        columns = min(4, max(len(maps), 1))
        rows = 1 + -(-len(maps) // columns)
        figure = plt.figure(figsize=(3.2 * columns, 0.25 * len(self.tasks) + 3.0 * rows), layout="constrained")
        grid = figure.add_gridspec(rows, columns)
        _tree(figure.add_subplot(grid[0, :]), self)
        panels = [figure.add_subplot(grid[1 + n // columns, n % columns]) for n in range(len(maps))]
        for axes, grouping in zip(panels, maps):
            image = _heat_map(axes, grouping, self[grouping.layer])
        if maps:
            figure.colorbar(image, ax=panels, label="conflict rate per step", shrink=0.8)
        if path is not None:
            figure.savefig(path, dpi=120)
            plt.close(figure)
        return figure


def _carry(selection, tasks, outputs, example=None, route=None, route_reason=None, parameters=None) -> None:
    """Give a selection what ``rewrite`` takes from the report (:class:`LayerSelection` says what each is)."""
    selection.tasks = list(tasks)
    selection.outputs = None if outputs is None else {task: part_from_json(part) for task, part in outputs.items()}
    selection.example, selection.route, selection.route_reason = example, route, route_reason
    selection.parameters = dict(parameters or {})


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.3f}"


@dataclass
class ConflictReport:
    """Recon conflict scores of every shared layer, and what the paper plots.

    ``counts[k][l][p]`` is the number of steps at which the gradients of task pair ``pairs[p]`` on layer
    ``layers[l]`` had cosine < ``thresholds[k]``; a layer's score sums that over pairs. ``mean_cosine[l][p]`` and
    ``histogram[l]`` (``bins`` equal bins over [-1, 1]) describe the cosines; ``whole_cosine[s][p]`` is the cosine
    at step ``s`` over all scored layers' parameters together. ``reach[layer]`` lists the tasks whose losses
    reach a layer (:meth:`users`, those whose outputs use it, who get its copies); ``left_out[layer]`` says why a
    layer was not scored. ``skipped`` counts the steps left unscored because their gradients were not finite (a
    ``GradScaler``'s overflow steps, which it skips too). ``outputs`` gives, per task, the key path of the part of
    the model's output its loss read (``[]``: the whole output; a list of paths where it read parts of several
    keys), as :func:`fxsplit.analyze` found it; a selection passes it on to ``rewrite``. ``route`` and
    ``route_reason`` say how the model was traced (``"fx"`` or ``"export"``) and why, as the graph records them.
    ``example`` is the call ``(args, kwargs)`` of the model that the trace was checked on (analyze's first batch), so
    that a selection splits on the same route, checked on it; it is kept in memory only: :meth:`save` writes no
    tensors, and a loaded report has none.

    Steps where only some tasks had a loss: ``pair_steps[p]`` is the number of scored steps at which both tasks of
    ``pairs[p]`` had one, the steps its counts and ``mean_cosine`` are over (``whole_cosine`` is ``None`` at the
    others). A pair's *rate* on a layer is its count over its pair steps; a layer's rate (:meth:`rates_at`) sums its
    pairs' rates: its score per step, as if every pair were scored at every step. :meth:`ranking`, which ``top`` and
    ``within`` follow, ranks by score when every pair was scored equally often (fully labelled steps: the score
    divided by the steps, the same order) and by rate otherwise, so that a pair scored at few steps neither vanishes
    nor dominates; a pair never scored (its tasks never had a loss at one step) adds nothing. A report saved without
    ``pair_steps`` (before it existed) was fully labelled: every pair was scored at every step.

    :meth:`flops` is what a split adds in compute (FLOPs per sample, by the profile in ``graph.graph["compute"]``
    that analyze measures on its first batch), :meth:`describe` a selection's parameters and FLOPs together.

    ``print(report)`` shows the 20 top-ranked layers (and how many more there are) and ends with a ``warning:``
    line when the ranking is likely noise: fewer than 20 scored steps, or a tie at the top (tied layers are ranked
    in network order). ``plot(path, chosen=report.top(k))`` draws the scores per layer with the chosen ones marked.
    """

    tasks: list[str]
    thresholds: list[float]
    layers: list[str]
    pairs: list[list[str]]
    counts: list[list[list[int]]]
    mean_cosine: list[list[float | None]]
    histogram: list[list[int]]
    whole_cosine: list[list[float]]
    steps: int
    reach: dict[str, list[str]]
    left_out: dict[str, str]
    graph: nx.DiGraph = field(repr=False)
    skipped: int = 0
    outputs: dict[str, list] | None = None
    example: tuple[tuple, dict] | None = field(default=None, repr=False, compare=False)
    pair_steps: list[int] | None = None

    def __post_init__(self):
        if self.pair_steps is None:
            self.pair_steps = [self.steps] * len(self.pairs)
        if len(self.pair_steps) != len(self.pairs):
            raise ReportError(f"pair_steps has {len(self.pair_steps)} entries for {len(self.pairs)} task pairs: one "
                              f"per pair, the steps it was scored at.")
        for k, threshold in enumerate(self.thresholds):
            for layer, score in self.scores_at(threshold).items():
                self.graph.nodes[layer].setdefault("scores", {})[threshold] = score
            for layer in self.layers:
                self.graph.nodes[layer]["score"] = self.scores[layer]
        for layer, reason in self.left_out.items():
            self.graph.nodes[layer]["left_out"] = reason

    @property
    def route(self) -> str | None:
        """How the model was traced: ``"fx"`` or ``"export"`` (``None`` for a graph that does not say)."""
        return self.graph.graph.get("route")

    @property
    def route_reason(self) -> str | None:
        """Why that route: as the trace recorded it."""
        return self.graph.graph.get("route_reason")

    @property
    def scores(self) -> dict[str, int]:
        """Layer -> score at the primary threshold, highest first (ties in graph order)."""
        return self.scores_at(self.thresholds[0])

    def scores_at(self, threshold: float) -> dict[str, int]:
        """Layer -> score at one of the report's thresholds, highest first (ties in graph order)."""
        k = self._threshold_index(threshold)
        totals = {layer: sum(self.counts[k][l]) for l, layer in enumerate(self.layers)}
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def rates_at(self, threshold: float | None = None) -> dict[str, float]:
        """Layer -> its rate at ``threshold`` (default: the primary one): the sum over its pairs of count / pair
        steps (a pair never scored adds 0), highest first (ties in graph order)."""
        rates = {layer: sum(rate for rate in pairs.values() if rate is not None)
                 for layer, pairs in self.pair_rates(threshold).items()}
        return dict(sorted(rates.items(), key=lambda item: -item[1]))

    def pair_rates(self, threshold: float | None = None) -> dict[str, dict[tuple[str, str], float | None]]:
        """Layer -> {(task, task): count / pair steps} at ``threshold`` (default: the primary one), in graph order;
        ``None`` for a pair never scored."""
        steps = dict(zip(map(tuple, self.pairs), self.pair_steps))
        return {layer: {pair: n / steps[pair] if steps[pair] else None for pair, n in counts.items()}
                for layer, counts in self.pair_counts(threshold).items()}

    def ranking(self, threshold: float | None = None) -> dict[str, float]:
        """What ``top`` and ``within`` rank by, highest first: the scores (:meth:`scores_at`) when every pair was
        scored at the same number of steps, else the rates (:meth:`rates_at`)."""
        threshold = self.thresholds[0] if threshold is None else threshold
        return self.scores_at(threshold) if self.equal_pair_steps else self.rates_at(threshold)

    @property
    def equal_pair_steps(self) -> bool:
        """Whether every task pair was scored at the same number of steps (as with fully labelled steps)."""
        return len(set(self.pair_steps)) <= 1

    def pair_counts(self, threshold: float | None = None) -> dict[str, dict[tuple[str, str], int]]:
        """Layer -> {(task, task): count} at ``threshold`` (default: the primary one), in graph order."""
        k = self._threshold_index(self.thresholds[0] if threshold is None else threshold)
        return {layer: {tuple(pair): n for pair, n in zip(self.pairs, self.counts[k][l])}
                for l, layer in enumerate(self.layers)}

    def cost(self, layer: str, groups=EACH) -> int:
        """Parameters that splitting ``layer`` adds: (copies - 1) x its parameters. A copy goes to each task of
        :meth:`users`, for whom :func:`fxsplit.rewrite` makes the copies, or with ``groups`` (a partition of the
        tasks, as in a :class:`GroupedSelection`) to each group that holds one of them."""
        kept = copies(check_partition(layer, groups, self.tasks), self.users(layer))
        return (len(kept) - 1) * self.graph.nodes[layer]["params"]

    def users(self, layer: str) -> list[str]:
        """The tasks whose outputs use ``layer``, in task order: splitting it gives each of them a copy.

        Recon's split network runs one stream per task from the first split layer on, and task ``t``'s head reads
        stream ``t``: every task whose output is computed with a layer gets a copy of it, as ``rewrite`` makes
        them. The tasks whose losses reach the layer (``reach``, which the scores count) are among them; a task
        whose output uses it but whose loss does not reach it (a probe on detached features) gets a copy too,
        which its loss never trains.
        """
        if layer not in self.reach:
            raise unknown_layer(layer, self.reach)
        fed = self.graph.nodes[layer].get("outputs")
        if fed is None:  # a graph that does not say which outputs a layer feeds (made by hand, or saved before)
            return list(self.reach[layer])
        using = self._fed(fed)
        return [task for task in self.tasks if task in using or task in self.reach[layer]]

    def _fed(self, paths: list[list]) -> set[str]:
        """The tasks whose part of the output holds one of the leaves at ``paths``."""
        return {task for task in self.tasks for part in self._parts(task) for path in paths
                if path[:len(part)] == part}

    def flops(self, layers: str | Iterable[str]) -> float:
        """FLOPs per sample that splitting ``layers`` (one name, or a selection) adds to the model's forward pass.

        Recon's split runs one stream per task from the first split layer on: every traced node downstream of a
        split layer (its own call among them) runs once per task whose output it feeds. The added FLOPs are the sum
        over those nodes of (tasks fed - 1) x their FLOPs, as ``torch.utils.flop_counter.FlopCounterMode`` counts
        them (matrix products, convolutions, attention), per sample of the batch they were measured on: analyze's
        first batch, or the example given to ``fxsplit.layer_graph``. :attr:`model_flops` is the model's own.
        """
        compute = self._compute()
        layers = [layers] if isinstance(layers, str) else list(layers)
        for layer in layers:
            if layer not in self.graph:
                raise unknown_layer(layer, self.graph)
        return added(compute, [self.graph.nodes[layer]["order"] for layer in layers], lambda fed: len(self._fed(fed)))

    @property
    def model_flops(self) -> float:
        """The model's forward FLOPs per sample, as :meth:`flops` counts them."""
        return self._compute()["model"]

    def _compute(self) -> dict:
        compute = self.graph.graph.get("compute")
        if compute is None:
            raise ReportError("this report has no compute profile: FLOPs are measured on an example, which analyze "
                              "takes from its first batch; for a ConflictMonitor pass graph=fxsplit.layer_graph(model, "
                              "example_inputs=x). A model whose forward call reads more than its graph is not "
                              "measured.")
        return compute

    def describe(self, layers: Iterable[str]) -> str:
        """What splitting ``layers`` adds, in parameters and (when measured) in FLOPs per sample, e.g.
        ``"3 layers: +1,056 parameters (+2.1%), +120 kFLOPs per sample (+8.0%)"``."""
        layers = list(layers)
        params = sum(self.cost(layer) for layer in layers)
        total = sum(count for _, count in self.graph.nodes(data="params"))
        text = f"{len(layers)} layers: +{params:,} parameters ({_share(params, total)})"
        if self.graph.graph.get("compute") is not None:
            flops = self.flops(layers)
            text += f", +{_flops(flops)} per sample ({_share(flops, self.model_flops)})"
        return text

    def _parts(self, task: str) -> list[list]:
        """The key paths of ``task``'s part of the output: as analyze found it, else as ``rewrite`` reads it without
        ``outputs=`` (its key of an output keyed by task, else the whole output)."""
        if self.outputs is not None and task in self.outputs:
            part = part_from_json(self.outputs[task])
            return [list(path) for path in part] if isinstance(part, Paths) else [list(part)]
        keyed = any(path[:1] == [task] for path in self.graph.graph.get("outputs", []))
        return [[task]] if keyed else [[]]

    def top(self, k: int) -> LayerSelection:
        """The ``k`` top-ranked layers (by :meth:`ranking`)."""
        if not isinstance(k, int) or k < 0:
            raise LayerError(f"top(k) needs a count k >= 0, got {k!r}.")
        return self._selection(list(self.ranking())[:k])

    def within(self, budget: float | None = None, *, flops: float | None = None) -> LayerSelection:
        """Layers in :meth:`ranking` order (score > 0) whose split adds at most ``budget`` x the model's parameters
        (by :meth:`cost`: the copies ``rewrite`` makes) and at most ``flops`` x the model's FLOPs per sample (by
        :meth:`flops`); either budget may be left out. A layer that would overshoot is skipped and the next ones
        are tried."""
        for name, value in (("budget", budget), ("flops", flops)):
            if value is not None and not value >= 0:
                raise LayerError(f"within({name}=...) needs a fraction >= 0 of the model's "
                                 f"{'parameters' if name == 'budget' else 'FLOPs'}, got {value!r}.")
        if budget is None and flops is None:
            raise LayerError("within() needs a budget: within(0.05) (parameters) and/or within(flops=0.5).")
        allowance = math.inf if budget is None else budget * self._model_params()
        compute = math.inf if flops is None else flops * self.model_flops
        chosen = []
        for layer, score in self.ranking().items():
            if score > 0 and self.cost(layer) <= allowance and (flops is None or
                                                                 self.flops([*chosen, layer]) <= compute):
                chosen.append(layer)
                allowance -= self.cost(layer)
        return self._selection(chosen)

    def _selection(self, layers: list[str]) -> LayerSelection:
        return LayerSelection(layers, self.tasks, self.outputs, **self._carried(layers))

    def _carried(self, layers) -> dict:
        """What a selection of ``layers`` carries to ``rewrite`` besides tasks and outputs: the example call, the
        route, and the parameters of each layer (where the graph names them)."""
        nodes = self.graph.nodes
        return dict(example=self.example, route=self.route, route_reason=self.route_reason,
                    parameters={layer: (list(nodes[layer]["parameters"]), nodes[layer]["params"])
                                for layer in layers if {"parameters", "params"} <= nodes[layer].keys()})

    def groups(self, budget: float | None = None, *, k: int | None = None, max_groups: int | None = None,
               threshold: float | None = None) -> GroupedSelection:
        """A grouped split chosen from the pair counts: layers, and per layer the groups of tasks sharing a copy.

        Per layer with conflicts, the tasks that use it are clustered by average linkage on their pairwise
        conflict counts (:func:`fxsplit.grouping.average_linkage`: tasks that conflict often end in different
        groups). Cutting its tree into ``g`` groups removes the conflicts of the pairs it separates and adds
        ``(g - 1)`` x the layer's parameters (as :meth:`cost`). Give one of:

        - ``budget``: the split adds at most ``budget`` x the model's parameters (as :meth:`within`); moves (a
          layer to more groups) are taken greedily by conflicts removed per added parameter
          (:func:`fxsplit.grouping.within_budget`);
        - ``k``: the ``k`` layers whose split removes the most, each into the fewest groups that remove as many as
          ``max_groups`` would (:func:`fxsplit.grouping.best_layers`): without ``max_groups``, top(k)'s layers.

        ``max_groups`` caps the groups per layer (default: one per task); ``threshold`` picks the counts (default:
        the primary one). ``print()`` the result to read the decision, ``plot()`` it to see the tree.

        >>> import torch, fxsplit
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> toward = lambda sign: lambda out, x: (out[:, 0] - sign * x.sum(1)).pow(2).mean()
        >>> tasks = {"a": toward(1), "b": toward(1), "c": toward(-1), "d": toward(-1)}
        >>> report = fxsplit.analyze(net, tasks, [torch.randn(16, 4) for _ in range(20)], progress=False)
        >>> report.groups(k=1)
        {'0': [['a', 'b'], ['c', 'd']]}
        """
        if (budget is None) == (k is None):
            raise LayerError("groups() needs one of budget= (a fraction of the model's parameters) or k= (a count "
                             "of layers), not both or neither.")
        if max_groups is not None and (not isinstance(max_groups, int) or isinstance(max_groups, bool)
                                       or max_groups < 2):
            raise LayerError(f"groups(max_groups=) needs a count >= 2 (one group splits nothing), got {max_groups!r}.")
        if not self.equal_pair_steps:
            raise ReportError("groups() clusters tasks by their pairs' conflict counts, which are comparable only when "
                              "every pair was scored at the same steps; this report's pairs were not (steps where "
                              f"only some tasks had a loss: pair_steps {self.pair_steps}). Use top(k) or within(), "
                              "which rank by rate, or score on fully labelled steps.")
        threshold = self.thresholds[0] if threshold is None else threshold
        scores = self.scores_at(threshold)
        groupings = [self._grouping(layer, self._threshold_index(threshold)) for layer in self.layers
                     if scores[layer] > 0]
        if budget is not None:
            if not budget >= 0:
                raise LayerError(f"groups(budget) needs a fraction >= 0 of the model's parameters, got {budget!r}.")
            chosen = within_budget(groupings, budget * self._model_params(), max_groups)
        else:
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                raise LayerError(f"groups(k=) needs a count k >= 0, got {k!r}.")
            chosen = best_layers(groupings, k, max_groups)
        kept = [grouping for grouping in groupings if grouping.layer in chosen]  # network order
        return GroupedSelection({g.layer: g.value(chosen[g.layer]) for g in kept}, self.tasks, self.outputs,
                                groupings={g.layer: g for g in kept}, model_params=self._model_params(),
                                threshold=threshold, **self._carried([g.layer for g in kept]))

    def _grouping(self, layer: str, k: int) -> LayerGrouping:
        """``layer``'s users with their pairwise conflict counts at threshold index ``k``."""
        users = self.users(layer)
        index = {task: i for i, task in enumerate(users)}
        counts = np.zeros((len(users), len(users)), dtype=np.int64)
        for (first, second), count in zip(self.pairs, self.counts[k][self.layers.index(layer)]):
            if first in index and second in index:  # a pair is counted only where both losses reach the layer
                counts[index[first], index[second]] = counts[index[second], index[first]] = count
        return LayerGrouping(layer, tuple(users), counts, self.steps, self.graph.nodes[layer]["params"],
                             others=tuple(task for task in self.tasks if task not in index))

    def _model_params(self) -> int:
        return sum(params for _, params in self.graph.nodes(data="params"))

    def conflict_rate(self, threshold: float) -> dict[tuple[str, str], float | None]:
        """Per task pair, the fraction of its pair steps whose whole-shared-vector cosine is below ``threshold``
        (``None`` for a pair never scored; 0 when no step was)."""
        below = [sum(step[p] is not None and step[p] < threshold for step in self.whole_cosine)
                 for p in range(len(self.pairs))]
        return {tuple(pair): n / steps if steps else (0.0 if not self.steps else None)
                for pair, n, steps in zip(self.pairs, below, self.pair_steps)}

    def __str__(self) -> str:
        rate = "" if self.equal_pair_steps else f"  {'rate':>6}"
        compute = f"  {'FLOPs':>7}" if self.graph.graph.get("compute") is not None else ""
        header = f"{'rank':>4}  {'layer':<40} {'kind':<16} {'params':>10}  {'score':>6}{rate}  mean cos{compute}"
        lines = [f"Conflict scores over {self.steps} steps, tasks {self.tasks}, cosine < {self.thresholds[0]}"]
        if not self.equal_pair_steps:
            steps = ", ".join(f"{a}-{b} {n}" for (a, b), n in zip(self.pairs, self.pair_steps))
            lines.append(f"pairs scored at unequal numbers of steps ({steps}): ranked by rate")
        lines += [header, "-" * len(header)]
        ranked = list(self.ranking())
        lines += [self._row(rank, layer) for rank, layer in enumerate(ranked[:PRINTED], 1)]
        if len(ranked) > PRINTED:
            what = "scores" if self.equal_pair_steps else "rates"
            lines.append(f"... and {len(ranked) - PRINTED} more layers, with {what} "
                         f"{self._rank_value(ranked[PRINTED])} and below")
        if compute:
            lines.append(f"FLOPs: what splitting the layer alone adds to the model's {_flops(self.model_flops)} per "
                         f"sample; top(5): {self.describe(self.top(5))}")
        lines += [f"warning: {caveat}" for caveat in self._caveats()]
        if self.skipped:
            lines.append(f"skipped: {self.skipped} steps whose gradients were not finite")
        if self.left_out:
            lines.append(f"not scored: {len(self.left_out)} layers (e.g. {next(iter(self.left_out.items()))})")
        return "\n".join(lines)

    def _row(self, rank: int, layer: str) -> str:
        node, l = self.graph.nodes[layer], self.layers.index(layer)
        cosines = [c for c in self.mean_cosine[l] if c is not None]
        mean = f"{sum(cosines) / len(cosines):+.3f}" if cosines else "-"
        rate = "" if self.equal_pair_steps else f"  {self._rank_value(layer):>6}"
        compute = "" if self.graph.graph.get("compute") is None else \
            f"  {_share(self.flops(layer), self.model_flops):>7}"
        return (f"{rank:>4}  {layer:<40} {node['kind']:<16} {node['params']:>10,}  {self.scores[layer]:>6}{rate}  "
                f"{mean:<8}{compute}")

    def _rank_value(self, layer: str) -> str:
        value = self.ranking()[layer]
        return str(value) if self.equal_pair_steps else f"{value:.3f}"

    def _caveats(self) -> list[str]:
        """Why the ranking may be noise: few steps, or a tie at the top (broken by network order)."""
        caveats = []
        if self.steps < FEW_STEPS:
            caveats.append(f"only {self.steps} steps were scored: a ranking from fewer than {FEW_STEPS} is mostly "
                           f"noise; score more batches")
        few = [f"{a}-{b} ({n})" for (a, b), n in zip(self.pairs, self.pair_steps) if n < min(FEW_STEPS, self.steps)]
        if few:
            caveats.append(f"pair(s) {', '.join(few)} were scored at fewer steps than {FEW_STEPS}: their rates are "
                           f"mostly noise (0: never, their tasks never had a loss at one step, adding nothing)")
        scores = list(self.ranking().values())
        tied = scores.count(scores[0]) if scores else 0
        if tied > 1:
            what = "score" if self.equal_pair_steps else "rate"
            caveats.append(f"the top {tied} layers tie at {what} {self._rank_value(next(iter(self.ranking())))}: "
                           f"their order is network order, not a ranking; score more batches, or at another threshold")
        return caveats

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("graph", "example")}
        data["graph"] = nx.node_link_data(_bare(self.graph), edges="edges")
        return {"format": FORMAT, **data}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (written whole, or not at all), without the example call, which holds tensors:
        a loaded report's selections are checked on an example only when ``rewrite`` is given one."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(partial, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ConflictReport:
        """Read a report saved with :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise ReportError(f"cannot read a conflict report from {str(path)!r}: {error}") from error
        if not isinstance(data, dict) or data.pop("format", None) not in READABLE:
            raise ReportError(f"{str(path)!r} is not an fxsplit conflict report (no format {FORMAT!r}).")
        try:
            data["graph"] = nx.node_link_graph(data["graph"], edges="edges")
            return cls(**data)
        except (KeyError, TypeError, ValueError, nx.NetworkXError) as error:
            raise ReportError(f"{str(path)!r} is a damaged conflict report: {type(error).__name__}: {error}") \
                from error

    def plot(self, path: str | os.PathLike | None = None, threshold: float | None = None,
             chosen: Iterable[str] = ()):
        """Horizontal bar chart of scores per layer, named, in network order from the top, with the ``chosen``
        layers (e.g. ``report.top(k)``) marked (needs matplotlib); saved to ``path`` if given."""
        plt = _pyplot(path)
        from matplotlib.patches import Patch
        from matplotlib.ticker import MaxNLocator
        threshold = self.thresholds[0] if threshold is None else threshold
        scores, chosen = self.scores_at(threshold), self._scored(chosen)
        figure, axes = plt.subplots(figsize=(7.0, 1.2 + 0.2 * len(self.layers)))
        axes.barh(range(len(self.layers)), [scores[layer] for layer in self.layers], height=0.7,
                  color=[CHOSEN if layer in chosen else SHARED for layer in self.layers])
        axes.set_yticks(range(len(self.layers)), self.layers, fontsize=8)
        axes.invert_yaxis()  # the network's first layer on top, as one reads it
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # scores are counts
        axes.set_xlabel(f"conflict score (cos < {threshold})")
        axes.set_title(f"{self.steps} steps, tasks {', '.join(self.tasks)}", fontsize=10)
        if chosen:
            axes.legend(handles=[Patch(color=CHOSEN, label=f"chosen ({len(chosen)})"),
                                 Patch(color=SHARED, label="left shared")], loc="best")
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
            plt.close(figure)
        return figure

    def _scored(self, layers: Iterable[str]) -> set[str]:
        layers = set(layers)
        unknown = sorted(layers - set(self.layers))
        if unknown:
            raise LayerError(f"chosen layer(s) {unknown} are not scored in this report; report.layers lists the "
                             f"{len(self.layers)} it scored.")
        return layers

    def _threshold_index(self, threshold: float) -> int:
        try:
            return self.thresholds.index(threshold)
        except ValueError:
            raise ReportError(f"threshold {threshold} was not scored; the report has {self.thresholds}.") from None


def _flops(count: float) -> str:
    """``count`` FLOPs with a unit prefix: ``"1.2 GFLOPs"``."""
    scale, prefix = next(((10.0 ** power, prefix) for power, prefix in ((12, "T"), (9, "G"), (6, "M"), (3, "k"))
                          if count >= 10.0 ** power), (1.0, ""))
    return f"{count / scale:.3g} {prefix}FLOPs"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:+.1f}%" if whole else "-"


def _bare(graph: nx.DiGraph) -> nx.DiGraph:
    """The layer graph without the attributes the report adds (they are rebuilt on load)."""
    bare = graph.copy()
    for _, data in bare.nodes(data=True):
        for key in ("score", "scores", "left_out"):
            data.pop(key, None)
    return bare



def _pyplot(path):
    """``matplotlib.pyplot``, drawing off screen when the figure goes to a file; an error naming the extra."""
    try:
        import matplotlib
        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise FxsplitError("plotting needs matplotlib: pip install matplotlib") from error
    return plt


def _tree(axes, selection: GroupedSelection) -> None:
    """An icicle of the streams: column 0 all tasks, column d the streams after the selection's d-th layer."""
    depths = [[list(selection.tasks)], *streams(selection, selection.tasks)]
    final = {task: n for n, stream in enumerate(depths[-1]) for task in stream}
    row = {task: n for n, task in enumerate(sorted(selection.tasks, key=lambda task: final[task]))}
    for depth, current in enumerate(depths):
        for stream in current:
            rows = sorted(row[task] for task in stream)
            axes.bar(depth, rows[-1] - rows[0] + 0.8, bottom=rows[0] - 0.4, width=0.85,
                     color=SHARED if len(stream) > 1 else CHOSEN, alpha=0.35 + 0.65 / len(stream) ** 0.5)
    axes.set_yticks(range(len(row)), sorted(row, key=row.get), fontsize=7)
    axes.invert_yaxis()
    axes.set_xticks(range(len(depths)), ["shared", *selection], rotation=30, ha="right", fontsize=7)
    axes.set_title("streams by depth: each split layer divides them along its groups (red: one task)", fontsize=9)


def _heat_map(axes, grouping: LayerGrouping, value):
    """The pair conflict rates of a layer's users, ordered by its groups (tree order inside), groups framed."""
    leaf = {task: n for n, task in enumerate(grouping.order)}
    groups = sorted((sorted(group, key=leaf.get) for group in copies(value, grouping.tasks)), key=lambda g: leaf[g[0]])
    order = [grouping.tasks.index(task) for group in groups for task in group]
    rates = grouping.counts[np.ix_(order, order)] / max(grouping.steps, 1)
    image = axes.imshow(rates, cmap="Reds", vmin=0.0, vmax=1.0)
    names = [grouping.tasks[i] for i in order]
    axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axes.set_yticks(range(len(names)), names, fontsize=6)
    start = 0
    for group in groups:
        axes.add_patch(_frame(start - 0.5, len(group)))
        start += len(group)
    axes.set_title(f"{grouping.layer}: {len(groups)} copies", fontsize=8)
    return image


def _frame(corner: float, size: int):
    from matplotlib.patches import Rectangle
    return Rectangle((corner, corner), size, size, fill=False, edgecolor="black", linewidth=1.2)
