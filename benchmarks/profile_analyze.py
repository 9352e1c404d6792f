"""Where an ``fxsplit.analyze`` step spends its time: ``python -m benchmarks.profile_analyze [--model M] [--tasks T]``.

Not part of the table: prints ``torch.profiler``'s operators (self time) over a few analyze steps, and the
same for the floor (forward + T ``autograd.grad``), so that what analyze adds on top stands out.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fxsplit

from .common import MODELS, Settings, floor_step, setup


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_analyze", description=__doc__)
    parser.add_argument("--model", choices=MODELS, default="resnet18")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings()
    model, batch, losses = setup(args.model, args.tasks, settings)
    graph = fxsplit.layer_graph(model)
    weights = [p for p in model.parameters() if p.requires_grad]
    runs = {
        "analyze": lambda: fxsplit.analyze(model, losses, [batch] * args.steps, graph=graph, progress=False),
        "floor": lambda: [floor_step(model, losses, batch, weights) for _ in range(args.steps)],
    }
    for name, fn in runs.items():
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"--- {name}: {args.model}, T={args.tasks}, {args.steps} steps")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=36))


if __name__ == "__main__":
    main()
