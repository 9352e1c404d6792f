"""The ``fxsplit`` command line: demo, analyze, rewrite, export, graph.

A SPEC names Python code that builds what fxsplit works on: ``path/to/file.py`` (its function ``spec``),
``path/to/file.py:function`` or ``package.module:function``. The function returns a mapping (or a tuple in this
order) with ``model``, ``tasks`` (task name -> ``loss(output, batch)``) and ``data`` (an iterable of batches), and
optionally ``outputs``, ``forward``, ``tracer_kwargs`` and ``method`` (as the library functions take them; the
guide's SPEC section, docs/guide.md, describes them). Every trace and split is checked against the model on the
first batch. A SPEC is executed code: run only SPECs you trust.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import re
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from . import SplitModule, analyze, export, layer_graph, rewrite
from .compute import forward_flops
from .analyze import default_forward
from .errors import FxsplitError, raised_at
from .experiment import demo
from .report import ConflictReport
from .tracing.verify import forwarding, recorded_example

SPEC_HELP = ("Python file (its function `spec`), file.py:function or module:function returning model, tasks and "
             "data. It is executed: run only SPECs you trust.")


class SpecError(FxsplitError):
    """A SPEC that cannot be loaded, that does not return model, tasks and data, or whose model fails on its data."""


# the library's fixes as Python calls (left) and as the command line gives them (right), tried in order
CLI_TERMS = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"rewrite\(\.\.\., outputs=(\{[^{}]*\})\)", "the SPEC's \"outputs\": \\1"),
    (r"rewrite\([^()]*method='(\w+)'\)", "the SPEC's \"method\": '\\1'"),
    (r"method='(\w+)'", "the SPEC's \"method\": '\\1'"),
    (r"tracer_kwargs=", "the SPEC's \"tracer_kwargs\": "),
    (r"fxsplit\.layer_graph\(model\)\.nodes", "`fxsplit graph SPEC`"),
    (r"\(fxsplit\.export\([^()]*\), or format='export'\)", "(--out FILE.pt2)"),
    (r"format='export', a \.pt2 file", "--out FILE.pt2"),
    (r"A conflict report from fxsplit\.analyze knows it from the task losses\.",
     "A report saved by `fxsplit analyze --out REPORT.json` knows it from the task losses: choose layers with "
     "--report REPORT.json."),
)]
KEYS = ("model", "tasks", "data")  # a SPEC's tuple gives these, in this order
# where a failure is the library's or Python's, not the SPEC's: the line a SpecError names lies elsewhere
_NOT_THE_SPEC = (sysconfig.get_path("stdlib"), str(Path(__file__).parent))


@dataclass
class Spec:
    """What a SPEC built: the model, its tasks and data, and the optional keys as the library functions take them."""

    name: str
    model: nn.Module
    tasks: Mapping[str, Callable]
    data: Iterable
    outputs: Mapping | None = None
    forward: Callable | None = None
    tracer_kwargs: Mapping[str, Any] | None = None
    method: str = "auto"

    @functools.cached_property
    def example(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the model takes on the first batch, recorded from a run as analyze calls it."""
        with _spec_code(f"SPEC {self.name!r}: its data fails"):
            batch = next(iter(self.data), None)
        if batch is None:
            raise SpecError(f"SPEC {self.name!r}: its data gives no batch.")
        try:
            return recorded_example(self.model, forwarding(self.forward or default_forward, batch))
        except FxsplitError:
            raise
        except Exception as error:
            raise SpecError(f"SPEC {self.name!r}: the model fails on the SPEC's first batch: {_described(error)}"
                            f"{self._forward_hint(batch)}") from error

    def _forward_hint(self, batch: Any) -> str:
        """A model may take a mapping itself; when it fails on one and no forward was given, say how to give it."""
        if not isinstance(batch, Mapping) or self.forward is not None:
            return ""
        return (f". The batch is a {type(batch).__name__} (keys {', '.join(map(repr, batch))}) and the SPEC gives no "
                f"forward, so the model was called on the whole batch: add \"forward\": forward(model, batch), the "
                f"call of the model on a batch (e.g. lambda model, batch: model(batch[...])).")


