"""The demo: Recon's experiment in miniature on MultiDigits, from scratch, in about a minute per seed on a CPU.

1. Train the joint network (one shared trunk, a head per task) while ``ConflictMonitor`` scores every shared layer;
   this run is both the scoring run and the joint baseline (same seeds and budget, so one run serves both).
2. Split the top-K layers (``rewrite``), and, as the paper's control, K random shared layers; in both, every
   BatchNorm in the branches gets a copy per task (``split_norms``), so that eval-mode statistics fit each
   branch (shared ones would average branches that have drifted apart).
3. Train both from scratch with the same seeds and budget, again through the monitor so that the conflicts left
   in the still-shared parameters are measured.
4. Report accuracy per task, parameters, and the occurrence of conflicting gradients; write JSON, a Markdown
   table, plots and the Recon network exported as TorchScript and ``torch.export`` files.

With several seeds (``seeds``) every step runs once per seed, the table gives mean ± sd over the seeds and the
per-seed paired differences (Recon minus joint, Recon minus random); plots and exported files are the first seed's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..datasets import MultiDigits
from ..errors import FxsplitError
from ..export import export
from ..extras import require
from ..report import ConflictReport
from .arms import Experiment, pairs, run_seed
from .statistics import comparisons, differences, summarize, table
from .training import Training

THRESHOLDS = (0.0, -0.01, -0.05, -0.1)
EXTRAS = ("matplotlib", "sklearn")  # the plots and the MultiDigits data: `pip install fxsplit[demo]`
TASKS = ("left", "right")


@dataclass
class DemoConfig:
    """Sizes and budgets of one demo run; ``seeds`` runs from ``seed`` to ``seed + seeds - 1``."""

    train_size: int = 8000
    test_size: int = 2000
    epochs: int = 4
    batch_size: int = 64
    lr: float = 2e-3
    top_k: int = 6
    width: int = 16
    seed: int = 0
    seeds: int = 1

    def __post_init__(self):
        if not (isinstance(self.seeds, int) and self.seeds >= 1):
            raise FxsplitError(f"the demo needs seeds >= 1 (how many seeds to run), got {self.seeds!r}.")

    @classmethod
    def quick(cls, **overrides) -> DemoConfig:
        """A smoke-test configuration that finishes in well under a minute."""
        return cls(**{"train_size": 768, "test_size": 256, "epochs": 1, **overrides})

    def experiment(self) -> Experiment:
        """The demo's experiment: DigitNet on MultiDigits, with BatchNorms split in the branches."""
        return Experiment(
            network=lambda: DigitNet(TASKS, width=self.width),
            data=lambda seed: (MultiDigits("train", size=self.train_size, seed=seed),
                               MultiDigits("test", size=self.test_size, seed=seed)),
            tasks=TASKS, training=Training(self.epochs, self.batch_size, self.lr, THRESHOLDS), k=self.top_k,
            split_norms=True)


@dataclass
class DemoRun:
    """A finished demo: its figures (as saved in ``results.json``) and the first seed's three trained networks."""

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


def run(out: Path, config: DemoConfig = DemoConfig(), progress: bool | None = None) -> DemoRun:
    """Run the demo and write its files into ``out``; ``results["files"]`` lists them.

    The extras it needs are checked before anything is trained, and the results (``results.json``,
    ``results.md``) are written before the plots.
    """
    for module in EXTRAS:
        require(module, "demo", "the demo")
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    experiment = config.experiment()
    seed_runs = (run_seed(experiment, seed, progress) for seed in range(config.seed, config.seed + config.seeds))
    first = next(seed_runs)  # the later seeds' networks are not kept
    figures = [first.figures, *(later.figures for later in seed_runs)]
    example = MultiDigits("test", size=8, seed=config.seed).images
    files = [export(first.models["recon"], out / f"recon{suffix}", example) for suffix in (".pt", ".pt2")]
    files.append(first.reports["joint"].save(out / "scoring_report.json"))
    scores, cosines = out / "scores.png", out / "cosines.png"
    results = {
        "config": asdict(config),
        "tasks": list(TASKS),
        "seeds": figures,
        "summary": summarize(figures),
        "paired": comparisons(figures, pairs()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    files += [scores, cosines, out / "results.json", out / "results.md"]
    results["files"] = sorted(str(f) for f in files)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    first.reports["joint"].plot(scores, chosen=first.figures["arms"]["recon"]["layers"])
    _cosines_plot(cosines, first.reports)
    return DemoRun(results, first.models)


def markdown(results: dict) -> str:
    """The results as Markdown: the table per arm, and with several seeds the paired differences."""
    config, runs = results["config"], results["seeds"]
    seeds = f"seed {config['seed']}" if len(runs) == 1 else f"seeds {config['seed']}-{config['seed'] + len(runs) - 1}"
    parts = [f"MultiDigits, {config['train_size']} training pairs, {config['epochs']} epochs, {seeds}, "
             f"top-{config['top_k']} layers (first seed): {', '.join(runs[0]['arms']['recon']['layers'])}.",
             table(runs)]
    if len(runs) > 1:
        parts += ["Mean ± sd over the seeds. Paired differences, in points (accuracy) and percent points "
                  "(conflicts):", *(differences(runs, arm, base) for arm, base in pairs())]
    parts.append("Conflicts: share of training steps whose task gradients over the still-shared parameters have "
                 "cosine below the threshold.")
    return "\n\n".join(parts) + "\n"


def _cosines_plot(path: Path, reports: dict[str, ConflictReport]) -> None:
    """The distribution of whole-shared-vector cosines per model."""
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
    figure.savefig(path, dpi=120)
    plt.close(figure)
