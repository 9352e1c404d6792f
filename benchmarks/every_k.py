"""Scoring every k-th step: how much of the ranking survives, and what it saves.

Run: ``python -m benchmarks.every_k``. The demo's joint network trains on MultiDigits under ``analyze`` with the
same seeds, scoring every step and every 2nd, 4th and 8th step (the other steps train plainly); each ranking is
compared with the every-step one by its top-6 overlap and Spearman's rank correlation.
"""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader

import fxsplit
from fxsplit.datasets import MultiDigits
from fxsplit.experiment.demo import DigitNet
from fxsplit.experiment.training import task_losses

EVERY = (1, 2, 4, 8)
TOP = 6


def scoring_run(every: int, data: MultiDigits, epochs: int = 4) -> tuple[fxsplit.ConflictReport, float]:
    torch.manual_seed(0)
    model = DigitNet(data.tasks)
    loader = DataLoader(data, batch_size=64, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    batches = [batch for _ in range(epochs) for batch in loader]
    start = time.perf_counter()
    report = fxsplit.analyze(model, task_losses(data.tasks), batches, every=every, progress=False,
                             optimizer=torch.optim.Adam(model.parameters(), lr=2e-3))
    return report, time.perf_counter() - start


def spearman(a: list[str], b: list[str]) -> float:
    """Spearman's rank correlation of two rankings of the same items."""
    rank = {item: i for i, item in enumerate(b)}
    n = len(a)
    return 1 - 6 * sum((i - rank[item]) ** 2 for i, item in enumerate(a)) / (n * (n * n - 1))


def main() -> None:
    data = MultiDigits("train", size=8000)
    reference, reference_seconds = scoring_run(1, data)
    baseline = list(reference.scores)
    print(f"| every | scored steps | seconds | time vs every step | top-{TOP} overlap | Spearman |")
    print("|---|---|---|---|---|---|")
    for every in EVERY:
        report, seconds = (reference, reference_seconds) if every == 1 else scoring_run(every, data)
        ranking = list(report.scores)
        overlap = len(set(ranking[:TOP]) & set(baseline[:TOP]))
        print(f"| {every} | {report.steps} | {seconds:.1f} | {seconds / reference_seconds:.2f} | "
              f"{overlap}/{TOP} | {spearman(ranking, baseline):.2f} |", flush=True)


if __name__ == "__main__":
    main()
