"""Figures over seeds: mean ± sd of each arm's figures, and the per-seed paired differences between two arms.

The input is a list of seed runs' figures, as ``fxsplit.experiment.arms.run_seed`` records them (``{"seed", "arms": {name:
figures}}``). Differences are paired: arm minus baseline within each seed, which share data, order and initial
weights, so the seed-to-seed spread that both arms share cancels out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def metrics(arm: dict) -> dict[str, float]:
    """The scalar figures of one arm in one seed, by name.

    >>> metrics({"mean_accuracy": 0.9, "accuracy": {"a": 0.8, "b": 1.0}, "conflict_rate": {"-0.1": 0.25},
    ...          "params": 10, "increase": 0.0})
    {'accuracy': 0.9, 'accuracy a': 0.8, 'accuracy b': 1.0, 'conflicts cos<-0.1': 0.25, 'params': 10, 'increase': 0.0}
    """
    return {"accuracy": arm["mean_accuracy"], **{f"accuracy {task}": a for task, a in arm["accuracy"].items()},
            **{f"conflicts cos<{s}": rate for s, rate in arm["conflict_rate"].items()}, "params": arm["params"],
            "increase": arm["increase"]}


def spread(values: Sequence[float]) -> dict:
    """Mean and sample standard deviation (``None`` for one value) of ``values``, which are kept too.

    >>> spread([1.0, 2.0, 3.0])
    {'mean': 2.0, 'sd': 1.0, 'values': [1.0, 2.0, 3.0]}
    """
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "values": list(values)}


def summarize(runs: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """Arm -> metric -> :func:`spread` over the seeds of ``runs``.

    >>> runs = [{"arms": {"joint": {"mean_accuracy": a, "accuracy": {}, "conflict_rate": {}, "params": 5,
    ...                             "increase": 0}}} for a in (0.5, 0.7)]
    >>> summarize(runs)["joint"]["accuracy"]["mean"]
    0.6
    """
    return {arm: {name: spread([metrics(run["arms"][arm])[name] for run in runs]) for name in metrics(figures)}
            for arm, figures in runs[0]["arms"].items()}


def paired(runs: Sequence[dict], arm: str, baseline: str) -> dict[str, dict]:
    """Metric -> :func:`spread` of ``arm`` minus ``baseline`` within each seed.

    >>> runs = [{"arms": {name: {"mean_accuracy": a, "accuracy": {}, "conflict_rate": {}, "params": 5, "increase": 0}
    ...                   for name, a in (("recon", r), ("joint", j))}} for r, j in ((0.5, 0.25), (0.75, 0.25))]
    >>> paired(runs, "recon", "joint")["accuracy"]
    {'mean': 0.375, 'sd': 0.1767766952966369, 'values': [0.25, 0.5]}
    """
    pairs = [(metrics(run["arms"][arm]), metrics(run["arms"][baseline])) for run in runs]
    return {name: spread([figures[name] - base[name] for figures, base in pairs]) for name in pairs[0][0]}


def comparisons(runs: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> dict[str, dict]:
    """``"arm - baseline"`` -> :func:`paired` differences, for each (arm, baseline) of ``pairs``."""
    return {f"{arm} - {baseline}": paired(runs, arm, baseline) for arm, baseline in pairs}


def show(figure: dict, percent: bool = False, sign: bool = False) -> str:
    """``mean ± sd`` (or the mean alone for one seed), as a fraction or in percent.

    >>> show(spread([0.9, 0.95])), show(spread([0.1, 0.2]), percent=True, sign=True), show(spread([0.5]))
    ('0.925 ± 0.035', '+15.0 ± 7.1', '0.500')
    """
    scale, digits = (100, 1) if percent else (1, 3)
    text = f"{figure['mean'] * scale:{'+' if sign else ''}.{digits}f}"
    return text if figure["sd"] is None else f"{text} ± {figure['sd'] * scale:.{digits}f}"


def table(runs: Sequence[dict]) -> str:
    """A Markdown table of each arm's accuracy and conflict rates (mean ± sd over ``runs``) and parameters (mean)."""
    summary, tasks, rates = summarize(runs), _tasks(runs), _rates(runs)
    head = ["arm", "mean acc.", *(f"{t} acc." for t in tasks), "params", "increase",
            *(f"conflicts % cos<{s}" for s in rates)]
    return grid(head, [[name, show(arm["accuracy"]), *(show(arm[f"accuracy {t}"]) for t in tasks),
                        f"{arm['params']['mean']:,.0f}", f"{arm['increase']['mean']:+.1%}",
                        *(show(arm[f"conflicts cos<{s}"], percent=True) for s in rates)]
                       for name, arm in summary.items()])


def differences(runs: Sequence[dict], arm: str, baseline: str) -> str:
    """A Markdown table of ``arm`` minus ``baseline`` per seed (accuracy in points, conflict rates in percent
    points), and their mean ± sd."""
    diff, rates = paired(runs, arm, baseline), _rates(runs)
    names = ["accuracy", *(f"conflicts cos<{s}" for s in rates)]
    head = ["seed", f"Δ mean acc. ({arm} − {baseline})", *(f"Δ {name}" for name in names[1:])]
    rows = [[str(run["seed"]), *(f"{diff[name]['values'][i] * 100:+.1f}" for name in names)]
            for i, run in enumerate(runs)]
    rows.append(["mean ± sd", *(show(diff[name], percent=True, sign=True) for name in names)])
    return grid(head, rows)


def paired_table(runs: Sequence[dict], pairs: Sequence[tuple[str, str]]) -> str:
    """A Markdown table of each (arm, baseline) of ``pairs``: the paired differences' mean ± sd (accuracy in
    points, conflict rates in percent points) and in how many seeds the arm's accuracy is the higher."""
    rates = _rates(runs)
    names = ["accuracy", *(f"conflicts cos<{s}" for s in rates)]
    head = ["arm − baseline", "Δ mean acc.", "acc. higher in", *(f"Δ {name}" for name in names[1:])]
    rows = []
    for arm, baseline in pairs:
        diff = paired(runs, arm, baseline)
        higher = sum(value > 0 for value in diff["accuracy"]["values"])
        rows.append([f"{arm} − {baseline}", show(diff["accuracy"], percent=True, sign=True),
                     f"{higher}/{len(runs)} seeds", *(show(diff[name], percent=True, sign=True) for name in names[1:])])
    return grid(head, rows)


def grid(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table.

    >>> print(grid(["a", "b"], [["1", "2"]]))
    | a | b |
    |---|---|
    | 1 | 2 |
    """
    lines = ["| " + " | ".join(cells) + " |" for cells in [head, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(head), *lines[1:]])


def _tasks(runs: Sequence[dict]) -> list[str]:
    return list(next(iter(runs[0]["arms"].values()))["accuracy"])


def _rates(runs: Sequence[dict]) -> list[str]:
    """The thresholds S of the conflict rates, highest first."""
    return sorted(next(iter(runs[0]["arms"].values()))["conflict_rate"], key=float, reverse=True)

