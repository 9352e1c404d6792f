"""The arms of Recon's experiment for one seed: the joint network (whose training is also the scoring run), its
top-K scored layers split (Recon) and, as the paper's control, K random shared layers split.

Every arm starts from the same initial weights (a split copy starts equal to its shared layer), trains with the
same budget and data order, and is evaluated on the same test set.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from . import rewrite
from .report import ConflictReport
from .training import Training, accuracy, train


@dataclass(frozen=True)
class Arm:
    """One network of the experiment: the layers it splits (``None``: the joint network, which also scores).

    An arm is a network and the rule by which its step turns the task losses into ``.grad``; every arm here
    steps on the gradient of the summed losses, so the rule is not a field yet. A gradient method applied to
    the shared parameters (an aggregator of the task gradients) would be one.
    """

    name: str
    layers: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Experiment:
    """What every seed of a comparison shares.

    ``network()`` builds a fresh joint network returning ``{task: logits}`` (it is called after
    ``torch.manual_seed(seed)``); ``data(seed)`` gives that seed's training and test sets, whose targets hold
    one class column per task, in the order of ``tasks``.
    """

    network: Callable[[], nn.Module]
    data: Callable[[int], tuple[Dataset, Dataset]]
    tasks: tuple[str, ...]
    training: Training
    k: int
    split_norms: bool = False


@dataclass
class SeedRun:
    """One seed's arms: ``figures`` (JSON-ready), and each arm's trained network and conflict report."""

    figures: dict
    models: dict[str, nn.Module]
    reports: dict[str, ConflictReport]


def run_seed(experiment: Experiment, seed: int, progress: bool | None = None) -> SeedRun:
    """Train and evaluate the joint, Recon and random arms of ``experiment`` with ``seed``."""
    train_set, test_set = experiment.data(seed)
    tasks, thresholds, k = list(experiment.tasks), experiment.training.thresholds, experiment.k

    def trained(arm: Arm) -> _Trained:
        torch.manual_seed(seed)
        model = experiment.network()
        if arm.layers is not None:
            model = rewrite(model, arm.layers, tasks, split_norms=experiment.split_norms)
        started = time.perf_counter()
        name = f"{arm.name} network (seed {seed})"
        report = train(model, train_set, tasks, experiment.training, seed, name, progress)
        return _Trained(arm, model, report, time.perf_counter() - started)

    runs = {"joint": trained(Arm("joint"))}
    scoring = runs["joint"].report
    random_layers = random.Random(seed).sample(scoring.layers, min(k, len(scoring.layers)))
    for arm in (Arm("recon", tuple(scoring.top(k))), Arm("random", tuple(random_layers))):
        runs[arm.name] = trained(arm)
    base_params = _params(runs["joint"].model)
    figures = {
        "seed": seed,
        "scoring": {"top": {str(s): list(scoring.scores_at(s))[:k] for s in thresholds},
                    "scores": {str(s): scoring.scores_at(s) for s in thresholds}},
        "arms": {name: _figures(run, test_set, tasks, base_params) for name, run in runs.items()},
    }
    return SeedRun(figures, {name: run.model for name, run in runs.items()},
                   {name: run.report for name, run in runs.items()})


class _Trained(NamedTuple):
    arm: Arm
    model: nn.Module
    report: ConflictReport
    seconds: float


def _figures(run: _Trained, test_set: Dataset, tasks: list[str], base_params: int) -> dict:
    """One arm's figures; conflict rates are the share of (step, task pair) with cosine below each S."""
    arm, model, report, seconds = run
    acc = accuracy(model, test_set, tasks)
    rates = [report.conflict_rate(s) for s in report.thresholds]
    return {
        "layers": list(arm.layers or []),
        "accuracy": acc,
        "mean_accuracy": sum(acc.values()) / len(acc),
        "params": _params(model),
        "increase": _params(model) / base_params - 1,
        "shared_layers": len(report.layers),
        "conflict_rate": {str(s): sum(rate.values()) / len(rate) for s, rate in zip(report.thresholds, rates)},
        "seconds": round(seconds, 1),
    }


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

