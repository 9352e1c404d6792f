import itertools
import math

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fxsplit
from fxsplit.grouping import LayerGrouping, average_linkage, check_partition, within_budget
from tests.patterns import DetachedProbe
from tests.reference import assert_per_task

CLUSTERS, PER_CLUSTER, DIM = 3, 4, 8
PLANTED = [[f"{name}{i}" for i in range(PER_CLUSTER)] for name in "xyz"[:CLUSTERS]]


def planted_problem(steps: int = 20):
    """12 regression tasks in 3 planted clusters on one shared MLP output: a task's target is its cluster's
    projection of the input (the three directions 120 degrees apart, so their pulls cancel), plus a little noise
    of its own. Tasks of a cluster pull the shared weights the same way, clusters pull them apart."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(DIM, 2))[0].T
    directions = [math.cos(2 * math.pi * c / CLUSTERS) * basis[0] + math.sin(2 * math.pi * c / CLUSTERS) * basis[1]
                  for c in range(CLUSTERS)]

    def regress(cluster: int, column: int):
        return lambda out, batch: (out[:, 0] - 3 * batch[0] @ directions[cluster]
                                   - 0.05 * batch[1][:, column]).pow(2).mean()

    tasks = {task: regress(c, c * PER_CLUSTER + i) for c, group in enumerate(PLANTED) for i, task in enumerate(group)}
    model = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 1))
    data = [(torch.randn(16, DIM), torch.randn(16, len(tasks))) for _ in range(steps)]
    return model, tasks, data


@pytest.fixture(scope="module")
def planted():
    model, tasks, data = planted_problem()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # joint training: the clusters' pulls then cancel
    return fxsplit.analyze(model, tasks, data, optimizer=optimizer, progress=False)


def test_groups_recover_planted_clusters(planted, tmp_path):
    conflicting = [layer for layer, score in planted.scores.items() if score > 0]
    assert sorted(conflicting) == ["0", "2", "4"]  # every linear layer of the MLP is shared by all 12 tasks
    for selection in (planted.groups(k=3), planted.groups(budget=10.0), planted.groups(k=3, max_groups=3)):
        assert selection == {layer: PLANTED for layer in planted.layers}
        assert selection.tasks == planted.tasks and selection.outputs == planted.groups(k=1).outputs
    two = planted.groups(k=3, max_groups=2)
    for layer, groups in two.items():  # two groups: one planted cluster against the other two
        assert len(groups) == 2 and all(any(set(c) <= set(g) for g in groups) for c in PLANTED)
    loaded = fxsplit.ConflictReport.load(planted.save(tmp_path / "report.json"))
    assert loaded.groups(budget=1.0) == planted.groups(budget=1.0)


def test_the_printout_reads_the_decision(planted):
    text = str(planted.groups(k=3))
    lines = text.splitlines()
    params = {layer: planted.graph.nodes[layer]["params"] for layer in planted.layers}
    added = 2 * sum(params.values())
    assert lines[0] == (f"Grouped split of 3 layers for 12 tasks: adds {added:,} parameters "
                        f"({added / sum(params.values()):.1%} of the model's {sum(params.values()):,})")
    assert lines[1] == (f"removes {sum(planted.scores.values()):,} conflicts (cosine < 0.0, 20 steps); one copy per "
                        f"task on these layers: adds {11 * sum(params.values()):,}, removes "
                        f"{sum(planted.scores.values()):,}")
    assert f"0: 3 groups, 3 streams after it; 3 copies of {params['0']:,} parameters add {2 * params['0']:,} and " \
           f"remove {planted.scores['0']:,} of its {planted.scores['0']:,} conflicts" in lines
    assert "  groups: x0 x1 x2 x3 | y0 y1 y2 y3 | z0 z1 z2 z3" in lines
    rates = [line for line in lines if line.startswith("  conflict rate per step: within groups 0.000, between")]
    assert len(rates) == 3


def test_the_plot_draws_the_tree_and_the_heat_maps(planted, tmp_path):
    selection = planted.groups(k=3)
    figure = selection.plot(tmp_path / "groups.png")
    assert (tmp_path / "groups.png").stat().st_size > 1000
    assert [axes.get_title() for axes in figure.axes[1:4]] == ["0: 3 copies", "2: 3 copies", "4: 3 copies"]
    hand_made = fxsplit.GroupedSelection({"0": "each", "4": [["x0"], sorted(set(planted.tasks) - {"x0"})]},
                                         planted.tasks)
    assert len(hand_made.plot().axes) == 1  # the tree only: a hand-made selection has no pair counts


# --- the clustering on hand-built conflict counts ---------------------------------------------------------------


@st.composite
def blocks(draw):
    """Symmetric pair counts over ``steps`` steps with a planted block structure and a clear gap: every pair
    inside a block conflicts fewer times than every pair across blocks; and the blocks (task indices)."""
    labels = draw(st.lists(st.integers(0, 4), min_size=2, max_size=12))
    steps = draw(st.integers(2, 50))
    gap = draw(st.integers(1, steps))
    n = len(labels)
    counts = np.zeros((n, n), dtype=np.int64)
    for i, j in itertools.combinations(range(n), 2):
        inside = labels[i] == labels[j]
        counts[i, j] = counts[j, i] = draw(st.integers(0, gap - 1) if inside else st.integers(gap, steps))
    found = {}
    for i, label in enumerate(labels):
        found.setdefault(label, []).append(i)
    return counts, steps, sorted(found.values())


def grouping_of(counts: np.ndarray, steps: int = 10, params: int = 7) -> LayerGrouping:
    return LayerGrouping("layer", tuple(f"t{i}" for i in range(len(counts))), counts, steps, params)


@given(blocks())
def test_average_linkage_finds_blocks_separated_by_a_gap(case):
    counts, steps, planted = case
    grouping = grouping_of(counts, steps)
    assert grouping.partition(len(planted)) == [[f"t{i}" for i in block] for block in planted]
    assert grouping.removed(len(planted)) == sum(counts[i, j] for i, j in itertools.combinations(range(len(counts)), 2)
                                                 if not any(i in b and j in b for b in planted))


@given(st.integers(2, 10).flatmap(lambda n: st.lists(st.integers(0, 20), min_size=n * (n - 1) // 2,
                                                    max_size=n * (n - 1) // 2).map(lambda c: (n, c))))
def test_every_cut_is_a_partition_and_removes_what_it_separates(case):
    n, flat = case
    counts = np.zeros((n, n), dtype=np.int64)
    counts[np.triu_indices(n, 1)] = flat
    grouping = grouping_of(counts + counts.T)
    removed = []
    for groups in range(1, n + 1):
        partition = grouping.partition(groups)
        assert len(partition) == groups and sorted(sum(partition, [])) == sorted(grouping.tasks)
        assert grouping.summary(partition).removed == grouping.removed(groups)
        removed.append(grouping.removed(groups))
    assert removed[0] == 0 and removed[-1] == grouping.total == sum(flat) and removed == sorted(removed)
    assert sorted(grouping.order) == sorted(grouping.tasks)


def test_ties_merge_the_clusters_of_the_first_tasks():
    merges = average_linkage(np.zeros((4, 4), dtype=np.int64))
    assert [(m.left, m.right) for m in merges] == [((0,), (1,)), ((0, 1), (2,)), ((0, 1, 2), (3,))]


@given(st.lists(st.tuples(st.integers(2, 6), st.integers(1, 50), st.integers(0, 10_000)), min_size=1, max_size=4),
       st.integers(0, 400), st.none() | st.integers(2, 6))
def test_the_greedy_stays_within_budget_and_stops_only_when_no_move_fits(layers, allowance, max_groups):
    groupings = []
    for n, params, seed in layers:
        counts = np.random.default_rng(seed).integers(0, 10, (n, n))
        grouping = grouping_of(np.triu(counts, 1) + np.triu(counts, 1).T, params=params)
        grouping.layer = f"layer{len(groupings)}"
        groupings.append(grouping)
    chosen = within_budget(groupings, allowance, max_groups)
    left = allowance - sum(g.added(chosen[g.layer]) for g in groupings if g.layer in chosen)
    assert left >= 0 and all(groups >= 2 for groups in chosen.values())
    for grouping in groupings:  # no move that removes more still fits
        now, most = chosen.get(grouping.layer, 1), min(max_groups or len(grouping.tasks), len(grouping.tasks))
        assert all(grouping.removed(g) == grouping.removed(now) or grouping.added(g) - grouping.added(now) > left
                   for g in range(now + 1, most + 1))


# --- the budget rule on a hand-built report ---------------------------------------------------------------------


def hand_built(layers: dict[str, tuple[int, dict]], tasks="abcd", reach=None, other_params: int = 0):
    """A report over ``tasks`` whose ``layers`` map to (parameters, {pair: count}) over 10 steps; the model has
    ``other_params`` more parameters in a head."""
    pairs = [list(pair) for pair in itertools.combinations(tasks, 2)]
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, {"kind": "Linear", "params": params}) for layer, (params, _) in layers.items())
    graph.add_node("head", kind="Linear", params=other_params)
    return fxsplit.ConflictReport(
        tasks=list(tasks), thresholds=[0.0], layers=list(layers), pairs=pairs,
        counts=[[[counts.get("".join(pair), 0) for pair in pairs] for _, counts in layers.values()]],
        mean_cosine=[[0.0] * len(pairs)] * len(layers), histogram=[[0] * 20] * len(layers),
        whole_cosine=[[0.0] * len(pairs)] * 10, steps=10, reach=reach or {layer: list(tasks) for layer in layers},
        left_out={}, graph=graph)


ACROSS = {"ac": 10, "ad": 10, "bc": 10, "bd": 10}  # {a, b} against {c, d}


def test_the_budget_takes_the_most_conflicts_per_parameter_first_and_counts_parameters_exactly():
    report = hand_built({"cheap": (10, ACROSS), "dear": (100, ACROSS), "quiet": (5, {})}, other_params=885)
    assert sum(params for _, params in report.graph.nodes(data="params")) == 1000
    assert report.groups(budget=0.0) == {}
    assert report.groups(budget=0.01) == {"cheap": [["a", "b"], ["c", "d"]]}  # 10 parameters of 10 allowed
    assert report.groups(budget=0.1) == {"cheap": [["a", "b"], ["c", "d"]]}  # "dear" would make it 110 > 100
    both = report.groups(budget=0.11)
    assert both == {"cheap": [["a", "b"], ["c", "d"]], "dear": [["a", "b"], ["c", "d"]]}
    assert sum(report.cost(layer, groups) for layer, groups in both.items()) == 110
    assert report.cost("dear") == 300 and report.cost("dear", [["a", "b"], ["c"], ["d"]]) == 200
    assert report.groups(k=5) == both  # "quiet" has no conflicts: splitting it removes nothing
    assert list(report.groups(k=1)) == ["cheap"] == report.top(1)  # ties in network order, as top(k)


def test_more_groups_where_further_conflicts_are_worth_their_parameters():
    pulls = {**ACROSS, "cd": 6}  # c and d conflict too, less often
    report = hand_built({"layer": (10, pulls)}, other_params=990)
    assert report.groups(budget=0.01) == {"layer": [["a", "b"], ["c", "d"]]}
    assert report.groups(budget=0.02) == {"layer": [["a", "b"], ["c"], ["d"]]}
    assert report.groups(budget=1.0) == report.groups(k=1) == {"layer": [["a", "b"], ["c"], ["d"]]}
    assert report.groups(k=1, max_groups=2) == {"layer": [["a", "b"], ["c", "d"]]}
    assert report.groups(budget=1.0, threshold=0.0) == report.groups(budget=1.0)


def test_each_task_alone_is_each_and_tasks_that_do_not_use_a_layer_get_no_copy():
    everyone = {pair: 10 for pair in ("ab", "ac", "ad", "bc", "bd", "cd")}
    report = hand_built({"all": (10, everyone), "some": (10, {"ab": 10, "ac": 10}), "pair": (10, {"ab": 1})},
                        reach={"all": list("abcd"), "some": list("abc"), "pair": list("ab")})
    selection = report.groups(k=3)
    assert selection == {"all": "each", "some": [["a", "d"], ["b", "c"]], "pair": "each"}  # d joins the first group
    assert report.cost("some", selection["some"]) == 10 and report.cost("pair", "each") == 10
    assert report.cost("all", "each") == 30 == report.cost("all")
    assert "some: 2 groups, 4 streams after it; 2 copies of 10 parameters add 10" in str(selection)


def test_a_probe_whose_loss_does_not_reach_a_layer_still_gets_its_copy_and_shares_it():
    torch.manual_seed(0)
    model = DetachedProbe()
    tasks = {"a": lambda out, x: out["a"].pow(2).mean(), "b": lambda out, x: -out["b"].mean(),
             "probe": lambda out, x: out["probe"].pow(2).mean()}
    report = fxsplit.analyze(model, tasks, [torch.randn(8, 4) for _ in range(3)], progress=False)
    selection = report.groups(budget=1.0)
    for layer, groups in selection.items():  # the probe has no measured conflicts: it shares a copy
        assert groups != "each" and any("probe" in group and len(group) > 1 for group in groups)
        assert report.cost(layer, groups) == (len(groups) - 1) * report.graph.nodes[layer]["params"]


# --- what is checked ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups, match", [
    ([["a", "b"], ["c", "e"]], r"task 'e' in the groups of layer 'conv' is not one of the tasks \['a', 'b', 'c', "
                               r"'d'\]"),
    ([["a", "bb"], ["c", "d"]], r"task 'bb' .* Did you mean 'b'\?"),
    ([["a", "b"], ["b", "c", "d"]], r"task 'b' is named twice in the groups of layer 'conv'; put each task in "
                                    r"exactly one group"),
    ([["a", "a"], ["b", "c", "d"]], r"task 'a' is named twice"),
    ([["a", "b"], ["c"]], r"task\(s\) \['d'\] are in no group of layer 'conv'; every task must be in one group"),
    ([["a", "b", "c", "d"]], r"one group of layer 'conv' splits nothing; give two groups or more, or leave 'conv' out"),
    ([["a", "b"], [], ["c", "d"]], r"the groups of layer 'conv' include an empty group"),
    ("every", r"must be a list of lists of task names, or 'each' \(one copy per task\), got 'every'"),
    ({"a": 1}, r"must be a list of lists of task names"),
    (["ab", "cd"], r"each group of layer 'conv' must be a list of task names, got 'ab'"),
    ([["a", 2], ["b", "c", "d"]], r"list task names \(str\), got int 2"),
])
def test_a_bad_partition_names_the_culprit(groups, match):
    with pytest.raises(fxsplit.PartitionError, match=match):
        fxsplit.GroupedSelection({"conv": groups}, "abcd")


def test_a_layer_named_by_anything_but_a_string_is_a_layer_error():
    with pytest.raises(fxsplit.LayerError, match="maps layer names"):
        check_partition(3, "each", "ab")
    with pytest.raises(fxsplit.LayerError, match="maps layer names to groups of tasks, got list; for one copy per"):
        fxsplit.GroupedSelection(["conv"], "ab")


def test_an_entry_set_later_is_checked_too():
    selection = fxsplit.GroupedSelection({}, "abc")
    selection["conv"] = [["a"], ["b", "c"]]
    with pytest.raises(fxsplit.PartitionError, match=r"task\(s\) \['c'\] are in no group of layer 'fc'"):
        selection["fc"] = [["a"], ["b"]]
    assert selection == {"conv": [["a"], ["b", "c"]]}


@pytest.mark.parametrize("arguments, match", [
    ({}, r"groups\(\) needs one of budget= .* or k="), ({"budget": 0.1, "k": 2}, "not both or neither"),
    ({"budget": -0.1}, r"fraction >= 0"), ({"k": -1}, r"count k >= 0"), ({"k": 1.5}, r"count k >= 0"),
    ({"k": 2, "max_groups": 1}, r"max_groups=\) needs a count >= 2"), ({"budget": 0.1, "threshold": 0.3},
                                                                      r"threshold 0.3 was not scored"),
])
def test_bad_arguments_to_groups(arguments, match):
    with pytest.raises(fxsplit.FxsplitError, match=match):
        hand_built({"layer": (10, ACROSS)}).groups(**arguments)


def test_a_reports_grouped_selection_splits_as_it_says(planted):
    model, _, data = planted_problem()
    x = data[0][0]
    selection = planted.groups(k=3)
    split = fxsplit.rewrite(model, selection, example_inputs=x)
    assert split.groups == {layer: tuple(map(tuple, PLANTED)) for layer in selection}
    calls = [node.target for node in split.graph.nodes if node.op == "call_module"]
    assert sorted(calls) == sorted([*(f"copies.{'_'.join(group)}.{layer}" for layer in selection for group in PLANTED),
                                    "1", "1", "1", "3", "3", "3"])  # each stream computed once: three, not twelve
    added = sum(p.numel() for p in split.parameters()) - sum(p.numel() for p in model.parameters())
    assert added == sum(planted.cost(layer, groups) for layer, groups in selection.items())
    assert_per_task(model, split, (x,), outputs={task: () for task in split.tasks})
