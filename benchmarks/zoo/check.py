"""One model through fxsplit's whole pipeline, stage by stage: ``python -m benchmarks.zoo.check NAME``.

Stages: build (backbone, two task heads, an input), trace (the layer graph, by the route ``method="auto"`` takes
on the input, recorded as ``route``), analyze (two steps of random data,
scores against the plain per-task loop), rewrite (at the first backbone layer, a middle one, the last, and three
spread out), equivalence (every rewrite against the original, per task, in eval and train mode), torchscript and
export (the spread rewrite written to a ``.pt`` / ``.pt2`` file, loaded back and compared, by ``fxsplit.export``).
The first five are the core: a failure there ends the run. Prints one line per stage started, then the result as
one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

import fxsplit
from benchmarks.common import task_losses
from benchmarks.zoo.build import build
from tests.reference import reference_cosines, relative_error
from tests.zoo import CHOICES, choose

STAGES = ("build", "trace", "analyze", "rewrite", "equivalence", "torchscript", "export")
CORE = STAGES[:5]
TOLERANCE = 1e-4  # relative; a wrong graph is off by O(1), rounding by < 1e-5 (docs/coverage.md has the spread)
NEAR = 1e-4  # cosines this close to the threshold S = 0 may fall either side by rounding


class Mismatch(Exception):
    """A rewrite's output differs from the original's."""


class ModelLimit(Exception):
    """The unsplit model fails the same stage: a limit of the model (or of torch), not of the rewrite."""


def cause(error: BaseException) -> str:
    """An error as ``Type: first line of its message`` (and the next, where the first only introduces it), with
    the source file and line it names, if any."""
    if isinstance(error, ModelLimit):  # its message already is a cause
        return f"ModelLimit: {error}"
    message = str(error)
    lines = [line.strip() for line in message.split('File "')[0].splitlines() if line.strip()] or [""]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    if len(text) > 200:
        text = text[:199] + "…"
    if where := re.search(r'File "([^"]+)", line (\d+)', message):
        text += f" ({Path(where[1]).name}:{where[2]})"
    return f"{type(error).__name__}: {text}"


class Check:
    """The stages run on one model; the outcome of each, and what went wrong, collected in ``row``."""

    def __init__(self, name: str, announce=print):
        self.name = name
        self.announce = announce
        self.row = {"name": name, **{stage: "" for stage in STAGES}, "causes": ""}

    def run(self) -> dict:
        start = time.perf_counter()
        try:
            model, batch, deterministic = self.stage("build", build, self.name)
            self.row["size"] = tree_leaves(batch[0])[0].shape[-1]  # pixels, or tokens
            graph = self.stage("trace", self.trace, model, batch[0])
            layers = [layer for layer in graph if not layer.startswith("heads.")]
            self.row["layers"] = len(layers)
            scored = self.stage("analyze", self.analyze, model, batch, graph)
            shared = [layer for layer in layers if layer in scored]  # not a layer no task uses (BERT's pooler here)
            route = {"method": graph.graph["route"]}
            if route["method"] == "export":  # which needs the example (and checks every rewrite on it)
                route["example_inputs"] = (batch[0],)
            splits = self.stage("rewrite", lambda: {c: fxsplit.rewrite(model, choose(shared, c), **route)
                                                    for c in CHOICES})
            modes = ("eval", "train") if deterministic else ("eval",)
            self.stage("equivalence", self.equivalence, model, splits, batch[0], modes)
            with tempfile.TemporaryDirectory() as out:
                for stage, suffix in (("torchscript", ".pt"), ("export", ".pt2")):
                    self.stage(stage, self.export, model, splits["spread"], Path(out, f"split{suffix}"), batch[0],
                               core=False)
        except _Stop:
            pass
        self.row["seconds"] = round(time.perf_counter() - start, 1)
        return self.row

    def stage(self, stage: str, fn, *args, core: bool = True):
        """Run ``fn(*args)`` as ``stage``: record "ok", or "fail" and the cause (and stop, for a core stage)."""
        self.announce(f"stage {stage}", flush=True)
        try:
            result = fn(*args)
        except Exception as error:  # any failure is a finding: record it with its cause
            self.row[stage] = "fail"
            self.row["causes"] += f"{'; ' if self.row['causes'] else ''}{stage}: {cause(error)}"
            if core:
                raise _Stop from error
            return None
        self.row[stage] = "ok"
        return result

    def trace(self, model, x) -> fxsplit.LayerGraph:
        """The layer graph, traced by the route ``method="auto"`` takes on ``x`` (which also checks the trace)."""
        graph = fxsplit.layer_graph(model, example_inputs=(x,))
        self.row["route"] = graph.graph["route"]
        return graph

    def analyze(self, model, batch, graph) -> dict[str, int]:
        """Two probing steps; the scores must equal those of the plain per-task loop, layer by layer, except where a
        cosine lies within ``NEAR`` of the threshold (there float rounding decides either way). The scores."""
        losses, batches = task_losses(2), [batch, batch]
        report = fxsplit.analyze(model, losses, batches, graph=graph, progress=False)
        cosines = reference_cosines(copy.deepcopy(model), losses, batches, graph)
        self.row["scored"] = len(report.scores)
        if set(report.scores) != set(cosines):
            raise Mismatch(f"scored layers {sorted(set(report.scores) ^ set(cosines))[:3]} differ from the plain "
                           f"loop's")
        near = 0
        for layer, values in cosines.items():
            expected = sum(c < 0 for c in values)
            if report.scores[layer] != expected:
                if not any(abs(c) < NEAR for c in values):
                    raise Mismatch(f"layer {layer!r} scores {report.scores[layer]}, the plain loop {expected}")
                near += 1
        self.row["plain_loop"] = f"equal except {near} near S" if near else "equal"
        return report.scores

    def equivalence(self, model, splits, x, modes) -> None:
        """Each rewrite's output per task against the original's, within ``TOLERANCE`` relative error."""
        worst = 0.0
        for mode in modes:
            model.train(mode == "train")
            expected = copy.deepcopy(model)(x)  # copies: train mode updates BatchNorm statistics
            for choice, split in splits.items():
                got = copy.deepcopy(split).train(mode == "train")(x)
                for task in expected:
                    error = relative_error(expected[task], got[task])
                    worst = max(worst, error)
                    if not error <= TOLERANCE:
                        raise Mismatch(f"relative error {error:.2g} > {TOLERANCE:g} ({mode} mode, split at "
                                       f"{choice}, task {task})")
        self.row["max_error"] = f"{worst:.2g}"

    def export(self, model, split, path: Path, x) -> None:
        """``fxsplit.export(split, path, x)``; if that fails, say whether exporting the unsplit model fails too."""
        try:
            fxsplit.export(split, path, x)
        except Exception as error:
            try:
                fxsplit.export(model, path.with_stem("original"), x)
            except Exception:
                raise ModelLimit(f"the unsplit model fails too: {cause(error)}") from error
            raise


class _Stop(Exception):
    """A core stage failed: the later stages cannot run."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.zoo.check", description=__doc__)
    parser.add_argument("name", help='"timm/<model>" or "torchvision/<model>"')
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(json.dumps(Check(args.name).run()), flush=True)


if __name__ == "__main__":
    main()
