"""Run the benchmarks and print one table: ``python -m benchmarks [--quick] [--only NAME ...]``."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time

import torch

from . import BENCHMARKS
from .common import Settings, table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few repeats and small sizes: a smoke run")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(quick=args.quick, device=args.device)
    torch.backends.cudnn.benchmark = settings.cuda  # as issue 13's CUDA measurements were taken
    print(f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, device {settings.device}, "
          f"{'quick' if settings.quick else 'full'} run, {settings.repeats} repeats (medians), load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for name in args.only or BENCHMARKS:
        start = time.perf_counter()
        rows += importlib.import_module(f".{name}", __package__).run(settings)
        print(f"[{name}] done in {time.perf_counter() - start:.1f} s", flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
