"""Real multi-task code (tests/real_models.py) through the whole loop, and the traps that gave silent wrong splits.

Each model: analyze -> rewrite(top-k, checked on an example) -> per-task equivalence in eval and train mode -> both
exports (or the model's own export limit) -> an optimizer step with parameter groups, ties checked after it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_map

import fxsplit
from fxsplit.modules import attribute
from tests.models import assert_equivalent, assert_unchanged, count, snapshot, without_dropout
from tests.reference import assert_per_task
from tests.real_models import (CASES, Case, FrozenTeacher, ListResNet, MixedPrecisionTrunk, Stateful, TiedLM,
                               UncertaintyWeighted)


def _calls(split: fxsplit.SplitModule, target: str) -> int:
    return sum(node.op == "call_module" and node.target == target for node in split.graph.nodes)


def _batches(case: Case, steps: int = 3) -> list:
    return [(case.inputs(), None) for _ in range(steps)]


def _tied(split: fxsplit.SplitModule, a: str, b: str) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """The pairs of tensors that must stay one: each task's copies where its branch uses both (the tie's layer was
    split), else the originals."""
    pairs = []
    for prefix in [f"copies.{task}." for task in split.tasks] + [""]:
        try:
            pairs.append((attribute(split, prefix + a), attribute(split, prefix + b)))
        except AttributeError:
            continue
    assert pairs, (a, b)
    return pairs


@pytest.mark.parametrize("name", sorted(CASES))
def test_real_model_analyze_rewrite_export_train(name, tmp_path):
    case = CASES[name]
    torch.manual_seed(0)
    model, x = case.build(), case.inputs()
    before = snapshot(model)
    report = fxsplit.analyze(model, case.losses(), _batches(case), progress=False)
    layers = report.top(case.top)
    assert len(layers) == case.top
    keys = case.outputs or {task: task for task in case.targets}
    assert report.outputs == {task: [key] for task, key in keys.items()}  # read off the losses by autograd
    split = fxsplit.rewrite(model, layers)  # the selection brings tasks, outputs and the example it is checked on
    assert (split.route, split.route_reason) == ("fx", "as the report's trace: torch.fx traced it, and its graph "
                                                       "matches the model")
    assert_unchanged(model, before)
    kwargs = {"outputs": case.outputs} if case.outputs else {}
    without_dropout(model, split)
    for training in (False, True):
        assert_equivalent(model.train(training), split.train(training), x, kwargs)
    assert_per_task(model, split, (x,), case.outputs, tolerance=1e-4)
    assert count(split.parameters()) == count(model.parameters()) + sum(report.cost(layer) for layer in layers)

    for suffix in (".pt", ".pt2"):  # each file is loaded back and checked against the split
        fxsplit.export(split, tmp_path / f"split{suffix}", (x,))

    groups = [list(split.shared_parameters()), *(list(split.task_parameters(t)) for t in split.tasks)]
    ids = [set(map(id, group)) for group in groups]
    assert sum(map(len, ids)) == len(set().union(*ids)) == len(list(split.parameters()))
    optimizer = torch.optim.SGD([{"params": group} for group in groups if group], lr=0.1)
    out = split.train()(x)
    sum(case.targets[task](out[task]) for task in split.tasks).backward()
    optimizer.step()
    for a, b in case.ties:
        for first, second in _tied(split, a, b):
            assert first is second and torch.equal(first, second)


@pytest.mark.parametrize("batch_branches", [True, False])
def test_the_recon_authors_list_network_split_before_its_features_trains_and_stays_per_task(batch_branches):
    """Split early, the feature layer ``fc`` runs once on the joined branches and the in-place ReLU after it writes
    into each branch's part: the split takes a training step, exactly as each task's model would."""
    torch.manual_seed(0)
    model, x = ListResNet(), torch.randn(4, 3, 8, 8)
    split = fxsplit.rewrite(model, ["bn1.copies.0", "blocks.0.conv1.copies.0"], batch_branches=batch_branches,
                            example_inputs=x)
    assert _calls(split, "fc.copies.0") == (1 if batch_branches else 2)
    sum(out.pow(2).sum() for out in split(x).values()).backward()
    assert_per_task(model, split, (x,))


def test_tied_weights_are_one_layer_split_into_one_copy_per_task():
    model = TiedLM()
    graph = fxsplit.layer_graph(model)
    assert "embed.weight" not in graph and "decoder" not in graph
    assert graph.nodes["embed"]["members"] == ["embed", "decoder"]
    assert graph.nodes["embed"]["params"] == model.embed.weight.numel()
    split = fxsplit.rewrite(model, ["embed"], example_inputs=torch.randint(0, 24, (2, 5)))
    assert count(split.parameters()) == count(model.parameters()) + 2 * model.embed.weight.numel()
    for task in split.tasks:
        copy_ = split.copy_of(task, "embed")
        readers = [attribute(split, n.target) for n in split.graph.nodes
                   if n.op in ("get_attr", "call_module") and n.meta.get("branch") == {task}
                   and n.target.startswith(f"copies.{task}.")]
        weights = {id(r if isinstance(r, nn.Parameter) else r.weight) for r in readers}
        assert weights == {id(copy_.weight)}  # embedding, F.linear(h, embed.weight) and the tied decoder
    with pytest.raises(fxsplit.LayerError, match="'decoder' shares its parameters with 'embed'"):
        fxsplit.rewrite(model, ["decoder"])


def test_what_forward_does_not_use_is_kept_on_the_split_model():
    model = UncertaintyWeighted()
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=torch.randn(2, 6))
    assert split.log_vars is not model.log_vars and torch.equal(split.log_vars, model.log_vars)
    assert {"log_vars", "steps", "ema.0.weight", "ema.2.bias"} <= set(split.state_dict())
    assert any(p is split.log_vars for p in split.shared_parameters())
    assert split.tasks == ("a", "b") and model.tasks == ["a", "b"]  # the attribute meets SplitModule.tasks
    restored = copy.deepcopy(split)
    assert torch.equal(restored.log_vars, split.log_vars) and hasattr(restored, "ema")
    extra = count(p for name, p in model.named_parameters() if name.startswith("trunk.2"))
    assert count(split.parameters()) == count(model.parameters()) + extra


def test_plain_attributes_of_the_model_are_kept():
    model = UncertaintyWeighted()
    model.loss_weights = {"a": 1.0, "b": 0.5}
    split = fxsplit.rewrite(model, ["trunk.0"])
    assert split.loss_weights == {"a": 1.0, "b": 0.5}
    assert copy.deepcopy(split).loss_weights == {"a": 1.0, "b": 0.5}


class IsinstanceCheck(nn.Module):
    """Code a trace cannot record: a stand-in for a tensor is no Tensor, so the trace skips the scaling."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2)})

    def forward(self, x):
        h = self.trunk(x)
        if isinstance(h, torch.Tensor):
            h = h * 3
        return {task: head(h) for task, head in self.heads.items()}


