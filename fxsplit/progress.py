"""A scoring run's progress on stderr, with the share of conflicting task pairs so far: a tqdm bar on a terminal,
one line every tenth of the run (or every 100 steps of a run of unknown length) elsewhere, as in a job's log.

The share is summed on the device by an ``on_step`` hook and read back only when it is shown: at most once a second
on a terminal, once a line elsewhere.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator

import torch

from .scoring import StepFigures

LINES = 10  # lines a run of known length prints off a terminal
UNKNOWN_LENGTH_EVERY = 100  # steps between lines when the length is not known
REFRESH_SECONDS = 1.0  # on a terminal: how often the share is read back


class ConflictShare:
    """An ``on_step`` hook: the share of (scored step, task pair) whose cosine on all scored layers together is
    below the primary threshold, kept on the device until :meth:`read`.

    >>> import torch, fxsplit
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> share = ConflictShare()
    >>> monitor = fxsplit.ConflictMonitor(net, ["a", "b"], on_step=share)
    >>> for x in torch.randn(4, 16, 4):
    ...     out = net(x)
    ...     monitor.backward({"a": out[:, 0].mean(), "b": -out[:, 0].mean()})  # opposed: every step conflicts
    >>> share.read()
    1.0
    """

    def __init__(self):
        self._below: torch.Tensor | None = None  # summed over steps: the step's share of conflicting pairs
        self._scored: torch.Tensor | None = None  # steps scored

    def __call__(self, figures: StepFigures) -> None:
        share = figures.conflicting_pairs()[0].nan_to_num(0.0)  # NaN: a step not scored
        if self._below is None:
            self._below, self._scored = torch.zeros_like(share), torch.zeros_like(share)
        self._below.add_(share)
        self._scored.add_(figures.scored)

    def read(self) -> float | None:
        """The share so far (one read from the device); ``None`` before a step was scored."""
        if self._below is None:
            return None
        below, scored = torch.stack([self._below, self._scored]).tolist()
        return below / scored if scored else None


class Progress:
    """Shows a run over ``total`` steps (``None``: unknown) on stderr, with :attr:`share` as the monitor's hook.

    ``enabled=None`` shows it (a bar on a terminal, lines elsewhere); ``False`` shows nothing.
    """

    def __init__(self, desc: str, total: int | None, threshold: float, enabled: bool | None = None):
        self.desc, self.total, self.threshold = desc, total, threshold
        self.share = ConflictShare()
        self.enabled = enabled is not False
        self.every = UNKNOWN_LENGTH_EVERY if total is None else max(1, math.ceil(total / LINES))
        self._bar = None
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)
        self._done, self._shown, self._started = 0, 0, time.monotonic()
        self._refreshed = self._started

    def wrap(self, steps: Iterable) -> Iterator:
        """Yield ``steps``, showing each one done (call :meth:`close` at the end)."""
        for step in steps:
            yield step
            self._advance()

    def close(self) -> None:
        """The last line (or the bar's final state)."""
        if self._bar is not None:
            self._bar.set_postfix_str(self._conflicts(), refresh=False)
            self._bar.close()
        elif self.enabled and self._shown < self._done:
            self._line()

    def _advance(self) -> None:
        self._done += 1
        if self._bar is not None:
            now = time.monotonic()
            if now - self._refreshed >= REFRESH_SECONDS:
                self._refreshed = now
                self._bar.set_postfix_str(self._conflicts(), refresh=False)
            self._bar.update()
        elif self.enabled and self._done % self.every == 0:
            self._line()

    def _line(self) -> None:
        self._shown = self._done
        of = "" if self.total is None else f"/{self.total}"
        rate = self._done / max(time.monotonic() - self._started, 1e-9)
        print(f"{self.desc}: step {self._done}{of}, {self._conflicts()}, {rate:.1f} steps/s", file=sys.stderr,
              flush=True)

    def _conflicts(self) -> str:
        share = self.share.read()
        shown = "-" if share is None else f"{share:.1%}"
        return f"conflicting task pairs {shown} (cos < {self.threshold:g})"
