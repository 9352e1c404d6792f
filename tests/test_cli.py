import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxsplit
from fxsplit import cli

SPEC = str(Path(__file__).parents[1] / "examples" / "digits_spec.py")


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "report.json"
    assert cli.main(["analyze", SPEC, "--steps", "3", "--threshold", "0", "-0.05", "--out", str(path)]) == 0
    return path


def test_analyze_prints_a_table_and_saves_a_report(report_path, capsys):
    report = fxsplit.ConflictReport.load(report_path)
    assert report.steps == 3 and report.thresholds == [0.0, -0.05] and report.tasks == ["left", "right"]
    code, out, _ = run(capsys, "analyze", SPEC, "--steps", "2", "--json")
    assert code == 0 and json.loads(out)["steps"] == 2


def test_rewrite_from_a_report_saves_a_loadable_model(report_path, tmp_path, capsys):
    code, _, err = run(capsys, "rewrite", SPEC, "--report", str(report_path), "--top", "3", "--out",
                       str(tmp_path / "split.pt"))
    assert code == 1 and "a .pkl file (.pt and .pt2 are the TorchScript and torch.export files" in err
    assert not (tmp_path / "split.pt").exists()
    saved = tmp_path / "split.pkl"
    code, out, _ = run(capsys, "rewrite", SPEC, "--report", str(report_path), "--top", "3", "--out", str(saved),
                       "--json")
    summary = json.loads(out)
    assert code == 0 and summary["layers"] == list(fxsplit.ConflictReport.load(report_path).scores)[:3]
    split = torch.load(saved, weights_only=False)
    assert isinstance(split, fxsplit.SplitModule) and list(split.split_layers) == sorted(
        summary["layers"], key=fxsplit.ConflictReport.load(report_path).layers.index)
    assert sum(p.numel() for p in split.parameters()) == summary["params"]


def test_export_writes_a_checked_file(report_path, tmp_path, capsys):
    code, out, _ = run(capsys, "export", SPEC, "--report", str(report_path), "--budget", "0.05",
                       "--out", str(tmp_path / "split.pt2"))
    assert code == 0 and out.startswith("exported and checked")
    program = torch.export.load(tmp_path / "split.pt2").module()
    assert set(program(torch.rand(3, 1, 12, 12))) == {"left", "right"}


def test_graph_lists_layers_and_writes_dot_and_png(tmp_path, capsys):
    code, out, _ = run(capsys, "graph", SPEC, "--dot", str(tmp_path / "g.dot"), "--png", str(tmp_path / "g.png"))
    assert code == 0 and out.splitlines()[0] == "20 layers, 25 edges"
    dot = (tmp_path / "g.dot").read_text()
    assert dot.count(" -> ") == 25 and '"stem.0" -> "stem.1";' in dot
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_errors_are_one_line_and_exit_1(capsys):
    code, out, err = run(capsys, "rewrite", SPEC, "--layers", "stem.9")
    assert code == 1 and err.count("\n") == 1 and err.startswith("fxsplit: error: 'stem.9' is not a layer")
    code, _, err = run(capsys, "rewrite", SPEC, "--top", "2")
    assert code == 1 and "give --report" in err
    code, _, err = run(capsys, "graph", "no/such/spec.py")
    assert code == 1 and "no such SPEC file" in err


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--debug", "graph", "no/such/spec.py")
    assert code == 1 and "Traceback" in err


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["rewrite"])
    assert exit_info.value.code == 2


def test_bad_spec_function(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("def spec():\n    return 1\n\ndef other():\n    return (None, None)\n")
    code, _, err = run(capsys, "graph", str(bad))
    assert code == 1 and "must return a mapping with model, tasks and data" in err
    code, _, err = run(capsys, "graph", f"{bad}:missing")
    assert code == 1 and "cannot load SPEC" in err


def test_python_dash_m_and_help_list_examples():
    done = subprocess.run([sys.executable, "-m", "fxsplit", "analyze", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1])
    assert done.returncode == 0 and "example:" in done.stdout and "executed" in done.stdout