def test_a_trace_that_differs_from_the_model_is_stopped_or_traced_the_other_way():
    model, x = IsinstanceCheck(), torch.randn(3, 4)
    with pytest.raises(fxsplit.TraceMismatchError, match=r"in train mode: output\['a'\] differs .*isinstance"):
        fxsplit.trace(model, x, method="fx")
    with pytest.raises(fxsplit.TraceMismatchError, match=r"output\['a'\] differs"):
        fxsplit.rewrite(model, ["trunk"], example_inputs=x, method="fx")
    unchecked = fxsplit.rewrite(model, ["trunk"])  # without an example nothing is checked, as documented
    assert unchecked.route == "fx" and not torch.equal(unchecked(x)["a"], model(x)["a"])
    split = fxsplit.rewrite(model, ["trunk"], example_inputs=x)  # "auto": the torch.export route runs the real code
    assert split.route == "export" and split.route_reason.startswith(
        "the graph of IsinstanceCheck traced by the fx route does not")
    assert all(torch.equal(split(x)[t], model(x)[t]) for t in "ab")
    tasks = {task: (lambda task: lambda out, batch: out[task].pow(2).mean())(task) for task in "ab"}
    report = fxsplit.analyze(model, tasks, [torch.randn(3, 4) for _ in range(2)], progress=False)  # the same way
    assert report.route == "export" and report.route_reason.startswith("the graph of IsinstanceCheck traced by")
    split = fxsplit.rewrite(model, report.top(1))
    assert (split.route, split.route_reason) == (report.route, f"as the report's trace: {report.route_reason}")
    assert all(torch.equal(split(x)[t], model(x)[t]) for t in "ab")


