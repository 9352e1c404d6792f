import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxsplit
from fxsplit.rewrite.streams import join
from tests.patterns import GatedExperts, NamedTasks, Parametrized, TwoHeads, WriteIntoView
from tests.reference import assert_per_task
from tests.models import (
    MultiHead, SmallCNN, assert_equivalent, assert_unchanged, count, small_models, snapshot,
)

MODELS = small_models()
HEADS = ("heads.", "head_a", "head_b")


def shared_layers(model: nn.Module) -> list[str]:
    return [name for name in fxsplit.layer_graph(model) if not name.startswith(HEADS)]


@st.composite
def split_cases(draw):
    name = draw(st.sampled_from(sorted(MODELS)))
    model, x, kwargs = MODELS[name]
    layers = draw(st.lists(st.sampled_from(shared_layers(model)), unique=True, max_size=4))
    return name, layers, draw(st.booleans()), draw(st.booleans()), draw(st.booleans())


@given(split_cases())
def test_rewrite_is_equivalent_counts_and_isolates(case):
    name, layers, training, split_norms, batch_branches = case
    model, x, kwargs = MODELS[name]
    model = copy.deepcopy(model).train(training)
    split = fxsplit.rewrite(model, layers, split_norms=split_norms, batch_branches=batch_branches, **kwargs)
    assert split.training == training
    assert_equivalent(model, split, x, kwargs)

    graph = fxsplit.layer_graph(model)
    assert set(layers) <= set(split.split_layers)
    extra = sum(graph.nodes[layer]["params"] for layer in split.split_layers)
    assert count(split.parameters()) == count(model.parameters()) + (len(split.tasks) - 1) * extra

    groups = [set(map(id, split.shared_parameters()))] + [set(map(id, split.task_parameters(t))) for t in split.tasks]
    assert sum(map(len, groups)) == len(set().union(*groups)) == len(list(split.parameters()))
    for task, own in zip(split.tasks, groups[1:]):
        copies = [split.copy_of(task, layer) for layer in split.split_layers]
        assert {id(p) for c in copies for p in ([c] if isinstance(c, nn.Parameter) else c.parameters())} <= own

    for task in split.tasks:
        split.zero_grad(set_to_none=True)
        split(x)[task].square().sum().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in split.task_parameters(task))
        for other in set(split.tasks) - {task}:
            assert all(p.grad is None for p in split.task_parameters(other)), (task, other)


def test_no_layers_gives_the_same_function_and_parameters():
    model, x, kwargs = MODELS["cnn"]
    split = fxsplit.rewrite(model, [])
    assert split.split_layers == () and split.tasks == ("a", "b")
    assert count(split.parameters()) == count(model.parameters())
    assert_equivalent(model.eval(), split.eval(), x, kwargs)


def _calls(split: fxsplit.SplitModule, target: str) -> int:
    return sum(node.op == "call_module" and node.target == target for node in split.graph.nodes)


def test_prefix_runs_once_branches_once_per_task_and_dead_work_is_dropped():
    model, x, kwargs = MODELS["cnn3"]
    split = fxsplit.rewrite(model, ["backbone.block2.conv1"])
    assert _calls(split, "backbone.stem.0") == 1 and _calls(split, "backbone.block1.conv2") == 1
    assert _calls(split, "backbone.block2.bn1") == 3 and _calls(split, "backbone.block2.conv1") == 0
    assert all(_calls(split, f"copies.{t}.backbone.block2.conv1") == 1 for t in "abc")
    assert all(_calls(split, f"heads.{t}") == 1 for t in "abc")  # head b is never run on branch a
    assert _calls(split, "backbone.block2.down.0") == 1  # the projection does not depend on the split layer


