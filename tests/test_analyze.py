import copy
import json
import math

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import fxsplit
from tests.patterns import DetachedProbe
from tests.reference import assert_per_task, reference
from tests.models import MultiHead, SmallCNN, Twice, assert_unchanged, scoring_cases as cases, snapshot

THRESHOLDS = [0.0, -0.05, 0.1]


@pytest.mark.parametrize("name", sorted(cases()))
def test_scores_equal_the_reference_loop_when_probing(name):
    model, tasks, batches = cases()[name]
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)  # grads a user left behind must stay as they are
    before = snapshot(model)
    report = fxsplit.analyze(model, tasks, batches, threshold=THRESHOLDS, progress=False)
    assert_unchanged(model, before)
    expected = reference(copy.deepcopy(model), tasks, batches, fxsplit.layer_graph(model), THRESHOLDS)
    for S in THRESHOLDS:
        assert report.scores_at(S) == {layer: expected[S].get(layer, 0) for layer in report.scores_at(S)}
        assert set(report.scores_at(S)) == set(expected[S])
    assert report.steps == len(batches)
    assert not [layer for layer in report.layers if layer.startswith(("heads.", "head_"))]


@pytest.mark.parametrize("name", ["cnn-bn", "vit", "called-twice-4-tasks"])
def test_training_run_scores_and_updates_like_plain_sgd(name):
    model, tasks, batches = cases()[name]
    twin = copy.deepcopy(model)
    report = fxsplit.analyze(model, tasks, batches, threshold=THRESHOLDS, progress=False,
                             optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    expected = reference(twin, tasks, batches, fxsplit.layer_graph(model), THRESHOLDS,
                         optimizer=torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    for S in THRESHOLDS:
        assert report.scores_at(S) == {layer: expected[S].get(layer, 0) for layer in report.scores_at(S)}
    for (key, value), twin_value in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(value, twin_value, rtol=1e-10, atol=1e-12, msg=key)


def test_scores_are_ranked_with_ties_in_graph_order_and_detail_is_consistent():
    model, tasks, batches = cases()["cnn-3-tasks"]
    report = fxsplit.analyze(model, tasks, batches, threshold=[0.0, 0.5], progress=False)
    ranked = list(report.scores.items())
    order = {layer: i for i, layer in enumerate(report.layers)}
    assert all((s1 > s2) or (s1 == s2 and order[l1] < order[l2]) for (l1, s1), (l2, s2) in zip(ranked, ranked[1:]))
    assert report.pairs == [["a", "b"], ["a", "c"], ["b", "c"]]
    pair_counts = report.pair_counts(0.5)
    assert all(sum(pair_counts[layer].values()) == score for layer, score in report.scores_at(0.5).items())
    assert all(sum(row) == report.steps * 3 for row in report.histogram)
    assert all(report.scores_at(0.5)[layer] >= score for layer, score in report.scores.items())
    assert all(len(step) == 3 and all(-1 <= c <= 1 for c in step) for step in report.whole_cosine)
    assert report.graph.nodes[ranked[0][0]]["score"] == ranked[0][1]
    assert report.cost("backbone.stem.0") == 2 * (3 * 8 * 9 + 8)
    assert set(report.left_out) == {"heads.a", "heads.b", "heads.c"}
    assert report.left_out["heads.b"] == "only task 'b' reaches it"


def test_only_still_shared_layers_of_a_rewritten_model_are_scored():
    model, tasks, batches = cases()["cnn-bn"]
    split = fxsplit.rewrite(model, ["backbone.block1.conv2", "backbone.block2.conv1"])
    split_tasks = {t: (lambda t: lambda out, batch: F.cross_entropy(out[t], batch[1][:, "ab".index(t)]))(t)
                   for t in "ab"}
    report = fxsplit.analyze(split, split_tasks, batches, progress=False)
    assert not [layer for layer in report.layers if layer.startswith("copies.")]
    assert "backbone.block2.bn1" in report.layers and "backbone.stem.0" in report.layers
    assert report.left_out["copies.a.backbone.block1.conv2"] == "only task 'a' reaches it"
    expected = reference(copy.deepcopy(split), split_tasks, batches, fxsplit.layer_graph(split), [0.0])
    assert report.scores == {layer: expected[0.0].get(layer, 0) for layer in report.scores}


def test_json_round_trip_and_selection_feed_rewrite(tmp_path):
    model, tasks, batches = cases()["cnn-bn"]
    report = fxsplit.analyze(model, tasks, batches, threshold=THRESHOLDS, progress=False)
    loaded = fxsplit.ConflictReport.load(report.save(tmp_path / "report.json"))
    assert loaded.to_dict() == report.to_dict()
    assert loaded.scores == report.scores and str(loaded) == str(report)
    top = loaded.top(3)
    assert top == list(report.scores)[:3] and top.tasks == ["a", "b"]
    split = fxsplit.rewrite(model, top)
    assert split.split_layers == tuple(sorted(top, key=report.layers.index))
    budget = report.within(0.05)
    total = sum(p.numel() for p in model.parameters())
    assert sum(report.cost(layer) for layer in budget) <= 0.05 * total
    assert len(budget) >= 1 and all(report.scores[layer] > 0 for layer in budget)


def test_plot_and_table(tmp_path):
    model, tasks, batches = cases()["vit"]
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    report.plot(tmp_path / "scores.png")
    assert (tmp_path / "scores.png").stat().st_size > 1000
    table = str(report)
    assert table.splitlines()[0].startswith("Conflict scores over 4 steps")
    assert all(layer in table for layer in report.layers)


def report_with(scores: list[int], steps: int) -> fxsplit.ConflictReport:
    """A two-task report whose layers ``layer0``, ``layer1``, ... (in network order) have these scores."""
    layers = [f"layer{i}" for i in range(len(scores))]
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, {"kind": "Linear", "params": 10 * (i + 1)}) for i, layer in enumerate(layers))
    return fxsplit.ConflictReport(
        tasks=["a", "b"], thresholds=[0.0], layers=layers, pairs=[["a", "b"]], counts=[[[s] for s in scores]],
        mean_cosine=[[-0.5]] * len(layers), histogram=[[0] * 20] * len(layers), whole_cosine=[[0.0]] * steps,
        steps=steps, reach={layer: ["a", "b"] for layer in layers}, left_out={}, graph=graph)


