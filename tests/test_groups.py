"""Grouped splits: a layer's copies serve groups of tasks, and streams split only where groups separate tasks."""

import copy
import pickle

import pytest
import torch
from torch import nn

import fxsplit
from fxsplit.modules import attribute
from tests.models import MultiHead, SmallCNN, Twice, assert_equivalent, count
from tests.patterns import NamedTasks
from tests.real_models import TiedLM, UncertaintyWeighted
from tests.reference import assert_per_task, reference

CNN = "backbone.block1.conv1", "backbone.block2.conv1"


def cnn(tasks=("a", "b", "c")):
    torch.manual_seed(0)
    return MultiHead(SmallCNN(), 16, tasks=tasks), torch.randn(4, 3, 16, 16)


def calls(split: fxsplit.SplitModule, target: str, training: bool | None = None) -> int:
    graph = split.graph if training is None else split.graph_for(training)
    return sum(node.op == "call_module" and node.target == target for node in graph.nodes)


@pytest.mark.parametrize("batch_branches", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_a_grouped_split_computes_each_task_as_the_model_with_its_groups_copies(batch_branches, training):
    model, x = cnn()
    model, x = model.double().train(training), x.double()  # a gradient that is zero but for rounding stays so
    groups = {CNN[0]: [["a", "b"], ["c"]], CNN[1]: "each"}
    split = fxsplit.rewrite(model, groups, batch_branches=batch_branches, example_inputs=x)  # the split check too
    assert split.groups == {CNN[0]: (("a", "b"), ("c",)), CNN[1]: (("a",), ("b",), ("c",))}
    assert_equivalent(model, split, x, {})
    assert_per_task(model, split, (x,))
    graph = fxsplit.layer_graph(model)
    assert count(split.parameters()) == count(model.parameters()) + graph.nodes[CNN[0]]["params"] + \
        2 * graph.nodes[CNN[1]]["params"]  # (groups - 1) x the layer's parameters


def test_shared_prefix_and_streams_run_once_and_a_stream_splits_only_where_groups_separate_its_tasks():
    model, x = cnn(("a", "b", "c", "d"))
    split = fxsplit.rewrite(model, {CNN[0]: [["a", "b"], ["c", "d"]], CNN[1]: [["a"], ["b"], ["c", "d"]]},
                            batch_branches=False)
    assert calls(split, "backbone.stem.0") == 1  # before any split layer: once
    assert calls(split, "copies.a_b.backbone.block1.conv1") == calls(split, "copies.c_d.backbone.block1.conv1") == 1
    assert calls(split, "backbone.block1.bn1") == calls(split, "backbone.block1.conv2") == 2  # once per stream
    assert calls(split, "backbone.block2.bn1") == 3  # streams a, b and c_d
    assert all(calls(split, f"copies.{holder}.backbone.block2.conv1") == 1 for holder in ("a", "b", "c_d"))
    assert calls(split, "heads.c") == calls(split, "heads.d") == 1
    assert print(split.tree()) is None and split.tree() == "\n".join([
        "a, b, c, d",
        "├── backbone.block1.conv1 [a_b]: a, b",
        "│   ├── backbone.block2.conv1 [a]: a",
        "│   └── backbone.block2.conv1 [b]: b",
        "└── backbone.block1.conv1 [c_d]: c, d",
        "    └── backbone.block2.conv1 [c_d]: c, d",
    ])


def test_a_group_copy_after_a_split_serves_each_of_its_tasks_streams():
    model, x = cnn(("a", "b", "c", "d"))
    groups = {CNN[0]: [["a", "b"], ["c", "d"]], CNN[1]: [["a", "c"], ["b", "d"]]}
    split = fxsplit.rewrite(model, groups, batch_branches=False, example_inputs=x)
    assert calls(split, "copies.a_c.backbone.block2.conv1") == 2  # streams a_b and c_d each reach it
    assert split.copy_of("a", CNN[1]) is split.copy_of("c", CNN[1]) is split.get_submodule(f"copies.a_c.{CNN[1]}")
    assert split.holder("d", CNN[0]) == "c_d" and split.holder("d", CNN[1]) == "b_d"
    assert split.tree().splitlines()[1:] == [
        "├── backbone.block1.conv1 [a_b]: a, b",
        "│   ├── backbone.block2.conv1 [a_c]: a",
        "│   └── backbone.block2.conv1 [b_d]: b",
        "└── backbone.block1.conv1 [c_d]: c, d",
        "    ├── backbone.block2.conv1 [a_c]: c",
        "    └── backbone.block2.conv1 [b_d]: d",
    ]
    assert_per_task(model, split, (x,))


def test_each_a_list_and_all_singletons_give_todays_per_task_split():
    model, x = cnn()
    splits = [fxsplit.rewrite(model, list(CNN)), fxsplit.rewrite(model, dict.fromkeys(CNN, "each")),
              fxsplit.rewrite(model, dict.fromkeys(CNN, [["c"], ["a"], ["b"]]))]
    for training in (True, False):
        codes = {split.graph_for(training).python_code("self").src for split in splits}
        assert len(codes) == 1
    assert [split.groups for split in splits[1:]] == [splits[0].groups] * 2
    assert splits[0].groups == dict.fromkeys(CNN, (("a",), ("b",), ("c",)))
    assert [list(split.state_dict()) for split in splits[1:]] == [list(splits[0].state_dict())] * 2


def test_parameter_groups_cover_every_parameter_once():
    model = UncertaintyWeighted()  # log_vars: a parameter forward does not use
    heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "abcd"})
    model.tasks, model.heads = list("abcd"), heads
    split = fxsplit.rewrite(model, {"trunk.0": [["a", "b", "c"], ["d"]], "trunk.2": [["a", "b"], ["c"], ["d"]]},
                            example_inputs=torch.randn(4, 6))
    owners = split.parameter_tasks()
    by_group = {group: {id(p) for p in split.group_parameters(group)} for group in set(owners.values())}
    everything = {id(p) for p in split.parameters()}
    assert sum(map(len, by_group.values())) == len(set().union(*by_group.values())) == len(everything)
    assert {id(p) for p in split.shared_parameters()} == \
        set().union(*(ids for group, ids in by_group.items() if len(group) > 1))
    for task in split.tasks:
        assert {id(p) for p in split.task_parameters(task)} == by_group.get((task,), set())
    assert {id(p) for p in split.group_parameters(["b", "a"])} == \
        {id(p) for p in split.get_submodule("copies.a_b.trunk.2").parameters()}
    assert {id(p) for p in split.group_parameters(("a", "b", "c"))} == \
        {id(p) for p in split.get_submodule("copies.a_b_c.trunk.0").parameters()}
    assert id(split.log_vars) in by_group[tuple("abcd")]  # unused: every task's
    with pytest.raises(fxsplit.TaskError, match="'e' is not a task"):
        list(split.group_parameters(["a", "e"]))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_grouped_splits_export_and_pickle(suffix, tmp_path):
    model, x = cnn()
    split = fxsplit.rewrite(model, {CNN[0]: [["a", "b"], ["c"]], CNN[1]: "each"}).eval()
    expected = split(x)
    path = fxsplit.export(split, tmp_path / f"model{suffix}", x)
    loaded = torch.jit.load(path) if suffix == ".pt" else torch.export.load(path).module()
    bigger = torch.cat([x, x[:1]])
    got = loaded(bigger)
    for task in expected:
        torch.testing.assert_close(got[task][:4], expected[task], rtol=1e-5, atol=1e-6)
    for again in (copy.deepcopy(split), pickle.loads(pickle.dumps(split))):
        assert again.groups == split.groups and again.tree() == split.tree()
        assert again.parameter_tasks() == split.parameter_tasks()
        assert all(torch.equal(again(x)[task], expected[task]) for task in expected)


