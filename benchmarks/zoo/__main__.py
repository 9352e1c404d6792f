"""Sweep the model zoo through fxsplit: ``python -m benchmarks.zoo [--sample ci|families|transformers|N] [--only NAME]``.

Every timm model with at most ``--cap`` parameters and every torchvision classifier under it (and a sample of
transformers architectures built from small configs: ``--sample transformers``), each in its own
process within ``--limit`` seconds: build with two task heads, trace, analyze, rewrite at four layer choices, check
equivalence per task, export to TorchScript and torch.export. Rows go to ``OUT/results.csv`` as they finish; a
second run skips the models already there (delete the file to start over). The summary goes to ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import platform
from importlib.metadata import version
from pathlib import Path

import timm
import torch
import torchvision

from benchmarks.zoo.catalog import CI_SAMPLE, TRANSFORMERS_SAMPLE, catalog, describe, select
from benchmarks.zoo.runner import sweep
from benchmarks.zoo.summary import summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("zoo-sweep"), help="results folder (default: zoo-sweep)")
    parser.add_argument("--cap", type=float, default=100e6, help="most parameters of a model (default: 100e6)")
    parser.add_argument("--limit", type=float, default=600, help="seconds per model (default: 600)")
    parser.add_argument("--library", choices=("timm", "torchvision", "transformers"), action="append",
                        help="only this library's models (repeatable; default: all)")
    parser.add_argument("--sample", type=_sample, metavar="ci|families|transformers|N",
                        help="ci: a fixed handful across families; families: the smallest model of each family; "
                             "transformers: common transformers architectures from small configs; "
                             "N: N models drawn at random (seed 0)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help='these models ("timm/resnet18", ...)')
    parser.add_argument("--jobs", type=int, default=1, help="models checked at once (default: 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model (default: 1)")
    args = parser.parse_args(argv)

    if args.only or args.sample in ("ci", "transformers"):
        try:
            models = describe(args.only or (CI_SAMPLE if args.sample == "ci" else TRANSFORMERS_SAMPLE))
        except KeyError as error:
            parser.error(f"unknown model {error}: names are 'timm/<model>', 'torchvision/<model>' or "
                         f"'transformers/<model type>'")
    else:
        models = select(catalog(args.out / "catalog.csv"), args.cap, args.sample)
    if args.library:
        models = [m for m in models if m.library in args.library]
    print(f"fxsplit zoo sweep: {len(models)} models, {args.limit:g} s each at most, {args.jobs} at a time; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, "
          f"transformers {version('transformers')}, "
          f"{platform.python_implementation()} {platform.python_version()}", flush=True)
    rows = sweep(models, args.out / "results.csv", args.limit, args.jobs, args.threads)
    chosen = {m.name for m in models}
    text = summary([row for row in rows if row["name"] in chosen])
    (args.out / "summary.md").write_text(text + "\n")
    print(text)


def _sample(text: str) -> str | int:
    if text in ("ci", "families", "transformers") or text.isdigit():
        return int(text) if text.isdigit() else text
    raise argparse.ArgumentTypeError(f"expected ci, families, transformers or a number of models, got {text!r}")


if __name__ == "__main__":
    main()
