"""One seed's arms: Recon splits the joint run's top-K, the control K random shared layers, parameter counts are
the paper's (T - 1) x the split layers, figures describe the returned networks, and a seed reproduces itself."""

from __future__ import annotations

import pytest
import torch

import fxsplit
from fxsplit.experiment.arms import Experiment, run_seed
from fxsplit.datasets import MultiDigits
from fxsplit.experiment.demo import DigitNet
from fxsplit.experiment.training import Training, accuracy, train

TASKS = ("left", "right")
K = 3


def experiment(split_norms: bool = False) -> Experiment:
    return Experiment(network=lambda: DigitNet(TASKS, width=4),
                      data=lambda seed: (MultiDigits("train", size=96, seed=seed), MultiDigits("test", size=64)),
                      tasks=TASKS, training=Training(1, 32, 1e-2, (-0.05, 0.0)), k=K, split_norms=split_norms)


@pytest.fixture(scope="module")
def seed_run():
    return run_seed(experiment(), seed=5, progress=False)


def test_recon_splits_the_top_k_and_random_k_other_shared_layers(seed_run):
    figures, scoring = seed_run.figures, seed_run.reports["joint"]
    arms = figures["arms"]
    assert list(arms) == ["joint", "recon", "random"] and figures["seed"] == 5
    assert arms["joint"]["layers"] == []
    assert arms["recon"]["layers"] == list(scoring.scores_at(-0.05))[:K] == figures["scoring"]["top"]["-0.05"]
    assert figures["scoring"]["top"]["0.0"] == list(scoring.scores_at(0.0))[:K]
    assert len(set(arms["random"]["layers"])) == K and set(arms["random"]["layers"]) <= set(scoring.layers)
    assert set(seed_run.models["recon"].split_layers) == set(arms["recon"]["layers"])


def test_parameters_grow_by_the_split_layers_and_they_are_no_longer_shared(seed_run):
    graph = fxsplit.layer_graph(DigitNet(TASKS, width=4))
    arms = seed_run.figures["arms"]
    joint = sum(p.numel() for p in DigitNet(TASKS, width=4).parameters())
    assert arms["joint"]["params"] == joint and arms["joint"]["shared_layers"] == 18
    for name in ("recon", "random"):
        added = sum(graph.nodes[layer]["params"] for layer in arms[name]["layers"])  # (T - 1) x, with T = 2
        assert arms[name]["params"] == joint + added
        assert arms[name]["increase"] == pytest.approx(added / joint)
        assert arms[name]["shared_layers"] == 18 - K


def test_figures_describe_the_returned_networks(seed_run):
    test_set = experiment().data(5)[1]
    for name, figures in seed_run.figures["arms"].items():
        model, report = seed_run.models[name], seed_run.reports[name]
        assert figures["accuracy"] == accuracy(model, test_set, TASKS)
        assert figures["mean_accuracy"] == pytest.approx(sum(figures["accuracy"].values()) / 2)
        assert figures["params"] == sum(p.numel() for p in model.parameters())
        assert figures["conflict_rate"] == {str(s): report.conflict_rate(s)[TASKS] for s in (-0.05, 0.0)}
        assert report.steps == 3


def test_a_seed_reproduces_itself_and_every_arm_starts_from_the_joint_networks_function(seed_run, monkeypatch):
    images, initial = MultiDigits("test", size=8).images, []

    def recording(model, *args):
        with torch.no_grad():
            initial.append(model.eval()(images))
        return train(model, *args)

    monkeypatch.setattr("fxsplit.experiment.arms.train", recording)
    again = run_seed(experiment(), seed=5, progress=False).figures
    assert without_seconds(again) == without_seconds(seed_run.figures)
    assert len(initial) == 3
    for outputs in initial[1:]:
        for task in TASKS:
            torch.testing.assert_close(outputs[task], initial[0][task])


def without_seconds(figures: dict) -> dict:
    return {**figures, "arms": {name: {k: v for k, v in arm.items() if k != "seconds"}
                                for name, arm in figures["arms"].items()}}