def test_grouped_splits_on_the_export_route_match_the_fx_route():
    model, x = cnn()
    groups = {CNN[0]: [["a", "b"], ["c"]], "backbone.block2.bn1": [["a"], ["b", "c"]]}
    splits = [fxsplit.rewrite(model, groups, batch_branches=False, method="fx"),
              fxsplit.rewrite(model, groups, example_inputs=x, method="export")]
    assert splits[1].route == "export" and splits[1].groups == splits[0].groups
    assert splits[1].parameter_tasks() == splits[0].parameter_tasks() and splits[1].tree() == splits[0].tree()
    for training in (True, False):
        outputs = [split.train(training)(x.clone()) for split in splits]
        assert all(torch.equal(outputs[0][task], outputs[1][task]) for task in outputs[0])
    assert_per_task(model, splits[1], (x,))


def test_tied_weights_stay_tied_in_a_group_copy():
    torch.manual_seed(0)
    model, ids = TiedLM(), torch.randint(0, 24, (2, 5))
    split = fxsplit.rewrite(model, {"embed": [["lm", "denoise"], ["topic"]]}, example_inputs=ids)
    assert count(split.parameters()) == count(model.parameters()) + model.embed.weight.numel()
    shared = split.copy_of("lm", "embed")
    assert shared is split.copy_of("denoise", "embed") is split.get_submodule("copies.lm_denoise.embed")
    assert split.get_submodule("copies.lm_denoise.decoder").weight is shared.weight
    readers = [attribute(split, n.target) for n in split.graph.nodes if n.op in ("get_attr", "call_module")
               and n.target.startswith("copies.lm_denoise.")]
    assert {id(r if isinstance(r, nn.Parameter) else r.weight) for r in readers} == {id(shared.weight)}
    assert_per_task(model, split, (ids,))


