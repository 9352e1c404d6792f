import json

import pytest
import torch

from fxsplit import cli, demo


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # TorchScript files on purpose
def test_quick_demo_writes_every_file_and_exports_match(tmp_path, monkeypatch, capsys):
    runs = []
    original = demo.run
    monkeypatch.setattr(demo, "run", lambda *args, **kwargs: runs.append(original(*args, **kwargs)) or runs[-1])
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {
        "results.json", "results.md", "scores.png", "cosines.png", "recon.pt", "recon.pt2", "scoring_report.json"}

    results = json.loads((tmp_path / "results.json").read_text())
    assert results == json.loads(json.dumps(runs[0].results))
    assert set(results["models"]) == {"joint", "recon", "random"}
    k = results["config"]["top_k"]
    assert len(results["scoring"]["top"]) == len(results["scoring"]["random"]) == k
    for name, model in runs[0].models.items():
        figures = results["models"][name]
        assert figures["params"] == sum(p.numel() for p in model.parameters())
        assert all(0.0 <= acc <= 1.0 for acc in figures["accuracy"].values())
        assert list(figures["conflict_rate"]) == ["0.0", "-0.01", "-0.05", "-0.1"]
    assert results["models"]["recon"]["increase"] > 0
    assert results["models"]["recon"]["shared_layers"] < results["models"]["joint"]["shared_layers"]

    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 4 and "| recon |" in table
    assert capsys.readouterr().out.startswith(table)

    recon = runs[0].models["recon"].eval()
    images = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        expected = recon(images)
    for loaded in (torch.jit.load(tmp_path / "recon.pt"), torch.export.load(tmp_path / "recon.pt2").module()):
        got = loaded(images)
        for task in expected:
            torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)