def test_a_traced_view_is_never_stale():
    """The custom-tracing route of version 0.1 split the weights from before training."""
    model = UncertaintyWeighted()
    gm = fxsplit.trace(model, tracer_kwargs={"leaf_modules": [nn.ReLU]})
    graph = fxsplit.layer_graph(gm)
    tasks = {t: (lambda t: lambda out, batch: out[t].pow(2).mean())(t) for t in "ab"}
    fxsplit.analyze(model, tasks, [torch.randn(4, 6) for _ in range(3)], graph=graph, progress=False,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.5))
    split = fxsplit.rewrite(gm, ["trunk.2"])
    assert torch.equal(split.get_submodule("trunk.0").weight, model.trunk[0].weight)
    assert torch.equal(split.copy_of("a", "trunk.2").weight, model.trunk[2].weight)


def _stateful_model() -> tuple[Stateful, torch.Tensor]:
    torch.manual_seed(0)
    model = Stateful()
    model.stats.mean.normal_()
    return model, torch.randn(5, 6)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_tracing_and_splitting_leave_the_models_state_alone(method):
    """Tracing runs forward's Python: a counter it bumped on the model's own buffer stayed bumped."""
    model, x = _stateful_model()
    before = snapshot(model)
    fxsplit.trace(model, x, method=method)
    fxsplit.layer_graph(model, example_inputs=x, method=method)
    fxsplit.rewrite(model, ["trunk"], example_inputs=x, method=method)
    if method == "fx":
        fxsplit.trace(model)
        fxsplit.rewrite(model, ["trunk"])
    assert_unchanged(model, before)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_state_updated_in_forward_is_updated_by_the_trace_and_the_split(method):
    """A buffer update the graph did not record left the split's running mean at its initial value for good."""
    model, x = _stateful_model()
    eager = copy.deepcopy(model)
    traced = fxsplit.trace(copy.deepcopy(model), x, method=method)
    split = fxsplit.rewrite(model, ["trunk"], example_inputs=x, method=method)  # the state is before the split
    for module in (eager, traced, split):
        module.train()
    for step in range(2):
        expected = eager(x)
        for module in (traced, split):
            got = module(x)
            assert all(torch.allclose(got[t], expected[t], atol=1e-6) for t in "ab")
    for module in (traced, split):
        assert int(module.get_buffer("stats.steps")) == 2
        assert torch.allclose(module.get_buffer("stats.mean"), eager.stats.mean, atol=1e-6)


