"""The demo: Recon's experiment in miniature on MultiDigits, from scratch, in a few minutes on a CPU.

1. Train the joint network (one shared trunk, a head per task) while ``analyze`` scores every shared layer;
   this run is both the scoring run and the joint baseline (same seeds and budget, so one run serves both).
2. Split the top-K layers (``rewrite``), and, as the paper's control, K random shared layers; in both, every
   BatchNorm in the branches gets a copy per task (``split_norms``), so that eval-mode statistics fit each
   branch (shared ones would average branches that have drifted apart).
3. Train both from scratch with the same seeds and budget, again under ``analyze`` so that the conflicts left
   in the still-shared parameters are measured.
4. Report accuracy per task, parameters, and the occurrence of conflicting gradients; write JSON, a Markdown
   table, plots and the Recon network exported as TorchScript and ``torch.export`` files.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .analyze import analyze
from .datasets import MultiDigits
from .export import export
from .report import ConflictReport
from .rewrite import rewrite

THRESHOLDS = [0.0, -0.01, -0.05, -0.1]


@dataclass
class DemoConfig:
    """Sizes and budgets of one demo run."""

    train_size: int = 8000
    test_size: int = 2000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    top_k: int = 6
    width: int = 16
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smoke-test configuration that finishes in well under a minute."""
        return cls(**{"train_size": 768, "test_size": 256, "epochs": 1, **overrides})


@dataclass
class DemoRun:
    """A finished demo: its figures (as saved in ``results.json``) and the three trained networks."""

    results: dict
    models: dict[str, nn.Module]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected when needed) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitNet(nn.Module):
    """A small ResNet-style multi-task network: stem, three residual stages, one linear head per task."""

    def __init__(self, tasks=("left", "right"), classes: int = 10, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.Sequential(
            ResidualBlock(width, width), ResidualBlock(width, 2 * width, 2), ResidualBlock(2 * width, 4 * width, 2)
        )
        self.heads = nn.ModuleDict({task: nn.Linear(4 * width, classes) for task in tasks})

    def forward(self, x):
        features = self.stages(self.stem(x)).mean((2, 3))
        return {task: head(features) for task, head in self.heads.items()}


def task_losses(tasks) -> dict:
    """Cross-entropy per task, reading the model's ``{task: logits}`` and the batch's target column."""
    return {task: (lambda column, task: lambda out, batch: F.cross_entropy(out[task], batch[1][:, column]))(i, task)
            for i, task in enumerate(tasks)}


def accuracy(model: nn.Module, data: DataLoader, tasks) -> dict[str, float]:
    """Per-task accuracy in eval mode (the model's mode is restored)."""
    was_training, correct, total = model.training, dict.fromkeys(tasks, 0), 0
    model.eval()
    with torch.no_grad():
        for images, targets in data:
            out = model(images)
            for i, task in enumerate(tasks):
                correct[task] += (out[task].argmax(1) == targets[:, i]).sum().item()
            total += len(targets)
    model.train(was_training)
    return {task: correct[task] / total for task in tasks}


def run(out: Path, config: DemoConfig = DemoConfig(), progress: bool | None = None) -> DemoRun:
    """Run the demo and write its files into ``out``."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    train_set = MultiDigits("train", size=config.train_size, seed=config.seed)
    test_set = MultiDigits("test", size=config.test_size, seed=config.seed)
    tasks = list(train_set.tasks)
    losses = task_losses(tasks)
    test = DataLoader(test_set, batch_size=256)

    def fresh() -> DigitNet:
        torch.manual_seed(config.seed)
        return DigitNet(tasks, width=config.width)

    def train(model: nn.Module, name: str) -> ConflictReport:
        torch.manual_seed(config.seed)
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed))
        batches = (batch for _ in range(config.epochs) for batch in loader)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        if progress is not False:
            print(f"training {name} ({config.epochs} epochs of {len(loader)} steps)", file=sys.stderr, flush=True)
        return analyze(model.train(), losses, batches, steps=config.epochs * len(loader), threshold=THRESHOLDS,
                       optimizer=optimizer, progress=progress)

    joint = fresh()
    scoring = train(joint, "joint network (scoring run)")
    recon_layers = scoring.top(config.top_k)
    random_layers = random.Random(config.seed).sample(scoring.layers, min(config.top_k, len(scoring.layers)))
    models, reports = {"joint": joint}, {"joint": scoring}
    for name, layers in (("recon", recon_layers), ("random", random_layers)):
        models[name] = rewrite(fresh(), layers, tasks, split_norms=True)
        reports[name] = train(models[name], f"{name} network (top-{config.top_k} layers)")

    base_params = sum(p.numel() for p in joint.parameters())
    results = {
        "config": asdict(config),
        "tasks": tasks,
        "scoring": {"top": list(recon_layers), "random": random_layers, "scores": scoring.scores},
        "models": {name: {
            "accuracy": accuracy(model, test, tasks),
            "params": sum(p.numel() for p in model.parameters()),
            "increase": sum(p.numel() for p in model.parameters()) / base_params - 1,
            "shared_layers": len(reports[name].layers),
            "conflict_rate": {str(s): reports[name].conflict_rate(s)[tuple(tasks[:2])] for s in THRESHOLDS},
        } for name, model in models.items()},
    }
    example = next(iter(test))[0][:8]
    for suffix in (".pt", ".pt2"):
        export(models["recon"], out / f"recon{suffix}", example)
    scoring.save(out / "scoring_report.json")
    _plots(out, scoring, reports)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    return DemoRun(results, models)


def markdown(results: dict) -> str:
    """The results as a Markdown table."""
    tasks, rates = results["tasks"], list(THRESHOLDS)
    head = ["model", *(f"{t} acc." for t in tasks), "params", "increase", *(f"conflicts cos<{s}" for s in rates)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        cells = [name, *(f"{m['accuracy'][t]:.3f}" for t in tasks), f"{m['params']:,}", f"{m['increase']:+.1%}",
                 *(f"{m['conflict_rate'][str(s)]:.1%}" for s in rates)]
        lines.append("| " + " | ".join(cells) + " |")
    config = results["config"]
    return (f"MultiDigits, {config['train_size']} training pairs, {config['epochs']} epochs, seed {config['seed']}, "
            f"top-{config['top_k']} layers: {', '.join(results['scoring']['top'])}.\n\n" + "\n".join(lines) + "\n\n"
            "Conflicts: share of training steps whose task gradients over the still-shared parameters have "
            "cosine below the threshold.\n")


def _plots(out: Path, scoring: ConflictReport, reports: dict[str, ConflictReport]) -> None:
    """Scores per layer, and the distribution of whole-shared-vector cosines per model."""
    scoring.plot(out / "scores.png")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, report in reports.items():
        cosines = [step[0] for step in report.whole_cosine]
        axes.hist(cosines, bins=30, range=(-1, 1), histtype="step", linewidth=1.5, label=name)
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set_xlabel("cosine of the task gradients over the still-shared parameters")
    axes.set_ylabel("training steps")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "cosines.png", dpi=120)
    plt.close(figure)
