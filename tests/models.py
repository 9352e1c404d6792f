"""Small multi-task models and the checks the tests share."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fxsplit
from tests.reference import relative_error


class MultiHead(nn.Module):
    """A backbone whose ``features``-wide output feeds one linear head per task; returns ``{task: logits}``."""

    def __init__(self, backbone: nn.Module, features: int, tasks=("a", "b"), classes: int = 3):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict({task: nn.Linear(features, classes) for task in tasks})

    def forward(self, x):
        shared = self.backbone(x)
        return {task: head(shared) for task, head in self.heads.items()}


class Block(nn.Module):
    """A residual block with BatchNorm, an in-place ReLU and an optional strided projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride), nn.BatchNorm2d(cout)) if stride > 1 else None

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.down is None else self.down(x)
        return self.relu(out)


class SmallCNN(nn.Module):
    """Stem, two residual blocks, pooled features of width 16."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block1 = Block(8, 8)
        self.block2 = Block(8, 16, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.block2(self.block1(self.stem(x)))).flatten(1)


class TinyViT(nn.Module):
    """Patch embedding, a class token and position embedding read directly, two hand-written attention blocks.

    Returns a tuple ``(class_token_features, mean_token_features)`` so that tasks can own tuple elements.
    """

    def __init__(self, dim: int = 16, patches: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Attention(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return tokens[:, 0], tokens[:, 1:].mean(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class TupleHeads(nn.Module):
    """TinyViT with task ``a`` reading the class token and task ``b`` the mean token; returns a tuple."""

    def __init__(self):
        super().__init__()
        self.vit = TinyViT()
        self.head_a = nn.Linear(16, 3)
        self.head_b = nn.Linear(16, 2)

    def forward(self, x):
        cls, mean = self.vit(x)
        return self.head_a(cls), self.head_b(mean)


class Twice(nn.Module):
    """A layer called twice, chunk and cat, and a shared tensor updated in place from a later layer."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.shared = nn.Linear(4, 4)
        self.mid = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        h = self.inp(x)
        left, right = h.chunk(2, dim=1)
        h2 = torch.cat([self.shared(left), self.shared(right)], dim=1)
        g = h * 2
        g.add_(self.mid(h2))  # g is computed before 'mid': a split 'mid' must not write into the shared g
        return self.out(torch.relu(g) + h2)


def small_models() -> dict[str, tuple[nn.Module, torch.Tensor, dict]]:
    """name -> (model, example input, extra rewrite arguments)."""
    torch.manual_seed(0)
    return {
        "cnn": (MultiHead(SmallCNN(), 16), torch.randn(4, 3, 16, 16), {}),
        "cnn3": (MultiHead(SmallCNN(), 16, tasks=("a", "b", "c")), torch.randn(4, 3, 16, 16), {}),
        "vit": (TupleHeads(), torch.randn(4, 3, 16, 16), {"tasks": ["a", "b"], "outputs": {"a": 0, "b": 1}}),
        "twice": (MultiHead(Twice(), 8, tasks=("a", "b", "c", "d")), torch.randn(4, 6), {}),
    }


def task_outputs(model: nn.Module, x: torch.Tensor, rewrite_kwargs: dict) -> dict[str, torch.Tensor]:
    """The original model's output per task, the way ``rewrite_kwargs`` assigns outputs to tasks."""
    out = model(x)
    outputs = rewrite_kwargs.get("outputs")
    if outputs is not None:
        return {task: out[key] for task, key in outputs.items()}
    if isinstance(out, dict):
        return out
    return {task: out for task in rewrite_kwargs["tasks"]}


def assert_equivalent(model: nn.Module, split: fxsplit.SplitModule, x: torch.Tensor, rewrite_kwargs: dict,
                      tolerance: float = 1e-5) -> None:
    """Every task's output of ``split`` matches the original's within ``tolerance`` relative error.

    Both run on copies, so BatchNorm running statistics of neither model change.
    """
    expected = task_outputs(copy.deepcopy(model), copy.deepcopy(x), rewrite_kwargs)  # forward may write into x
    got = copy.deepcopy(split)(copy.deepcopy(x))
    assert set(got) == set(expected)
    for task in expected:
        assert got[task].shape == expected[task].shape, task
        assert relative_error(expected[task], got[task]) <= tolerance, (task, relative_error(expected[task], got[task]))


def without_dropout(*models: nn.Module) -> None:
    """Dropout probability 0 everywhere, so that train mode can be compared exactly."""
    for model in models:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd):
                module.p = 0.0


def snapshot(model: nn.Module) -> dict:
    """Everything about a model that fxsplit must leave alone: state, gradients, hooks and modes."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "modes": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for name, m in model.named_modules()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["ids"] == before["ids"]
    assert after["modes"] == before["modes"]
    assert after["hooks"] == before["hooks"]
    assert set(after["state"]) == set(before["state"])
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    for key, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][key] is None), key
        assert grad is None or torch.equal(grad, after["grads"][key]), key


def count(parameters) -> int:
    return sum(p.numel() for p in parameters)


# --- scoring cases: models, losses(output, batch) and batches -------------------------------------------------


def _cross_entropy(key):
    return lambda out, batch: F.cross_entropy(out[key], batch[1][:, 0 if key in ("a", 0) else 1])


def _regress(key, column):
    return lambda out, batch: (out[key].sum(1) - batch[1][:, column].double()).pow(2).mean()


def scoring_cases() -> dict:
    """name -> (model, task losses, batches) for scoring tests, all in float64."""
    torch.manual_seed(0)
    image = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randint(0, 2, (6, 2))) for _ in range(4)]
    vectors = [(torch.randn(6, 6, dtype=torch.float64), torch.randint(0, 3, (6, 4))) for _ in range(4)]
    return {
        "cnn-bn": (MultiHead(SmallCNN(), 16).double(), {t: _cross_entropy(t) for t in "ab"}, image),
        "cnn-3-tasks": (MultiHead(SmallCNN(), 16, tasks="abc").double(),
                        {t: _regress(t, i % 2) for i, t in enumerate("abc")}, image),
        "vit": (TupleHeads().double(), {"a": _cross_entropy(0), "b": _cross_entropy(1)},
                [(torch.randn(6, 3, 16, 16, dtype=torch.float64), y) for _, y in image]),
        "called-twice-4-tasks": (MultiHead(Twice(), 8, tasks="abcd").double(),
                                 {t: _regress(t, i) for i, t in enumerate("abcd")}, vectors),
    }


def step_losses(model, tasks, batch):
    """The task losses of one batch ``(x, targets)``: ``tasks`` maps names to ``loss(output, batch)``."""
    out = model(batch[0])
    return {t: loss(out, batch) for t, loss in tasks.items()}


def monitored(model, tasks, batches, optimizer=None, hooks=False, **options):
    """Train (or probe) ``model`` on ``batches`` with a monitor in a plain loop; its report."""
    monitor = fxsplit.ConflictMonitor(model, tasks, **options)
    for batch in batches:
        losses = step_losses(model, tasks, batch)
        if hooks:
            for k, (task, loss) in enumerate(losses.items()):
                with monitor.task(task):
                    loss.backward(retain_graph=k < len(losses) - 1)
        else:
            monitor.backward(losses)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    return monitor.report()
