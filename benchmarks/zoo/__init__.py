"""The zoo sweep: every timm model under a parameter cap and every torchvision classifier, through fxsplit's whole
pipeline (trace, layer graph, analyze, rewrite, equivalence, TorchScript, torch.export).

``python -m benchmarks.zoo --help`` says how to run it; ``docs/coverage.md`` holds the latest results.
"""
