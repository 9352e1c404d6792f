"""Random multi-task architectures for property tests.

A network is a *program*: a list of operations, each reading earlier values (all of shape ``(batch, tokens,
width)``) and appending one value. ``Program.forward`` interprets it with plain Python loops over the fixed
list, so ``torch.fx`` unrolls it into a graph with residual adds, concatenations, chunks, modules called twice,
in-place updates, parameters read directly, BatchNorm/LayerNorm, attention, and 2–4 task heads; and the patterns
whose behaviour lives in the backward pass or in Python: a custom autograd Function, a gradient hook registered
in forward, a forward hook on a layer, a module whose code reads its own mode, data-dependent row selection
followed by a layer, and an input normalised in place.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from tests.patterns import Moded, ReverseGradient

WIDTH, TOKENS = 8, 3
UNARY = ("linear", "layernorm", "batchnorm", "attention", "reuse", "gelu_linear", "function", "gradient_hook",
         "forward_hook", "mode")
BINARY = ("add", "cat_project", "chunk_mix", "inplace_add", "param_add", "select_rows")


class Program(nn.Module):
    """Interprets ``ops``: ``(kind, inputs, module_index)``; returns ``{task: logits}`` or a tuple."""

    def __init__(self, ops: list[tuple], heads: list[int], as_tuple: bool, normalise: bool = False):
        super().__init__()
        self.ops, self.head_inputs, self.as_tuple, self.normalise = ops, heads, as_tuple, normalise
        self.blocks = nn.ModuleList(_module(kind) for kind, _, _ in ops)
        self.params = nn.ParameterDict({str(i): nn.Parameter(torch.randn(1, 1, WIDTH) * 0.5)
                                        for i, (kind, _, _) in enumerate(ops) if kind == "param_add"})
        self.heads = nn.ModuleList(nn.Linear(WIDTH, 3) for _ in heads)

    def forward(self, x):
        if self.normalise:
            x.div_(2)  # in place, as preprocessing inside forward does
        values = [x]
        for i, (kind, inputs, reused) in enumerate(self.ops):
            a = values[inputs[0]]
            b = values[inputs[-1]]
            block = self.blocks[reused if kind == "reuse" else i]
            if kind in ("linear", "layernorm", "reuse", "gelu_linear", "forward_hook", "mode"):
                out = block(a)
            elif kind == "function":
                out = ReverseGradient.apply(block(a))
            elif kind == "gradient_hook":
                out = block(a)
                out.register_hook(lambda grad: grad * 3)
            elif kind == "select_rows":  # the rows kept depend on the values: on the copies, once they differ
                out = b + block(a[a[..., 0] > 0]).sum(0)
            elif kind == "batchnorm":
                out = block(a.transpose(1, 2)).transpose(1, 2)
            elif kind == "attention":
                q, k, v = block(a).chunk(3, dim=-1)
                out = a + (q @ k.transpose(1, 2)).softmax(-1) @ v
            elif kind == "add":
                out = a + b
            elif kind == "cat_project":
                out = block(torch.cat([a, b], dim=-1))
            elif kind == "chunk_mix":
                left, right = block(torch.cat([a, b], dim=-1)).chunk(2, dim=-1)
                out = left * torch.sigmoid(right)
            elif kind == "inplace_add":
                out = a * 1.0  # a fresh tensor; b is written into it in place
                out.add_(block(b))
            else:  # param_add: a parameter read directly
                out = a + self.params[str(i)]
            values.append(out)
        outputs = [head(values[j].mean(1)) for head, j in zip(self.heads, self.head_inputs)]
        return tuple(outputs) if self.as_tuple else {f"t{i}": out for i, out in enumerate(outputs)}


def _module(kind: str) -> nn.Module:
    if kind in ("linear", "inplace_add", "function", "gradient_hook", "select_rows"):
        return nn.Linear(WIDTH, WIDTH)
    if kind == "forward_hook":
        linear = nn.Linear(WIDTH, WIDTH)
        linear.register_forward_hook(lambda module, args, out: out * 0.5)
        return linear
    if kind == "mode":
        return Moded(WIDTH)
    if kind == "layernorm":
        return nn.LayerNorm(WIDTH)
    if kind == "batchnorm":
        return nn.BatchNorm1d(WIDTH)
    if kind == "attention":
        return nn.Linear(WIDTH, 3 * WIDTH)
    if kind == "gelu_linear":
        return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
    if kind in ("cat_project", "chunk_mix"):
        return nn.Linear(2 * WIDTH, WIDTH if kind == "cat_project" else 2 * WIDTH)
    return nn.Identity()  # reuse (calls an earlier block) and add / param_add (no module of their own)


@st.composite
def programs(draw) -> tuple[Program, torch.Tensor, dict]:
    """A random network, an input batch, and the rewrite arguments that name its tasks."""
    length = draw(st.integers(2, 9))
    ops = []
    for i in range(length):
        earlier = st.integers(0, i)
        reusable = [j for j, (kind, _, _) in enumerate(ops) if kind in ("linear", "gelu_linear")]
        kinds = UNARY + BINARY if reusable else tuple(k for k in UNARY + BINARY if k != "reuse")
        kind = draw(st.sampled_from(kinds))
        inputs = (draw(earlier), draw(earlier))
        ops.append((kind, inputs, draw(st.sampled_from(reusable)) if kind == "reuse" else i))
    tasks = draw(st.integers(2, 4))
    heads = [draw(st.integers(max(1, length - 2), length)) for _ in range(tasks)]  # heads read late values
    as_tuple, normalise = draw(st.booleans()), draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = Program(ops, heads, as_tuple, normalise).double()
    names = [f"t{i}" for i in range(tasks)]
    kwargs = {"tasks": names, "outputs": dict(zip(names, range(tasks)))} if as_tuple else {}
    return model, torch.randn(5, TOKENS, WIDTH, dtype=torch.float64), kwargs


@st.composite
def partitions(draw, users: list[str]) -> str | list[list[str]]:
    """A random partition of ``users`` (the tasks that use a layer) into two or more groups, or ``"each"``."""
    labels = [draw(st.integers(0, len(users) - 1)) for _ in users]
    if len(set(labels)) < 2:
        return "each"
    return [[task for task, label in zip(users, labels) if label == group] for group in sorted(set(labels))]
