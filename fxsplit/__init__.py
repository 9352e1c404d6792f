"""fxsplit: multi-task model surgery on torch.fx."""

from . import rules
from .analyze import analyze
from .errors import (
    ExportError, FxsplitError, InitError, LayerError, MissingExtraError, MissingTaskError, PartitionError,
    RepeatedTaskError, ReportError, ScoringError, SplitMismatchError, TaskError, PythonStateWarning, StaleGraphError,
    TraceError, TraceMismatchError, UnknownLayerError, UnknownTaskError,
)
from .export import export, script
from .layers import LayerGraph, layer_graph
from .report import ConflictReport, GroupedSelection, LayerSelection
from .rewrite import rewrite
from .scoring import ConflictMonitor, StepFigures
from .split_module import SplitModule
from .tracing import trace

__all__ = [
    "ConflictMonitor",
    "ConflictReport",
    "ExportError",
    "FxsplitError",
    "GroupedSelection",
    "InitError",
    "LayerError",
    "LayerGraph",
    "LayerSelection",
    "MissingExtraError",
    "MissingTaskError",
    "PartitionError",
    "RepeatedTaskError",
    "ReportError",
    "ScoringError",
    "SplitMismatchError",
    "SplitModule",
    "StaleGraphError",
    "StepFigures",
    "TaskError",
    "TraceError",
    "TraceMismatchError",
    "PythonStateWarning",
    "UnknownLayerError",
    "UnknownTaskError",
    "analyze",
    "export",
    "layer_graph",
    "rewrite",
    "rules",
    "script",
    "trace",
]
