"""What lives in the backward pass, through tracing and rewriting (fxsplit/tracing/autograd.py): custom autograd
Functions and gradient hooks registered in forward are recorded, inference mode is recorded as no-grad, and
backward hooks on modules that tracing goes through are refused by name."""

from __future__ import annotations

import pickle

import pytest
import torch

import fxsplit
from tests.patterns import (
    BackwardHooked, InferenceTeacher, InplaceAfterLinear, PreActivation, Reversed, TensorHooked, TwoHeads, inputs,
)
from tests.reference import assert_per_task


@pytest.mark.parametrize("batch_branches", [True, False])
def test_a_custom_autograd_function_keeps_its_backward(batch_branches):
    torch.manual_seed(0)
    model = TwoHeads(Reversed())
    x = inputs()
    split = fxsplit.rewrite(model, ["trunk.outer"], batch_branches=batch_branches, example_inputs=x)
    assert split.route == "fx"
    assert_per_task(model, split, (x,))
    restored = pickle.loads(pickle.dumps(split))
    restored(x)["a"].sum().backward()
    model(x)["a"].sum().backward()
    assert torch.allclose(restored.trunk.inner.weight.grad, model.trunk.inner.weight.grad)


def test_a_custom_autograd_function_on_the_export_route_is_checked_exactly_or_refused():
    torch.manual_seed(0)
    model = TwoHeads(Reversed())
    x = inputs()
    try:
        split = fxsplit.rewrite(model, ["trunk.outer"], example_inputs=x, method="export")
    except fxsplit.TraceError as error:
        assert "ReverseGradient" in str(error)
    else:
        assert_per_task(model, split, (x,))


@pytest.mark.parametrize("pre", [False, True])
def test_a_backward_hook_on_a_module_that_tracing_enters_is_refused_by_name(pre):
    model = TwoHeads(BackwardHooked(pre))
    with pytest.raises(fxsplit.TraceError, match=r"'trunk\.block'.*backward (pre-)?hook.*leaf_modules"):
        fxsplit.rewrite(model, ["trunk.outer"])


def test_a_backward_hook_on_a_leaf_module_runs_in_the_split():
    torch.manual_seed(0)
    model = TwoHeads(BackwardHooked())
    x = inputs()
    split = fxsplit.rewrite(model, ["trunk.outer"], example_inputs=x,
                            tracer_kwargs={"leaf_modules": ["trunk.block"]})
    assert_per_task(model, split, (x,))


def test_a_gradient_hook_registered_in_forward_is_recorded():
    torch.manual_seed(0)
    model = TwoHeads(TensorHooked())
    x = inputs()
    for example in (x, None):  # checked, or not: the same graph
        split = fxsplit.rewrite(model, ["trunk.outer"], example_inputs=example)
        assert split.route == "fx"
        assert_per_task(model, split, (x,))
    with torch.no_grad():  # where nothing needs a gradient, the split registers no hook (the model's call fails)
        assert not split(x)["a"].requires_grad
        with pytest.raises(RuntimeError, match="cannot register a hook"):
            model(x)


def test_a_gradient_hook_behind_a_requires_grad_test_is_refused_by_name():
    model = TwoHeads(TensorHooked(guarded=True))
    with pytest.raises(fxsplit.TraceError, match="register_hook"):
        fxsplit.rewrite(model, ["trunk.outer"], example_inputs=inputs())


def test_inference_mode_blocks_are_recorded_as_no_grad():
    torch.manual_seed(0)
    model = TwoHeads(InferenceTeacher())
    x = inputs()
    split = fxsplit.rewrite(model, ["trunk.mix"], example_inputs=x)
    assert_per_task(model, split, (x,))
    split(x)["a"].sum().backward()
    assert split.trunk.teacher.weight.grad is None and split.trunk.student.weight.grad is not None


@pytest.mark.parametrize("trunk, layer", [(InplaceAfterLinear, "trunk.first"), (PreActivation, "trunk.stem")])
def test_in_place_writes_after_a_batched_layer_train(trunk, layer):
    torch.manual_seed(0)
    model = TwoHeads(trunk())
    x = inputs()
    split = fxsplit.rewrite(model, [layer], example_inputs=x)
    sum(out.sum() for out in split(x).values()).backward()
    assert_per_task(model, split, (x,))


def test_a_custom_function_in_a_branch_keeps_the_other_branches_out_of_each_tasks_backward():
    """Joined branches would run every branch's history in each task's backward, and a custom Function there turns
    "no gradient" into zeros: a branch whose history holds one is not joined."""
    torch.manual_seed(0)
    model = TwoHeads(Reversed())
    x = inputs()
    split = fxsplit.rewrite(model, ["trunk.inner"], example_inputs=x)
    split(x)["a"].sum().backward()
    assert split.copy_of("b", "trunk.inner").weight.grad is None
    assert_per_task(model, split, (x,))
