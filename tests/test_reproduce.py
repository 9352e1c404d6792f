"""The reproduction tool (``python -m benchmarks.reproduce``), end to end at a tiny size: the paper's network and
parameter counts, K layers split per arm, and figures whose summaries and paired differences are the seeds' own."""

from __future__ import annotations

import json
import statistics

import pytest

import fxsplit
from benchmarks.reproduce import __main__ as command
from benchmarks.reproduce.paper import MultiMnistResNet

K = 25


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduction")
    command.main(["--seeds", "2", "--epochs", "1", "--train-size", "16", "--test-size", "16", "--batch-size", "16",
                  "--image-size", "12", "--device", "cpu", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def graph():
    return fxsplit.layer_graph(MultiMnistResNet())


def test_the_papers_network_has_its_parameter_count_and_41_shared_layers(graph):
    assert sum(params for _, params in graph.nodes(data="params")) == 11_223_560
    assert len([layer for layer in graph if not layer.startswith("heads.")]) == 41


def test_tiny_run_writes_every_arm_with_k_layers_split_and_exact_parameter_counts(tiny, graph):
    out, results = tiny
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]
    assert results["config"]["k"] == K and results["thresholds"][0] == -0.1
    assert [run["seed"] for run in results["seeds"]] == [0, 1]
    for run in results["seeds"]:
        arms = run["arms"]
        assert list(arms) == ["joint", "recon", "random"]
        assert arms["joint"]["params"] == 11_223_560 and arms["joint"]["shared_layers"] == 41
        assert arms["recon"]["layers"] == run["scoring"]["top"]["-0.1"]
        for name in ("recon", "random"):
            layers = arms[name]["layers"]
            assert len(set(layers)) == K and arms[name]["shared_layers"] == 41 - K
            assert arms[name]["params"] == 11_223_560 + sum(graph.nodes[layer]["params"] for layer in layers)
        rates = [rate for arm in arms.values() for rate in arm["conflict_rate"].values()]
        assert all(rate in (0.0, 1.0) for rate in rates)  # one step per arm
        assert set(run["scoring"]["top"]) == {"-0.1", "0.0", "-0.01", "-0.05"}


def test_summaries_and_paired_differences_are_the_seeds_own(tiny):
    _, results = tiny
    runs = results["seeds"]
    for arm in ("joint", "recon", "random"):
        values = [run["arms"][arm]["mean_accuracy"] for run in runs]
        assert results["summary"][arm]["accuracy"]["values"] == values
        assert results["summary"][arm]["accuracy"]["mean"] == pytest.approx(statistics.fmean(values))
        assert results["summary"][arm]["accuracy"]["sd"] == pytest.approx(statistics.stdev(values))
    for arm, base in (("recon", "joint"), ("recon", "random")):
        paired = results["paired"][f"{arm} - {base}"]
        for metric, key in (("accuracy", "mean_accuracy"), ("params", "params")):
            assert paired[metric]["values"] == [run["arms"][arm][key] - run["arms"][base][key] for run in runs]
        assert paired["conflicts cos<-0.1"]["values"] == [
            run["arms"][arm]["conflict_rate"]["-0.1"] - run["arms"][base]["conflict_rate"]["-0.1"] for run in runs]


def test_markdown_holds_the_table_the_differences_and_the_set_up(tiny, capsys):
    out, results = tiny
    text = (out / "results.md").read_text()
    assert "11,223,560 parameters, 41 shared layers" in text and "2 seeds" in text
    assert text.count("\n| recon |") == 1 and text.count("\n| mean ± sd |") == 2
    assert "(recon − joint)" in text and "(recon − random)" in text