def test_batched_branches_run_shared_layers_once_and_norms_per_branch():
    model, x, kwargs = MODELS["cnn3"]
    split = fxsplit.rewrite(model.train(), ["backbone.block1.conv2"])
    for conv in ("backbone.block2.conv1", "backbone.block2.conv2", "backbone.block2.down.0"):
        assert _calls(split, conv) == 1
    assert _calls(split, "backbone.block2.bn1") == 3  # BatchNorm sees each branch's batch alone
    assert sum(n.target is join for n in split.graph.nodes) == 2  # block2.conv1 and down.0 share one
    assert_equivalent(model, split, x, kwargs)
    unbatched = fxsplit.rewrite(model, ["backbone.block1.conv2"], batch_branches=False)
    assert _calls(unbatched, "backbone.block2.conv1") == 3
    assert not any(n.target is join for n in unbatched.graph.nodes)


def test_per_sample_modules_stay_on_the_concatenated_stream():
    model, x, kwargs = MODELS["vit"]
    split = fxsplit.rewrite(model, ["vit.blocks.0.qkv"], **kwargs)
    assert [_calls(split, f"vit.blocks.1.mlp.{i}") for i in range(4)] == [1, 1, 1, 1]  # Linear, GELU, Dropout, Linear
    assert_equivalent(model.eval(), split.eval(), x, kwargs)


def test_shared_tensor_updated_in_place_by_a_branch_is_cloned_per_branch():
    model, x, kwargs = MODELS["twice"]
    split = fxsplit.rewrite(model, ["backbone.mid"])
    clones = [node for node in split.graph.nodes if node.op == "call_method" and node.target == "clone"]
    assert len(clones) == 4
    assert_equivalent(model, split, x, kwargs)


def test_tasks_and_outputs():
    model, x, kwargs = MODELS["vit"]
    split = fxsplit.rewrite(model, ["vit.blocks.1.qkv"], **kwargs)
    assert split.tasks == ("a", "b")
    assert split(x)["a"].shape == (4, 3) and split(x)["b"].shape == (4, 2)
    with pytest.raises(fxsplit.TaskError, match=r"returns a tuple of 2.*outputs=\{'p': 0, 'q': 1\}"):
        fxsplit.rewrite(model, ["vit.blocks.1.qkv"], tasks=["p", "q"])  # which element is whose: never guessed
    nested = fxsplit.rewrite(model, [], outputs={"a": (0,), "b": (1,)})
    assert nested.tasks == ("a", "b")


def test_tasks_default_to_the_keys_of_a_mapping_output():
    model, x, _ = MODELS["cnn3"]
    assert fxsplit.rewrite(model, ["backbone.stem.0"]).tasks == ("a", "b", "c")
    assert fxsplit.rewrite(model, ["backbone.stem.0"], tasks=["c", "a"]).tasks == ("c", "a")


def test_user_model_is_never_modified():
    model, x, kwargs = MODELS["cnn"]
    model = copy.deepcopy(model).train()
    model(x)["a"].sum().backward()
    model.backbone.stem[0].register_forward_hook(lambda *args: None)
    before = snapshot(model)
    split = fxsplit.rewrite(model, ["backbone.stem.0", "backbone.block2.bn1"], init="reset", split_norms=True)
    split(x)["b"].sum().backward()
    with torch.no_grad():
        for p in split.parameters():
            p.add_(1.0)
    assert_unchanged(model, before)


def test_copies_are_independent_and_reachable_by_task_and_layer():
    model, x, kwargs = MODELS["cnn"]
    split = fxsplit.rewrite(model, ["backbone.block1.conv1"])
    a, b = split.copy_of("a", "backbone.block1.conv1"), split.copy_of("b", "backbone.block1.conv1")
    assert a is not b and a.weight is not b.weight
    assert torch.equal(a.weight, model.backbone.block1.conv1.weight)
    with pytest.raises(fxsplit.UnknownLayerError, match="Did you mean 'backbone.block1.conv1'"):
        split.copy_of("a", "backbone.block1.conv")
    with pytest.raises(fxsplit.TaskError, match="'z' is not a task"):
        split.copy_of("z", "backbone.block1.conv1")


