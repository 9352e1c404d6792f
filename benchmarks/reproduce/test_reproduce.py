"""The reproduction tool (``python -m benchmarks.reproduce``), end to end at a tiny size: the paper's network and
parameter counts, K layers split per arm, every gradient method alone and with Recon, and figures whose summaries
and paired differences are the seeds' own."""

from __future__ import annotations

import json
import statistics

import pytest

import fxsplit
from benchmarks.reproduce import __main__ as command
from benchmarks.reproduce.paper import MultiMnistResNet

K = 25
METHODS = ("PCGrad", "CAGrad", "UPGrad")
ARMS = ["joint", "recon", "PCGrad", "recon + PCGrad", "CAGrad", "recon + CAGrad", "UPGrad", "recon + UPGrad", "random"]
PAIRS = [("recon", "joint"), ("recon", "random"), *((f"recon + {m}", m) for m in METHODS)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torchjd", reason="the gradient methods' arms need torchjd (fxsplit[methods])")
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
    assert results["config"]["methods"] == list(METHODS)
    assert [run["seed"] for run in results["seeds"]] == [0, 1]
    for run in results["seeds"]:
        arms = run["arms"]
        assert list(arms) == ARMS
        assert [arm["method"] for arm in arms.values()] == [None, None, *(m for m in METHODS for _ in "ab"), None]
        for name in ("joint", *METHODS):
            assert arms[name]["params"] == 11_223_560 and arms[name]["shared_layers"] == 41
            assert arms[name]["layers"] == []
        for name in ("recon", *(f"recon + {m}" for m in METHODS)):  # the joint run's top-K, whatever the method
            assert arms[name]["layers"] == run["scoring"]["top"]["-0.1"]
        for name in ("recon", "random"):
            layers = arms[name]["layers"]
            assert len(set(layers)) == K and arms[name]["shared_layers"] == 41 - K
            assert arms[name]["params"] == 11_223_560 + sum(graph.nodes[layer]["params"] for layer in layers)
        for method in METHODS:
            assert arms[f"recon + {method}"]["params"] == arms["recon"]["params"]
            assert arms[f"recon + {method}"]["shared_layers"] == 41 - K
        rates = [rate for arm in arms.values() for rate in arm["conflict_rate"].values()]
        assert all(rate in (0.0, 1.0) for rate in rates)  # one step per arm
        assert set(run["scoring"]["top"]) == {"-0.1", "0.0", "-0.01", "-0.05"}


def test_summaries_and_paired_differences_are_the_seeds_own(tiny):
    _, results = tiny
    runs = results["seeds"]
    for arm in ARMS:
        values = [run["arms"][arm]["mean_accuracy"] for run in runs]
        assert results["summary"][arm]["accuracy"]["values"] == values
        assert results["summary"][arm]["accuracy"]["mean"] == pytest.approx(statistics.fmean(values))
        assert results["summary"][arm]["accuracy"]["sd"] == pytest.approx(statistics.stdev(values))
    assert list(results["paired"]) == [f"{arm} - {base}" for arm, base in PAIRS]
    for arm, base in PAIRS:
        paired = results["paired"][f"{arm} - {base}"]
        for metric, key in (("accuracy", "mean_accuracy"), ("params", "params")):
            assert paired[metric]["values"] == [run["arms"][arm][key] - run["arms"][base][key] for run in runs]
        assert paired["conflicts cos<-0.1"]["values"] == [
            run["arms"][arm]["conflict_rate"]["-0.1"] - run["arms"][base]["conflict_rate"]["-0.1"] for run in runs]


def test_markdown_holds_the_table_the_differences_and_the_set_up(tiny, capsys):
    out, results = tiny
    text = (out / "results.md").read_text()
    assert "11,223,560 parameters, 41 shared layers" in text and "2 seeds" in text
    assert "gradient methods: PCGrad, CAGrad, UPGrad" in text
    assert [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and " ± " in line][:9] == [
        f"| {arm}" for arm in ARMS]  # the paper's layout: each method's row, then with Recon
    assert text.count("\n| mean ± sd |") == len(PAIRS)
    assert all(f"({arm} − {base})" in text for arm, base in PAIRS)


def test_an_unknown_method_is_refused_before_any_training(tmp_path, capsys):
    pytest.importorskip("torchjd", reason="method names are torchjd's aggregators (fxsplit[methods])")
    with pytest.raises(SystemExit):
        command.main(["--methods", "PCGrad", "PCgrad", "--out", str(tmp_path)])
    assert "torchjd has no aggregator 'PCgrad'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
