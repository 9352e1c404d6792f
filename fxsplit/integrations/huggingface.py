"""``ConflictTrainer`` and ``ConflictCallback``: Recon's conflict scores while a transformers ``Trainer`` trains."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import FxsplitError, TaskError
from ..layers import layer_graph
from ..scoring import ConflictMonitor, StepFigures
from ..outputs import task_names
from ..scoring.checks import step_hooks
from ._convention import CONVENTION, task_losses
from ..extras import require

transformers = require("transformers", "huggingface", "fxsplit.integrations.huggingface")

REPORT_NAME = "conflicts.json"


class ConflictCallback(transformers.TrainerCallback):
    """Scores how often the task gradients conflict on every shared layer while a :class:`ConflictTrainer` trains,
    as :class:`~fxsplit.ConflictMonitor` scores a plain loop, and saves the :class:`~fxsplit.ConflictReport`
    beside the checkpoints: ``conflicts.json`` in every ``checkpoint-N`` directory the Trainer saves (the scores
    up to step N), and in ``output_dir`` when training ends.

    The Trainer's own backward trains, untouched: the monitor differentiates each task's loss once more beside it
    (one more gradient pass per task and step) and changes no ``.grad``. Gradient accumulation is scored per
    optimizer step, as ``monitor.backward(..., accumulate=True)`` scores it.

    Args:
        tasks: the task names, the keys of the model's ``"losses"``.
        filename: the report's file name.
        **options: passed to :class:`~fxsplit.ConflictMonitor` (``threshold``, ``graph``, ``bins``,
            ``distributed``, ``on_step``); without ``graph``, the model's layer graph is traced on the first
            training batch, called as the Trainer calls it (``model(**inputs)``). The scaler is the Trainer's
            (``fp16``).

    After training, ``callback.monitor.report()`` is the report. See :class:`ConflictTrainer` for an example.
    """

    def __init__(self, tasks: Iterable[str], *, filename: str = REPORT_NAME, **options):
        for option in ("aggregator", "scaler"):
            if option in options:
                raise FxsplitError(f"ConflictCallback does not take {option}: the Trainer's own backward and "
                                   f"GradScaler train the model, the monitor only scores.")
        self.tasks = task_names(tasks)
        self.filename = filename
        self._hooks = step_hooks(options.pop("on_step", None))
        self._options = options
        self.monitor: ConflictMonitor | None = None
        self._steps = 0  # optimizer steps the Trainer completed in this train()
        self._scored = 0  # optimizer steps the monitor completed

    def on_train_begin(self, args, state, control, **kwargs):
        self.monitor, self._steps, self._scored = None, 0, 0

    def on_step_end(self, args, state, control, **kwargs):
        self._steps += 1
        if self._scored != self._steps:
            raise TaskError("ConflictCallback got no per-task losses for this optimizer step: train with "
                            "fxsplit.integrations.huggingface.ConflictTrainer (or a Trainer subclass that inherits "
                            "from it), whose compute_loss hands them over.")

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and not checkpoint.is_dir():
            raise FxsplitError(f"ConflictCallback saves the report beside the checkpoint in {str(checkpoint)!r}, "
                               f"which the Trainer did not create (a hyperparameter search saves elsewhere).")
        self._save(checkpoint, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self._save(Path(args.output_dir), state)

    def _save(self, directory: Path, state) -> None:
        report = self.monitor.report()  # on every process: under distributed="local" it is a collective
        if state.is_world_process_zero:
            directory.mkdir(parents=True, exist_ok=True)
            report.save(directory / self.filename)

    def _start(self, model: nn.Module, inputs: Mapping, scaler) -> None:
        """The monitor, at the first training batch (``inputs``), before its forward: tracing runs the model."""
        if self.monitor is None:
            graph = self._options.get("graph")
            if graph is None:
                graph = layer_graph(model, example_kwargs=dict(inputs))
            self.monitor = ConflictMonitor(model, self.tasks, scaler=scaler, on_step=(*self._hooks, self._count),
                                           **{**self._options, "graph": graph})

    def _score(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool) -> None:
        """Score one micro-batch's losses, keeping their graph for the Trainer's backward."""
        self.monitor.backward(losses, accumulate=accumulate, update_grad=False, retain_graph=True)

    def _count(self, figures: StepFigures) -> None:
        self._scored += 1


class ConflictTrainer(transformers.Trainer):
    """A ``Trainer`` whose ``compute_loss`` hands the model's per-task losses to its :class:`ConflictCallback`.

    The model returns them beside the total, ``{"loss": total, "losses": {task: loss}, ...}`` (a dict, or a
    ``ModelOutput`` with a ``losses`` field); the Trainer trains on the total, as always. To combine it with
    another ``Trainer`` subclass, inherit from both: ``class MyTrainer(ConflictTrainer, Seq2SeqTrainer)``.

    >>> import tempfile, torch, fxsplit, transformers
    >>> from fxsplit.integrations.huggingface import ConflictCallback, ConflictTrainer
    >>> class TwoTasks(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.trunk, self.a, self.b = torch.nn.Linear(4, 8), torch.nn.Linear(8, 1), torch.nn.Linear(8, 1)
    ...     def forward(self, x, y):
    ...         shared = self.trunk(x).tanh()
    ...         losses = {"a": (self.a(shared)[:, 0] - y).pow(2).mean(), "b": self.b(shared).pow(2).mean()}
    ...         return {"loss": sum(losses.values()), "losses": losses}
    >>> data = [{"x": torch.randn(4), "y": torch.randn(())} for _ in range(12)]
    >>> out = tempfile.mkdtemp()
    >>> args = transformers.TrainingArguments(out, max_steps=3, per_device_train_batch_size=4, save_steps=2,
    ...                                       report_to=[], use_cpu=True, disable_tqdm=True)
    >>> conflicts = ConflictCallback(["a", "b"])
    >>> trainer = ConflictTrainer(model=TwoTasks(), args=args, train_dataset=data, callbacks=[conflicts])
    >>> trainer.remove_callback(transformers.PrinterCallback)  # keeps this example's output to its result
    >>> _ = trainer.train()
    >>> fxsplit.ConflictReport.load(f"{out}/checkpoint-2/conflicts.json").steps, conflicts.monitor.report().steps
    (2, 3)
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        training = torch.is_grad_enabled()  # evaluation runs without gradients
        if training:
            callback = self._conflict_callback()
            callback._start(self.accelerator.unwrap_model(model), inputs, self.accelerator.scaler)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if training:
            source = f"{type(self.accelerator.unwrap_model(model)).__name__}.forward"
            callback._score(task_losses(outputs, source), accumulate=not self.accelerator.sync_gradients)
        return (loss, outputs) if return_outputs else loss

    def _conflict_callback(self) -> ConflictCallback:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ConflictCallback):
                return callback
        raise FxsplitError(f"ConflictTrainer scores with a ConflictCallback: pass callbacks=[ConflictCallback(tasks)]; "
                           f"the model's forward returns {CONVENTION}.")