def test_original_state_dict_loads_into_the_shared_part():
    model, x, kwargs = MODELS["cnn"]
    split = fxsplit.rewrite(model, ["backbone.block1.conv1"])
    result = split.load_state_dict(model.state_dict(), strict=False)
    assert result.unexpected_keys == ["backbone.block1.conv1.weight"]
    assert sorted(result.missing_keys) == ["copies.a.backbone.block1.conv1.weight",
                                           "copies.b.backbone.block1.conv1.weight"]


def test_init_reset_reinitialises_each_copy():
    model, x, kwargs = MODELS["cnn"]
    torch.manual_seed(1)
    split = fxsplit.rewrite(model, ["backbone.block1.conv2", "backbone.block1.bn2"], init="reset")
    original = model.backbone.block1.conv2.weight
    a, b = (split.copy_of(t, "backbone.block1.conv2").weight for t in "ab")
    assert not torch.equal(a, original) and not torch.equal(b, original) and not torch.equal(a, b)
    assert all(split.copy_of(t, "backbone.block1.bn2").weight.eq(1).all() for t in "ab")


def test_init_callable_sees_every_copy():
    model, x, kwargs = MODELS["vit"]
    seen = []

    def init(copy_, layer, task):
        seen.append((layer, task, type(copy_).__name__))
        with torch.no_grad():
            copy_.zero_()

    split = fxsplit.rewrite(model, ["vit.pos_embed"], init=init, **kwargs)
    assert seen == [("vit.pos_embed", "a", "Parameter"), ("vit.pos_embed", "b", "Parameter")]
    assert not split.copy_of("a", "vit.pos_embed").any()


def test_pickle_deepcopy_and_torch_save_keep_the_class():
    model, x, kwargs = MODELS["cnn"]
    split = fxsplit.rewrite(model.eval(), ["backbone.block2.conv2"]).eval()
    buffer = io.BytesIO()
    torch.save(split, buffer)
    buffer.seek(0)
    for restored in (copy.deepcopy(split), pickle.loads(pickle.dumps(split)), torch.load(buffer, weights_only=False)):
        assert isinstance(restored, fxsplit.SplitModule)
        assert restored.split_layers == split.split_layers and restored.tasks == split.tasks
        assert all(torch.equal(restored(x)[t], split(x)[t]) for t in split.tasks)
        assert count(restored.task_parameters("a")) == count(split.task_parameters("a"))


def test_a_traced_graph_module_can_be_rewritten():
    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return self.lin(x) if x.shape[0] > 0 else x

    model = MultiHead(nn.Sequential(SmallCNN(), Opaque()), 16)
    leaves = {"leaf_modules": [Opaque]}
    gm = fxsplit.trace(model, tracer_kwargs=leaves)
    before = snapshot(gm)
    x = torch.randn(2, 3, 8, 8)
    for split in (fxsplit.rewrite(gm, ["backbone.1"], example_inputs=x),
                  fxsplit.rewrite(model, ["backbone.1"], tracer_kwargs=leaves, example_inputs=x)):
        assert_equivalent(model.eval(), split.eval(), x, {})
    assert_unchanged(gm, before)


