"""The trace stage: a model becomes a ``torch.fx.GraphModule`` whose nodes carry stable dotted paths."""

from .mutations import follow_mutations, mutated_input
from .symbolic import PathTracer, trace, trace_for_reading

__all__ = ["PathTracer", "follow_mutations", "mutated_input", "trace", "trace_for_reading"]
