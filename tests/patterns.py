"""Models written in the patterns of real training code that once gave a silent wrong split or score: behaviour
that lives in the backward pass (custom autograd Functions, hooks, inference mode), in-place writes after a
batched layer, data-dependent row selection, inputs normalised in place, float16.

Each is a trunk under two task heads (``TwoHeads``): ``trunk.*`` are the shared layers.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 8


class TwoHeads(nn.Module):
    """A shared trunk and one linear head per task, returning ``{task: output}``."""

    def __init__(self, trunk: nn.Module, tasks=("a", "b"), width: int = WIDTH):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleDict({task: nn.Linear(width, 3) for task in tasks})

    def forward(self, x):
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


class ReverseGradient(torch.autograd.Function):
    """Identity forward, negated gradient backward (DANN's gradient reversal)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Reversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, WIDTH)
        self.outer = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.outer(torch.tanh(ReverseGradient.apply(self.inner(x))))


class Moded(nn.Module):
    """A layer whose code reads its own mode (tracing goes through it): doubled in train mode."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        h = self.linear(x)
        return h * 2 if self.training else h


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return torch.relu(self.linear(x))


class BackwardHooked(nn.Module):
    """A full backward hook on a module that tracing goes through (not a leaf)."""

    def __init__(self, pre: bool = False):
        super().__init__()
        self.inner = nn.Linear(4, WIDTH)
        self.block = Block()
        self.outer = nn.Linear(WIDTH, WIDTH)
        if pre:
            self.block.register_full_backward_pre_hook(lambda module, grad_output: (grad_output[0] * 3,))
        else:
            self.block.register_full_backward_hook(lambda module, grad_input, grad_output: (grad_input[0] * 3,))

    def forward(self, x):
        return self.outer(self.block(self.inner(x)))


class TensorHooked(nn.Module):
    """``h.register_hook`` in forward: scales the gradient that flows back into ``inner``."""

    def __init__(self, guarded: bool = False):
        super().__init__()
        self.guarded = guarded
        self.inner = nn.Linear(4, WIDTH)
        self.outer = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = self.inner(x)
        if not self.guarded or h.requires_grad:
            h.register_hook(lambda grad: grad * 5)
        return self.outer(h)


class InferenceTeacher(nn.Module):
    """A frozen teacher run under ``torch.inference_mode()``: its weights get no gradient."""

    def __init__(self):
        super().__init__()
        self.teacher = nn.Linear(4, WIDTH)
        self.student = nn.Linear(4, WIDTH)
        self.mix = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        with torch.inference_mode():
            target = self.teacher(x)
        return self.mix(self.student(x) + target.clone())


class Chain(nn.Module):
    """Three linear layers, ``first`` to ``third``, for the patterns below to connect."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)
        self.third = nn.Linear(WIDTH, WIDTH)


class InplaceAfterLinear(Chain):
    """The Recon authors' ResNet style: ``F.relu(h, inplace=True)`` right after a layer (here a shared one that
    batched branches run once)."""

    def forward(self, x):
        h = self.second(self.first(x))
        h = F.relu(h, inplace=True)
        return self.third(h)


class PreActivation(nn.Module):
    """A pre-activation residual block: ``out += shortcut`` written into a shared layer's output."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, WIDTH)
        self.norm = nn.LayerNorm(WIDTH)
        self.conv = nn.Linear(WIDTH, WIDTH)
        self.shortcut = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        h = self.stem(x)
        out = self.conv(torch.relu(self.norm(h)))
        out += self.shortcut(h)
        return out


class InplaceInput(nn.Module):
    """Normalises its input in place, as some preprocessing inside forward does."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        x.div_(2)
        return self.second(self.first(x))


class RowSelection(Chain):
    """Keeps the rows whose first feature is positive (kept tokens, proposals), then pools them: how many rows a
    branch keeps depends on its copies."""

    def forward(self, x):
        h = self.second(self.first(x))
        h = h[h[:, 0] > 0]
        return self.third(h).sum(0, keepdim=True).expand(x.shape[0], -1)


class Normalised(nn.Module):
    """Linear layers with BatchNorm between them, for float16 checks."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.first = nn.Linear(4, WIDTH)
        self.norm = nn.BatchNorm1d(WIDTH)
        self.second = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.second(self.norm(self.first(x))) * self.scale


def inputs(batch: int = 6, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 4, dtype=dtype)


class NamedTasks(nn.Module):
    """Tasks named freely (``"type"``, ``"train"``: names ``nn.Module`` uses itself), so the heads sit in a list, as
    code that names tasks by strings it reads from a config does: a ``ModuleDict`` cannot hold those keys."""

    def __init__(self, tasks, width: int = WIDTH):
        super().__init__()
        self.names = list(tasks)
        self.trunk = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, width))
        self.heads = nn.ModuleList(nn.Linear(width, 3) for _ in self.names)

    def forward(self, x):
        h = self.trunk(x)
        return {name: head(h) for name, head in zip(self.names, self.heads)}


@dataclasses.dataclass
class SegDepth:
    """A dataclass output (as detection and dense-prediction code returns them): a field per task."""

    seg: torch.Tensor
    depth: torch.Tensor


SegDepthTuple = collections.namedtuple("SegDepthTuple", "seg depth")


class RecordOutput(nn.Module):
    """A trunk under two heads whose outputs come back as a record (``record(seg, depth)``: a dataclass or a
    namedtuple), read by field name."""

    def __init__(self, record=SegDepth):
        super().__init__()
        self.record = record
        self.trunk = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.seg, self.depth = nn.Linear(WIDTH, 3), nn.Linear(WIDTH, 2)

    def forward(self, x):
        h = self.trunk(x)
        return self.record(self.seg(h), self.depth(h))


class OptionalInput(nn.Module):
    """An input ``forward`` may go without, taken by name (``mask=None``) or through ``**kwargs``, as wrappers that
    pass keywords on do; without it, ``forward`` takes another path (here: no gating)."""

    def __init__(self, variadic: bool = False):
        super().__init__()
        self.variadic = variadic
        self.trunk = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.heads = nn.ModuleDict({task: nn.Linear(WIDTH, 3) for task in ("a", "b")})

    def forward(self, x, mask=None, **kwargs):
        h = self.trunk(x)
        gate = kwargs.get("gate") if self.variadic else mask
        if gate is not None:
            h = h * 2  # a path only the call with the input takes
        return {task: head(h) for task, head in self.heads.items()}


class Symmetric(nn.Module):
    """A parametrization: the weight is symmetric, derived from its upper triangle."""

    def forward(self, weight):
        return weight.triu() + weight.triu(1).transpose(0, 1)


class PlainLinear(nn.Module):
    """A layer written by hand (not torch.nn's), to be weight-normalised."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH)
        self.bias = nn.Parameter(torch.zeros(WIDTH))

    def forward(self, x):
        return x @ self.weight.transpose(0, 1) + self.bias


class Parametrized(nn.Module):
    """Weights derived by ``torch.nn.utils.parametrize`` (a symmetric weight, ``weight_norm`` on torch.nn's layer
    and on a layer written by hand), as spectral- or weight-normalised networks have them."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, WIDTH)
        self.symmetric = nn.Linear(WIDTH, WIDTH)
        nn.utils.parametrize.register_parametrization(self.symmetric, "weight", Symmetric())
        self.normed = nn.utils.parametrizations.weight_norm(nn.Linear(WIDTH, WIDTH))
        self.plain = nn.utils.parametrizations.weight_norm(PlainLinear())

    def forward(self, x):
        return self.plain(torch.tanh(self.normed(torch.tanh(self.symmetric(self.stem(x))))))


class DetachedProbe(nn.Module):
    """Two task heads on a shared trunk and a linear probe that reads the trunk's features detached (a probe
    trained on frozen features, as self-supervised code evaluates them): the probe's output uses the trunk, its
    loss never reaches it."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.heads = nn.ModuleDict({task: nn.Linear(WIDTH, 3) for task in ("a", "b")})
        self.probe = nn.Linear(WIDTH, 2)

    def forward(self, x):
        h = self.trunk(x)
        return {"a": self.heads.a(h), "b": self.heads.b(h), "probe": self.probe(h.detach())}


class WriteIntoView(nn.Module):
    """``h = shared[:, :4]; h.add_(update)``: an update written in place into a view of an activation that is read
    afterwards whole, as code that fills part of a feature map does. ``mid`` computes the update from the input,
    ``last`` reads the activation after the write."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, WIDTH)
        self.mid = nn.Linear(4, WIDTH // 2)
        self.last = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        shared = self.stem(x)
        part = shared[:, : WIDTH // 2]
        part.add_(self.mid(x))
        return self.last(shared)


class RegularisedGate(nn.Module):
    """A gate that back-propagates a regulariser of its weights from inside ``forward`` in train mode (LibMTL's
    DSelect-k style: ``self.reg_loss.backward(retain_graph=True)``), so that its ``.grad`` holds it before the task
    losses add theirs."""

    def __init__(self, experts: int = 2):
        super().__init__()
        self.logits = nn.Linear(WIDTH, experts)

    def forward(self, h):
        weights = torch.softmax(self.logits(h), -1)
        if self.training:
            weights.pow(2).mean().backward(retain_graph=True)
        return weights


class GatedExperts(nn.Module):
    """A stem, a regularised gate and two experts mixed by it (a mixture-of-experts layer)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, WIDTH)
        self.gate = RegularisedGate()
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        weights = self.gate(h)
        return weights[:, :1] * self.experts[0](h) + weights[:, 1:] * self.experts[1](h)


