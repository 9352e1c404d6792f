import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxsplit
from fxsplit import cli

ROOT = Path(__file__).parents[1]
SPEC = str(ROOT / "examples" / "digits_spec.py")

TINY = """\
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})

    def forward(self, x):
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


def losses(labels=1):
    return {task: (lambda k: lambda out, batch: F.cross_entropy(out[task], batch[labels][:, k]))(k)
            for k, task in enumerate("ab")}


def spec():
    torch.manual_seed(0)
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8, 2))) for _ in range(3)]
    return {"model": Net(), "tasks": losses(), "data": data}


def dict_batches():
    torch.manual_seed(0)
    data = [{"image": torch.randn(8, 4), "labels": torch.randint(0, 2, (8, 2))} for _ in range(3)]
    return {"model": Net(), "tasks": losses("labels"), "data": data}
"""
HINTS = """

class TupleNet(Net):
    def forward(self, x):
        out = super().forward(x)
        return out["a"], out["b"]


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Branching(Net):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return super().forward(self.gate(x))


class Autocast(Net):
    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.trunk(x)
        return {task: head(h.float()) for task, head in self.heads.items()}


def tuple_output():
    return {**spec(), "model": TupleNet()}


def branching():
    return {**spec(), "model": Branching(), "method": "fx"}


def autocast():
    return {**spec(), "model": Autocast()}


def autocast_exported():
    return {**autocast(), "method": "export"}


def exported():
    return {**spec(), "method": "export"}
"""  # models whose errors give fixes, as SPEC functions to append to TINY
HINTS_LINE = len(TINY.splitlines())
MODEL_LINE = TINY.splitlines().index("        h = self.trunk(x)") + 1  # where Net fails on a bad input


def spec_file(folder: Path, text: str = TINY, name: str = "tiny_spec.py") -> Path:
    path = folder / name
    path.write_text(text)
    return path


@pytest.fixture
def scripted_sys_path(monkeypatch):
    """sys.path as the installed ``fxsplit`` script has it (no working directory), and no module left imported."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", os.getcwd())])
    modules = set(sys.modules)
    yield list(sys.path)
    for name in set(sys.modules) - modules:
        del sys.modules[name]


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


def test_a_spec_imports_from_its_own_folder_and_from_the_working_directory(tmp_path, scripted_sys_path,
                                                                          monkeypatch, capsys):
    spec_file(tmp_path, name="tiny_net.py")
    spec_file(tmp_path, "from tiny_net import spec  # a neighbour of the SPEC\n", "file_spec.py")
    spec_file(tmp_path, "from tiny_net import spec\n", "module_spec.py")
    code, out, err = run(capsys, "graph", str(tmp_path / "file_spec.py"))  # run from elsewhere
    assert (code, err) == (0, "") and out.splitlines()[0] == "4 layers, 3 edges"
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "graph", "module_spec:spec")
    assert (code, err) == (0, "") and out.splitlines()[0] == "4 layers, 3 edges"
    assert sys.path == scripted_sys_path


@pytest.mark.parametrize("text, line", [
    ("def spec():\n    raise ValueError('no data here')\n", 2),
    ("import no_such_module_for_a_spec\n", 1),
    ("def spec(:\n    pass\n", 1),
])
def test_a_spec_that_fails_is_a_one_line_spec_error_saying_where(tmp_path, capsys, text, line):
    path = spec_file(tmp_path, text, "failing_spec.py")
    with pytest.raises(Exception) as raised:  # what the SPEC raises when Python runs it
        namespace = {}
        exec(compile(text, str(path), "exec"), namespace)
        namespace["spec"]()
    raised = raised.value
    message = raised.msg if isinstance(raised, SyntaxError) else str(raised)
    code, _, err = run(capsys, "graph", str(path))
    assert code == 1 and err == (f"fxsplit: error: cannot load SPEC {str(path)!r}: {type(raised).__name__}: "
                                 f"{message} at {path}:{line}: {text.splitlines()[line - 1].strip()}\n")


def test_a_model_that_fails_on_a_dict_batch_asks_for_a_forward_in_the_spec(tmp_path, capsys):
    path = spec_file(tmp_path, TINY + """
def with_forward():
    return {**dict_batches(), "forward": lambda model, batch: model(batch["image"])}


class DictNet(Net):
    def forward(self, batch):
        return super().forward(batch["image"])


def dict_model():
    return {**dict_batches(), "model": DictNet()}
