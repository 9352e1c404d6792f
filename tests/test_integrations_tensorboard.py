"""TensorBoardLogger: what it writes, read back with TensorBoard's own reader, against the monitor's report."""

import numpy as np
import pytest
import torch

from tests.models import monitored, scoring_cases

pytest.importorskip("tensorboard", reason="TensorBoard is an optional extra")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from fxsplit.integrations._convention import HEAT_MAP_KEY, layer_rate_key, share_key  # noqa: E402
from fxsplit.integrations.tensorboard import TensorBoardLogger  # noqa: E402

THRESHOLDS = [0.0, -0.05, 0.3]


def test_scalars_and_heat_maps_are_the_reports_figures(tmp_path):
    model, tasks, batches = scoring_cases()["cnn-3-tasks"]  # three pairs: shares of 0, 1/3, 2/3 and 1
    batches = batches * 2  # 8 steps: intervals of 3, 3 and 2 (the flush)
    logger = TensorBoardLogger(tmp_path, every=3, top=4)
    report = monitored(model, tasks, batches, torch.optim.SGD(model.parameters(), lr=0.1), threshold=THRESHOLDS,
                       on_step=logger)
    logger.flush()
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert len(report.pairs) == 3 and report.steps == len(batches)
    for threshold in THRESHOLDS:
        shares = [np.float32(np.mean([cosine < threshold for cosine in step])) for step in report.whole_cosine]
        assert [(event.step, event.value) for event in events.Scalars(share_key(threshold))] == \
            list(enumerate(shares))
    assert len({event.value for event in events.Scalars(share_key(0.3))}) > 2  # the check can tell shares apart
    pairs = {layer: len(reach) * (len(reach) - 1) // 2 for layer, reach in report.reach.items()}
    last = len(batches) - 1
    rates = {}  # step -> {tag: value} of the layers' conflict rates
    for tag in events.Tags()["scalars"]:
        if "layer_conflict_rate" in tag:
            for event in events.Scalars(tag):
                rates.setdefault(event.step, {})[tag] = event.value
    assert sorted(rates) == [2, 5, last]  # at each interval's end
    assert rates[last] == {layer_rate_key(layer): np.float32(report.scores[layer] / (report.steps * pairs[layer]))
                           for layer in report.top(4)}
    images = events.Images(HEAT_MAP_KEY)
    assert [image.step for image in images] == [2, 5, 7]
    assert (images[0].height, images[0].width) == (256 // len(report.layers) * len(report.layers), 255)


def test_no_step_is_written_before_its_interval_ends(tmp_path):
    model, tasks, batches = scoring_cases()["cnn-bn"]
    logger = TensorBoardLogger(tmp_path, every=10)
    monitored(model, tasks, batches, on_step=logger)
    logger.writer.flush()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert events.Tags()["scalars"] == []
    logger.flush()
    events.Reload()
    assert len(events.Scalars(share_key(0.0))) == len(batches)
