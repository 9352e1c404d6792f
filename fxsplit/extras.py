"""What an optional part of fxsplit (an integration, the demo) needs: the module, or an error naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


def require(module: str, extra: str, needed_by: str) -> ModuleType:
    """``module``, or a :class:`~fxsplit.MissingExtraError` saying to ``pip install 'fxsplit[extra]'``.

    >>> require("torch.nn", "torch", "this example").Linear.__name__
    'Linear'
    >>> require("no_such_framework", "nothing", "fxsplit.integrations.nothing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    fxsplit.errors.MissingExtraError: fxsplit.integrations.nothing needs ...: pip install 'fxsplit[nothing]'
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingExtraError(f"{needed_by} needs {module.split('.')[0]}, which is not installed: "
                                f"pip install 'fxsplit[{extra}]'") from error
