"""fxsplit inside the training stacks people use: one module per framework, each an optional extra.

- ``fxsplit.integrations.lightning``: ``ConflictCallback``, a PyTorch Lightning callback
  (``pip install 'fxsplit[lightning]'``);
- ``fxsplit.integrations.huggingface``: ``ConflictCallback`` and ``ConflictTrainer`` for the transformers
  ``Trainer`` (``pip install 'fxsplit[huggingface]'``);
- ``fxsplit.integrations.tensorboard``: ``TensorBoardLogger``, a monitor's ``on_step`` hook that writes to a
  ``SummaryWriter`` (``pip install 'fxsplit[tensorboard]'``).

``import fxsplit`` imports none of them; importing one whose framework is missing raises a
:class:`~fxsplit.MissingExtraError` that names the extra to install.
"""
