"""Autograd's and autocast's modes in a traced graph: ``torch.no_grad()``, ``torch.enable_grad()``,
``torch.set_grad_enabled``, ``torch.inference_mode()`` and ``torch.autocast`` blocks in ``forward`` become nodes,
which ``torch.fx`` does not record by itself (it would let gradients flow through a frozen teacher, or compute in
float32 what the model computes in bfloat16). An inference-mode block is recorded as a no-grad block: the same
values and no gradient, where the model runs (inference mode forbids more, not less).

While tracing, entering a block records the mode then in force (``torch.is_grad_enabled()``) and sets the block's
(:func:`set_grad_mode`); leaving it sets the recorded mode back, so the graph honours the caller's mode as the
model does. TorchScript compiles these nodes too. An autocast block becomes ``torch.amp._enter_autocast`` and
``torch.amp._exit_autocast`` nodes, as ``torch.export`` records it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import fx
from torch.autograd import grad_mode


@fx.node.has_side_effect
def set_grad_mode(mode: bool) -> None:
    """Set autograd's mode (a node with no users that passes must keep)."""
    torch.set_grad_enabled(mode)


@contextlib.contextmanager
def recording_modes(tracer: fx.Tracer) -> Iterator[None]:
    """Within the block, the gradient-mode and autocast context managers record themselves in ``tracer``'s
    graph."""
    saved: list[fx.Proxy] = []

    def enter(mode: bool) -> None:
        saved.append(tracer.create_proxy("call_function", torch.is_grad_enabled, (), {}))
        tracer.create_proxy("call_function", set_grad_mode, (mode,), {})

    def enter_unchanged() -> None:  # inference_mode(False): the mode stays what it is
        saved.append(tracer.create_proxy("call_function", torch.is_grad_enabled, (), {}))

    def leave(*_) -> None:
        tracer.create_proxy("call_function", set_grad_mode, (saved.pop(),), {})

    def set_grad_enabled(self, mode: bool) -> None:  # a context manager, or a call that sets the mode for good
        self.mode = mode
        enter(mode)

    def enter_autocast(self) -> None:
        arguments = (self.device, self.fast_dtype, self._enabled, self._cache_enabled)
        self.recorded = tracer.create_proxy("call_function", torch.amp._enter_autocast, arguments, {})

    def leave_autocast(self, *_) -> None:
        tracer.create_proxy("call_function", torch.amp._exit_autocast, (self.recorded,), {})

    patches = [
        (grad_mode.no_grad, "__enter__", lambda self: enter(False)),
        (grad_mode.no_grad, "__exit__", leave),
        (grad_mode.enable_grad, "__enter__", lambda self: enter(True)),
        (grad_mode.enable_grad, "__exit__", leave),
        (grad_mode.set_grad_enabled, "__init__", set_grad_enabled),
        (grad_mode.set_grad_enabled, "__exit__", leave),
        (grad_mode.inference_mode, "__enter__", lambda self: enter(False) if self.mode else enter_unchanged()),
        (grad_mode.inference_mode, "__exit__", leave),
        (torch.autocast, "__enter__", enter_autocast),
        (torch.autocast, "__exit__", leave_autocast),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    for cls, name, patch in patches:
        setattr(cls, name, patch)
    try:
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
