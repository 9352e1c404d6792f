"""``TensorBoardLogger``: a monitor's per-step figures written to TensorBoard (``torch.utils.tensorboard``)."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import FxsplitError
from ..scoring import StepFigures
from ._convention import HEAT_MAP_KEY, layer_rate_key, share_key
from ..extras import require

SummaryWriter = require("torch.utils.tensorboard", "tensorboard", "fxsplit.integrations.tensorboard").SummaryWriter

RED, WHITE, BLUE, GREY = (np.array(c, dtype=np.float64) for c in ((1, 0, 0), (1, 1, 1), (0, 0, 1), (0.5, 0.5, 0.5)))
IMAGE_SIZE = 256  # pixels the heat map's layers and steps are stretched to, at least


class TensorBoardLogger:
    """The ``on_step`` hook of a :class:`~fxsplit.ConflictMonitor` (or of :func:`fxsplit.analyze`) that writes its
    figures to TensorBoard, reading them from the device once every ``every`` steps.

    At every ``every``-th step, and at :meth:`flush`, it writes

    * ``fxsplit/conflicting_pairs_below_{S}`` for each threshold S, at every scored step of the interval: the share
      of task pairs whose gradients on all scored layers together (the parameters still shared) have cosine below S
      (averaged over the steps, ``report.conflict_rate(S)`` averaged over pairs);
    * ``fxsplit/layer_conflict_rate/{layer}`` for the ``top`` layers scored highest so far, at the interval's last
      step: the share of (scored step, task pair that reaches the layer, both tasks with a loss) with cosine below
      the primary S so far (``report.counts`` over the layer's pair steps);
    * ``fxsplit/layer_cosine``, a heat map: a row per scored layer in network order, a column per step of the
      interval, the layer's mean pair cosine from red (-1) through white (0) to blue (+1), grey where a step was
      not scored. When the monitor's scored layers grow (a task has a loss for the first time), the interval so far
      is written on the layers it had, and the next starts with all of them.

    ``writer``: a ``SummaryWriter``, or the log directory of a new one. Call :meth:`flush` at the end of training
    (it writes the steps since the last interval).

    >>> import tempfile, torch, fxsplit
    >>> from fxsplit.integrations.tensorboard import TensorBoardLogger
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> logger = TensorBoardLogger(tempfile.mkdtemp(), every=2)
    >>> monitor = fxsplit.ConflictMonitor(net, ["a", "b"], on_step=logger)
    >>> for x in torch.randn(3, 16, 4):
    ...     out = net(x)
    ...     monitor.backward({"a": out[:, 0].pow(2).mean(), "b": -out[:, 1].mean()})
    >>> logger.flush()  # the third step
    """

    def __init__(self, writer: SummaryWriter | str | os.PathLike, *, every: int = 100, top: int = 10):
        if not (isinstance(every, int) and every >= 1 and isinstance(top, int) and top >= 0):
            raise FxsplitError(f"every must be a whole number of steps >= 1 and top a count >= 0, got {every!r}, "
                             f"{top!r}.")
        self.writer = writer if isinstance(writer, SummaryWriter) else SummaryWriter(os.fspath(writer))
        self.every, self.top = every, top
        self._figures: StepFigures | None = None  # the last step's
        self._steps: list[int] = []  # of the interval
        self._shares: list[torch.Tensor] = []  # per step of the interval: (thresholds,)
        self._cosines: list[torch.Tensor] = []  # per step of the interval: (layers,)
        self._conflicts: torch.Tensor | None = None  # per layer, since the start: conflicting (step, pair) at S
        self._pair_steps: torch.Tensor | None = None  # per layer, since the start: scored (step, valid pair)

    def __call__(self, figures: StepFigures) -> None:
        if self._figures is None or list(figures.layers) != list(self._figures.layers):
            self._grow(figures)
        self._figures = figures
        self._steps.append(figures.step)
        self._shares.append(figures.conflicting_pairs())
        self._cosines.append(figures.layer_cosine())
        self._conflicts.add_(figures.conflicts[0].sum(1))
        self._pair_steps.add_(torch.bitwise_and(figures.valid, figures.scored).sum(1))
        if len(self._steps) >= self.every:
            self._write()

    def _grow(self, figures: StepFigures) -> None:
        """Start the tallies on ``figures``' layers, carrying those of the layers seen so far."""
        self._write()
        tallies = [torch.zeros(len(figures.layers), dtype=torch.int64, device=figures.cosine.device) for _ in range(2)]
        if self._figures is not None:
            at = torch.tensor([list(figures.layers).index(layer) for layer in self._figures.layers],
                              dtype=torch.int64, device=figures.cosine.device)
            for tally, old in zip(tallies, (self._conflicts, self._pair_steps)):
                tally[at] = old
        self._conflicts, self._pair_steps = tallies

    def flush(self) -> None:
        """Write the steps since the last interval, and flush the writer."""
        self._write()
        self.writer.flush()

    def _write(self) -> None:
        if not self._steps:
            return
        figures, steps = self._figures, self._steps
        shares, cosines = torch.stack(self._shares), torch.stack(self._cosines)
        parts = [shares.flatten(), cosines.flatten(), self._conflicts.double(), self._pair_steps.double()]
        host = torch.cat(parts).cpu().numpy()  # the interval's one read from the device
        shares, cosines, conflicts, pair_steps = np.split(host, np.cumsum([p.numel() for p in parts])[:-1])
        shares, cosines = shares.reshape(len(steps), -1), cosines.reshape(len(steps), -1)
        for step, row in zip(steps, shares):
            for threshold, share in zip(figures.thresholds, row):
                if not np.isnan(share):  # a step not scored
                    self.writer.add_scalar(share_key(threshold), share, step)
        for layer in np.argsort(-conflicts, kind="stable")[:self.top]:  # ties in network order, as reports rank
            if pair_steps[layer]:
                self.writer.add_scalar(layer_rate_key(figures.layers[layer]), conflicts[layer] / pair_steps[layer],
                                       steps[-1])
        self.writer.add_image(HEAT_MAP_KEY, heat_map(cosines.T), steps[-1], dataformats="HWC")
        self._steps, self._shares, self._cosines = [], [], []


def heat_map(cosines: np.ndarray) -> np.ndarray:
    """An RGB image (uint8, height x width x 3) of ``cosines`` (layers x steps): red at -1, white at 0, blue at +1,
    grey for NaN; each value a block of pixels, so that both sides reach ``IMAGE_SIZE``.

    >>> heat_map(np.array([[-1.0, 0.0, 1.0, np.nan]]))[0, ::64].tolist()
    [[255, 0, 0], [255, 255, 255], [0, 0, 255], [128, 128, 128]]
    """
    value = np.nan_to_num(cosines, nan=0.0).clip(-1, 1)[..., None]
    colour = np.where(value < 0, WHITE + (RED - WHITE) * -value, WHITE + (BLUE - WHITE) * value)
    colour = np.where(np.isnan(cosines)[..., None], GREY, colour)
    rows, columns = cosines.shape
    block = (max(1, IMAGE_SIZE // rows), max(1, IMAGE_SIZE // columns))
    image = colour.repeat(block[0], axis=0).repeat(block[1], axis=1)
    return np.round(image * 255).astype(np.uint8)
