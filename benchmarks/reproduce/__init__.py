"""The Recon paper's MultiMNIST experiment on MultiDigits: ``python -m benchmarks.reproduce [--quick]``.

Arms, per seed: the joint ResNet-18 (whose training is also the scoring run, at S = -0.1 as the paper uses for
this data; the other S are reported too), its top-K layers split (Recon, K = 25 as in the paper), each gradient
method alone and with Recon (torchjd's aggregators on the shared parameters: the paper's main table), and K random
shared layers split (the paper's control). Results: docs/reproduction.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fxsplit.experiment.arms import Experiment, pairs, run_seed
from fxsplit.experiment.statistics import comparisons, differences, grid, paired_table, summarize, table
from fxsplit.experiment.training import Training

from . import paper

THRESHOLDS = (-0.1, 0.0, -0.01, -0.05)  # the first is the primary S, the one that ranks the layers
METHODS = ("PCGrad", "CAGrad", "UPGrad")


@dataclass(frozen=True)
class Config:
    """Sizes and budget of a reproduction; the defaults are the paper's optimizer, batch and K."""

    seeds: int = 3
    epochs: int = 8
    train_size: int = 30_000
    test_size: int = 5_000
    k: int = 25
    batch_size: int = 256
    lr: float = 1e-3
    image_size: int = paper.IMAGE_SIZE
    split_norms: bool = False
    methods: tuple[str, ...] = METHODS
    device: str = "cpu"

    def quick(self) -> Config:
        """A size that finishes in at most 10 minutes on 2 CPU cores: few pairs, short training."""
        return replace(self, epochs=2, train_size=1_024, test_size=1_000)

    def experiment(self) -> Experiment:
        return Experiment(
            network=paper.MultiMnistResNet,
            data=lambda seed: paper.data(seed, self.train_size, self.test_size, self.image_size),
            tasks=paper.TASKS, training=Training(self.epochs, self.batch_size, self.lr, THRESHOLDS, self.device),
            k=self.k, split_norms=self.split_norms, methods=tuple(self.methods))


def run(config: Config, out: Path, progress: bool | None = None) -> dict:
    """Run every seed, writing ``results.json`` and ``results.png`` into ``out`` after each; return the results."""
    from .plot import plot

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    experiment = config.experiment()
    results = {
        "config": asdict(config),
        "environment": environment(config.device),
        "thresholds": list(THRESHOLDS),
        "seeds": [],
    }
    for seed in range(config.seeds):
        results["seeds"].append(run_seed(experiment, seed, progress).figures)
        runs = results["seeds"]
        results["summary"] = summarize(runs)
        results["paired"] = comparisons(runs, pairs(config.methods))
        results["seconds"] = round(time.perf_counter() - started, 1)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "results.png")
    return results


def markdown(results: dict) -> str:
    """The results as Markdown: set-up, mean ± sd per arm, paired differences per seed, selections at each S."""
    config, runs = results["config"], results["seeds"]
    k, primary, joint = config["k"], str(results["thresholds"][0]), runs[0]["arms"]["joint"]
    overlaps = [[s, *(str(len(set(run["scoring"]["top"][s]) & set(run["scoring"]["top"][primary]))) for run in runs)]
                for s in map(str, results["thresholds"][1:])]
    return "\n\n".join([
        f"MultiDigits at {config['image_size']}x{config['image_size']}, {config['train_size']:,} training and "
        f"{config['test_size']:,} test pairs, {config['epochs']} epochs, Adam {config['lr']:g}, batch "
        f"{config['batch_size']}, K = {k}, gradient methods: {', '.join(config['methods']) or 'none'}, {len(runs)} "
        f"seeds, {results['environment']['device']}; joint network: "
        f"{joint['params']:,} parameters, {joint['shared_layers']} shared layers.",
        "Mean ± sd over the seeds:", table(runs),
        "Paired differences (arm minus baseline within each seed), in points (accuracy) and percent points "
        "(conflicts), mean ± sd over the seeds:", paired_table(runs, pairs(config["methods"])),
        "Per seed:", *(differences(runs, arm, base) for arm, base in pairs(config["methods"])),
        "Conflicts: share of training steps whose task gradients over the still-shared parameters have cosine "
        f"below S. Recon splits the top-{k} layers at S = {primary}; how many of them the top-{k} at another S "
        "would also split:",
        grid(["S", *(f"seed {run['seed']}" for run in runs)], overlaps),
    ]) + "\n"


def environment(device: str) -> dict:
    """Where the run happened: versions, CPUs and threads, and the device's name."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    return {"torch": torch.__version__, "python": platform.python_version(), "device": name,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}
