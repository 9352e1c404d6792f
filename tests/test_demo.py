import json
import sys

import pytest
import torch

from fxsplit import ConflictReport, MissingExtraError, cli
from fxsplit.errors import FxsplitError
from fxsplit.experiment import demo

TINY = demo.DemoConfig.quick(train_size=64, test_size=32, width=4, top_k=2)  # one step per epoch


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # TorchScript files on purpose
def test_quick_demo_over_two_seeds_writes_and_lists_every_file_and_exports_match(tmp_path, monkeypatch, capsys):
    runs = []
    original = demo.run
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: runs.append(original(*args, **kwargs)) or runs[-1])
    assert cli.main(["demo", "--quick", "--seeds", "2", "--out", str(tmp_path)]) == 0
    written = {"results.json", "results.md", "scores.png", "cosines.png", "recon.pt", "recon.pt2",
               "scoring_report.json"}
    assert {p.name for p in tmp_path.iterdir()} == written

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(runs[0].results))
    assert results["files"] == sorted(str(tmp_path / name) for name in written)
    assert [run["seed"] for run in results["seeds"]] == [0, 1]
    k = results["config"]["top_k"]
    for run in results["seeds"]:
        arms = run["arms"]
        assert list(arms) == ["joint", "recon", "random"]
        assert len(arms["recon"]["layers"]) == len(arms["random"]["layers"]) == k
        assert arms["recon"]["increase"] > 0 and arms["recon"]["shared_layers"] < arms["joint"]["shared_layers"]
        assert all(0.0 <= acc <= 1.0 for arm in arms.values() for acc in arm["accuracy"].values())
        assert all(list(arm["conflict_rate"]) == ["0.0", "-0.01", "-0.05", "-0.1"] for arm in arms.values())
    for arm, base in (("recon", "joint"), ("recon", "random")):
        assert results["paired"][f"{arm} - {base}"]["accuracy"]["values"] == [
            run["arms"][arm]["mean_accuracy"] - run["arms"][base]["mean_accuracy"] for run in results["seeds"]]
    for name, model in runs[0].models.items():  # the first seed's networks
        assert results["seeds"][0]["arms"][name]["params"] == sum(p.numel() for p in model.parameters())

    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| recon |") == 1 and table.count("\n| mean ± sd |") == 2
    out, err = capsys.readouterr()
    assert out == table + "\nfiles written:\n" + "\n".join(results["files"]) + "\n"
    assert sum(line.endswith(" s)") and ": epoch 1/1, mean loss left " in line for line in err.splitlines()) == 6

    recon = runs[0].models["recon"].eval()
    images = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        expected = recon(images)
    for loaded in (torch.jit.load(tmp_path / "recon.pt"), torch.export.load(tmp_path / "recon.pt2").module()):
        got = loaded(images)
        for task in expected:
            torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)


def test_demo_needs_at_least_one_seed():
    with pytest.raises(FxsplitError, match="seeds >= 1"):
        demo.DemoConfig(seeds=0)


@pytest.fixture
def seeds_trained(monkeypatch):
    """The seeds the demo trains, as it starts each."""
    trained = []
    original = demo.run_seed
    monkeypatch.setattr(demo, "run_seed", lambda experiment, seed, *args: trained.append(seed) or original(
        experiment, seed, *args))
    return trained


@pytest.mark.parametrize("module", ["matplotlib", "sklearn"])
def test_the_demo_checks_its_extras_before_it_trains(tmp_path, monkeypatch, capsys, seeds_trained, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, as when it is not installed
    with pytest.raises(MissingExtraError) as error:
        demo.run(tmp_path / "tiny", TINY, progress=False)
    assert str(error.value) == f"the demo needs {module}, which is not installed: pip install 'fxsplit[demo]'"
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "quick")]) == 1
    assert capsys.readouterr().err == f"fxsplit: error: {error.value}\n"
    assert seeds_trained == [] and list(tmp_path.iterdir()) == []


def test_the_results_are_written_before_the_plots(tmp_path, monkeypatch):
    plotted = []

    def failing_plot(report, path, **options):
        plotted.append(options)
        raise FxsplitError("the plot fails")

    monkeypatch.setattr(ConflictReport, "plot", failing_plot)
    with pytest.raises(FxsplitError, match="the plot fails"):
        demo.run(tmp_path, TINY, progress=False)
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text() == demo.markdown(results)
    assert plotted == [{"chosen": results["seeds"][0]["arms"]["recon"]["layers"]}]  # scores.png marks them