def _rejects(error, match, model=None, layers=(), **kwargs):
    model = MODELS["cnn"][0] if model is None else model
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fxsplit.rewrite(model, layers, **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("layers, error, match", [
    (["backbone.stem.O"], fxsplit.UnknownLayerError, r"'backbone.stem.O' is not a layer.*Did you mean .*'backbone.stem.0'"),
    (["backbone.block1"], fxsplit.LayerError, r"'backbone.block1' is a container of 4 layers"),
    (["backbone.stem.0", "backbone.stem.0"], fxsplit.LayerError, r"\['backbone.stem.0'\] given more than once"),
    ("backbone.stem.0", fxsplit.LayerError, r"got the string 'backbone.stem.0'; use \['backbone.stem.0'\]"),
    ([0], fxsplit.LayerError, r"must be names \(str\).*got int 0"),
    (None, fxsplit.LayerError, r"must be a list of layer names, got NoneType"),
    (["heads.a"], fxsplit.LayerError, r"'heads.a' cannot be split: only task 'a' uses it"),
])
def test_bad_layers(layers, error, match):
    _rejects(error, match, layers=layers)


@pytest.mark.parametrize("kwargs, match", [
    ({"tasks": ["a"]}, r"at least two tasks"),
    ({"tasks": ["a", "a"]}, r"\['a'\] given more than once"),
    ({"tasks": ["a", "z"]}, r"task\(s\) \['z'\] are not keys of the model's output \['a', 'b'\]"),
    ({"tasks": ["a", "seg-map"]}, r"must be Python identifiers.*seg-map"),
    ({"tasks": "ab"}, r"tasks must be a list of names"),
    ({"outputs": {"a": "a", "b": "zz"}}, r"outputs\['b'\] = 'zz'.*has no 'zz' \(it has \['a', 'b'\]\)"),
    ({"outputs": {"a": "a"}, "tasks": ["a", "b"]}, r"outputs names tasks \['a'\] but the tasks are \['a', 'b'\]"),
])
def test_bad_tasks(kwargs, match):
    _rejects(fxsplit.TaskError, match, **kwargs)


def test_a_tensor_output_needs_task_names():
    _rejects(fxsplit.TaskError, r"not a mapping.*pass tasks=", model=SmallCNN())


def test_bad_init():
    _rejects(fxsplit.InitError, r"init must be 'copy', 'reset' or a callable", layers=["backbone.stem.0"], init="zero")
    model, x, kwargs = MODELS["vit"]
    _rejects(fxsplit.InitError, r"'vit.pos_embed' \(Parameter\) has no reset_parameters", model=model,
             layers=["vit.pos_embed"], init="reset", **kwargs)


def test_a_split_model_is_not_split_again():
    split = fxsplit.rewrite(MODELS["cnn"][0], ["backbone.stem.0"])
    with pytest.raises(fxsplit.LayerError, match="already split"):
        fxsplit.rewrite(split, ["backbone.stem.1"])


def test_twice_called_layer_split_fans_out_at_its_first_call():
    model, x, kwargs = MODELS["twice"]
    split = fxsplit.rewrite(model, ["backbone.shared"])
    assert _calls(split, "backbone.inp") == 1
    assert sum(n.op == "call_module" and n.target.startswith("copies.") for n in split.graph.nodes) == 8
    assert_equivalent(model, split, x, kwargs)
    assert isinstance(split.copy_of("d", "backbone.shared"), nn.Linear)


# The torch.export route: the same surgery on graphs of ATen operations, one graph per mode.

def _cases() -> dict[str, tuple[nn.Module, object, dict, list[str]]]:
    """name -> (model, example input, rewrite arguments, layers to split) for both routes."""
    from tests.real_models import CASES

    layers = {"cnn3": ["backbone.block1.conv2", "backbone.block1.bn1"], "vit": ["vit.pos_embed", "vit.blocks.1.qkv"],
              "twice": ["backbone.shared", "backbone.mid"]}
    cases = {name: (*MODELS[name], chosen) for name, chosen in layers.items()}
    torch.manual_seed(0)
    for name, layers in (("tied-lm", ["embed", "mix"]), ("log-vars", ["trunk.2"]), ("dict-batch", ["stem.1"])):
        case = CASES[name]
        cases[name] = (case.build(), case.inputs(), {"outputs": case.outputs} if case.outputs else {}, layers)
    return cases


EXPORT_CASES = _cases()


@pytest.fixture(scope="module")
def both_routes():
    """name -> (fx route split, export route split) of every case, in train mode; the fx route unbatched, so that
    outputs are bit for bit the model's, the export route with its default (batching, which does nothing there)."""
    splits = {}
    for name, (model, x, kwargs, layers) in EXPORT_CASES.items():
        model = copy.deepcopy(model).train()
        splits[name] = (fxsplit.rewrite(model, layers, batch_branches=False, method="fx", **kwargs),
                        fxsplit.rewrite(model, layers, example_inputs=(x,), method="export", **kwargs))
    return splits


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_route_splits_as_the_fx_route_does(both_routes, name):
    """Same copies, parameter groups, ties and kept state; bit-equal outputs in both modes, and BatchNorm statistics
    updated alike (a shared BatchNorm in the branches counts and averages once per branch, in task order)."""
    _, x, _, _ = EXPORT_CASES[name]
    by_fx, by_export = (copy.deepcopy(split) for split in both_routes[name])
    assert (by_fx.route, by_export.route) == ("fx", "export") and by_export.route_reason == "asked for (method='export')"
    assert by_export.split_layers == by_fx.split_layers and by_export.has_two_graphs
    assert not any(node.target is torch.cat for node in by_export.graph.nodes)  # batching: nothing to batch
    assert _owners(by_export) == _owners(by_fx)
    assert [id(p) for p in by_export.parameters()] != [id(p) for p in by_fx.parameters()]
    assert count(by_export.parameters()) == count(by_fx.parameters())
    for task in by_fx.tasks:
        for layer in by_fx.split_layers:
            assert type(by_export.copy_of(task, layer)) is type(by_fx.copy_of(task, layer)), (task, layer)
    for training in (True, True, False, True):
        outputs = [split.train(training)(x) for split in (by_fx, by_export)]
        assert all(torch.equal(outputs[0][task], outputs[1][task]) for task in by_fx.tasks), training
    states = [split.state_dict() for split in (by_fx, by_export)]
    assert set(states[1]) == set(states[0])
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0]), name


