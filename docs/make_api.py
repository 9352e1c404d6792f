"""Write the API reference (docs/api.md) from the docstrings of fxsplit's public names.

Run: python docs/make_api.py  (tests/test_docs.py checks that docs/api.md is up to date)
"""

import importlib
import inspect
import sys
from pathlib import Path

import fxsplit
from fxsplit import datasets

SECTIONS = {
    "Surgery": ["trace", "layer_graph", "LayerGraph", "rewrite", "SplitModule", "export", "script"],
    "Conflict scores": ["analyze", "ConflictMonitor", "StepFigures", "ConflictReport", "LayerSelection"],
    "Errors and warnings": ["FxsplitError", "TraceError", "TraceMismatchError", "SplitMismatchError", "LayerError",
               "UnknownLayerError", "StaleGraphError", "TaskError", "PartitionError", "UnknownTaskError",
               "RepeatedTaskError", "MissingTaskError", "InitError", "ReportError", "ScoringError", "ExportError",
               "MissingExtraError",
               "PythonStateWarning"],
}


# the framework integrations, each an optional extra: their classes, without the framework's hooks they implement
INTEGRATIONS = {"lightning": ["ConflictCallback"], "huggingface": ["ConflictTrainer", "ConflictCallback"],
                "tensorboard": ["TensorBoardLogger"]}


def entry(name: str, obj, members: bool = True) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function"
    signature = "" if inspect.isclass(obj) and issubclass(obj, Exception) else str(inspect.signature(obj))
    lines = [f"### `{name}{signature}`", "", f"*{kind}*", "", inspect.cleandoc(obj.__doc__ or ""), ""]
    if members and inspect.isclass(obj) and not issubclass(obj, Exception):
        for member, value in vars(obj).items():
            if member.startswith("_") or not (callable(value) or isinstance(value, (property, classmethod))):
                continue
            function = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
            doc = inspect.getdoc(function) or ""
            signature = "" if isinstance(value, property) else str(inspect.signature(function))
            lines += [f"- `{name}.{member}{signature}`: {doc.splitlines()[0] if doc else ''}"]
        lines.append("")
    return lines


def render() -> str:
    lines = ["# API reference", "", "Generated from the docstrings by `python docs/make_api.py`; do not edit.", ""]
    documented = set()
    for section, names in SECTIONS.items():
        lines += [f"## {section}", ""]
        for name in names:
            lines += entry(f"fxsplit.{name}", getattr(fxsplit, name))
            documented.add(name)
    lines += ["## Data", ""] + entry("fxsplit.datasets.MultiDigits", datasets.MultiDigits)
    lines += ["## Integrations (optional extras)", ""]
    for module, names in INTEGRATIONS.items():
        integration = importlib.import_module(f"fxsplit.integrations.{module}")
        for name in names:
            lines += entry(f"fxsplit.integrations.{module}.{name}", getattr(integration, name),
                           members=name == "TensorBoardLogger")
    missing = set(fxsplit.__all__) - documented
    if missing:
        sys.exit(f"public names missing from docs/make_api.py: {sorted(missing)}")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    (Path(__file__).parent / "api.md").write_text(render())
