"""The errors fxsplit raises: one base class, one subclass per kind of mistake."""

from __future__ import annotations

import difflib
import os
import traceback
from collections.abc import Iterable

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)


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


class PartitionError(LayerError, TaskError):
    """A layer's partition of the tasks into groups does not fit the model's tasks: a task unknown, in two groups
    or in none, or a single group."""


class UnknownTaskError(PartitionError):
    """A partition names a task the model does not have."""


class RepeatedTaskError(PartitionError):
    """A partition puts a task in more than one group."""


class MissingTaskError(PartitionError):
    """A task that uses a layer is in none of the groups of its partition."""


class InitError(FxsplitError):
    """A split layer's copies cannot be initialised as asked."""


class ReportError(FxsplitError):
    """A conflict report file that cannot be read, or a threshold the report did not score."""


class ScoringError(FxsplitError):
    """A step cannot be scored as asked: the loop, the model or the process group breaks the scoring's contract."""


class ExportError(FxsplitError):
    """A model could not be exported, or the exported file does not reproduce it."""


class MissingExtraError(FxsplitError, ImportError):
    """An optional extra (an integration's framework, what the demo needs) is not installed; the message names the
    extra that installs it."""


def unknown_layer(name: object, known: Iterable[str], what: str = "layer") -> UnknownLayerError:
    """An :class:`UnknownLayerError` for ``name`` that suggests the closest known names."""
    known = list(known)
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return UnknownLayerError(
        f"{name!r} is not a {what} of this model.{hint} "
        f"fxsplit.layer_graph(model).nodes lists the {len(known)} {what}s."
    )


def raised_at(error: BaseException, skip: Iterable[str] = ()) -> str:
    """``file:line: code`` of the innermost frame that raised ``error`` outside torch and the paths ``skip`` (files
    or folders), or ``""`` when every frame lies there: the user's line, not the library's."""
    skipped = (_TORCH_DIR, *(os.path.abspath(path) for path in skip))
    frames = [f for f in traceback.extract_tb(error.__traceback__)  # "<frozen ...>": Python's import machinery
              if not f.filename.startswith("<frozen ") and not os.path.abspath(f.filename).startswith(skipped)]
    if not frames:
        return ""
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"


def user_line(error: BaseException) -> str:
    """``file:line: code`` of the innermost frame that raised ``error`` outside torch and fxsplit."""
    return raised_at(error, skip=(os.path.dirname(__file__),))