def load_spec(spec: str) -> Spec:
    """Run a SPEC and return what it built.

    While it runs, the working directory and the SPEC file's folder are on ``sys.path`` (as for ``python
    spec.py``), so that it imports its neighbours; ``sys.path`` is then restored.
    """
    location, _, name = spec.rpartition(":") if ":" in spec else (spec, "", "spec")
    is_file = location.endswith(".py")
    if is_file and not Path(location).is_file():
        raise SpecError(f"no such SPEC file: {location}")
    with _importable(os.getcwd(), *([str(Path(location).resolve().parent)] if is_file else [])), \
            _spec_code(f"cannot load SPEC {spec!r}"):
        module = _spec_module(location) if is_file else importlib.import_module(location)
        function = getattr(module, name, None)
        if not callable(function):
            raise SpecError(f"cannot load SPEC {spec!r}: {location} has no function {name!r}.")
        built = function()
    return _spec_of(spec, built)


def _spec_module(path: str) -> ModuleType:
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(Path(path).stem, path))
    module.__spec__.loader.exec_module(module)
    return module


def _spec_of(name: str, built: Any) -> Spec:
    if isinstance(built, (tuple, list)) and len(built) == len(KEYS):
        built = dict(zip(KEYS, built))
    if not isinstance(built, Mapping) or not set(KEYS) <= set(built):
        raise SpecError(f"SPEC {name!r} must return a mapping with model, tasks and data (or that tuple).")
    known = [f.name for f in fields(Spec)][1:]
    unknown = [key for key in built if key not in known]
    if unknown:
        raise SpecError(f"SPEC {name!r} returns unknown keys {unknown}; a SPEC gives {', '.join(known)}.")
    return Spec(name, **built)


@contextlib.contextmanager
def _importable(*folders: str) -> Iterator[None]:
    saved = list(sys.path)
    sys.path[:0] = folders
    try:
        yield
    finally:
        sys.path[:] = saved


@contextlib.contextmanager
def _spec_code(failing: str) -> Iterator[None]:
    """Run the SPEC's code: what it raises becomes a one-line :class:`SpecError` that starts with ``failing``."""
    try:
        yield
    except SpecError:
        raise
    except Exception as error:
        raise SpecError(f"{failing}: {_described(error)}") from error


