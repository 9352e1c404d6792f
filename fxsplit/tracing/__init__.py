"""The trace stage: a model becomes a ``torch.fx.GraphModule`` whose nodes carry stable dotted paths."""

from .exported import ExportedGraphModule, trace_exported, trace_exported_for_reading
from .mutations import follow_mutations, mutated_input
from .symbolic import PathTracer, trace, trace_for_reading

__all__ = [
    "ExportedGraphModule", "PathTracer", "follow_mutations", "mutated_input", "trace", "trace_exported",
    "trace_exported_for_reading", "trace_for_reading",
]
