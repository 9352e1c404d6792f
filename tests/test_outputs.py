import pytest
import torch

import fxsplit
from fxsplit.outputs import paths_read, select, task_paths


def _grad(*shape):
    return torch.randn(*shape, requires_grad=True) * 1.0


def test_paths_read_by_each_loss():
    h = _grad(4, 3)
    out = {"pair": (h * 2, h[:, :1] * 3), "other": _grad(4)}
    losses = {"first": out["pair"][0].sum(), "second": out["pair"][1].pow(2).mean(), "both": out["other"].sum()
              + out["pair"][0].mean(), "nothing": torch.zeros((), requires_grad=True)}
    assert paths_read(out, losses) == {"first": ("pair", 0), "second": ("pair", 1), "both": (), "nothing": ()}


def test_a_part_computed_from_another_counts_as_reading_both():
    h = _grad(4, 3)
    out = (h, h[:, :2])  # out[1] is a view of out[0]: its loss depends on out[0] too
    assert paths_read(out, {"b": out[1].sum()}) == {"b": ()}


def test_task_paths_and_select():
    out = {"seg": 1, "depth": 2}
    assert task_paths(out, None, None) == {"seg": ("seg",), "depth": ("depth",)}
    assert task_paths((1, (2, 3)), ["a", "b"], {"a": 0, "b": (1, 0)}) == {"a": (0,), "b": (1, 0)}
    assert select((1, (2, 3)), (1, 0), "b") == 2
    assert task_paths(5, ["a", "b"], None) == {"a": (), "b": ()}
    with pytest.raises(fxsplit.TaskError, match=r"outputs=\{'a': 0, 'b': 1\}"):
        task_paths([1, 2], ["a", "b"], None)
    with pytest.raises(fxsplit.TaskError, match=r"not keys of the model's output \['x', 'y'\].*outputs=\{'a': 'x'"):
        task_paths({"x": 1, "y": 2}, ["a", "b"], None)