def _described(error: Exception) -> str:
    """``Type: message at file:line: code``, the line being the SPEC's (or its model's), not the library's."""
    if isinstance(error, SyntaxError):
        return f"SyntaxError: {error.msg} at {error.filename}:{error.lineno}: {(error.text or '').strip()}"
    where = raised_at(error, skip=_NOT_THE_SPEC)
    message = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {message}{' at ' + where if where else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (FxsplitError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"fxsplit: error: {in_cli_terms(str(error)) if isinstance(error, FxsplitError) else error}",
              file=sys.stderr)
        return 1


def in_cli_terms(message: str) -> str:
    """A library error's fixes, given there as Python arguments, as the SPEC keys and options that give them here."""
    for pattern, replacement in CLI_TERMS:
        message = pattern.sub(replacement, message)
    return message


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxsplit", description="Multi-task model surgery on torch.fx (Recon: split the layers whose task "
        "gradients conflict most).", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  fxsplit demo --quick --out demo-out\n  fxsplit graph examples/digits_spec.py\n"
               "  fxsplit analyze examples/digits_spec.py --steps 20 --out report.json\n"
               "  fxsplit rewrite examples/digits_spec.py --report report.json --top 4 --out split.pkl\n"
               "  fxsplit export examples/digits_spec.py --split split.pkl --out split.pt2\n"
               "A SPEC's keys: the SPEC section of docs/guide.md.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    def command(name: str, run, help: str, example: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=f"example:\n  {example}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(run=run)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        return sub

    sub = command("demo", _demo, "train joint, Recon and random-split networks on MultiDigits and compare them",
                  "fxsplit demo --quick --out demo-out")
    sub.add_argument("--out", type=Path, default=Path("fxsplit-demo"), help="folder for results (default %(default)s)")
    sub.add_argument("--quick", action="store_true", help="a smoke run of well under a minute")
    sub.add_argument("--top", type=int, help=f"K, layers to split (default {demo.DemoConfig.top_k})")
    sub.add_argument("--epochs", type=int, help="training epochs per network")
    sub.add_argument("--seed", type=int, help="seed of data, initialisation and order (the first one)")
    sub.add_argument("--seeds", type=int, help="how many seeds to run, from --seed up (default 1, for speed): several "
                     "give mean ± sd per network and per-seed paired differences")
    _output_flags(sub)

    sub = command("analyze", _analyze, "score every shared layer by how often its task gradients conflict",
                  "fxsplit analyze examples/digits_spec.py --steps 50 --threshold 0 -0.05 --out report.json")
    sub.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    sub.add_argument("--steps", type=int, help="batches to analyze (default: all the data)")
    sub.add_argument("--threshold", type=float, nargs="+", default=[0.0], help="S: count cosines below it")
    sub.add_argument("--train", type=float, metavar="LR", help="also train (SGD with this learning rate)")
    sub.add_argument("--out", type=Path, help="save the report as JSON")
    sub.add_argument("--plot", type=Path, help="save a plot of scores per layer (PNG)")
    _output_flags(sub)

    sub = command("rewrite", _rewrite, "split layers into per-task copies",
                  "fxsplit rewrite examples/digits_spec.py --report report.json --top 4 --out split.pkl")
    _selection_flags(sub)
    sub.add_argument("--init", choices=("copy", "reset"), default="copy", help="how copies start")
    sub.add_argument("--split-norms", action="store_true", help="also split norm layers in the branches")
    sub.add_argument("--out", type=Path, help="save the trainable split model as a pickle, FILE.pkl (load it with "
                     "torch.load(FILE, weights_only=False)); `fxsplit export` writes .pt / .pt2 files")
    _output_flags(sub)

    sub = command("export", _export, "write the (split) model as TorchScript (.pt) or torch.export (.pt2)",
                  "fxsplit export examples/digits_spec.py --split split.pkl --out split.pt2")
    _selection_flags(sub, required=False).add_argument(
        "--split", type=Path, metavar="FILE.pkl", help="a split saved by `fxsplit rewrite --out` (and trained since), "
        "instead of splitting the SPEC's model now; a pickle: export only files you trust")
    sub.add_argument("--out", type=Path, required=True, help="file to write: .pt or .pt2")
    _output_flags(sub)

    sub = command("graph", _graph, "list the layer graph, or write it as DOT or PNG",
                  "fxsplit graph examples/digits_spec.py --dot layers.dot")
    sub.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    sub.add_argument("--dot", type=Path, help="write the graph in Graphviz DOT")
    sub.add_argument("--png", type=Path, help="draw the graph into a PNG (needs matplotlib)")
    _output_flags(sub)
    return parser


def _output_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _selection_flags(sub: argparse.ArgumentParser, required: bool = True) -> argparse._MutuallyExclusiveGroup:
    """SPEC and the ways to choose layers (one of them), a group the command may add its own ways to."""
    sub.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    choice = sub.add_mutually_exclusive_group(required=required)
    choice.add_argument("--layers", nargs="+", metavar="LAYER", help="layer names to split")
    choice.add_argument("--top", type=int, metavar="K", help="the K top-scored layers of --report")
    choice.add_argument("--budget", type=float, metavar="F", help="top layers of --report adding at most F x params")
    choice.add_argument("--flops", type=float, metavar="F",
                        help="top layers of --report adding at most F x the model's FLOPs per sample")
    sub.add_argument("--report", type=Path, help="a report saved by `fxsplit analyze --out`")
    return choice


def _print(args, data: Any, text: str) -> None:
    print(json.dumps(data, indent=1, default=str) if args.json else text)


def _note(args, text: str) -> None:
    """A line on what was done (a file written): after the printout, or on stderr when stdout is JSON."""
    print(text, file=sys.stderr if args.json else sys.stdout)


def _demo(args) -> None:
    options = (("top_k", args.top), ("epochs", args.epochs), ("seed", args.seed), ("seeds", args.seeds))
    overrides = {k: v for k, v in options if v is not None}
    config = demo.DemoConfig.quick(**overrides) if args.quick else demo.DemoConfig(**overrides)
    results = demo.run(args.out, config, progress=None if not args.json else False).results
    _print(args, results, demo.markdown(results) + "\nfiles written:\n" + "\n".join(results["files"]))


def _analyze(args) -> None:
    spec = load_spec(args.spec)
    optimizer = torch.optim.SGD(spec.model.parameters(), lr=args.train) if args.train else None
    report = analyze(spec.model, spec.tasks, spec.data, steps=args.steps, threshold=args.threshold,
                     optimizer=optimizer, forward=spec.forward, graph=_layer_graph(spec),
                     progress=None if not args.json else False)
    if args.steps is not None and report.steps < args.steps:
        print(f"fxsplit: the data gave {report.steps} batches, so {report.steps} of the {args.steps} steps asked "
              f"for were analyzed", file=sys.stderr)
    _print(args, report.to_dict(), str(report))
    if args.out:
        _note(args, f"wrote {report.save(args.out)}")
    if args.plot:
        report.plot(args.plot)
        _note(args, f"wrote {args.plot}")


def _layer_graph(spec: Spec):
    """The model's layer graph, traced with the SPEC's options and checked on its first batch."""
    args, kwargs = spec.example
    return layer_graph(spec.model, tracer_kwargs=spec.tracer_kwargs, example_inputs=args, example_kwargs=kwargs,
                       method=spec.method)


def _selected(args) -> list[str] | None:
    if args.layers is not None:
        return args.layers
    if args.top is None and args.budget is None and args.flops is None:
        return None
    if args.report is None:
        raise FxsplitError("--top, --budget and --flops choose from a report: give --report REPORT.json")
    report = ConflictReport.load(args.report)
    return report.top(args.top) if args.top is not None else report.within(args.budget, flops=args.flops)


def _split(args, spec: Spec, **options):
    layers = _selected(args)
    if layers is None:
        return spec.model, []
    inputs, kwargs = spec.example
    split = rewrite(spec.model, layers, list(spec.tasks), outputs=spec.outputs, example_inputs=inputs,
                    example_kwargs=kwargs, tracer_kwargs=spec.tracer_kwargs, method=spec.method, **options)
    return split, list(layers)


def _rewrite(args) -> None:
    if args.out is not None and args.out.suffix != ".pkl":
        raise FxsplitError(f"--out {args.out}: rewrite saves the trainable split model as a pickle, a .pkl file "
                           f"(.pt and .pt2 are the TorchScript and torch.export files that `fxsplit export` writes).")
    spec = load_spec(args.spec)
    split, layers = _split(args, spec, init=args.init, split_norms=args.split_norms)
    before = sum(p.numel() for p in spec.model.parameters())
    after = sum(p.numel() for p in split.parameters())
    flops = [forward_flops(module, *spec.example) for module in (spec.model, split)]
    summary = {"layers": layers, "split_layers": list(split.split_layers), "tasks": list(split.tasks),
               "params": after, "increase": after / before - 1, "flops_per_sample": flops[1],
               "flops_increase": flops[1] / flops[0] - 1 if flops[0] else None,
               "saved": str(args.out) if args.out else None}
    compute = f"{flops[0]:,.0f} -> {flops[1]:,.0f} FLOPs per sample" + \
        (f" ({flops[1] / flops[0] - 1:+.1%})" if flops[0] else "")
    _print(args, summary, f"split {', '.join(split.split_layers) or 'no layer'} for tasks {', '.join(split.tasks)}: "
           f"{before:,} -> {after:,} parameters ({after / before - 1:+.1%}), {compute}")
    if args.out:
        torch.save(split, args.out)
        _note(args, f"wrote {args.out}")
    else:
        _note(args, "nothing saved: give --out FILE.pkl to save the split model")


def _export(args) -> None:
    spec = load_spec(args.spec)
    model, layers = _saved_split(args.split) if args.split else _split(args, spec)
    path = export(model, args.out, spec.example[0])
    _print(args, {"path": str(path), "layers": layers}, f"exported and checked {path}")


def _saved_split(path: Path) -> tuple[SplitModule, list[str]]:
    """The split model in ``path`` and its split layers."""
    wrong = f"--split {path} is not a split model saved by `fxsplit rewrite --out`"
    try:
        split = torch.load(path, weights_only=False)  # the user's own pickle: --help says to export trusted ones only
    except OSError:
        raise
    except Exception as error:  # not a pickle, or not one torch reads
        raise FxsplitError(f"{wrong} ({type(error).__name__}: {str(error).splitlines()[0]}).") from error
    if not isinstance(split, SplitModule):
        raise FxsplitError(f"{wrong} (a {type(split).__name__}).")
    return split, list(split.split_layers)


def _graph(args) -> None:
    graph = _layer_graph(load_spec(args.spec))
    _print(args, {"nodes": dict(graph.nodes(data=True)), "edges": list(graph.edges)}, str(graph))
    if args.dot:
        args.dot.write_text(graph.to_dot())
        _note(args, f"wrote {args.dot}")
    if args.png:
        _note(args, f"wrote {graph.draw(args.png)}")
