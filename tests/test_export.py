import copy
import os

import pytest
import torch
from torch import nn

import fxsplit
from tests.models import assert_unchanged, small_models, snapshot
from tests.patterns import TwoHeads, Unscriptable

MODELS = small_models()
SPLITS = {"cnn": ["backbone.block1.conv2"], "cnn3": ["backbone.stem.1"], "vit": ["vit.blocks.0.qkv"],
          "twice": ["backbone.mid"]}


def _split(name):
    model, x, kwargs = MODELS[name]
    return fxsplit.rewrite(model, SPLITS[name], **kwargs).eval(), x


def _assert_same(expected: dict, got: dict):
    assert set(expected) == set(got)
    for task in expected:
        torch.testing.assert_close(got[task], expected[task], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torchscript_matches(name):
    split, x = _split(name)
    _assert_same(split(x), fxsplit.script(split)(x))
    assert split.training is False and isinstance(split, fxsplit.SplitModule)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_exported_files_load_back_and_match(name, suffix, tmp_path):
    split, x = _split(name)
    before = snapshot(split)
    path = fxsplit.export(split, tmp_path / f"model{suffix}", x)
    assert_unchanged(split, before)
    assert os.listdir(tmp_path) == [f"model{suffix}"]
    loaded = torch.jit.load(path) if suffix == ".pt" else torch.export.load(path).module()
    bigger = torch.cat([x, x[:1]])  # the batch dimension of a .pt2 is dynamic
    _assert_same(split(bigger), loaded(bigger))


def test_arguments_bound_to_their_defaults_script_and_export(tmp_path):
    class Scaled(nn.Module):
        def forward(self, x, scale=None):
            return x if scale is None else x * scale

    gm = fxsplit.trace(Scaled())  # scale=None is bound while tracing, and guarded
    assert any("_assert_is_none" in str(n.target) for n in gm.graph.nodes)
    with pytest.raises(AssertionError, match="scale has been specialized to have value None"):
        gm(torch.ones(2), scale=2.0)
    assert torch.equal(fxsplit.script(gm)(torch.ones(2)), torch.ones(2))
    for suffix in (".pt", ".pt2"):
        fxsplit.export(gm, tmp_path / f"scaled{suffix}", torch.ones(2, 3))


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_inputs_that_do_not_fit_raise_and_write_nothing(suffix, tmp_path):
    split, x = _split("cnn")
    with pytest.raises(fxsplit.ExportError, match=r"cannot run on the example inputs \[\(4, 5\)\]"):
        fxsplit.export(split, tmp_path / f"model{suffix}", torch.randn(4, 5))
    assert os.listdir(tmp_path) == []


def test_export_needs_a_batch_of_two(tmp_path):
    split, x = _split("cnn")
    with pytest.raises(fxsplit.ExportError, match="a batch of 1: torch.export would fix the batch size"):
        fxsplit.export(split, tmp_path / "model.pt2", x[:1])
    assert os.listdir(tmp_path) == []


def test_unknown_format(tmp_path):
    split, x = _split("cnn")
    with pytest.raises(fxsplit.ExportError, match="format must be one of"):
        fxsplit.export(split, tmp_path / "model.onnx", x)


def test_script_failure_is_an_export_error_and_can_be_retried():
    class Unscriptable(nn.Module):
        def forward(self, x):
            return x * len({1: 2}.items().__class__.__name__)  # not TorchScript

    with pytest.raises(fxsplit.ExportError, match="TorchScript cannot compile"):
        fxsplit.script(Unscriptable())
    split, x = _split("cnn")
    _assert_same(split(x), fxsplit.script(split)(x))


def test_a_file_torchscript_cannot_save_is_an_export_error(tmp_path):
    """A method TorchScript is told to ignore compiles, but cannot be saved: ExportError, nothing written."""
    class Ignored(nn.Module):
        @torch.jit.ignore
        def double(self, x):
            return 2 * x

        def forward(self, x):
            return self.double(x)

    message = r"(?s)^TorchScript cannot save Ignored .*Python function call .double."
    with pytest.raises(fxsplit.ExportError, match=message):
        fxsplit.export(Ignored(), tmp_path / "model.pt", torch.ones(2, 3))
    assert os.listdir(tmp_path) == []


def test_a_split_traced_through_torch_export_saves_as_pt2_with_a_dynamic_batch(tmp_path):
    model, x, kwargs = MODELS["twice"]
    split = fxsplit.rewrite(model, SPLITS["twice"], example_inputs=x, method="export", **kwargs).eval()
    with pytest.raises(fxsplit.ExportError, match=r"traced through torch.export \(asked for \(method='export'\)\): "
                                                  r".*TorchScript cannot compile\. Save it as a \.pt2 file"):
        fxsplit.export(split, tmp_path / "split.pt", x)
    assert os.listdir(tmp_path) == []
    loaded = torch.export.load(fxsplit.export(split, tmp_path / "split.pt2", x)).module()
    bigger = torch.cat([x, x, x[:1]])
    _assert_same(split(bigger), loaded(bigger))
    _assert_same(model.eval()(bigger), loaded(bigger))


def test_a_failed_torchscript_export_names_the_model_and_the_cause_every_time(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads(nn.Sequential(Unscriptable(), nn.ReLU(), nn.Linear(8, 8)))
    split = fxsplit.rewrite(model.eval(), ["trunk.2"], tracer_kwargs={"leaf_modules": [Unscriptable]}).eval()
    assert type(copy.deepcopy(split)).__name__ == "TwoHeads"
    for attempt in range(2):  # a failed attempt must leave nothing behind that hides the cause the next time
        with pytest.raises(fxsplit.ExportError, match=r"(?s)^TorchScript cannot compile TwoHeads: .*'__class__'"):
            fxsplit.export(split, tmp_path / "split.pt", torch.randn(4, 4))
        with pytest.raises(fxsplit.ExportError, match=r"(?s)^TorchScript cannot compile TwoHeads: .*'__class__'"):
            fxsplit.script(split)
    assert os.listdir(tmp_path) == []