def test_the_printout_shows_the_top_rows_and_counts_the_rest():
    report = report_with(list(range(25)), steps=50)  # layer24 scores highest
    lines = str(report).splitlines()
    assert lines[0] == "Conflict scores over 50 steps, tasks ['a', 'b'], cosine < 0.0" and len(lines) == 3 + 20 + 1
    assert [line.split()[:2] for line in lines[3:23]] == [[str(rank), f"layer{24 - rank + 1}"] for rank in
                                                          range(1, 21)]
    assert lines[3].split()[2:] == ["Linear", "250", "24", "-0.500"]
    assert lines[23] == "... and 5 more layers, with scores 4 and below"


@pytest.mark.parametrize("scores, steps, warnings", [
    ([9, 4, 2], 50, []),
    ([9, 4, 2], 5, ["warning: only 5 steps were scored: a ranking from fewer than 20 is mostly noise; score more "
                    "batches"]),
    ([4, 9, 9, 9], 50, ["warning: the top 3 layers tie at score 9: their order is network order, not a ranking; "
                        "score more batches, or at another threshold"]),
    ([0, 0], 3, ["warning: only 3 steps were scored: a ranking from fewer than 20 is mostly noise; score more "
                 "batches",
                 "warning: the top 2 layers tie at score 0: their order is network order, not a ranking; score "
                 "more batches, or at another threshold"]),
])
def test_the_printout_warns_when_the_ranking_is_noise(scores, steps, warnings):
    lines = str(report_with(scores, steps)).splitlines()
    assert lines[3 + len(scores):] == warnings