def test_python_reads_a_buffers_sizes_dtype_and_device():
    """Buffers are traced as graph values; timm's RoPE asserts on one's size, so its metadata stays Python's."""

    class Rotary(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("periods", torch.arange(1.0, 5.0), persistent=False)
            self.heads = nn.ModuleDict({task: nn.Linear(4, 2) for task in "ab"})

        def forward(self, x):
            assert self.periods.numel() == 4 and self.periods.dim() == 1
            h = torch.sin(x * self.periods.to(dtype=x.dtype, device=self.periods.device))
            return {task: head(h) for task, head in self.heads.items()}

    model, x = Rotary(), torch.randn(3, 4)
    traced = fxsplit.trace(model, x, method="fx")
    assert traced.meta["route"] == "fx" and torch.equal(traced(x)["a"], model(x)["a"])


def test_a_trace_that_misses_a_state_update_is_stopped():
    """An update through a plain attribute that aliases the buffer runs while tracing and is not recorded."""
    model, x = _stateful_model()
    model.stats.counter = model.stats.steps  # the same tensor, but not read as a buffer
    model.stats.forward = lambda h: (model.stats.counter.add_(1), h)[1]
    with pytest.raises(fxsplit.TraceMismatchError, match=r"in train mode: buffer stats\.steps after the call differs"):
        fxsplit.trace(model, x, method="fx")


def test_state_updated_in_the_branches_is_refused():
    """Each task's branch would update the one running mean in turn: no split computes what the model does."""
    model, x = _stateful_model()
    for method in ("fx", "export"):
        with pytest.raises(fxsplit.LayerError, match=r"stats\.mean.*after the split layer 'stem'"):
            fxsplit.rewrite(model, ["stem"], example_inputs=x, method=method)


def test_a_leaf_module_that_updates_state_in_the_branches_is_stopped_by_the_check():
    """A leaf is called whole, so its updates are invisible to the graph: each branch calls it and updates it."""
    model, x = _stateful_model()
    leaf = {"leaf_modules": ["stats"]}
    with pytest.raises(fxsplit.SplitMismatchError, match=r"buffer stats\.(steps|mean) after the call differs .*"
                                                          r"runs in the task branches, once per task"):
        fxsplit.rewrite(model, ["stem"], example_inputs=x, tracer_kwargs=leaf, method="fx")
    split = fxsplit.rewrite(model, ["trunk"], example_inputs=x, tracer_kwargs=leaf, method="fx")  # before: fine
    assert split.route == "fx"


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("layer", ["teacher", "trunk"])
def test_no_grad_blocks_stay_without_gradient(method, layer, tmp_path):
    """torch.fx does not record torch.no_grad(): the split trained the frozen teacher and the target network
    (which runs in both branches after a split trunk: batched, inside the block)."""
    torch.manual_seed(0)
    model, x = FrozenTeacher(), torch.randn(5, 6)
    split = fxsplit.rewrite(model, [layer], example_inputs=x, method=method)
    for module in (model, split):
        out = module(x)
        (out["a"].sum() + 2 * out["b"].sum()).backward()
    frozen = [p for name, p in split.named_parameters() if "teacher" in name or "target" in name]
    assert len(frozen) == (6 if layer == "teacher" else 4) and all(p.grad is None for p in frozen)
    trunk = [split.copy_of(t, "trunk") for t in "ab"] if layer == "trunk" else [split.trunk]
    assert torch.allclose(sum(m.weight.grad for m in trunk), model.trunk.weight.grad, atol=1e-6)
    with torch.no_grad():
        assert not split(x)["a"].requires_grad
    assert torch.is_grad_enabled()
    if method == "fx":  # TorchScript compiles the recorded mode changes
        fxsplit.export(split, tmp_path / "split.pt", x)


@pytest.mark.parametrize("layer", ["stem", "trunk"])
def test_autocast_blocks_compute_in_their_precision(layer):
    """torch.fx does not record torch.autocast: the split computed in float32 what the model computes in bfloat16."""
    torch.manual_seed(0)
    model, x = MixedPrecisionTrunk(), torch.randn(5, 6)
    split = fxsplit.rewrite(model, [layer])  # no example: nothing would catch it
    for training in (False, True):
        model.train(training), split.train(training)
        assert all(torch.equal(split(x)[t], model(x)[t]) for t in "ab")
    assert torch.is_autocast_enabled("cpu") is False


def test_recorded_autocast_blocks_say_how_to_export(tmp_path):
    model, x = MixedPrecisionTrunk(), torch.randn(5, 6)
    with pytest.raises(fxsplit.ExportError, match=r"torch\.autocast blocks .* method='export'"):
        fxsplit.export(fxsplit.rewrite(model, ["trunk"]), tmp_path / "split.pt2", x)
    split = fxsplit.rewrite(model, ["trunk"], example_inputs=x, method="export")
    loaded = torch.export.load(fxsplit.export(split, tmp_path / "split.pt2", x)).module()
    assert torch.equal(loaded(x)["a"], model(x)["a"])


class DeepSupervision(nn.Module):
    """Collects intermediate features in a list for an auxiliary loss, as deep-supervision code often does."""

    def __init__(self):
        super().__init__()
        self.stem, self.trunk = nn.Linear(6, 8), nn.Linear(8, 8)
        self.heads = nn.ModuleDict({task: nn.Linear(8, 2) for task in "ab"})
        self.features = []

    def forward(self, x):
        h = self.stem(x)
        self.features.append(h)
        h = self.trunk(h)
        return {task: head(h) for task, head in self.heads.items()}


def test_tensors_kept_in_python_state_are_named_and_the_model_is_left_alone():
    """No graph adds to a list: the split's list stays empty while training code may read it (a cache, as timm's
    LeViT keeps, is harmless): a warning names the attribute, and tracing leaves no stand-ins behind."""
    model, x = DeepSupervision(), torch.randn(3, 6)
    for call in (lambda: fxsplit.trace(model), lambda: fxsplit.rewrite(model, ["trunk"], example_inputs=x),
                 lambda: fxsplit.layer_graph(model, example_inputs=x)):
        with pytest.warns(fxsplit.PythonStateWarning, match=r"\(features: a list, dict or set\).*Return those "
                                                            r"tensors from forward"):
            result = call()
    assert model.features == [] and result.graph["route"] == "fx"
    split = fxsplit.rewrite(model, ["trunk"])
    assert split.features == [] and all(torch.equal(split(x)[t], model(x)[t]) for t in "ab")


def test_checks_run_the_model_without_changing_its_python_state():
    class Counting(UncertaintyWeighted):
        calls = 0

        def forward(self, x):
            self.calls += 1
            return super().forward(x)

    model, x = Counting(), torch.randn(2, 6)
    fxsplit.rewrite(model, ["trunk.2"], example_inputs=x)
    fxsplit.analyze(model, {t: (lambda t: lambda out, batch: out[t].sum())(t) for t in "ab"}, [x], progress=False)
    assert model.calls == 1  # analyze's one step; the checks and the tracing ran copies


def test_tuple_outputs_need_outputs_and_dict_inputs_export(tmp_path):
    case = CASES["dict-batch"]
    model, x = case.build(), case.inputs()
    with pytest.raises(fxsplit.TaskError, match=r"returns a tuple of 2.*outputs=\{'seg': 0, 'depth': 1\}"):
        fxsplit.rewrite(model, ["body"], tasks=["seg", "depth"])
    report = fxsplit.analyze(model, case.losses(), _batches(case), progress=False)
    saved = fxsplit.ConflictReport.load(report.save(tmp_path / "report.json"))
    assert saved.outputs == {"segmentation": [0], "depth": [1]} and saved.top(1).outputs["depth"] == (1,)
    split = fxsplit.rewrite(model, ["body"], outputs=case.outputs, example_inputs=(x,))
    path = fxsplit.export(split, tmp_path / "split.pt2", (x,))
    bigger = tree_map(lambda value: torch.cat([value, value[:1]]), x)  # every leaf has a dynamic batch
    loaded = torch.export.load(path).module()(bigger)
    split.eval()
    assert all(torch.allclose(loaded[t], split(bigger)[t], atol=1e-6) for t in split.tasks)


def test_data_dependent_branch_in_forward_gets_a_fix_that_applies_there():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, scale: float = 1.0):
            h = self.lin(x)
            if h.sum() > 0:
                h = -h
            return {"a": h, "b": h * scale}

    with pytest.raises(fxsplit.TraceError) as info:
        fxsplit.trace(Branchy())
    message = str(info.value)
    assert "test_real_models.py" in message and "if h.sum() > 0" in message
    assert "move that code into a submodule and make the submodule a leaf" in message
    assert "autowrap_functions" in message and "argument of forward() (x)" in message  # scale=1.0 is bound