def _owners(split: fxsplit.SplitModule) -> dict[str, tuple[tuple[str, ...], frozenset[str]]]:
    """Every name of every parameter -> the tasks that use it, and all its names (tied parameters have several)."""
    tasks = split.parameter_tasks()
    names: dict[int, set[str]] = {}
    for name, parameter in split.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), set()).add(name)
    by_id = {id(p): tasks[name] for name, p in split.named_parameters()}
    return {name: (by_id[id(p)], frozenset(names[id(p)])) for name, p in split.named_parameters(remove_duplicate=False)}


def test_export_route_runs_the_prefix_once_each_branch_once_per_task_and_drops_dead_work(both_routes):
    split = copy.deepcopy(both_routes["cnn3"][1])
    train = split.graph_for(True)

    def count_path(path: str) -> int:
        return sum(node.meta.get("path") == path for node in train.nodes)

    assert count_path("backbone.stem.0.conv2d") == 1 and count_path("backbone.block1.conv1.conv2d") == 1
    assert count_path("backbone.block1.conv2.conv2d") == 3 and count_path("backbone.block2.bn2.batch_norm") == 3
    assert [count_path(f"heads.{t}.linear") for t in "abc"] == [1, 1, 1]  # head b is never run on branch a
    reads = {node.target for node in train.nodes if node.op == "get_attr"}
    assert {f"copies.{t}.backbone.block1.conv2.{name}" for t in "abc" for name in ("weight", "bias")} <= reads
    assert "backbone.block1.conv2.weight" not in reads
    assert sum(node.op == "call_module" for node in train.nodes) == 1  # torch.export's checks of the input
    nbt = "backbone.block2.bn1.num_batches_tracked"
    assert split.state_dict()[nbt] == 0
    split(EXPORT_CASES["cnn3"][1])
    assert split.state_dict()[nbt] == 3  # a shared BatchNorm in the branches counts each branch's batch


