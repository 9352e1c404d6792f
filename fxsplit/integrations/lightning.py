"""``ConflictCallback``: Recon's conflict scores while a ``LightningModule`` trains (PyTorch Lightning)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import FxsplitError, TaskError
from ..scoring import ConflictMonitor, StepFigures
from ..outputs import task_names
from ..scoring.checks import loss_value, step_hooks
from ._convention import CONVENTION, share_key, task_losses
from ..extras import require

pl = require("lightning.pytorch", "lightning", "fxsplit.integrations.lightning")


class ConflictCallback(pl.Callback):
    """Scores how often the task gradients conflict on every shared layer while ``trainer.fit`` runs, as
    :class:`~fxsplit.ConflictMonitor` scores a plain loop, and logs the share of conflicting task pairs.

    * **Automatic optimization**: ``training_step`` returns its per-task losses beside the total,
      ``{"loss": sum(losses.values()), "losses": {task: loss}}``. While fitting, the callback runs the module's
      ``backward`` as ``monitor.backward(losses)`` does: one gradient pass per task, and ``.grad`` receives their
      sum (what ``loss.backward()`` gives, up to rounding), or an aggregator's combination. Lightning's gradient
      accumulation, precision plugin and hooks work as without it.
    * **Manual optimization**: call ``self.manual_backward(losses)`` with the mapping instead of the total (once per
      optimizer step); it runs through Lightning's backward path as ``monitor.backward(losses)``.

    Every optimizer step logs ``fxsplit/conflicting_pairs_below_{S}`` for each threshold S through
    ``pl_module.log_dict`` (on_step): the share of task pairs whose gradients on all scored layers together have
    cosine below S (NaN at a step not scored, one whose gradients overflowed). ``callback.monitor.report()`` gives
    the :class:`~fxsplit.ConflictReport`; ``path`` saves it at the end of ``fit``.

    Args:
        tasks: the task names, the keys of ``"losses"`` (``None``, or no entry, for a task without labels in the
            batch: see :class:`~fxsplit.ConflictMonitor`).
        model: the module to score (default: the ``LightningModule``); its layer graph is traced from its
            ``forward``, and it must hold every parameter the optimizers train.
        path: where to save the report when ``fit`` ends.
        **options: passed to :class:`~fxsplit.ConflictMonitor` (``threshold``, ``graph``, ``aggregator``,
            ``distributed``, ``on_step``, ...); its ``scaler`` is the one of Lightning's ``16-mixed`` precision.

    >>> import lightning.pytorch as L, torch, fxsplit
    >>> from fxsplit.integrations.lightning import ConflictCallback
    >>> class TwoTasks(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk, self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    ...     def forward(self, x):
    ...         shared = self.trunk(x).tanh()
    ...         return {"a": self.a(shared), "b": self.b(shared)}
    ...     def training_step(self, x, batch_idx):
    ...         out = self(x)
    ...         losses = {"a": out["a"].pow(2).mean(), "b": (out["b"] - 1).pow(2).mean()}
    ...         return {"loss": sum(losses.values()), "losses": losses}
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> conflicts = ConflictCallback(["a", "b"])
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[conflicts], logger=False, enable_checkpointing=False,
    ...                     enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(TwoTasks(), torch.utils.data.DataLoader(torch.randn(12, 4), batch_size=4))
    >>> report = conflicts.monitor.report()
    >>> report.steps, report.layers
    (3, ['trunk'])
    """

    def __init__(self, tasks: Iterable[str], *, model: nn.Module | None = None,
                 path: str | os.PathLike | None = None, **options):
        if "scaler" in options:
            raise FxsplitError("ConflictCallback takes the GradScaler of Lightning's precision plugin (precision="
                               "'16-mixed'); do not pass scaler.")
        self.tasks = task_names(tasks)
        self.model, self.path = model, path
        self._hooks = step_hooks(options.pop("on_step", None))
        self._options = options
        self.monitor: ConflictMonitor | None = None
        self._pending: tuple[dict[str, torch.Tensor], torch.Tensor | None] | None = None  # losses, total to check
        self._checked = False  # whether training_step's total was checked against its losses
        self._figures: StepFigures | None = None  # of the optimizer step completed in this batch
        self._replaced: list[str] = []  # the module's methods replaced while fitting

    # --- fit -----------------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # by now the strategy has moved the module and initialized a process group, which the monitor checks
        if type(pl_module).backward is not pl.LightningModule.backward:
            raise FxsplitError(f"{type(pl_module).__name__} overrides backward, which ConflictCallback replaces while "
                               f"fitting (it runs one gradient pass per task); remove the override.")
        model = pl_module if self.model is None else self.model
        _check_trains_only(trainer, model, pl_module)
        self.monitor = ConflictMonitor(model, self.tasks, scaler=getattr(trainer.precision_plugin, "scaler", None),
                                       on_step=(*self._hooks, self._remember), **self._options)
        self._checked, self._pending, self._figures = False, None, None
        replaced = {"backward": self._backward(trainer, pl_module.automatic_optimization)}
        if pl_module.automatic_optimization:
            replaced["training_step"] = self._recording(pl_module.training_step)
        else:
            replaced["manual_backward"] = self._manual(pl_module.manual_backward)
        self._replaced = list(replaced)
        for name, method in replaced.items():
            setattr(pl_module, name, method)  # an attribute of this instance, removed when fit ends

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._figures is not None:  # an optimizer step was completed
            shares = self._figures.conflicting_pairs()
            pl_module.log_dict({share_key(t): share for t, share in zip(self._figures.thresholds, shares)},
                               on_step=True, on_epoch=False)
            self._figures = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._give_back(pl_module)
        if self.path is not None:
            report = self.monitor.report()  # on every rank: under distributed="local" it is a collective
            if trainer.is_global_zero:
                report.save(self.path)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._give_back(pl_module)

    def _give_back(self, pl_module: pl.LightningModule) -> None:
        """Remove the methods the callback put on the module for fitting."""
        for name in self._replaced:
            delattr(pl_module, name)
        self._replaced = []

    # --- what the module runs while fitting -----------------------------------------------------------------------

    def _recording(self, training_step):
        """``training_step`` that keeps the per-task losses it returns for the backward that follows."""

        def recorded(*args, **kwargs):
            output = training_step(*args, **kwargs)
            self._pending = None if output is None else (task_losses(output, "training_step"), output.get("loss"))
            return output

        return recorded

    def _manual(self, manual_backward):
        """``manual_backward`` that takes the per-task losses and runs Lightning's backward path on their sum."""

        def manual(losses: Mapping[str, torch.Tensor], *args, **kwargs) -> None:
            if not isinstance(losses, Mapping):
                raise TaskError(f"with ConflictCallback, manual optimization calls self.manual_backward(losses) with "
                                f"the mapping task -> loss, {self.tasks}, not with their total "
                                f"({type(losses).__name__}).")
            losses = {task: loss_value(task, loss) for task, loss in losses.items() if loss is not None}
            if not losses:
                raise TaskError("manual_backward got no task's loss (all None): skip the backward of a batch without "
                                "any task's labels.")
            self._pending = (losses, None)
            manual_backward(sum(losses.values()), *args, **kwargs)  # precision plugin, hooks; then _backward

        return manual

    def _backward(self, trainer: pl.Trainer, automatic: bool):
        """The module's ``backward`` while fitting: the monitor's, on the per-task losses of this step."""

        def backward(loss: torch.Tensor) -> None:  # loss: the total, as the precision plugin scaled it
            if self._pending is None:
                raise TaskError(f"ConflictCallback got no per-task losses for this backward: training_step must "
                                f"return {CONVENTION} (automatic optimization), or call self.manual_backward(losses) "
                                f"with the mapping (manual optimization).")
            (losses, total), self._pending = self._pending, None
            accumulate = False
            if automatic:
                self._check_total(losses, total)
                # as Lightning: the loss divided by the batches accumulated, the optimizer step after the last
                losses = {task: value / trainer.accumulate_grad_batches for task, value in losses.items()}
                accumulate = trainer.fit_loop._should_accumulate()
            self.monitor.backward(losses, accumulate=accumulate)

        return backward

    def _check_total(self, losses: Mapping[str, torch.Tensor], total: torch.Tensor) -> None:
        """At the first step: the total that Lightning would train on is the sum of the losses (one read)."""
        if self._checked:
            return
        self._checked = True
        summed = sum(loss.detach().double() for loss in losses.values())
        if not torch.allclose(total.detach().double(), summed, rtol=1e-3, atol=1e-6):  # any precision's rounding
            raise TaskError(f"training_step returned 'loss' {total.item():.6g}, which is not the sum of its 'losses' "
                            f"({summed.item():.6g}); the callback trains on their sum, as monitor.backward does. "
                            f"Return {CONVENTION}, with any task weights inside the losses.")

    def _remember(self, figures: StepFigures) -> None:
        self._figures = figures


def _check_trains_only(trainer: pl.Trainer, model: nn.Module, pl_module: pl.LightningModule) -> None:
    """Raise if an optimizer trains a parameter outside ``model``: the monitor would give it no gradient."""
    scored = {id(p) for p in model.parameters()}
    names = {id(p): name for name, p in pl_module.named_parameters()}
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in scored:
                    raise FxsplitError(
                        f"the optimizer trains {names.get(id(p), f'a parameter of shape {tuple(p.shape)}')!r}, which "
                        f"the scored {type(model).__name__} does not hold: its gradient would be missing. Pass model= "
                        f"a module that holds every trained parameter (by default the LightningModule).")