def test_a_shared_value_that_groups_write_into_in_place_is_cloned_per_branch():
    torch.manual_seed(0)
    model, x = MultiHead(Twice(), 8, tasks=("a", "b", "c", "d")), torch.randn(4, 6)
    split = fxsplit.rewrite(model, {"backbone.inp": [["a", "b"], ["c", "d"]], "backbone.mid": "each"},
                            example_inputs=x)  # g = h * 2 is one stream per group; mid's branches add_ into it
    assert_per_task(model, split, (x,))


def test_init_is_told_a_group_copy_serves_the_groups_tasks():
    model, x = cnn()
    seen = []
    fxsplit.rewrite(model, {CNN[0]: [["b", "a"], ["c"]]}, init=lambda copy_, layer, task: seen.append((layer, task)))
    assert seen == [(CNN[0], ("a", "b")), (CNN[0], "c")]


def test_group_copies_of_free_task_names_sit_under_their_holders_joined():
    torch.manual_seed(0)
    model, x = NamedTasks(("type", "seg_", "add", "module")), torch.randn(5, 4)
    split = fxsplit.rewrite(model, {"trunk.2": [["type", "seg_"], ["add", "module"]]}, example_inputs=x)
    assert set(split.copies._modules) == {"type__seg__", "add_module_"}  # add_module: every nn.Module's
    assert split.holder("module", "trunk.2") == "add_module_"
    assert_per_task(model, split, (x,))


def test_holders_that_would_clash_are_refused_naming_both_groups():
    model = NamedTasks(("a", "b", "a_b"))
    with pytest.raises(fxsplit.TaskError, match=r"groups \['a', 'b'\] and \['a_b'\].*copies\.a_b"):
        fxsplit.rewrite(model, {"trunk.0": [["a", "b"], ["a_b"]], "trunk.2": "each"})