""")
    code, _, err = run(capsys, "graph", f"{path}:dict_batches")
    assert code == 1 and err == (
        f"fxsplit: error: SPEC '{path}:dict_batches': the model fails on the SPEC's first batch: TypeError: "
        f"linear(): argument 'input' (position 1) must be Tensor, not dict at {path}:{MODEL_LINE}: h = "
        f"self.trunk(x). The batch is a dict (keys 'image', 'labels') and the SPEC gives no forward, so the model "
        f"was called on the whole batch: add \"forward\": forward(model, batch), the call of the model on a batch "
        f"(e.g. lambda model, batch: model(batch[...])).\n")
    for name in ("with_forward", "dict_model"):  # a forward, or a model that takes the dict itself
        for command in (["graph"], ["analyze", "--steps", "2", "--json"], ["rewrite", "--layers", "trunk.2"],
                        ["export", "--layers", "trunk.2", "--out", str(tmp_path / f"{name}.pt2")]):
            code, _, err = run(capsys, command[0], f"{path}:{name}", *command[1:])
            assert (code, err) == (0, ""), (name, command)


def test_a_model_that_fails_on_the_first_batch_is_a_spec_error_without_the_forward_hint(tmp_path, capsys):
    path = spec_file(tmp_path, TINY.replace("torch.randn(8, 4), torch.randint", "torch.randn(8, 5), torch.randint"))
    code, _, err = run(capsys, "rewrite", str(path), "--layers", "trunk.2")
    assert code == 1 and err == (
        f"fxsplit: error: SPEC '{path}': the model fails on the SPEC's first batch: RuntimeError: mat1 and mat2 "
        f"shapes cannot be multiplied (8x5 and 4x8) at {path}:{MODEL_LINE}: h = self.trunk(x)\n")


def test_analyze_and_graph_say_which_files_they_wrote(tmp_path, capsys):
    spec, report, plot = spec_file(tmp_path), tmp_path / "report.json", tmp_path / "scores.png"
    code, out, _ = run(capsys, "analyze", str(spec), "--out", str(report), "--plot", str(plot))
    assert code == 0 and out.splitlines()[-2:] == [f"wrote {report}", f"wrote {plot}"]
    code, out, err = run(capsys, "analyze", str(spec), "--out", str(report), "--plot", str(plot), "--json")
    assert code == 0 and json.loads(out)["steps"] == 3 and err == f"wrote {report}\nwrote {plot}\n"  # stdout: JSON
    dot, png = tmp_path / "layers.dot", tmp_path / "layers.png"
    code, out, _ = run(capsys, "graph", str(spec), "--dot", str(dot), "--png", str(png))
    assert code == 0 and out.splitlines()[-2:] == [f"wrote {dot}", f"wrote {png}"] and dot.exists() and png.exists()


def test_rewrite_names_the_layers_it_split_and_says_what_it_saved(tmp_path, capsys):
    spec, saved = spec_file(tmp_path), tmp_path / "split.pkl"
    summary = ("split trunk.0, trunk.2 for tasks a, b: 148 -> 260 parameters (+75.7%), 256 -> 448 FLOPs per sample "
               "(+75.0%)")  # the trunk runs twice: 2 x (4 x 8 + 8 x 8) FLOPs more
    code, out, _ = run(capsys, "rewrite", str(spec), "--layers", "trunk.2", "trunk.0")
    assert (code, out) == (0, f"{summary}\nnothing saved: give --out FILE.pkl to save the split model\n")
    assert not saved.exists()
    code, out, _ = run(capsys, "rewrite", str(spec), "--layers", "trunk.2", "trunk.0", "--out", str(saved))
    assert (code, out) == (0, f"{summary}\nwrote {saved}\n") and saved.exists()


def test_rewrite_chooses_within_a_compute_budget(tmp_path, capsys):
    spec, report = spec_file(tmp_path), tmp_path / "report.json"
    code, out, _ = run(capsys, "analyze", str(spec), "--out", str(report))
    assert code == 0 and "FLOPs: what splitting the layer alone adds to the model's 256 FLOPs per sample" in out
    code, out, _ = run(capsys, "rewrite", str(spec), "--report", str(report), "--flops", "0.6", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["flops_increase"] <= 0.6 and summary["flops_per_sample"] <= 1.6 * 256
    assert summary["split_layers"] == fxsplit.ConflictReport.load(report).within(flops=0.6)


def test_export_writes_a_saved_and_trained_split(tmp_path, capsys):
    spec, saved, exported = spec_file(tmp_path), tmp_path / "split.pkl", tmp_path / "trained.pt2"
    assert run(capsys, "rewrite", str(spec), "--layers", "trunk.2", "--out", str(saved))[0] == 0
    split = torch.load(saved, weights_only=False)
    with torch.no_grad():
        split.get_parameter("copies.a.trunk.2.weight").add_(1.0)  # as training would move it
    torch.save(split, saved)
    code, out, _ = run(capsys, "export", str(spec), "--split", str(saved), "--out", str(exported))
    assert (code, out) == (0, f"exported and checked {exported}\n")
    x = torch.randn(5, 4)
    program = torch.export.load(exported).module()
    with torch.no_grad():
        expected, untrained = split.eval()(x), cli.load_spec(str(spec)).model(x)  # the SPEC seeds its model
    torch.testing.assert_close(program(x), expected)
    assert not torch.allclose(program(x)["a"], untrained["a"])
    for wrong in (exported, tmp_path / "model.pkl"):
        torch.save(torch.nn.Linear(4, 2), tmp_path / "model.pkl")
        code, _, err = run(capsys, "export", str(spec), "--split", str(wrong), "--out", str(tmp_path / "x.pt2"))
        assert code == 1 and err.startswith(f"fxsplit: error: --split {wrong} is not a split model saved by "
                                            f"`fxsplit rewrite --out` (") and err.count("\n") == 1
    assert "(a Linear)" in err and not (tmp_path / "x.pt2").exists()
    with pytest.raises(SystemExit) as exit_info:  # a saved split, or layers to split now: not both
        cli.main(["export", str(spec), "--split", str(saved), "--layers", "trunk.0", "--out", str(exported)])
    assert exit_info.value.code == 2
    assert "argument --layers: not allowed with argument --split" in capsys.readouterr().err


@pytest.mark.parametrize("function, command, message", [
    ("tuple_output", ["rewrite", "--layers", "trunk.2"],
     "the model returns a tuple of 2, and which element belongs to which task cannot be known from it: say so with "
     "the SPEC's \"outputs\": {{'a': 0, 'b': 1}} (an element may be nested: a tuple of keys). A report saved by "
     "`fxsplit analyze --out REPORT.json` knows it from the task losses: choose layers with --report REPORT.json."),
    ("branching", ["graph"],
     "torch.fx cannot trace module 'gate' (Gate): TraceError: symbolically traced variables cannot be used as inputs "
     "to control flow at {path}:{gate_line}: return x if x.sum() > 0 else -x. To fix: make it a leaf, called whole "
     "(its parameters then form one layer): the SPEC's \"tracer_kwargs\": {{'leaf_modules': [Gate]}} (or ['gate'])."),
    ("autocast", ["export", "--layers", "trunk.2", "--out", "{tmp}/split.pt2"],
     "Autocast's graph holds torch.autocast blocks that the torch.fx route recorded as nodes, which neither "
     "TorchScript nor torch.export exports again. Split the model on the torch.export route (the SPEC's \"method\": "
     "'export'): its split exports to a .pt2 file."),
    ("exported", ["export", "--layers", "trunk.2", "--out", "{tmp}/split.pt"],
     "the model was traced through torch.export (asked for (the SPEC's \"method\": 'export')): its graph applies "
     "ATen operations, which TorchScript cannot compile. Save it as a .pt2 file instead (--out FILE.pt2), which "
     "torch.export loads."),
    ("spec", ["rewrite", "--layers", "trunk.9"],
     "'trunk.9' is not a layer of this model. Did you mean 'trunk.2', 'trunk.0'? `fxsplit graph SPEC` lists the 4 "
     "layers."),
])
def test_fixes_are_given_as_spec_keys_and_options(tmp_path, capsys, function, command, message):
    path = spec_file(tmp_path, TINY + HINTS)
    command = [part.format(tmp=tmp_path) for part in command]
    code, _, err = run(capsys, command[0], f"{path}:{function}", *command[1:])
    gate_line = HINTS_LINE + HINTS.splitlines().index("        return x if x.sum() > 0 else -x") + 1
    assert code == 1 and err == f"fxsplit: error: {message.format(path=path, gate_line=gate_line)}\n"


def test_the_fix_a_hint_gives_works(tmp_path, capsys):
    path = spec_file(tmp_path, TINY + HINTS)
    code, out, _ = run(capsys, "export", f"{path}:autocast_exported", "--layers", "trunk.2", "--out",
                       str(tmp_path / "split.pt2"))
    assert code == 0 and out == f"exported and checked {tmp_path / 'split.pt2'}\n"


def test_the_guides_spec_example_runs_as_it_shows(tmp_path, capsys):
    guide = (ROOT / "docs" / "guide.md").read_text().split("\n## SPEC: what the command line runs\n")[1]
    source, commands = re.findall(r"```(?:python|bash)\n(.*?)```", guide, re.S)[:2]
    spec_file(tmp_path, source, "two_heads.py")
    lines = [line.split("#")[0].split() for line in commands.splitlines() if not line.startswith("#")]
    assert [line[:2] for line in lines] == [["fxsplit", c] for c in ("graph", "analyze", "rewrite", "export")]
    for line in lines:
        command = [str(tmp_path / part) if "." in part else part for part in line[1:]]  # files in tmp_path
        code, out, err = run(capsys, *command, *(["--json"] if line[1] == "analyze" else []))
        assert code == 0, (line, err)
    assert (tmp_path / "split.pt2").exists() and (tmp_path / "scores.png").exists()
