"""Python values a graph holds (fxsplit/tracing/frozen.py): a module's mode or attribute that traced code read is
recorded, a change after tracing stops the graph by name, and the traced or split module holds stand-ins of the
model's modules, so that such attributes can be found and set."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fxsplit
from tests.patterns import Moded


class DropPath(nn.Module):
    """timm's DropPath in miniature: the probability is a plain attribute that traced code reads."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1) > self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


class Scheduled(nn.Module):
    """An epoch the training loop sets (``model.epoch = e``) that forward reads; a note it never reads."""

    def __init__(self):
        super().__init__()
        self.epoch, self.note = 0, "untouched"
        self.stem = nn.Linear(4, 8)
        self.body = Moded()
        self.drop = DropPath()
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 2)})

    def forward(self, x):
        h = self.drop(self.body(self.stem(x)))
        if self.epoch >= 3:
            h = h.detach()
        return {task: head(h) for task, head in self.heads.items()}


def _split(method: str) -> tuple[Scheduled, fxsplit.SplitModule, torch.Tensor]:
    torch.manual_seed(0)
    model, x = Scheduled(), torch.randn(4, 4)
    return model, fxsplit.rewrite(model, ["body.linear"], example_inputs=x, method=method), x


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_module_switched_to_another_mode_alone_stops_the_graph_by_name(method):
    model, split, x = _split(method)
    split.body.eval()
    with pytest.raises(fxsplit.StaleGraphError, match="module 'body' is in eval mode"):
        split(x)
    split.eval()  # the whole module: its eval graph
    assert torch.allclose(split(x)["a"], model.eval()(x)["a"])
    split.train()
    assert torch.allclose(split(x)["a"], model.train()(x)["a"])


@pytest.mark.parametrize("method", ["fx", "export"])
def test_an_attribute_the_training_loop_sets_stops_the_graph_until_it_is_put_back(method):
    model, split, x = _split(method)
    split.note = "changed"  # forward never reads it
    split(x)
    split.epoch = 3
    with pytest.raises(fxsplit.StaleGraphError, match=r"epoch is 3, but the train-mode graph .* traced with 0"):
        split(x)
    restored = pickle.loads(pickle.dumps(split))
    with pytest.raises(fxsplit.StaleGraphError, match="epoch is 3"):
        restored(x)
    split.epoch = 0
    assert torch.allclose(split(x)["b"], model(x)["b"])


def test_a_drop_path_schedule_finds_the_modules_and_stops_the_graph_that_holds_the_old_probability():
    model, split, x = _split("fx")
    found = [module for module in split.modules() if isinstance(module, DropPath)]
    assert len(found) == 1 and found[0].drop_prob == 0.0
    for module in found:
        module.drop_prob = 0.1
    with pytest.raises(fxsplit.StaleGraphError, match=r"drop\.drop_prob is 0.1"):
        split(x)
    with pytest.raises(fxsplit.StaleGraphError):
        copy.deepcopy(split)(x)


def test_stand_ins_keep_the_models_classes_attributes_and_modes_and_still_export(tmp_path):
    model, split, x = _split("fx")
    traced = fxsplit.trace(model, x)
    for module in (traced, split):
        assert type(module.body) is Moded and module.body.training and "Moded" in str(module)
    assert type(split.drop) is DropPath  # the split keeps even what no graph calls
    assert traced.body.linear.weight is model.body.linear.weight  # a view: the model's own tensors
    assert sum(p.numel() for p in traced.parameters()) == sum(p.numel() for p in model.parameters())
    fxsplit.export(split, tmp_path / "split.pt", x)
    fxsplit.export(split, tmp_path / "split.pt2", x)


def test_a_list_the_graph_read_counts_as_changed_when_changed_in_place():
    class Indexed(nn.Module):
        def __init__(self):
            super().__init__()
            self.order = [0, 1]
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

        def forward(self, x):
            x = x[:, self.order[0]:self.order[1] + 3]
            return {task: head(x) for task, head in self.heads.items()}

    split = fxsplit.rewrite(Indexed(), [], tasks=["a", "b"])
    x = torch.randn(2, 4)
    split(x)
    split.order.append(2)
    with pytest.raises(fxsplit.StaleGraphError, match=r"order is \[0, 1, 2\]"):
        split(x)
