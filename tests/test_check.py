"""The checks that an example turns into facts (fxsplit/tracing/verify.py, fxsplit/rewrite/check.py): they compare
in float64, compare gradients as well as outputs, run on copies of the caller's inputs, and see leaks between
branches that only appear once the copies differ."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fxsplit
from fxsplit.rewrite.check import check_split
from fxsplit.tracing.verify import calling, check_trace
from tests.patterns import GumbelRouted, InplaceInput, Normalised, RowSelection, TwoHeads, inputs
from tests.reference import assert_per_task


class Mistraced(nn.Module):
    """Large outputs, and code a trace cannot record (a stand-in for a tensor is no Tensor): the graph skips the
    scaling that the model applies."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 8)

    def forward(self, x):
        h = self.first(x) * 8000
        if isinstance(h, torch.Tensor):
            h = h * 1.5
        return self.second(h)


def test_a_float16_mistrace_with_outputs_beyond_float16s_range_of_norms_is_caught():
    torch.manual_seed(0)
    model = TwoHeads(Mistraced()).half()
    x = inputs(512, torch.float16)
    out = model(x)["a"]
    assert out.isfinite().all() and out.norm().isinf()  # each value fits in float16, the norm does not
    with pytest.raises(fxsplit.TraceMismatchError, match="relative error 0.33"):
        fxsplit.trace(model, x, method="fx")


def test_a_float16_model_with_batchnorm_is_checked_and_split_exactly():
    torch.manual_seed(0)
    model = TwoHeads(Normalised()).half()
    x = inputs(8, torch.float16)
    split = fxsplit.rewrite(model, ["trunk.second"], example_inputs=x)
    assert split.route == "fx"
    assert_per_task(model, split, (x,), tolerance=1e-2)


def test_checks_run_on_copies_of_the_callers_inputs():
    torch.manual_seed(0)
    model = TwoHeads(InplaceInput())
    x = inputs()
    kept = x.clone()
    split = fxsplit.rewrite(model, ["trunk.second"], example_inputs=x)
    assert torch.equal(x, kept)  # forward divides its input in place; the checks never divide the caller's
    assert split.route == "fx"
    assert_per_task(model, split, (x,))
    report = fxsplit.analyze(model, {t: (lambda t: lambda out, batch: out[t].pow(2).mean())(t) for t in "ab"},
                             [x], progress=False)
    assert report.steps == 1 and torch.equal(x, kept / 2)  # the scored step is a real step: it divides once


def test_the_trace_check_compares_gradients():
    torch.manual_seed(0)
    model = TwoHeads(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8)))
    traced = fxsplit.trace(model)
    node = next(n for n in traced.graph.nodes if n.target == "trunk.1")
    with traced.graph.inserting_after(node):
        detached = traced.graph.call_method("detach", (node,))
    node.replace_all_uses_with(detached, delete_user_cb=lambda user: user is not detached)
    traced.recompile()
    x = inputs()
    assert torch.equal(traced(x)["a"], model(x)["a"])  # the same outputs: only the gradients differ
    with pytest.raises(fxsplit.TraceMismatchError, match=r"gradient .*trunk\.0\.weight"):
        check_trace(model, traced, calling((x,), {}), modes=(True,))


def _leaking(split: fxsplit.SplitModule, reader: str, source: str) -> fxsplit.SplitModule:
    """``split`` with task ``reader``'s head reading task ``source``'s branch: a leak that only shows once the
    copies differ."""
    split = copy.deepcopy(split)
    head = next(n for n in split.graph.nodes if n.op == "call_module" and n.target == f"heads.{reader}")
    own = head.args[0]
    other = next(n for n in split.graph.nodes if n.meta.get("branch") == {source}
                 and n.meta.get("origin") == own.meta["origin"])
    head.replace_input_with(own, other)
    split.recompile()
    return split


def test_the_split_check_sees_a_leak_between_branches_that_equal_copies_hide():
    torch.manual_seed(0)
    model = TwoHeads(RowSelection())
    x = inputs()
    split = fxsplit.rewrite(model, ["trunk.third"], batch_branches=False, example_inputs=x)
    leak = _leaking(split, "a", "b")
    assert torch.equal(leak(x)["a"], split(x)["a"])  # equal copies: the leak computes the same
    with pytest.raises(fxsplit.SplitMismatchError, match="task 'a'"):
        check_split(model, fxsplit.trace(model), leak, {"a": ("a",), "b": ("b",)}, calling((x,), {}))


@pytest.mark.parametrize("batch_branches", [True, False])
def test_branches_that_keep_different_rows_stay_apart(batch_branches):
    torch.manual_seed(0)
    model = TwoHeads(RowSelection())
    x = inputs(16)
    split = fxsplit.rewrite(model, ["trunk.second"], batch_branches=batch_branches, example_inputs=x)
    assert_per_task(model, split, (x,))


def test_randomness_in_eval_mode_that_the_branches_draw_apart_is_named_not_called_a_bug():
    torch.manual_seed(0)
    model, x = TwoHeads(GumbelRouted()), inputs()
    with pytest.warns(UserWarning, match=r"TwoHeads draws random numbers in eval mode \(at trunk\.gumbel_softmax: "
                                         r"1 draw in the model's graph, 2 in the split's \(its task branches draw "
                                         r"apart\)\).*eval mode was not checked"):
        fxsplit.rewrite(model.eval(), ["trunk.stem"], example_inputs=x)


def test_randomness_in_eval_mode_drawn_once_before_the_branches_is_checked():
    torch.manual_seed(0)
    model, x = TwoHeads(GumbelRouted()), inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        split = fxsplit.rewrite(model.eval(), ["trunk.paths.0"], example_inputs=x)
    assert [str(w.message) for w in caught] == [  # train mode's draws are the documented exception
        "TwoHeads is random in train mode even without dropout, so the split model was checked in eval mode only."]
    assert sum(node.target is torch.nn.functional.gumbel_softmax for node in split.graph.nodes) == 1
    assert_per_task(model, split, (x,), modes=(False,))
