"""``ConflictReport``: what :func:`fxsplit.analyze` measured, with rankings, selections, JSON and a plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

import networkx as nx

from .compute import added
from .errors import FxsplitError, LayerError, ReportError, unknown_layer
from .outputs import Paths, part_from_json

FORMAT = "fxsplit.ConflictReport/2"
PRINTED = 20  # rows of the top layers that ``print(report)`` shows
FEW_STEPS = 20  # a report from fewer scored steps warns that its ranking is mostly noise
CHOSEN, SHARED = "tab:red", "tab:blue"  # bar colours of the plot
READABLE = ("fxsplit.ConflictReport/1", FORMAT)  # version 1 files lack ``skipped`` (it was always 0)


class LayerSelection(list):
    """Layer names chosen from a report; carries the report's tasks and which part of the output each task's loss
    read, so ``fxsplit.rewrite(model, selection)`` needs no other argument."""

    def __init__(self, layers, tasks, outputs=None):
        super().__init__(layers)
        self.tasks = list(tasks)
        self.outputs = None if outputs is None else {task: part_from_json(part) for task, part in outputs.items()}


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
    keys), as :func:`fxsplit.analyze` found it; a selection passes it on to ``rewrite``.

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
        return LayerSelection(list(self.ranking())[:k], self.tasks, self.outputs)

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
        allowance = math.inf if budget is None else budget * sum(n for _, n in self.graph.nodes(data="params"))
        compute = math.inf if flops is None else flops * self.model_flops
        chosen = []
        for layer, score in self.ranking().items():
            if score > 0 and self.cost(layer) <= allowance and (flops is None or
                                                                 self.flops([*chosen, layer]) <= compute):
                chosen.append(layer)
                allowance -= self.cost(layer)
        return LayerSelection(chosen, self.tasks, self.outputs)

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
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "graph"}
        data["graph"] = nx.node_link_data(_bare(self.graph), edges="edges")
        return {"format": FORMAT, **data}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report as JSON (written whole, or not at all)."""
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

