"""Test options and hypothesis profiles.

``--zoo=full`` runs the equivalence check on the whole model zoo (default: a sample across families).
``HYPOTHESIS_PROFILE=slow`` runs the property tests with many more examples.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser):
    parser.addoption("--zoo", choices=("sample", "full"), default="sample",
                     help="which torchvision/timm models the zoo equivalence test runs")