def test_export_route_copies_batchnorm_statistics_per_task(both_routes):
    split = copy.deepcopy(both_routes["cnn3"][1]).train()
    split(EXPORT_CASES["cnn3"][1])
    norms = [split.copy_of(task, "backbone.block1.bn1") for task in split.tasks]
    assert all(isinstance(norm, nn.BatchNorm2d) and norm.num_batches_tracked == 1 for norm in norms)
    assert len(norms) == 3 and "backbone.block1.bn1.running_mean" not in split.state_dict()
    assert norms[0].running_mean is not norms[1].running_mean
    assert not torch.equal(norms[0].running_mean, torch.zeros_like(norms[0].running_mean))


def test_export_route_split_switches_modes_takes_any_batch_and_survives_pickling(both_routes):
    model, x, kwargs, _ = EXPORT_CASES["cnn3"]
    split = both_routes["cnn3"][1]
    batch = torch.randn(7, *x.shape[1:])  # traced with a batch of 4
    for restored in (copy.deepcopy(split), pickle.loads(pickle.dumps(split)), _saved_and_loaded(split)):
        assert restored.route == "export" and restored.meta["route"] == "export"
        for training in (False, True):
            assert_equivalent(copy.deepcopy(model).train(training), restored.train(training), batch, kwargs,
                              tolerance=0.0)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[2\] == 16"):
        split(torch.randn(2, 3, 8, 8))  # sizes other than the batch are fixed at the example's


def _saved_and_loaded(module: nn.Module) -> nn.Module:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


class DeepSupervision(nn.Module):
    """Task 'c' reads the trunk's last layer only in train mode (an auxiliary loss on deep features)."""

    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(4, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "abc"})

    def forward(self, x):
        h = self.first(x)
        g = self.last(h)
        out = {"a": self.heads.a(g), "b": self.heads.b(g), "c": self.heads.c(h)}
        if self.training:
            out["c"] = out["c"] + self.heads.c(g)
        return out


@pytest.mark.parametrize("training", [False, True])
def test_a_layer_that_a_task_uses_in_one_mode_only_gets_that_tasks_copy(training):
    torch.manual_seed(0)
    model, x = DeepSupervision().train(training), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["last"], example_inputs=x)
    assert {task for task in split.tasks if hasattr(split.copies, task) and hasattr(getattr(split.copies, task), "last")} \
        == {"a", "b", "c"}
    assert_per_task(model, split, (x,))


def test_a_hooked_shared_layer_in_the_branches_runs_once_per_branch_with_its_rows():
    torch.manual_seed(0)
    model = MultiHead(SmallCNN(), 16)
    x = torch.randn(4, 3, 16, 16)
    seen = []
    model.backbone.block2.conv1.register_forward_hook(lambda module, args, out: seen.append(out.shape[0]))
    split = fxsplit.rewrite(model, ["backbone.block1.conv2"], example_inputs=x)
    seen.clear()
    split(x)
    assert seen == [4, 4]  # one call per branch, each with the branch's own rows
    assert _calls(split, "backbone.block2.conv2") == 1  # what has no hook still runs once on the joined branches


@pytest.mark.parametrize("tasks, holders", [
    (("type", "train"), ("type_", "train_")),  # names nn.Module uses itself
    (("eval", "half", "cuda", "forward"), ("eval_", "half_", "cuda_", "forward_")),
    (("copies", "class", "None"), ("copies", "class_", "None_")),  # Python keywords name no attribute
    (("seg", "seg_", "seg__"), ("seg", "seg__", "seg___")),  # a trailing underscore gets one more: no two collide
])
def test_every_identifier_names_a_task_and_its_copies_sit_under_a_documented_name(tasks, holders):
    torch.manual_seed(0)
    model, x = NamedTasks(tasks), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=x)
    assert split.tasks == tasks
    assert set(split.copies._modules) == set(holders)
    for task, holder in zip(tasks, holders):
        assert split.copy_of(task, "trunk.2") is split.get_submodule(f"copies.{holder}.trunk.2")
    assert len({id(split.copy_of(task, "trunk.2").weight) for task in tasks}) == len(tasks)
    assert_per_task(model, split, (x,))


