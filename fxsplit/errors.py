"""The errors fxsplit raises: one base class, one subclass per kind of mistake."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FxsplitError(Exception):
    """Base class of every error fxsplit raises on bad input."""


class TraceError(FxsplitError):
    """The model could not be traced by ``torch.fx``."""


class TraceMismatchError(TraceError):
    """A traced graph computes something other than the model on an example input."""


class StaleGraphError(TraceError):
    """A Python value that a traced graph holds (a module's mode or attribute that traced code read) was changed
    after tracing: the graph would ignore it."""


class PythonStateWarning(UserWarning):
    """``forward`` keeps tensors it computes in Python state (a list or dict it adds to), which no graph records."""


class SplitMismatchError(FxsplitError):
    """A split model computes something other than the original for some task on an example input."""


class LayerError(FxsplitError):
    """A layer argument is malformed, duplicated or not splittable."""


class UnknownLayerError(LayerError, KeyError):
    """A layer name that is not a layer of the model."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TaskError(FxsplitError):
    """The tasks (their names, or how outputs map onto them) do not fit the model."""


class InitError(FxsplitError):
    """A split layer's copies cannot be initialised as asked."""


class ReportError(FxsplitError):
    """A conflict report file that cannot be read, or a threshold the report did not score."""


class ScoringError(FxsplitError):
    """A step cannot be scored as asked: the loop, the model or the process group breaks the scoring's contract."""


class ExportError(FxsplitError):
    """A model could not be exported, or the exported file does not reproduce it."""


class MissingExtraError(FxsplitError, ImportError):
    """An integration's framework is not installed; the message names the extra that installs it."""


def unknown_layer(name: object, known: Iterable[str], what: str = "layer") -> UnknownLayerError:
    """An :class:`UnknownLayerError` for ``name`` that suggests the closest known names."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return UnknownLayerError(
        f"{name!r} is not a {what} of this model.{hint} "
        f"fxsplit.layer_graph(model).nodes lists the {len(known)} {what}s."
    )
