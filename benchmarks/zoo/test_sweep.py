"""The zoo sweep tool (``python -m benchmarks.zoo``): the CI sample passes every stage, a second run resumes, a
time limit names the stage it cut, a wrong rewrite is caught, failures group by cause, samples stay under the cap."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxsplit
from benchmarks.zoo import runner, summary
from benchmarks.zoo.catalog import CI_SAMPLE, Model, select
from benchmarks.zoo.check import STAGES, Check, Mismatch, ModelLimit, cause
from tests.models import MultiHead, SmallCNN


def sweep(out, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.zoo", "--out", str(out), *args], cwd=runner.ROOT,
                          capture_output=True, text=True, check=True)


def test_ci_sample_passes_every_stage_and_resumes(tmp_path):
    first = sweep(tmp_path, "--sample", "ci", "--jobs", "2")
    rows = runner.read(tmp_path / "results.csv")
    assert sorted(row["name"] for row in rows) == sorted(CI_SAMPLE)
    for row in rows:
        second = row["name"].startswith("transformers/")  # torch.fx cannot trace it: torch.export's route, no .pt
        assert row["route"] == ("export" if second else "fx"), row
        stages = {stage: "fail" if second and stage == "torchscript" else "ok" for stage in STAGES}
        assert {stage: row[stage] for stage in STAGES} == stages, row
        assert not second or "ExportError: the model was traced through torch.export" in row["causes"], row
        assert float(row["max_error"]) <= 1e-5 and int(row["scored"]) >= int(row["layers"]) - second > 0, row
        assert row["plain_loop"] == "equal", row
    assert sum(first.stdout.count(f"] {library}/") for library in ("timm", "torchvision", "transformers")) == len(
        CI_SAMPLE)
    text = (tmp_path / "summary.md").read_text()
    assert text.startswith("| library |") and f"on {len(CI_SAMPLE)} of the {len(CI_SAMPLE)} models compared." in text

    again = sweep(tmp_path, "--sample", "ci")
    assert "] t" not in again.stdout and runner.read(tmp_path / "results.csv") == rows


def test_time_limit_fails_the_stage_it_cut(monkeypatch):
    """Killed at its limit, the check fails the stage it had started, with the limit named: with a limit of 0 it is
    killed before it announces a stage (the first fails); killed after announcing two, the second fails."""
    row = runner.check(Model("timm/resnet10t", "resnet", 1), limit=0, threads=1)
    assert row["build"] == "fail" and row["causes"] == "build: timeout: over 0 s"
    assert all(row[stage] == "" for stage in STAGES[1:])

    def killed(command, timeout, **kwargs):
        raise subprocess.TimeoutExpired(command, timeout, output="stage build\nstage trace\n")

    monkeypatch.setattr(runner.subprocess, "run", killed)
    row = runner.check(Model("timm/resnet10t", "resnet", 1), limit=5, threads=1)
    assert (row["build"], row["trace"], row["causes"]) == ("ok", "fail", "trace: timeout: over 5 s")
    assert all(row[stage] == "" for stage in STAGES[2:])


def test_equivalence_names_a_wrong_rewrite():
    torch.manual_seed(0)
    model = MultiHead(SmallCNN(), 16).eval()
    split = fxsplit.rewrite(model, ["backbone.block2.conv2"])
    wrong = copy.deepcopy(split)
    with torch.no_grad():
        wrong.copy_of("b", "backbone.block2.conv2").weight.mul_(1.5)
    check = Check("small")
    check.equivalence(model, {"good": split}, torch.randn(4, 3, 16, 16), ("eval", "train"))
    assert check.row["max_error"] == "0"
    with pytest.raises(Mismatch, match=r"\(eval mode, split at wrong, task b\)"):
        check.equivalence(model, {"wrong": wrong}, torch.randn(4, 3, 16, 16), ("eval",))


class Unscriptable(nn.Module):
    def forward(self, x):
        double = lambda t: 2 * t  # noqa: E731 - TorchScript rejects lambdas
        return double(x)


def test_export_failures_say_whether_the_unsplit_model_fails_too(tmp_path):
    """A model TorchScript cannot compile is a limit of the model; a graph that fails where the model works is not."""
    model = nn.Sequential(nn.Linear(3, 3), Unscriptable())
    graph = fxsplit.trace(model, tracer_kwargs={"leaf_modules": [Unscriptable]})
    x = torch.randn(2, 3)
    with pytest.raises(ModelLimit, match=r"^the unsplit model fails too: ExportError: TorchScript cannot compile"):
        Check("m").export(model, graph, tmp_path / "m.pt", x)
    with pytest.raises(fxsplit.ExportError, match="TorchScript cannot compile"):
        Check("m").export(nn.Linear(3, 3), graph, tmp_path / "m.pt", x)


def test_causes_name_the_source_line():
    error = RuntimeError('Cannot compile:\n  lambdas are not supported\n  File "/lib/timm/models/vit.py", line 12\n')
    assert cause(error) == "RuntimeError: Cannot compile: lambdas are not supported (vit.py:12)"
    error = RuntimeError("x" * 300 + ':\n  File "/lib/timm/layers/mlp.py", line 3\n  more')
    assert cause(error) == f"RuntimeError: {'x' * 199}… (mlp.py:3)"


def test_failures_group_by_cause_across_models():
    def row(name, causes):
        return {"name": name, "causes": causes}

    rows = [row("timm/a", "trace: TraceError: cannot trace 'blocks.0' at line 12"),
            row("timm/b", "trace: TraceError: cannot trace 'stem.1' at line 40; export: ExportError: no; not this"),
            row("timm/c", "")]
    lines = summary.failures(rows).splitlines()[2:]
    assert lines == ["| trace | TraceError: cannot trace 'blocks.0' at line 12 | timm/a, timm/b |",
                     "| export | ExportError: no; not this | timm/b |"]


def test_samples_keep_models_under_the_cap():
    models = [Model("timm/big", "f", 200), Model("timm/mid", "f", 50), Model("timm/small", "f", 10),
              Model("timm/other", "g", 70), Model("torchvision/small", "f", 5)]
    assert [m.name for m in select(models, cap=100)] == ["timm/mid", "timm/small", "timm/other", "torchvision/small"]
    assert [m.name for m in select(models, cap=100, sample="families")] == ["timm/small", "timm/other",
                                                                             "torchvision/small"]
    drawn = select(models, cap=100, sample=2)
    assert len(drawn) == 2 and drawn == select(models, cap=100, sample=2)
    assert {m.name for m in drawn} < {m.name for m in select(models, cap=100)}