def test_init_reset_resets_what_a_parametrization_derives_the_weight_from():
    torch.manual_seed(0)
    model = TwoHeads(Parametrized())
    split = fxsplit.rewrite(model, ["trunk.normed"], init="reset")
    original = model.trunk.normed
    bound = 1 / 8 ** 0.5  # nn.Linear's reset_parameters draws weight and bias within 1 / sqrt(fan_in)
    copies = [split.copy_of(task, "trunk.normed") for task in split.tasks]
    for copy_ in copies:
        assert nn.utils.parametrize.is_parametrized(copy_, "weight")
        assert not torch.allclose(copy_.weight, original.weight) and not torch.equal(copy_.bias, original.bias)
        assert copy_.weight.abs().max() <= bound and copy_.bias.abs().max() <= bound
        g, v = copy_.parametrizations.weight.original0, copy_.parametrizations.weight.original1
        torch.testing.assert_close(copy_.weight, g * v / v.norm(dim=1, keepdim=True))
    assert not torch.allclose(copies[0].weight, copies[1].weight)
    _rejects(fxsplit.InitError, r"'trunk.symmetric'.*parametrization Symmetric of its weight has no right_inverse",
             model=model, layers=["trunk.symmetric"], init="reset")


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_write_into_a_view_of_an_activation_before_the_split_is_kept(method):
    torch.manual_seed(0)
    model, x = TwoHeads(WriteIntoView()), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["trunk.last"], example_inputs=x, method=method)
    assert_per_task(model, split, (x,))
    if method == "fx":
        unchecked = fxsplit.rewrite(model, ["trunk.last"])  # kept without an example to catch it, too
        assert sum(node.target == "add_" for node in unchecked.graph.nodes) == 1
        assert_per_task(model, unchecked, (x,))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_branch_value_written_into_a_view_of_a_shared_activation_is_refused_by_name(method):
    torch.manual_seed(0)
    model, x = TwoHeads(WriteIntoView()), torch.randn(5, 4)
    with pytest.raises(fxsplit.LayerError, match=r"in-place write at trunk\.add writes a value computed after the "
                                                 r"split layer 'trunk\.mid' into .*trunk\.stem.*read afterwards \(at "
                                                 r"trunk\.last.*write out of place"):
        fxsplit.rewrite(model, ["trunk.mid"], example_inputs=x, method=method)


def _grads_set_by_forward(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    module(x)
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("example", [False, True])
def test_a_backward_call_inside_forward_runs_once_in_the_split(example):
    torch.manual_seed(0)
    model, x = TwoHeads(GatedExperts()).train(), torch.randn(6, 4)
    split = fxsplit.rewrite(model, ["trunk.experts.0"], example_inputs=x if example else None)
    assert sum(node.target == "backward" for node in split.graph.nodes) == 1
    expected = _grads_set_by_forward(model, x)
    assert sorted(expected) == ["trunk.gate.logits.bias", "trunk.gate.logits.weight", "trunk.stem.bias",
                                "trunk.stem.weight"]
    got = _grads_set_by_forward(split, x)
    assert sorted(got) == sorted(expected) and all(torch.equal(got[name], expected[name]) for name in expected)
    assert not any(node.target == "backward" for node in split.eval().graph.nodes)  # train mode's code only
    assert_per_task(model, split, (x,))


def test_a_backward_call_inside_forward_after_a_split_layer_is_refused_by_name():
    torch.manual_seed(0)
    model, x = TwoHeads(GatedExperts()).train(), torch.randn(6, 4)
    with pytest.raises(fxsplit.LayerError, match=r"trunk\.gate\.backward .*after the split layer 'trunk\.stem'.*"
                                                 r"once per task"):
        fxsplit.rewrite(model, ["trunk.stem"], example_inputs=x)
