"""fxsplit: multi-task model surgery on torch.fx."""

from .errors import ExportError, FxsplitError, InitError, LayerError, TaskError, TraceError, UnknownLayerError
from .export import export, script
from .layers import layer_graph
from .rewrite import rewrite
from .split_module import SplitModule
from .tracing import trace

__all__ = [
    "ExportError",
    "FxsplitError",
    "InitError",
    "LayerError",
    "SplitModule",
    "TaskError",
    "TraceError",
    "UnknownLayerError",
    "export",
    "layer_graph",
    "rewrite",
    "script",
    "trace",
]