@pytest.mark.parametrize("partition, error, message", [
    ([["a", "b"], ["c", "e"]], fxsplit.UnknownTaskError, r"names 'e', which is not a task .* \['a', 'b', 'c'\]"),
    ([["a", "b"], ["b", "c"]], fxsplit.RepeatedTaskError, r"puts task 'b' in more than one group"),
    ([["a", "b"]], fxsplit.MissingTaskError, r"task 'c' uses layer 'backbone.block1.conv1' but is in none"),
    ([["a", "b", "c"]], fxsplit.LayerError, r"in one group: it splits nothing"),
    ("a", fxsplit.LayerError, r"must be 'each' or a list of groups"),
    (["a", "b"], fxsplit.LayerError, r"must be 'each' or a list of groups"),
    ([["a"], [], ["b", "c"]], fxsplit.LayerError, r"must be 'each' or a list of groups"),
])
def test_partitions_that_do_not_fit_the_tasks_are_refused_naming_the_culprit(partition, error, message):
    model, _ = cnn()
    with pytest.raises(error, match=message):
        fxsplit.rewrite(model, {CNN[0]: partition})
    assert issubclass(error, fxsplit.LayerError)


def test_an_unknown_layer_in_a_grouped_selection_is_named():
    model, _ = cnn()
    with pytest.raises(fxsplit.UnknownLayerError, match="backbone.block1.conv9"):
        fxsplit.rewrite(model, {"backbone.block1.conv9": [["a"], ["b", "c"]]})


class Beside(nn.Module):
    """Tasks a and b read ``mid`` after the trunk; task c reads the trunk."""

    def __init__(self):
        super().__init__()
        self.trunk, self.mid = nn.Linear(4, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "abc"})

    def forward(self, x):
        h = self.trunk(x)
        m = self.mid(h)
        return {"a": self.heads.a(m), "b": self.heads.b(m), "c": self.heads.c(h)}


def test_a_task_that_does_not_use_the_layer_may_be_named_in_its_partition():
    torch.manual_seed(0)
    model, x = Beside(), torch.randn(4, 4)
    split = fxsplit.rewrite(model, {"trunk": [["a", "b"], ["c"]], "mid": [["a"], ["b", "c"]]}, example_inputs=x)
    assert split.groups == {"trunk": (("a", "b"), ("c",)), "mid": (("a",), ("b",))}
    with pytest.raises(fxsplit.TaskError, match="task 'c' does not use the split layer 'mid'"):
        split.copy_of("c", "mid")
    assert split.tree().splitlines()[1:] == [
        "├── trunk [a_b]: a, b",
        "│   ├── mid [a]: a",
        "│   └── mid [b]: b",
        "└── trunk [c]: c",
    ]
    assert_per_task(model, split, (x,))


def test_analyze_on_a_grouped_split_scores_what_two_tasks_or_more_still_share_as_the_plain_loop_does():
    torch.manual_seed(0)

    class ThreeHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
            self.heads = nn.ModuleDict({task: nn.Linear(8, 1) for task in "abc"})

        def forward(self, x):
            h = self.trunk(x)
            return {task: head(h) for task, head in self.heads.items()}

    model = ThreeHeads()
    split = fxsplit.rewrite(model, {"trunk.0": [["a", "b"], ["c"]]}, example_inputs=torch.randn(6, 4))
    tasks = {task: (lambda task, sign: lambda out, batch: (out[task][:, 0] - sign * batch[0].sum(1)).pow(2).mean())(
        task, sign) for task, sign in zip("abc", (1, -1, 1))}
    batches = [(torch.randn(6, 4),) for _ in range(8)]
    report = fxsplit.analyze(copy.deepcopy(split), tasks, batches, progress=False, threshold=[0.0, 0.5])
    assert report.layers == ["copies.a_b.trunk.0", "trunk.2"]  # c's own copy and the heads serve one task each
    assert report.reach["copies.a_b.trunk.0"] == ["a", "b"] and report.reach["copies.c.trunk.0"] == ["c"]
    expected = reference(split, tasks, batches, report.graph, [0.0, 0.5])
    assert {S: report.scores_at(S) for S in (0.0, 0.5)} == {S: {layer: expected[S].get(layer, 0)
                                                                 for layer in report.layers} for S in (0.0, 0.5)}
