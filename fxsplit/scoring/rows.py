"""Per-task gradient rows: each task's gradients of every trainable parameter, one row of a flat buffer per task.

Parameters whose shapes differ only in the first dimension lie side by side in a row (a *group*), so that one
``torch.cat`` copies a task's gradients of a whole group into its row; within a group, parameters of one shape (a
*run*) are evenly spaced, so that one ``bmm`` gives the task-by-task Gram matrix of each of them. A step costs a few
operators per group and per shape, not per parameter.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch


class _Group:
    """Parameters of one dtype whose shapes agree after the first dimension: columns ``[start, stop)`` of a row."""

    def __init__(self, members: list[int], shapes: list[torch.Size], start: int, flat: torch.Tensor):
        self.members, self.scalar = members, len(shapes[0]) == 0
        self.start = start
        self.stop = start + sum(shape.numel() for shape in shapes)
        self.shape = (sum(shape[0] for shape in shapes), *shapes[0][1:]) if not self.scalar else ()
        self.rows = [self.view(row) for row in flat]

    def view(self, row: torch.Tensor) -> torch.Tensor:
        """This group's part of a row, shaped so that the members' gradients fill it by one ``cat``."""
        part = row[self.start:self.stop]
        return part if self.scalar else part.view(self.shape)

    def copy(self, parts: list[torch.Tensor], out: torch.Tensor) -> None:
        if self.scalar:
            torch.stack(parts, out=out)
        else:
            torch.cat(parts, out=out)


def _gram_inputs(flat: torch.Tensor, start: int, count: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` parameters of ``size`` numbers from column ``start`` on, as ``(count, tasks, size)`` and its
    transpose: their Gram matrices are one ``bmm``."""
    by_parameter = flat[:, start:start + count * size].view(flat.shape[0], count, size).permute(1, 0, 2)
    return by_parameter, by_parameter.transpose(1, 2)


class GradientRows:
    """The tasks' gradients of ``params``: ``flat[t]`` is task ``t``'s, ``columns(i)`` where parameter ``i`` lies.

    >>> import torch
    >>> w, b = torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(2))
    >>> rows = GradientRows([w, b], tasks=2)
    >>> rows.store(0, (torch.ones(2, 3), None)); rows.store(1, (2 * torch.ones(2, 3), torch.ones(2)))
    >>> rows.grams()[:, 1].tolist()  # per parameter, task 0's gradient . task 1's
    [12.0, 0.0]
    """

    def __init__(self, params: Sequence[torch.Tensor], tasks: int):
        self.params = list(params)
        self.tasks = tasks
        first = self.params[0]
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in self.params))
        members: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            members.setdefault((p.shape[1:] if p.dim() else None, p.dtype), []).append(i)
        groups = [sorted(group, key=lambda i: tuple(self.params[i].shape)) for group in members.values()]
        self.order = [i for group in groups for i in group]  # slot -> parameter: the Gram matrices' order
        self.slot = {i: s for s, i in enumerate(self.order)}
        self.flat = torch.zeros(tasks, sum(p.numel() for p in self.params), dtype=dtype, device=first.device)
        self._grams = torch.zeros(len(self.params), tasks, tasks, dtype=dtype, device=first.device)
        self._flat_grams = self._grams.view(len(self.params), tasks * tasks)
        self.groups, self.runs, self.offsets, start = [], [], [0] * len(self.params), 0
        for group in groups:
            shapes = [self.params[i].shape for i in group]
            self.groups.append(_Group(group, shapes, start, self.flat))
            for shape, run in itertools.groupby(group, key=lambda i: self.params[i].shape):
                run = list(run)
                for k, i in enumerate(run):
                    self.offsets[i] = start + k * shape.numel()
                slot = self.slot[run[0]]
                self.runs.append((_gram_inputs(self.flat, start, len(run), shape.numel()),
                                  self._grams[slot:slot + len(run)]))
                start += len(run) * shape.numel()
        self._zeros: dict[tuple, torch.Tensor] = {}
        self._scratch: list[torch.Tensor] | None = None

    def columns(self, i: int) -> tuple[int, int]:
        """Where parameter ``i``'s gradient lies in every row."""
        return self.offsets[i], self.offsets[i] + self.params[i].numel()

    def views(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """Views of a row-sized vector shaped like each parameter, in parameter order."""
        return [vector[start:stop].view(p.shape) for p, (start, stop) in
                zip(self.params, map(self.columns, range(len(self.params))))]

    def store(self, task: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Write one task's gradients (``None``: its loss does not reach the parameter) into its row."""
        with torch.no_grad():
            for group in self.groups:
                group.copy(self._parts(group, grads), out=group.rows[task])

    def add(self, task: int, grads: Sequence[torch.Tensor | None]) -> None:
        """Add one task's gradients to its row (gradient accumulation)."""
        if self._scratch is None:
            scratch = self.flat.new_empty(self.flat.shape[1])
            self._scratch = [group.view(scratch) for group in self.groups]
        with torch.no_grad():
            for group, out in zip(self.groups, self._scratch):
                group.copy(self._parts(group, grads), out=out)
                group.rows[task].add_(out)

    def grams(self) -> torch.Tensor:
        """``(parameters, tasks * tasks)``: each parameter's Gram matrix of the task gradients, flattened, in slot
        order."""
        with torch.no_grad():
            for inputs, out in self.runs:
                torch.bmm(*inputs, out=out)
        return self._flat_grams

    def _parts(self, group: _Group, grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        return [self._zero(i) if grads[i] is None else grads[i] for i in group.members]

    def _zero(self, i: int) -> torch.Tensor:
        p = self.params[i]
        key = (p.shape, p.dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        return self._zeros[key]
