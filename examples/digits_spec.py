"""A SPEC for the fxsplit command line: the demo's network, its two tasks and a few MultiDigits batches.

    fxsplit graph examples/digits_spec.py
    fxsplit analyze examples/digits_spec.py --steps 20 --out report.json
    fxsplit rewrite examples/digits_spec.py --report report.json --top 4 --out split.pkl
"""

import torch
from torch.utils.data import DataLoader

from fxsplit.datasets import MultiDigits
from fxsplit.experiment.demo import DigitNet
from fxsplit.experiment.training import task_losses


def spec():
    torch.manual_seed(0)
    data = MultiDigits("train", size=512)
    return {
        "model": DigitNet(data.tasks),
        "tasks": task_losses(data.tasks),
        "data": DataLoader(data, batch_size=64),
    }