def test_the_plot_names_every_layer_and_marks_the_chosen_ones(tmp_path):
    report = report_with([3, 9, 1, 7, 0], steps=50)
    chosen = report.top(2)
    figure = report.plot(tmp_path / "scores.png", chosen=chosen)
    assert (tmp_path / "scores.png").stat().st_size > 1000
    axes = figure.axes[0]
    on_screen = axes.transData.transform  # data to display coordinates, y upwards
    labels = sorted(axes.get_yticklabels(), key=lambda label: -on_screen(label.get_position())[1])  # top first
    assert [label.get_text() for label in labels] == report.layers  # network order, from the top
    assert all(label.get_fontsize() >= 8 for label in labels)
    bars = {label.get_text(): bar for label, bar in zip(axes.get_yticklabels(), axes.patches)}
    assert [bars[layer].get_width() for layer in report.layers] == [3, 9, 1, 7, 0]
    colors = {layer: bars[layer].get_facecolor() for layer in report.layers}
    assert colors["layer1"] == colors["layer3"] and len(set(colors.values())) == 2
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["chosen (2)", "left shared"]
    with pytest.raises(fxsplit.LayerError, match=r"chosen layer\(s\) \['layer9'\] are not scored in this report"):
        report.plot(chosen=["layer1", "layer9"])


def test_conflict_rate_counts_whole_vector_cosines():
    model, tasks, batches = cases()["cnn-bn"]
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    rate = report.conflict_rate(0.0)[("a", "b")]
    assert rate == sum(step[0] < 0 for step in report.whole_cosine) / 4
    assert report.conflict_rate(1.01)[("a", "b")] == 1.0


def _model_tasks_batches():
    model, tasks, batches = cases()["cnn-bn"]
    return model, tasks, batches


