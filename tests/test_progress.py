"""analyze's progress on stderr: the running share of conflicting task pairs, on a terminal and off one."""

import re
import sys

import torch

import fxsplit

TASKS = {"a": lambda out, batch: out[:, 0].pow(2).mean(), "b": lambda out, batch: -out[:, 1].mean()}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _data(steps):
    return [torch.randn(8, 4) for _ in range(steps)]


def test_off_a_terminal_a_line_every_tenth_of_the_run_ends_with_the_reports_share(capsys):
    report = fxsplit.analyze(_net(), TASKS, _data(20), threshold=[0.1, 0.0])
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.search(r"step (\d+)/20", line).group(1)) for line in lines] == list(range(2, 21, 2))
    assert f"conflicting task pairs {report.conflict_rate(0.1)[('a', 'b')]:.1%} (cos < 0.1)" in lines[-1]


def test_a_run_of_unknown_length_prints_every_100_steps_and_at_the_end(capsys):
    fxsplit.analyze(_net(), TASKS, iter(_data(150)))
    assert [re.search(r"step (\d+),", line).group(1) for line in capsys.readouterr().err.splitlines()] == ["100", "150"]


def test_on_a_terminal_the_bar_shows_the_share(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    report = fxsplit.analyze(_net(), TASKS, _data(5))
    assert f"conflicting task pairs {report.conflict_rate(0.0)[('a', 'b')]:.1%}" in capsys.readouterr().err


def test_progress_false_shows_nothing(capsys):
    fxsplit.analyze(_net(), TASKS, _data(5), progress=False)
    assert capsys.readouterr().err == ""