class DeepSupervised(nn.Module):
    """Task outputs beside a deep-supervision mapping of the same tasks' predictions from an earlier stage
    (MTI-Net's ``out["deep_supervision"] = {...}``): each task's loss reads its own key and its entry there."""

    def __init__(self):
        super().__init__()
        self.early = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU())
        self.late = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.heads = nn.ModuleDict({task: nn.Linear(WIDTH, 3) for task in ("seg", "depth")})
        self.early_heads = nn.ModuleDict({task: nn.Linear(WIDTH, 3) for task in ("seg", "depth")})

    def forward(self, x):
        early = self.early(x)
        late = self.late(early)
        out = {task: head(late) for task, head in self.heads.items()}
        out["deep_supervision"] = {task: head(early) for task, head in self.early_heads.items()}
        return out


class GumbelRouted(nn.Module):
    """Routing by Gumbel-softmax samples in both modes (learning-to-branch code samples in eval too): ``route``'s
    logits are perturbed by random numbers on every call."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, WIDTH)
        self.route = nn.Linear(WIDTH, 2)
        self.paths = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(2))

    def forward(self, x):
        h = self.stem(x)
        choice = F.gumbel_softmax(self.route(h), tau=1.0, hard=True)
        return choice[:, :1] * self.paths[0](h) + choice[:, 1:] * self.paths[1](h)


class Aggregation(nn.Module):
    """Pools node features per graph, overriding ``__call__`` to fill in its arguments before ``forward`` runs,
    as PyTorch Geometric's ``Aggregation`` does (the number of graphs is read off the batch vector's values)."""

    def __call__(self, x, index=None, dim_size=None):
        if index is None:
            index = x.new_zeros(x.size(0), dtype=torch.long)
        if dim_size is None:
            dim_size = int(index.max()) + 1 if index.numel() > 0 else 0
        return super().__call__(x, index=index, dim_size=dim_size)


class SumAggregation(Aggregation):
    def forward(self, x, index, dim_size):
        return x.new_zeros(dim_size, x.size(-1)).index_add(0, index, x)


class GraphRegressor(nn.Module):
    """A molecular property regressor in a QM9 model's pattern: node features, message-free node layers, a sum
    over each graph's nodes (``batch`` says which graph a node is in), one head per target."""

    def __init__(self, targets=("mu", "alpha")):
        super().__init__()
        self.node = nn.Sequential(nn.Linear(4, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.pool = SumAggregation()
        self.heads = nn.ModuleDict({target: nn.Linear(WIDTH, 1) for target in targets})

    def forward(self, x, batch):
        pooled = self.pool(self.node(x), batch)
        return {target: head(pooled) for target, head in self.heads.items()}


def graph_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Ten nodes of three graphs, and the batch vector."""
    return torch.randn(10, 4), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])


class Unscriptable(nn.Module):
    """A layer whose Python TorchScript cannot compile (a type's ``__class__``)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, WIDTH)

    def forward(self, x):
        return self.linear(x) * len({1: 2}.items().__class__.__name__)
