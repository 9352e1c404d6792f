"""How a step's update reaches ``.grad``: added as autograd adds the summed loss's gradient, and never written into
memory the user may still hold.

A parameter whose ``.grad`` is ``None`` is given a view of this step's update vector (converted to its dtype):
memory nothing else holds, which the monitor writes into again only while the parameter still holds it as its
``.grad`` (to accumulate, as autograd accumulates into an existing ``.grad``). A ``.grad`` the user kept and then let
go of (``zero_grad()``, ``p.grad = None`` or another tensor) never changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .rows import GradientRows


def accumulated(grad: torch.Tensor, addend: torch.Tensor) -> torch.Tensor:
    """``grad + addend`` as autograd accumulates into an existing ``.grad``: in place into a dense one."""
    if grad.layout == torch.strided:
        return grad.add_(addend)
    return grad + addend if addend.layout != torch.strided else addend + grad  # sparse + sparse stays sparse


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape``."""
    strides, size = [], 1
    for extent in reversed(shape):
        strides.append(size)
        size *= extent
    return tuple(reversed(strides))


def _columns(vector: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``vector[start:stop]``, without an operator when that is all of it."""
    return vector if (start, stop) == (0, len(vector)) else vector[start:stop]


@dataclass
class _Given:
    """An update whose views parameters were given as ``.grad``: per dtype block, the tensor the views are of and
    the column its first number stands for; per parameter given one, the view."""

    blocks: list[tuple[torch.Tensor, int]]
    views: dict[int, torch.Tensor]

    def still_held(self, params: Sequence[torch.Tensor], reached: Iterable[int]) -> bool:
        """Whether every view is still its parameter's ``.grad`` and every parameter ``reached`` holds one: then the
        whole update can be added in one operator per block."""
        return all(params[i].grad is view for i, view in self.views.items()) and all(i in self.views for i in reached)


class GradWriter:
    """Adds update vectors, laid out as a row of ``rows``, to the parameters' ``.grad``."""

    def __init__(self, rows: GradientRows):
        self.rows = rows
        self._strides = [_contiguous_strides(shape) for shape in rows.shapes]
        self._given: _Given | None = None  # the update whose views the parameters were last given

    def write(self, update: torch.Tensor, reached: Sequence[int], replaced: Mapping[int, torch.Tensor]) -> None:
        """Add ``update`` to the ``.grad`` of the parameters ``reached`` (positions in ``rows.params``), or, for
        those in ``replaced``, the tensor given there (a sparse gradient, kept sparse)."""
        given = self._given
        if given is not None and not replaced and given.still_held(self.rows.params, reached):
            for (tensor, _), (_, start, stop) in zip(given.blocks, self.rows.blocks):
                tensor.add_(_columns(update, start, stop))
            return
        blocks = self._blocks(update)
        views = {}
        for i in reached:
            p = self.rows.params[i]
            addend = replaced[i] if i in replaced else self._view(blocks, i)
            if p.grad is None:
                p.grad = addend
                if i not in replaced:
                    views[i] = addend
            else:
                p.grad = accumulated(p.grad, addend)
        self._given = _Given(blocks, views) if views else None

    def _blocks(self, update: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
        """The update in each dtype of the parameters' numbers: a view of it, or a converted copy, and the column
        its first storage element stands for."""
        blocks = []
        for dtype, start, stop in self.rows.blocks:
            part = _columns(update, start, stop)
            blocks.append((part, 0) if dtype == update.dtype else (part.to(dtype), start))
        return blocks

    def _view(self, blocks: list[tuple[torch.Tensor, int]], i: int) -> torch.Tensor:
        """Parameter ``i``'s part of the update, shaped (and typed) as the parameter."""
        tensor, origin = blocks[self.rows.block_of[i]]
        view = tensor.as_strided(self.rows.shapes[i], self._strides[i], self.rows.offsets[i] - origin)
        return torch.view_as_complex(view) if self.rows.params[i].is_complex() else view
