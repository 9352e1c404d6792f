"""Which part of a model's output belongs to which task: a key path per task (or several, :class:`Paths`), applied
to graphs and to outputs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import fx

from . import structure
from .errors import TaskError

OutputKey = Union[str, int, tuple]
Path = tuple  # keys from the whole output down to a task's part; () is the whole output


def task_paths(output: Any, tasks: Sequence[str] | Mapping[str, Any] | None,
               outputs: Mapping[str, OutputKey] | None) -> dict[str, Path]:
    """Task -> the key path of its part of ``output`` (the traced output structure, or a real output).

    A mapping output whose keys are the tasks (or a namedtuple or dataclass whose fields are) gives each task its
    key; a single value goes whole to every task; anything else (a tuple, a list, a mapping or record keyed
    otherwise) needs ``outputs``: guessing would be silently wrong. A key is a mapping key, an index or a field.
    """
    if isinstance(tasks, Mapping):
        tasks = list(tasks)
    if outputs is not None:
        if not isinstance(outputs, Mapping):
            raise TaskError(f"outputs must map task names to output keys, got {type(outputs).__name__}.")
        tasks = list(outputs) if tasks is None else tasks
        task_names(tasks)
        if set(outputs) != set(tasks):
            raise TaskError(f"outputs names tasks {sorted(outputs)} but the tasks are {sorted(tasks)}.")
        paths = {task: as_part(outputs[task]) for task in tasks}
        for task, path in paths.items():
            select(output, path, task)
        return paths
    names = _named_parts(output)
    if names is not None:
        tasks = list(names) if tasks is None else tasks
        task_names(tasks)
        missing = [task for task in tasks if task not in names]
        if missing:
            raise TaskError(
                f"task(s) {missing} are not {_what_names(output)} {list(names)}; name tasks after those "
                f"names, or say which output is whose: {_outputs_call(tasks, list(names))}."
            )
        return {task: (task,) for task in tasks}
    if isinstance(output, (tuple, list)):
        shown = list(tasks) if tasks is not None else [f"task{i}" for i in range(len(output))]
        raise TaskError(
            f"the model returns a {type(output).__name__} of {len(output)}, and which element belongs to which task "
            f"cannot be known from it: say so with {_outputs_call(shown, list(range(len(output))))} (an element "
            f"may be nested: a tuple of keys). A conflict report from fxsplit.analyze knows it from the task losses."
        )
    if tasks is None:
        raise TaskError("the model's output is not a mapping, so the tasks cannot be read from it: pass "
                        "tasks=[...] (every task then gets the whole output of its branch).")
    task_names(tasks)
    return {task: () for task in tasks}


def paths_read(output: Any, losses: Mapping[str, torch.Tensor]) -> dict[str, Path | Paths]:
    """Task -> the part of ``output`` its loss reads, found by autograd: the key path of the smallest part that
    holds every output tensor the loss depends on and no other (``()``: the whole output), or, for a loss that
    reads parts of several keys (its own and a deep-supervision entry), the :class:`Paths` of those parts. It is
    never widened to parts the loss does not read, nor too narrow: a loss that reaches a part through another
    (``out[1] = out[0][:, :3]``) reads both.

    >>> import torch
    >>> out = (torch.ones(2, requires_grad=True) * 2, {"x": torch.ones(3, requires_grad=True) * 3})
    >>> paths_read(out, {"a": out[0].sum(), "b": out[1]["x"].mean(), "both": out[0].sum() + out[1]["x"].sum()})
    {'a': (0,), 'b': (1, 'x'), 'both': ()}
    """
    leaves = [(path, value) for path, _, value in structure.leaves(output)
              if isinstance(value, torch.Tensor) and value.requires_grad]
    every = [path for path, _ in leaves]
    paths = {}
    for task, loss in losses.items():
        grads = torch.autograd.grad(loss, [value for _, value in leaves], retain_graph=True, allow_unused=True)
        read = {path for path, grad in zip(every, grads) if grad is not None}
        paths[task] = _covering(read, every) if read else ()
    return paths


class Paths(tuple):
    """Several parts of the output that one task reads: its own key and its entry of a deep-supervision mapping,
    ``Paths([("seg",), ("deep_supervision", "seg")])``. The task's share is the output pruned to them (other keys
    of a mapping left out, other elements of a tuple or a list ``None``), so that its loss reads it as it read the
    whole output."""


def _covering(read: set[Path], every: list[Path]) -> Path | Paths:
    """The fewest parts, each as deep as it can be, that hold exactly the ``read`` leaves (of ``every`` leaf): one
    path, or :class:`Paths`."""
    def cover(prefix: Path) -> list[Path]:
        under = [path for path in every if path[:len(prefix)] == prefix]
        if all(path in read for path in under):
            return [_common_prefix(under)]
        keys = dict.fromkeys(path[len(prefix)] for path in under if path in read)  # in the output's order
        return [part for key in keys for part in cover((*prefix, key))]

    parts = cover(())
    return parts[0] if len(parts) == 1 else Paths(parts)


def _common_prefix(paths: list[Path]) -> Path:
    prefix = paths[0]
    for path in paths[1:]:
        n = next((i for i, (a, b) in enumerate(zip(prefix, path)) if a != b), min(len(prefix), len(path)))
        prefix = prefix[:n]
    return prefix


def as_part(value: OutputKey | list) -> Path | Paths:
    """What ``outputs=`` gives for one task as a key path: a key, a tuple of keys (a nested path), or a list of
    those (several parts, :class:`Paths`)."""
    if isinstance(value, Paths):
        return value
    if isinstance(value, list):
        return Paths(as_part(item) for item in value)
    return value if isinstance(value, tuple) else (value,)


def part_to_json(part: Path | Paths) -> list:
    """A task's part as JSON holds it: a list of keys, or a list of such lists for several parts."""
    return [list(path) for path in part] if isinstance(part, Paths) else list(part)


