"""Per-task gradient rows: each task's gradients of every trainable parameter, one row of a flat buffer per task.

Parameters whose shapes differ only in the first dimension lie side by side in a row (a *group*), so that one
``torch.cat`` copies a task's gradients of a whole group into its row; within a group, parameters of one shape (a
*run*) are evenly spaced, so that one ``bmm`` gives the task-by-task Gram matrix of each of them. A step costs a few
operators per group and per shape, not per parameter.

Rows are real and at least float32 (float64 when a parameter is): a float16 gradient of norm 300 has a squared norm
that float16 cannot hold. A complex parameter's gradient is kept as ``torch.view_as_real`` of it (its real and
imaginary parts, side by side), so that a dot product of two rows is the real part of the Hermitian inner product; a
sparse gradient (``nn.Embedding(sparse=True)``) is kept dense.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch


def real_dtype(p: torch.Tensor) -> torch.dtype:
    """The real dtype of ``p``'s numbers (a complex parameter's parts)."""
    return p.dtype.to_real() if p.is_complex() else p.dtype


def row_shape(p: torch.Tensor) -> torch.Size:
    """The shape of ``p``'s gradient in a row: a complex parameter's real view."""
    return torch.Size((*p.shape, 2)) if p.is_complex() else p.shape


def as_row(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as a row holds it: dense, and real."""
    if grad.layout != torch.strided:
        grad = grad.to_dense()
    return torch.view_as_real(grad.resolve_conj()) if grad.is_complex() else grad


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

    Columns are ordered by the parameters' dtype, the rows' own first (``blocks`` lists them), and complex
    parameters first within theirs, so that their real views start at even offsets (``torch.view_as_complex``
    needs it).

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
        self.shapes = [row_shape(p) for p in self.params]
        dtype = functools.reduce(torch.promote_types, map(real_dtype, self.params), torch.float32)
        device = self.params[0].device
        groups = self._groups(dtype)
        self.order = [i for group in groups for i in group]  # slot -> parameter: the Gram matrices' order
        self.slot = {i: s for s, i in enumerate(self.order)}
        self.flat = torch.zeros(tasks, sum(shape.numel() for shape in self.shapes), dtype=dtype, device=device)
        self._grams = torch.zeros(len(self.params), tasks, tasks, dtype=dtype, device=device)
        self._flat_grams = self._grams.view(len(self.params), tasks * tasks)
        self.groups, self.runs, self.offsets, start = [], [], [0] * len(self.params), 0
        for group in groups:
            shapes = [self.shapes[i] for i in group]
            self.groups.append(_Group(group, shapes, start, self.flat))
            for shape, run in itertools.groupby(group, key=lambda i: self.shapes[i]):
                run = list(run)
                for k, i in enumerate(run):
                    self.offsets[i] = start + k * shape.numel()
                slot = self.slot[run[0]]
                self.runs.append((_gram_inputs(self.flat, start, len(run), shape.numel()),
                                  self._grams[slot:slot + len(run)]))
                start += len(run) * shape.numel()
        self.blocks, self.block_of = self._blocks()
        self._zeros: dict[tuple, torch.Tensor] = {}
        self._scratch: list[torch.Tensor] | None = None

    def _groups(self, dtype: torch.dtype) -> list[list[int]]:
        """The parameters in groups, each sorted by shape; the groups in column order."""
        members: dict[tuple, list[int]] = {}
        for i, (p, shape) in enumerate(zip(self.params, self.shapes)):
            members.setdefault((shape[1:] if len(shape) else None, real_dtype(p), p.is_complex()), []).append(i)
        # the rows' own dtype first, each dtype's parameters side by side, complex ones first; ties keep their order
        keys = sorted(members, key=lambda key: (key[1] != dtype, str(key[1]), not key[2]))
        return [sorted(members[key], key=lambda i: tuple(self.shapes[i])) for key in keys]

    def _blocks(self) -> tuple[list[tuple[torch.dtype, int, int]], list[int]]:
        """Per dtype of the parameters' numbers, the columns ``[start, stop)`` they fill (groups are in dtype
        order); and per parameter, its block."""
        blocks: list[tuple[torch.dtype, int, int]] = []
        block_of = [0] * len(self.params)
        for group in self.groups:
            dtype = real_dtype(self.params[group.members[0]])
            start = blocks.pop()[1] if blocks and blocks[-1][0] == dtype else group.start
            blocks.append((dtype, start, group.stop))
            for i in group.members:
                block_of[i] = len(blocks) - 1
        return blocks, block_of

    def columns(self, i: int) -> tuple[int, int]:
        """Where parameter ``i``'s gradient lies in every row."""
        return self.offsets[i], self.offsets[i] + self.shapes[i].numel()

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
        return [self._zero(i) if grads[i] is None else as_row(grads[i]) for i in group.members]

    def _zero(self, i: int) -> torch.Tensor:
        p = self.params[i]
        key = (self.shapes[i], real_dtype(p))
        if key not in self._zeros:
            self._zeros[key] = torch.zeros(self.shapes[i], dtype=real_dtype(p), device=p.device)
        return self._zeros[key]
