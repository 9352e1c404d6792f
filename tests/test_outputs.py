import pytest
import torch

import fxsplit
from fxsplit.outputs import Paths, paths_read, select, task_paths
from tests.patterns import DeepSupervised, RecordOutput, SegDepth, SegDepthTuple
from tests.reference import assert_per_task


def _grad(*shape):
    return torch.randn(*shape, requires_grad=True) * 1.0


def test_paths_read_by_each_loss():
    h = _grad(4, 3)
    out = {"pair": (h * 2, h[:, :1] * 3), "other": _grad(4)}
    losses = {"first": out["pair"][0].sum(), "second": out["pair"][1].pow(2).mean(), "both": out["other"].sum()
              + out["pair"][0].mean(), "nothing": torch.zeros((), requires_grad=True)}
    assert paths_read(out, losses) == {"first": ("pair", 0), "second": ("pair", 1), "nothing": (),
                                       "both": Paths([("pair", 0), ("other",)])}  # not the whole output: no widening


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


RECORDS = [SegDepth, SegDepthTuple]


@pytest.mark.parametrize("record", RECORDS)
@pytest.mark.parametrize("choice", [{"outputs": {"seg": "seg", "depth": "depth"}}, {"tasks": ["seg", "depth"]}, {}])
def test_a_record_output_is_read_by_field(record, choice):
    torch.manual_seed(0)
    model, x = RecordOutput(record), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=x, **choice)
    assert split.tasks == ("seg", "depth") and split(x)["depth"].shape == (5, 2)
    assert_per_task(model, split, (x,), outputs={"seg": "seg", "depth": "depth"})


def test_a_namedtuple_field_may_be_named_by_its_index():
    torch.manual_seed(0)
    model, x = RecordOutput(SegDepthTuple), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=x, outputs={"seg": 0, "depth": 1})
    assert_per_task(model, split, (x,), outputs={"seg": 0, "depth": 1})


@pytest.mark.parametrize("record", RECORDS)
def test_analyze_finds_each_tasks_field_and_its_selection_rewrites(record):
    torch.manual_seed(0)
    model, x = RecordOutput(record), torch.randn(5, 4)
    tasks = {"seg": lambda out, batch: out.seg.pow(2).mean(), "depth": lambda out, batch: -out.depth.mean()}
    report = fxsplit.analyze(model, tasks, [x, torch.randn(5, 4)], progress=False)
    assert report.outputs == {"seg": ["seg"], "depth": ["depth"]}
    split = fxsplit.rewrite(model, report.top(2), example_inputs=x)
    assert split.split_layers == ("trunk.0", "trunk.2")
    assert_per_task(model, split, (x,), outputs={"seg": "seg", "depth": "depth"})


@pytest.mark.parametrize("record", RECORDS)
def test_a_whole_record_goes_to_every_task_and_is_compared_field_by_field(record):
    torch.manual_seed(0)
    model, x = RecordOutput(record), torch.randn(5, 4)
    split = fxsplit.rewrite(model, ["trunk.2"], example_inputs=x, outputs={"p": (), "q": ()})
    assert type(split(x)["p"]) is record
    assert_per_task(model, split, (x,), outputs={"p": (), "q": ()})


@pytest.mark.parametrize("record", RECORDS)
def test_tasks_that_are_not_fields_of_a_record_need_outputs(record):
    with pytest.raises(fxsplit.TaskError, match=r"\['p', 'q'\] are not fields of the model's output \(Seg.*"
                                                r"\['seg', 'depth'\].*outputs=\{'p': 'seg', 'q': 'depth'\}"):
        fxsplit.rewrite(RecordOutput(record), [], tasks=["p", "q"])
    with pytest.raises(fxsplit.TaskError, match=r"outputs\['p'\] = 'mask': .*no 'mask' \(it has fields "
                                                r"\['seg', 'depth'\]\)"):
        fxsplit.rewrite(RecordOutput(record), [], outputs={"p": "mask", "q": "seg"})


def _deep_supervision_losses() -> dict:
    def loss(task):
        return lambda out, batch: out[task].pow(2).mean() + out["deep_supervision"][task].abs().mean()

    return {task: loss(task) for task in ("seg", "depth")}


def test_a_loss_that_reads_its_key_and_a_deep_supervision_entry_reads_those_parts_only():
    torch.manual_seed(0)
    model, x = DeepSupervised(), torch.randn(6, 4)
    out = model(x)
    found = paths_read(out, {task: loss(out, None) for task, loss in _deep_supervision_losses().items()})
    assert found == {task: Paths([(task,), ("deep_supervision", task)]) for task in ("seg", "depth")}
    assert set(select(out, found["seg"], "seg")) == {"seg", "deep_supervision"}
    assert list(select(out, found["seg"], "seg")["deep_supervision"]) == ["seg"]


def test_deep_supervision_from_analyze_to_a_split_whose_branches_return_what_their_losses_read():
    torch.manual_seed(0)
    model, x = DeepSupervised(), torch.randn(6, 4)
    tasks = _deep_supervision_losses()
    report = fxsplit.analyze(model, tasks, [x, torch.randn(6, 4)], progress=False)
    assert report.outputs == {task: [[task], ["deep_supervision", task]] for task in tasks}
    assert sorted(report.layers) == ["early.0", "late.0"]  # every head is one task's
    assert report.users("late.0") == ["seg", "depth"] and report.cost("late.0") == 8 * 8 + 8
    split = fxsplit.rewrite(model, report.top(2), example_inputs=x)
    assert split.split_layers == ("early.0", "late.0")
    out = split(x)
    assert set(out["seg"]) == {"seg", "deep_supervision"} and set(out["seg"]["deep_supervision"]) == {"seg"}
    assert all(tasks[task](out[task], None).isfinite() for task in tasks)  # the losses read the branches as they are
    assert {p for p in split.task_parameters("seg")} >= set(split.early_heads.seg.parameters())
    parts = {task: [(task,), ("deep_supervision", task)] for task in tasks}
    assert_per_task(model, split, (x,), outputs=parts)
    again = fxsplit.rewrite(model, ["early.0"], outputs=parts, example_inputs=x)  # the same parts, given by hand
    assert_per_task(model, again, (x,), outputs=parts)
