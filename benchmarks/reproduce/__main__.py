"""``python -m benchmarks.reproduce``: the Recon paper's MultiMNIST experiment on MultiDigits, over several seeds."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

import torch

from fxsplit.errors import FxsplitError

from . import Config, markdown, run


def main(argv: list[str] | None = None) -> None:
    defaults = Config()
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__)
    parser.add_argument("--quick", action="store_true", help=f"a small size that finishes in at most 10 minutes on "
                        f"2 CPU cores ({defaults.quick().train_size:,} pairs, {defaults.quick().epochs} epochs)")
    parser.add_argument("--seeds", type=_positive, help=f"seeds 0..N-1 (default {defaults.seeds})")
    parser.add_argument("--epochs", type=_positive, help=f"epochs per network (default {defaults.epochs})")
    parser.add_argument("--k", type=_positive, help=f"layers to split (default {defaults.k}, as in the paper)")
    parser.add_argument("--train-size", type=_positive, help=f"training pairs (default {defaults.train_size:,})")
    parser.add_argument("--test-size", type=_positive, help=f"test pairs (default {defaults.test_size:,})")
    parser.add_argument("--batch-size", type=_positive, help=f"batch size (default {defaults.batch_size})")
    parser.add_argument("--image-size", type=_positive, help=f"image side in pixels (default {defaults.image_size})")
    parser.add_argument("--split-norms", action="store_true", default=None,
                        help="also split the BatchNorms in the branches (default: shared, as the authors' code)")
    parser.add_argument("--methods", nargs="*", metavar="NAME", help="gradient methods, torchjd aggregators by class "
                        "name, each run alone and with Recon (default: " + " ".join(defaults.methods) + "; none "
                        "after --methods alone)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's own choice; 1 "
                        "runs faster on a machine that other jobs keep busy)")
    parser.add_argument("--out", type=Path, default=Path("reproduction"), help="folder for results.json, "
                        "results.md and results.png (default %(default)s)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = defaults.quick() if args.quick else defaults
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    config = replace(config, **{"device": "cuda" if torch.cuda.is_available() else "cpu", **given})
    try:
        config.experiment()  # the methods are checked (torchjd installed, names known) before any training
    except FxsplitError as error:
        parser.error(str(error))
    results = run(config, args.out)
    text = markdown(results)
    (args.out / "results.md").write_text(text)
    print(text + "\nfiles written:\n" + "\n".join(str(args.out / name) for name in
                                                   ("results.json", "results.md", "results.png")))
    sys.stdout.flush()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


if __name__ == "__main__":
    main()