def test_unknown_tracer_option_is_named():
    with pytest.raises(fxsplit.TraceError, match=r"unknown option\(s\) \['leafs'\]"):
        fxsplit.layer_graph(nn.Linear(2, 2), tracer_kwargs={"leafs": [nn.Linear]})


@pytest.mark.parametrize("name, what", [("meta", "a traced module"), ("tasks", "a split model")])
def test_a_top_level_name_the_graph_module_uses_is_refused(name, what):
    """torch.fx's GraphModule keeps its own `meta`; a SplitModule has `tasks`: a model's module there would clash."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(name, nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}))

        def forward(self, x):
            return {task: head(x) for task, head in getattr(self, name).items()}

    run = fxsplit.trace if name == "meta" else lambda model: fxsplit.rewrite(model, [], tasks=["a", "b"])
    with pytest.raises(fxsplit.TraceError, match=rf"has '{name}' at its top level, a name that {what}"):
        run(Named())


# The second route (torch.export): models torch.fx cannot trace, through the same loop.

def _cross_entropy(task: str, classes: int):
    return lambda out, batch: torch.nn.functional.cross_entropy(out[task], batch[1][:, 0] % classes)


@pytest.fixture(scope="module")
def split_bert(bert):
    """BERT with two heads, analyzed on padded batches and split at the report's top 3, with nothing else: analyze
    traces the model on its first batch, and the split is checked on it."""
    from tests.hf_models import token_batch

    model, _ = bert
    data = [(token_batch(4, padded=(3, 6)), torch.randint(0, 12, (4, 1))) for _ in range(3)]
    report = fxsplit.analyze(model, {"sentiment": _cross_entropy("sentiment", 3), "topic": _cross_entropy("topic", 4)},
                             data, forward=lambda model, batch: model(*batch[0]), progress=False)
    split = fxsplit.rewrite(model, report.top(3))
    return model, report, split


def test_bert_is_scored_layer_by_layer_and_split_on_the_export_route(split_bert):
    model, report, split = split_bert
    assert report.route == "export" and "torch.fx cannot trace module 'bert' (BertModel)" in report.route_reason
    assert len(report.scores) >= 20
    assert "bert.encoder.layer.1.attention.self.query" in report.scores and "bert" not in report.scores
    assert (split.route, split.route_reason) == (report.route, f"as the report's trace: {report.route_reason}")
    assert_per_task(model, split, report.example[0])
    assert list(split.split_layers) == [layer for layer in report.graph if layer in report.top(3)]
    assert count(split.parameters()) == count(model.parameters()) + sum(report.cost(layer) for layer in report.top(3))


def test_bert_split_follows_the_padding_mask_in_both_modes(split_bert):
    from tests.hf_models import token_batch

    model, _, split = split_bert
    ids, mask = token_batch(5, padded=(2, 7, 4))
    unpadded = torch.ones_like(mask)
    for training in (False, True):  # the model's dropout is 0: train mode is exact too
        reference, got = copy.deepcopy(model).train(training), copy.deepcopy(split).train(training)
        for attention in (mask, unpadded):
            expected = reference(ids, attention)
            assert all(torch.equal(got(ids, attention)[task], expected[task]) for task in split.tasks), training
        assert not torch.equal(reference(ids, mask)["topic"], reference(ids, unpadded)["topic"])


def test_bert_split_round_trips_through_pt2_with_a_dynamic_batch(split_bert, tmp_path):
    from tests.hf_models import token_batch

    _, _, split = split_bert
    loaded = torch.export.load(fxsplit.export(split, tmp_path / "bert.pt2", token_batch(4))).module()
    ids, mask = token_batch(7, padded=(1, 8))
    expected = copy.deepcopy(split).eval()(ids, mask)
    assert all(torch.allclose(loaded(ids, mask)[task], expected[task], atol=1e-6) for task in split.tasks)


def test_distilbert_splits_exactly():
    """Dict batches, the mask given by keyword: the example call keeps both kinds of argument."""
    pytest.importorskip("transformers", reason="HuggingFace models are an optional test dependency")
    from tests.hf_models import DistilBertTwoHeads, token_batch

    torch.manual_seed(0)
    model = DistilBertTwoHeads()
    data = [dict(zip(("input_ids", "attention_mask"), token_batch(4, padded=(2, 6))), label=torch.randint(0, 3, (4,)))
            for _ in range(2)]
    tasks = {"intent": lambda out, batch: torch.nn.functional.cross_entropy(out["intent"], batch["label"]),
             "rating": lambda out, batch: (out["rating"][:, 0] - batch["label"]).pow(2).mean()}
    forward = lambda model, batch: model(batch["input_ids"], attention_mask=batch["attention_mask"])  # noqa: E731
    report = fxsplit.analyze(model, tasks, data, forward=forward, progress=False)
    assert report.route == "export" and report.graph.number_of_nodes() == 21
    args, kwargs = report.example
    assert list(kwargs) == ["attention_mask"] and torch.equal(args[0], data[0]["input_ids"])
    split = fxsplit.rewrite(model, report.top(2))  # checked per task in both modes, on the first batch
    assert split.route == "export" and "DistilBertModel" in split.route_reason
    assert_per_task(model, split, args, kwargs=kwargs)
    ids, mask = token_batch(6, padded=(3, 5))
    for training in (False, True):
        expected, got = copy.deepcopy(model).train(training)(ids, mask), copy.deepcopy(split).train(training)(ids, mask)
        assert all(torch.equal(got[task], expected[task]) for task in ("intent", "rating")), training


def test_mtan_analyze_rewrite_both_modes():
    from tests.mtan import MTAN

    torch.manual_seed(0)
    model = MTAN(channels=(4, 8))  # two stages: the second resizes the first's attention
    tasks = {"segmentation": lambda out, batch: out["segmentation"].pow(2).mean(),
             "depth": lambda out, batch: (out["depth"] - 1).abs().mean()}
    report = fxsplit.analyze(model, tasks, [torch.randn(4, 3, 16, 16) for _ in range(2)], progress=False)
    assert report.route == "export" and "TaskAttention" in report.route_reason
    assert len(report.scores) == 8  # the shared encoder's layers
    split = fxsplit.rewrite(model, report.top(3))
    assert (split.route, split.route_reason) == (report.route, f"as the report's trace: {report.route_reason}")
    assert_per_task(model, split, report.example[0])
    batch = torch.randn(6, 3, 16, 16)
    for training in (True, False):
        expected, outputs = copy.deepcopy(model).train(training)(batch), copy.deepcopy(split).train(training)(batch)
        assert all(torch.equal(outputs[task], expected[task]) for task in tasks), training
