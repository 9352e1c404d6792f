"""fxsplit's benchmarks: ``python -m benchmarks [--quick] [--only NAME]`` runs them and prints one table.

Every ratio compares measurements taken in the same run; nothing asserts on time. Results: docs/performance.md.
``python -m benchmarks.reproduce`` runs the paper's MultiMNIST experiment over seeds (docs/reproduction.md);
``python -m benchmarks.zoo`` sweeps timm and torchvision models (docs/coverage.md).
"""

BENCHMARKS = ("analyze_step", "operators", "split_network", "surgery", "memory", "routes")
