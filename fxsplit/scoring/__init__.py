"""The scoring stage: each task's gradients of a step, their conflicts per layer, and the monitor that runs them
inside any training loop (``ConflictMonitor``; ``fxsplit.analyze`` is a loop over it).

rows (per-task gradient rows) -> scope (which layers are scored) -> counter (conflict counts on the device), and
grads (the step's update into ``.grad``); checks (what the user hands in), distributed (reductions across
processes) and methods (torchjd aggregators) serve the monitor; figures (``StepFigures``) is what it hands to its
per-step hooks.
"""

from .figures import StepFigures
from .monitor import ConflictMonitor

__all__ = ["ConflictMonitor", "StepFigures"]