@pytest.mark.parametrize("change, error, match", [
    (lambda m, t, b: (m, list(t), b), fxsplit.TaskError, "tasks must map task names to loss functions"),
    (lambda m, t, b: (m, {"a": t["a"]}, b), fxsplit.TaskError, "at least two tasks"),
    (lambda m, t, b: (m, t, []), fxsplit.FxsplitError, "data gave no batch"),
    (lambda m, t, b: (m, {**t, "b": lambda out, batch: 1 / 0}, b), fxsplit.TaskError,
     "loss of task 'b' raised ZeroDivisionError"),
    (lambda m, t, b: (m, {**t, "b": lambda out, batch: out["b"].sum(1)}, b), fxsplit.TaskError,
     r"task 'b' must be a scalar tensor, got \(6,\)"),
    (lambda m, t, b: (m, {**t, "b": lambda out, batch: out["b"].sum() * math.nan}, b), fxsplit.TaskError,
     r"task\(s\) \['b'\] is NaN or infinite"),
    (lambda m, t, b: (m, {**t, "b": lambda out, batch: torch.tensor(1.0)}, b), fxsplit.TaskError,
     "task 'b' does not depend on the model"),
])
def test_bad_input(change, error, match):
    model, tasks, batches = change(*_model_tasks_batches())
    model.train()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        fxsplit.analyze(model, tasks, batches, progress=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("threshold", [1.5, -2, [0.0, 3.0], []])
def test_threshold_outside_cosine_range(threshold):
    model, tasks, batches = _model_tasks_batches()
    with pytest.raises(fxsplit.FxsplitError, match=r"threshold must be a cosine in \[-1, 1\]"):
        fxsplit.analyze(model, tasks, batches, threshold=threshold, progress=False)


def test_scoring_every_kth_step_trains_on_every_step():
    model, tasks, batches = cases()["cnn-bn"]
    batches = batches * 2
    twin, sparse = copy.deepcopy(model), copy.deepcopy(model)
    full = fxsplit.analyze(twin, tasks, batches, optimizer=torch.optim.SGD(twin.parameters(), lr=0.1),
                           progress=False)
    report = fxsplit.analyze(sparse, tasks, batches, every=3, optimizer=torch.optim.SGD(sparse.parameters(), lr=0.1),
                             progress=False)
    assert report.steps == 3 and full.steps == 8
    assert [c for (c,) in report.whole_cosine] == pytest.approx([full.whole_cosine[i][0] for i in (0, 3, 6)],
                                                                rel=1e-9)
    for value, expected in zip(sparse.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    probe = fxsplit.analyze(model, tasks, batches, every=4, progress=False)
    assert probe.steps == 2
    with pytest.raises(fxsplit.FxsplitError, match="every must be a whole number"):
        fxsplit.analyze(model, tasks, batches, every=0, progress=False)


def test_custom_forward_and_steps():
    model, tasks, batches = _model_tasks_batches()
    seen = []

    def forward(net, batch):
        seen.append(batch)
        return net(batch[0])

    report = fxsplit.analyze(model, tasks, iter(batches), steps=2, forward=forward, progress=False)
    assert report.steps == 2 and len(seen) == 2 + 1  # the steps, and the first batch's call of the model recorded
    fxsplit.analyze(model, tasks, iter(batches), steps=2, forward=forward, progress=False,
                    graph=fxsplit.layer_graph(model))
    assert len(seen) == 3 + 2 + 1  # a graph passed in is taken as it is; the example call is still recorded


def test_a_frozen_model_has_nothing_to_score():
    model, tasks, batches = _model_tasks_batches()
    with pytest.raises(fxsplit.FxsplitError, match="no parameter that requires grad"):
        fxsplit.analyze(model.requires_grad_(False), tasks, batches, progress=False)


def test_frozen_layers_are_left_out():
    model, tasks, batches = _model_tasks_batches()
    model.backbone.stem[0].requires_grad_(False)
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    assert report.left_out["backbone.stem.0"] == "frozen (no parameter requires grad)"
    assert "backbone.stem.0" not in report.scores


@pytest.mark.parametrize("content, match", [
    ("{not json", "cannot read a conflict report"),
    ('{"format": "something else"}', "is not an fxsplit conflict report"),
    ('{"format": "fxsplit.ConflictReport/1", "tasks": ["a"]}', "is a damaged conflict report"),
])
def test_corrupt_report_files(tmp_path, content, match):
    path = tmp_path / "report.json"
    path.write_text(content)
    with pytest.raises(fxsplit.ReportError, match=match):
        fxsplit.ConflictReport.load(path)


def test_missing_report_file(tmp_path):
    with pytest.raises(fxsplit.ReportError, match="cannot read a conflict report"):
        fxsplit.ConflictReport.load(tmp_path / "nothing.json")


def test_a_report_for_another_model_is_refused():
    model, tasks, batches = _model_tasks_batches()
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    other = MultiHead(Twice(), 8)
    before = snapshot(other)
    with pytest.raises(fxsplit.ReportError, match="the report was made for another model"):
        fxsplit.rewrite(other, report.top(2))
    assert_unchanged(other, before)


def test_unscored_threshold_is_a_report_error():
    model, tasks, batches = _model_tasks_batches()
    report = fxsplit.analyze(model, tasks, batches, threshold=[0.0, -0.1], progress=False)
    with pytest.raises(fxsplit.ReportError, match=r"threshold 0.5 was not scored; the report has \[0.0, -0.1\]"):
        report.scores_at(0.5)


def test_a_model_both_routes_trace_gets_the_same_report():
    torch.manual_seed(0)
    model = MultiHead(SmallCNN(), 16)
    batches = [torch.randn(4, 3, 8, 8) for _ in range(3)]
    tasks = {"a": lambda out, batch: out["a"].pow(2).mean(), "b": lambda out, batch: -out["b"][:, 0].mean()}
    reports = [fxsplit.analyze(model, tasks, batches, threshold=[0.0, -0.1], progress=False,
                               graph=fxsplit.layer_graph(model, example_inputs=batches[0], method=method))
               for method in ("fx", "export")]
    assert [report.graph.graph["route"] for report in reports] == ["fx", "export"]
    data = [{key: value for key, value in report.to_dict().items() if key != "graph"} for report in reports]
    assert data[0] == data[1] and str(reports[0]) == str(reports[1])
    assert reports[0].top(4) == reports[1].top(4) and len(reports[0].scores) == 12


def test_the_cost_of_an_unknown_layer_names_the_close_ones():
    model, tasks, batches = _model_tasks_batches()
    report = fxsplit.analyze(model, tasks, batches[:1], progress=False)
    with pytest.raises(fxsplit.UnknownLayerError, match=r"'backbone.stem.O' is not a layer.*Did you mean .*"
                                                        r"'backbone.stem.0'"):
        report.cost("backbone.stem.O")


@pytest.mark.parametrize("argument, value", [("bins", 0), ("bins", -3), ("bins", 2.5), ("bins", True),
                                             ("steps", -1), ("steps", 1.5), ("every", 2.0)])
def test_counts_that_are_not_whole_numbers_are_typed_errors(argument, value):
    model, tasks, batches = _model_tasks_batches()
    with pytest.raises(fxsplit.FxsplitError, match=rf"{argument} must be a whole number .*got {value!r}"):
        fxsplit.analyze(model, tasks, batches, progress=False, **{argument: value})
    if argument == "bins":
        with pytest.raises(fxsplit.FxsplitError, match=rf"bins must be a whole number .*got {value!r}"):
            fxsplit.ConflictMonitor(model, list(tasks), bins=value)


def test_cost_and_within_count_the_copies_rewrite_makes_one_per_task_whose_output_uses_a_layer():
    torch.manual_seed(0)
    model = DetachedProbe()
    batches = [torch.randn(8, 4) for _ in range(3)]
    tasks = {"a": lambda out, x: out["a"].pow(2).mean(), "b": lambda out, x: -out["b"].mean(),
             "probe": lambda out, x: out["probe"].pow(2).mean()}
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    assert report.reach["trunk.2"] == ["a", "b"]  # the probe's loss is detached from the trunk
    assert report.users("trunk.2") == ["a", "b", "probe"]  # its output is not: its branch runs the trunk
    assert report.cost("trunk.2") == 2 * (8 * 8 + 8)
    total = sum(p.numel() for p in model.parameters())
    for budget in (0.3, 0.6, 1.0):
        chosen = report.within(budget)
        split = fxsplit.rewrite(model, chosen)
        added = sum(p.numel() for p in split.parameters()) - total
        assert added == sum(report.cost(layer) for layer in chosen) <= budget * total, budget
    split = fxsplit.rewrite(model, report.top(2), example_inputs=batches[0])
    assert sum(p.numel() for p in split.parameters()) - total == report.cost("trunk.0") + report.cost("trunk.2")
    assert_per_task(model, split, (batches[0],))


# Nothing but the model, the losses and the data: the first batch is the example the trace is checked on, and the
# report's selections carry it to rewrite with the route.

def test_a_report_keeps_its_route_and_example_call_and_its_selections_split_on_them(tmp_path):
    model, tasks, batches = _model_tasks_batches()
    before = snapshot(model)
    report = fxsplit.analyze(model, tasks, batches, progress=False)
    assert (report.route, report.route_reason) == ("fx", "torch.fx traced it, and its graph matches the model")
    args, kwargs = report.example
    assert len(args) == 1 and torch.equal(args[0], batches[0][0]) and args[0] is not batches[0][0] and kwargs == {}
    for selection in (report.top(2), report.within(1.0)):
        assert (selection.route, selection.example) == ("fx", report.example)
    split = fxsplit.rewrite(model, report.top(2))  # checked on the report's example
    assert (split.route, split.route_reason) == ("fx", f"as the report's trace: {report.route_reason}")
    assert_unchanged(model, before)
    assert_per_task(model, split, args)
    by_export = fxsplit.rewrite(model, report.top(2), method="export")  # a method given wins, on the same example
    assert (by_export.route, by_export.route_reason) == ("export", "asked for (method='export')")
    by_export.eval()
    assert all(torch.allclose(by_export(*args)[task], split.eval()(*args)[task]) for task in split.tasks)

    path = report.save(tmp_path / "report.json")
    assert "example" not in json.loads(path.read_text())  # no tensors in the file
    loaded = fxsplit.ConflictReport.load(path)
    assert (loaded.route, loaded.route_reason, loaded.example) == (report.route, report.route_reason, None)
    assert fxsplit.rewrite(model, loaded.top(2)).route_reason == "torch.fx traced it; not checked: no example input"
    assert fxsplit.rewrite(model, loaded.top(2), example_inputs=args).route_reason == split.route_reason


def test_a_report_for_another_model_of_the_same_names_is_refused_before_its_example_runs():
    model, tasks, batches = _model_tasks_batches()
    report = fxsplit.analyze(model, tasks, batches[:2], progress=False)
    other = copy.deepcopy(model)
    other.backbone.stem[0] = torch.nn.Conv2d(1, 8, 3, padding=1).double()  # grey images: the example cannot run
    before = snapshot(other)
    with pytest.raises(fxsplit.ReportError, match=r"\['backbone.stem.0'\]; the report was made for another model"):
        fxsplit.rewrite(other, report.top(len(report.scores)))
    assert_unchanged(other, before)


def test_the_monitor_traces_by_method_on_its_example_and_its_report_keeps_them():
    model, tasks, batches = _model_tasks_batches()
    x = batches[0][0]
    monitor = fxsplit.ConflictMonitor(model, list(tasks), method="export", example_inputs=x)
    out = model(x)
    monitor.backward({task: loss(out, batches[0]) for task, loss in tasks.items()})
    report = monitor.report()
    assert (report.route, report.route_reason) == ("export", "asked for (method='export')")
    assert report.example == ((x,), {})
    split = fxsplit.rewrite(model, report.top(2))  # the report's route, though torch.fx traces the model
    assert (split.route, split.route_reason) == ("export", "as the report's trace: asked for (method='export')")
    with pytest.raises(fxsplit.FxsplitError, match="method and tracer_kwargs say how to trace the model, and a graph "
                                                   "was given"):
        fxsplit.ConflictMonitor(model, list(tasks), graph=report.graph, method="fx")


class _Gated(torch.nn.Module):
    """Two heads after a branch on a tensor's value, which neither route can trace."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(4, 4)
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 2), "b": torch.nn.Linear(4, 2)})

    def forward(self, x):
        h = self.trunk(x)
        h = h if h.sum() > 0 else -h
        return {task: head(h) for task, head in self.heads.items()}


def test_a_model_neither_route_traces_is_one_error_with_the_fix_for_each():
    tasks = {task: (lambda task: lambda out, batch: out[task].pow(2).mean())(task) for task in "ab"}
    with pytest.raises(fxsplit.TraceError) as info:
        fxsplit.analyze(_Gated(), tasks, [torch.randn(3, 4)], progress=False)
    message = str(info.value)
    assert message.count("torch.fx cannot trace") == 1 and message.count("torch.export cannot trace") == 1
    assert "The torch.export route, tried next on the example, fails too" in message
    assert "make the submodule a leaf" in message and "select with torch.where, or use torch.cond" in message


def test_a_forward_that_never_calls_the_model_itself_is_analyzed_with_a_graph_and_keeps_no_example():
    model, tasks, batches = _model_tasks_batches()

    def forward(net, batch):  # the model's parts, not the model: no call of its forward to trace
        features = net.backbone(batch[0])
        return {task: head(features) for task, head in net.heads.items()}

    with pytest.raises(fxsplit.TraceError, match=r"forward\(model, batch\) never calls MultiHead itself.*give "
                                                 r"graph=\.\.\."):
        fxsplit.analyze(model, tasks, batches, forward=forward, progress=False)
    report = fxsplit.analyze(model, tasks, batches, forward=forward, graph=fxsplit.layer_graph(model), progress=False)
    assert report.example is None and report.route == "fx"
    assert fxsplit.rewrite(model, report.top(2)).route_reason == "torch.fx traced it; not checked: no example input"


# --- steps where only some tasks have a loss -----------------------------------------------------------------

def _three_pair_report(counts: list[list[int]], pair_steps: list[int]) -> fxsplit.ConflictReport:
    """A three-task report whose layers ``layer0``, ... have these counts per pair (a-b, a-c, b-c)."""
    layers = [f"layer{i}" for i in range(len(counts))]
    graph = nx.DiGraph()
    graph.add_nodes_from((layer, {"kind": "Linear", "params": 10}) for layer in layers)
    return fxsplit.ConflictReport(
        tasks=["a", "b", "c"], thresholds=[0.0], layers=layers, pairs=[["a", "b"], ["a", "c"], ["b", "c"]],
        counts=[counts], mean_cosine=[[-0.5, None if not pair_steps[1] else -0.5, -0.5]] * len(layers),
        histogram=[[0] * 20] * len(layers), whole_cosine=[[0.0, None, 0.0]] * max(pair_steps), steps=max(pair_steps),
        reach={layer: ["a", "b", "c"] for layer in layers}, left_out={}, graph=graph, pair_steps=pair_steps)


def test_pairs_scored_unequally_often_rank_by_rate_so_a_rare_pair_neither_vanishes_nor_dominates():
    # a-c was scored at 10 of 100 steps: layer1's 9 conflicts there are a rate of 0.9, layer0's 50 on a-b 0.5
    report = _three_pair_report([[50, 0, 0], [0, 9, 0], [0, 1, 0]], pair_steps=[100, 10, 100])
    assert report.scores == {"layer0": 50, "layer1": 9, "layer2": 1}
    assert report.rates_at() == pytest.approx({"layer1": 0.9, "layer0": 0.5, "layer2": 0.1})
    assert report.top(2) == ["layer1", "layer0"] and report.within(0.7) == ["layer1"]  # 20 of 21 parameters
    assert report.pair_rates()["layer1"] == {("a", "b"): 0.0, ("a", "c"): 0.9, ("b", "c"): 0.0}
    lines = str(report).splitlines()
    assert lines[1] == "pairs scored at unequal numbers of steps (a-b 100, a-c 10, b-c 100): ranked by rate"
    assert lines[4].split()[1:] == ["layer1", "Linear", "10", "9", "0.900", "-0.500"]
    assert "warning: pair(s) a-c (10) were scored at fewer steps than 20" in str(report)


def test_a_pair_never_scored_adds_nothing_and_divides_by_nothing():
    report = _three_pair_report([[5, 0, 2], [1, 0, 0]], pair_steps=[30, 0, 30])
    assert report.rates_at() == pytest.approx({"layer0": 7 / 30, "layer1": 1 / 30})
    assert report.pair_rates()["layer0"][("a", "c")] is None
    assert report.conflict_rate(0.5) == {("a", "b"): 1.0, ("a", "c"): None, ("b", "c"): 1.0}
    assert "a-c (0)" in str(report) and report.top(1) == ["layer0"]
    with pytest.raises(fxsplit.ReportError, match="pair_steps has 2 entries for 3 task pairs"):
        _three_pair_report([[5, 0, 2]], pair_steps=[30, 30])


def _labelled(task, column):
    """A loss that has no value (None) for a batch whose labels of ``task`` are missing (all -1)."""
    loss = cases()["cnn-3-tasks"][1][task]
    return lambda out, batch: None if bool((batch[1][:, column] < 0).all()) else loss(out, batch)


def test_analyze_scores_a_loss_that_returns_none_as_the_monitor_scores_an_absent_task():
    model, tasks, batches = cases()["cnn-3-tasks"]
    unlabelled = [(x, y.clone()) for x, y in batches]
    unlabelled[0][1][:, 1] = -1  # task "b" (column 1) has no labels in the first batch, "a" none in the third
    unlabelled[2][1][:, 0] = -1
    partial = {"a": _labelled("a", 0), "b": _labelled("b", 1), "c": tasks["c"]}
    report = fxsplit.analyze(copy.deepcopy(model), partial, unlabelled, progress=False)
    monitor = fxsplit.ConflictMonitor(model, list(tasks))
    for batch in unlabelled:
        out = model(batch[0])
        monitor.backward({task: loss(out, batch) for task, loss in partial.items()})
    expected = monitor.report()
    assert report.pair_steps == expected.pair_steps == [2, 3, 3]
    assert report.counts == expected.counts and report.top(3) == expected.top(3)
    assert report.outputs == {"a": ["a"], "b": ["b"], "c": ["c"]}  # "b" read from the first batch it had labels in
    never = {**partial, "b": lambda out, batch: None}
    with pytest.raises(fxsplit.TaskError, match=r"task\(s\) \['b'\] had no loss at any step"):
        fxsplit.analyze(copy.deepcopy(model), never, unlabelled, progress=False)


def test_groups_refuse_a_report_whose_pairs_were_scored_unequally_often():
    report = _three_pair_report([[50, 0, 0]], pair_steps=[100, 10, 100])
    with pytest.raises(fxsplit.ReportError, match=r"every pair was scored at the same steps.*\[100, 10, 100\]"):
        report.groups(k=1)
