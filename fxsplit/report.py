"""``ConflictReport``: what :func:`fxsplit.analyze` measured, with rankings, selections, JSON and a plot."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import networkx as nx

from .errors import FxsplitError, LayerError, ReportError, unknown_layer
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
        self.tasks = list(tasks)
        self.outputs = None if outputs is None else {task: part_from_json(part) for task, part in outputs.items()}
        self.example = example
        self.route = route
        self.route_reason = route_reason
        self.parameters = dict(parameters or {})


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

    def __post_init__(self):
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

    def pair_counts(self, threshold: float | None = None) -> dict[str, dict[tuple[str, str], int]]:
        """Layer -> {(task, task): count} at ``threshold`` (default: the primary one), in graph order."""
        k = self._threshold_index(self.thresholds[0] if threshold is None else threshold)
        return {layer: {tuple(pair): n for pair, n in zip(self.pairs, self.counts[k][l])}
                for l, layer in enumerate(self.layers)}

    def cost(self, layer: str) -> int:
        """Parameters that splitting ``layer`` adds: (tasks that use it - 1) x its parameters, with the tasks of
        :meth:`users`, for whom :func:`fxsplit.rewrite` makes the copies."""
        return (len(self.users(layer)) - 1) * self.graph.nodes[layer]["params"]

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
        using = {task for task in self.tasks for part in self._parts(task) for path in fed
                 if path[:len(part)] == part}
        return [task for task in self.tasks if task in using or task in self.reach[layer]]

    def _parts(self, task: str) -> list[list]:
        """The key paths of ``task``'s part of the output: as analyze found it, else as ``rewrite`` reads it without
        ``outputs=`` (its key of an output keyed by task, else the whole output)."""
        if self.outputs is not None and task in self.outputs:
            part = part_from_json(self.outputs[task])
            return [list(path) for path in part] if isinstance(part, Paths) else [list(part)]
        keyed = any(path[:1] == [task] for path in self.graph.graph.get("outputs", []))
        return [[task]] if keyed else [[]]

    def top(self, k: int) -> LayerSelection:
        """The ``k`` highest-scoring layers."""
        if not isinstance(k, int) or k < 0:
            raise LayerError(f"top(k) needs a count k >= 0, got {k!r}.")
        return self._selection(list(self.scores)[:k])

    def within(self, budget: float) -> LayerSelection:
        """Layers in ranking order (score > 0) whose split adds at most ``budget`` x the model's parameters (by
        :meth:`cost`: the copies ``rewrite`` makes); a layer that would overshoot is skipped and the next ones are
        tried."""
        if not budget >= 0:
            raise LayerError(f"within(budget) needs a fraction >= 0 of the model's parameters, got {budget!r}.")
        allowance = budget * sum(params for _, params in self.graph.nodes(data="params"))
        chosen = []
        for layer, score in self.scores.items():
            if score > 0 and self.cost(layer) <= allowance:
                chosen.append(layer)
                allowance -= self.cost(layer)
        return self._selection(chosen)

    def _selection(self, layers: list[str]) -> LayerSelection:
        """``layers`` with what ``rewrite`` takes from the report: tasks, outputs, example call, route, and the
        parameters of each layer (where the graph names them)."""
        nodes = self.graph.nodes
        return LayerSelection(layers, self.tasks, self.outputs, example=self.example, route=self.route,
                              route_reason=self.route_reason, parameters={layer: (list(nodes[layer]["parameters"]), nodes[layer]["params"])
                                          for layer in layers if {"parameters", "params"} <= nodes[layer].keys()})

    def conflict_rate(self, threshold: float) -> dict[tuple[str, str], float]:
        """Per task pair, the fraction of steps whose whole-shared-vector cosine is below ``threshold``."""
        return {tuple(pair): sum(step[p] < threshold for step in self.whole_cosine) / max(self.steps, 1)
                for p, pair in enumerate(self.pairs)}

    def __str__(self) -> str:
        header = f"{'rank':>4}  {'layer':<40} {'kind':<16} {'params':>10}  {'score':>6}  mean cos"
        lines = [f"Conflict scores over {self.steps} steps, tasks {self.tasks}, cosine < {self.thresholds[0]}",
                 header, "-" * len(header)]
        ranked = list(self.scores.items())
        lines += [self._row(rank, layer, score) for rank, (layer, score) in enumerate(ranked[:PRINTED], 1)]
        if len(ranked) > PRINTED:
            lines.append(f"... and {len(ranked) - PRINTED} more layers, with scores {ranked[PRINTED][1]} and below")
        lines += [f"warning: {caveat}" for caveat in self._caveats()]
        if self.skipped:
            lines.append(f"skipped: {self.skipped} steps whose gradients were not finite")
        if self.left_out:
            lines.append(f"not scored: {len(self.left_out)} layers (e.g. {next(iter(self.left_out.items()))})")
        return "\n".join(lines)

    def _row(self, rank: int, layer: str, score: int) -> str:
        node, l = self.graph.nodes[layer], self.layers.index(layer)
        cosines = [c for c in self.mean_cosine[l] if c is not None]
        mean = f"{sum(cosines) / len(cosines):+.3f}" if cosines else "-"
        return f"{rank:>4}  {layer:<40} {node['kind']:<16} {node['params']:>10,}  {score:>6}  {mean}"

    def _caveats(self) -> list[str]:
        """Why the ranking may be noise: few steps, or a tie at the top (broken by network order)."""
        caveats = []
        if self.steps < FEW_STEPS:
            caveats.append(f"only {self.steps} steps were scored: a ranking from fewer than {FEW_STEPS} is mostly "
                           f"noise; score more batches")
        scores = list(self.scores.values())
        tied = scores.count(scores[0]) if scores else 0
        if tied > 1:
            caveats.append(f"the top {tied} layers tie at score {scores[0]}: their order is network order, not a "
                           f"ranking; score more batches, or at another threshold")
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
        try:
            import matplotlib
            if path is not None:
                matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.patches import Patch
            from matplotlib.ticker import MaxNLocator
        except ImportError as error:
            raise FxsplitError("plotting needs matplotlib: pip install matplotlib") from error
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


def _bare(graph: nx.DiGraph) -> nx.DiGraph:
    """The layer graph without the attributes the report adds (they are rebuilt on load)."""
    bare = graph.copy()
    for _, data in bare.nodes(data=True):
        for key in ("score", "scores", "left_out"):
            data.pop(key, None)
    return bare

