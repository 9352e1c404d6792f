"""The arms of Recon's experiment for one seed: the joint network (whose training is also the scoring run), its
top-K scored layers split (Recon), K random shared layers split (the paper's control) and, for each gradient
method, the joint network trained with it (the method alone) and Recon's network trained with it (Recon + method).

Every arm starts from the same initial weights (a split copy starts equal to its shared layer), trains with the
same budget and data order, and is evaluated on the same test set. Recon's layers come from the one scoring run,
the joint network's, for every method: the paper searches the conflict layers of a network once and uses the split
network with every method.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import rewrite
from ..report import ConflictReport
from .training import Training, accuracy, aggregator, train


@dataclass(frozen=True)
class Arm:
    """One network of the experiment and how its step turns the task losses into ``.grad``.

    ``layers``: the layers it splits (``None``: the joint network); ``method``: the torchjd aggregator (its class
    name) applied to the task gradients of the shared parameters (``None``: the gradient of the summed losses).
    """

    name: str
    layers: tuple[str, ...] | None = None
    method: str | None = None


@dataclass(frozen=True)
class Experiment:
    """What every seed of a comparison shares.

    ``network()`` builds a fresh joint network returning ``{task: logits}`` (it is called after
    ``torch.manual_seed(seed)``); ``data(seed)`` gives that seed's training and test sets, whose targets hold
    one class column per task, in the order of ``tasks``; ``methods`` are torchjd aggregators' class names
    (``"PCGrad"``), each adding two arms: the method alone and Recon + the method.
    """

    network: Callable[[], nn.Module]
    data: Callable[[int], tuple[Dataset, Dataset]]
    tasks: tuple[str, ...]
    training: Training
    k: int
    split_norms: bool = False
    methods: tuple[str, ...] = ()

    def __post_init__(self):
        for method in self.methods:  # an unknown name, or torchjd missing, fails now, not after hours of training
            aggregator(method)


@dataclass
class SeedRun:
    """One seed's arms: ``figures`` (JSON-ready), and each arm's trained network and conflict report."""

    figures: dict
    models: dict[str, nn.Module]
    reports: dict[str, ConflictReport]


def pairs(methods: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The paired differences reported, (arm, baseline): Recon against the joint network and the random control,
    and Recon + each method against the method alone.

    >>> pairs(["UPGrad"])
    [('recon', 'joint'), ('recon', 'random'), ('recon + UPGrad', 'UPGrad')]
    """
    return [("recon", "joint"), ("recon", "random"), *((recon_with(m), m) for m in methods)]


def recon_with(method: str) -> str:
    """The name of the arm that trains Recon's network with ``method``."""
    return f"recon + {method}"


def run_seed(experiment: Experiment, seed: int, progress: bool | None = None) -> SeedRun:
    """Train and evaluate every arm of ``experiment`` with ``seed``, in the paper's table order: the joint network,
    Recon, each method alone and with Recon, then the random control."""
    train_set, test_set = experiment.data(seed)
    tasks, thresholds, k = list(experiment.tasks), experiment.training.thresholds, experiment.k

    def trained(arm: Arm) -> _Trained:
        torch.manual_seed(seed)
        model = experiment.network()
        if arm.layers is not None:
            model = rewrite(model, arm.layers, tasks, split_norms=experiment.split_norms)
        started = time.perf_counter()
        name = f"{arm.name} network (seed {seed})"
        report = train(model, train_set, tasks, experiment.training, seed, name, progress, arm.method)
        return _Trained(arm, model, report, time.perf_counter() - started)

    runs = {"joint": trained(Arm("joint"))}
    scoring = runs["joint"].report
    top = tuple(scoring.top(k))
    arms = [Arm("recon", top)]
    for method in experiment.methods:
        arms += [Arm(method, method=method), Arm(recon_with(method), top, method)]
    arms.append(Arm("random", tuple(random.Random(seed).sample(scoring.layers, min(k, len(scoring.layers))))))
    for arm in arms:
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
        "method": arm.method,
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
