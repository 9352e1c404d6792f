"""fxsplit: multi-task model surgery on torch.fx."""

from .analyze import analyze
from .errors import (
    ExportError, FxsplitError, InitError, LayerError, ReportError, TaskError, TraceError, UnknownLayerError,
)
from .export import export, script
from .layers import layer_graph
from .report import ConflictReport, LayerSelection
from .rewrite import rewrite
from .split_module import SplitModule
from .tracing import trace

__all__ = [
    "ConflictReport",
    "ExportError",
    "FxsplitError",
    "InitError",
    "LayerError",
    "LayerSelection",
    "ReportError",
    "SplitModule",
    "TaskError",
    "TraceError",
    "UnknownLayerError",
    "analyze",
    "export",
    "layer_graph",
    "rewrite",
    "script",
    "trace",
]
