"""Test options and hypothesis profiles.

``--zoo=full`` runs the equivalence check on the whole model zoo (default: a sample across families).
``HYPOTHESIS_PROFILE=slow`` runs the property tests with many more examples.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--zoo", choices=("sample", "full"), default="sample",
                     help="which torchvision/timm models the zoo equivalence test runs")


@pytest.fixture(scope="module")
def bert():
    """``BertTwoHeads`` (seed 0) and an example batch of 4 padded sequences; skipped without transformers."""
    pytest.importorskip("transformers", reason="HuggingFace models are an optional test dependency")
    from tests.hf_models import BertTwoHeads, token_batch

    torch.manual_seed(0)
    return BertTwoHeads(), token_batch(4)