def part_from_json(data: list) -> Path | Paths:
    """The inverse of :func:`part_to_json` (keys are never lists, so a list of lists is several parts)."""
    if data and all(isinstance(item, list) for item in data):
        return Paths(tuple(path) for path in data)
    return tuple(data)


def select(output: Any, path: Path | Paths, task: str) -> Any:
    """The part of ``output`` at ``path``, or ``output`` pruned to several parts (:class:`Paths`)."""
    if isinstance(path, Paths):
        return _pruned(output, list(path), task)
    for key in path:
        try:
            output = structure.part(output, key)
        except (KeyError, IndexError, TypeError):
            given = path[0] if len(path) == 1 else path
            raise TaskError(f"outputs[{task!r}] = {given!r}: the model's output has no {key!r} (it has "
                            f"{_parts_of(output)}).") from None
    return output


def _pruned(output: Any, paths: list[Path], task: str) -> Any:
    """``output`` with only the parts at ``paths``: other keys of a mapping left out, other elements of a tuple or
    a list ``None``."""
    if () in paths:
        return output
    if structure.record_fields(output) is not None or not isinstance(output, (Mapping, tuple, list)):
        raise TaskError(f"task {task!r} reads several parts of a {_parts_of(output)} output ({list(paths)}), which "
                        f"fxsplit cannot hand to it alone: say which part is its with outputs={{{task!r}: ...}}.")
    firsts = dict.fromkeys(path[0] for path in paths)
    for key in firsts:
        select(output, (key,), task)  # says which key is missing

    def rest(key) -> list[Path]:
        return [path[1:] for path in paths if path[0] == key]

    if isinstance(output, Mapping):
        return {key: _pruned(value, rest(key), task) for key, value in output.items() if key in firsts}
    return type(output)(_pruned(value, rest(i), task) if i in firsts else None for i, value in enumerate(output))


def _named_parts(output: Any) -> list | None:
    """The keys of a mapping output, or the fields of a namedtuple or dataclass one; ``None`` for other outputs."""
    if isinstance(output, Mapping):
        return list(output)
    fields = structure.record_fields(output)
    return None if fields is None else list(fields)


def _what_names(output: Any) -> str:
    if isinstance(output, Mapping):
        return "keys of the model's output"
    return f"fields of the model's output ({structure.record_class(output).__name__})"


def _parts_of(output: Any) -> str:
    """What a part of the output holds, for a message: its keys, fields or indices, or what single value it is."""
    names = _named_parts(output)
    if names is not None:
        return f"{names}" if isinstance(output, Mapping) else f"fields {names}"
    if isinstance(output, (tuple, list)):
        return f"indices 0..{len(output) - 1}"
    return f"a single {'value' if isinstance(output, fx.Node) else type(output).__name__}"


def task_names(tasks: Iterable) -> list[str]:
    """The task names as a list, after the one rule every stage applies: two or more distinct Python
    identifiers (a split names its copies after them)."""
    if isinstance(tasks, (str, bytes)) or not isinstance(tasks, Iterable):
        raise TaskError(f"tasks must be a list of names, got {tasks!r}.")
    names = list(tasks)
    bad = [task for task in names if not (isinstance(task, str) and task.isidentifier())]
    if bad:
        raise TaskError(f"task names must be Python identifiers (a split names its copies after them), got {bad}.")
    repeated = repeated_items(names)
    if repeated:
        raise TaskError(f"task name(s) {repeated} given more than once.")
    if len(names) < 2:
        raise TaskError(f"conflicts and splits need at least two tasks, got {names}.")
    return names


def repeated_items(items) -> list:
    """The items that occur more than once, sorted."""
    return sorted(item for item, n in Counter(items).items() if n > 1)


def _outputs_call(tasks: Sequence[str], keys: Sequence) -> str:
    pairs = ", ".join(f"{task!r}: {key!r}" for task, key in zip(tasks, [*keys, *(["..."] * len(tasks))]))
    return f"rewrite(..., outputs={{{pairs}}})"
