"""Recon's experiment, not a pipeline stage: it uses the pipeline (``ConflictMonitor`` scores while a network
trains, ``rewrite`` splits) to compare networks over seeds.

- ``training``: one network trained through the monitor (the summed loss or a gradient method), and its accuracy;
- ``arms``: one seed's networks (joint, Recon, the random control, each gradient method alone and with Recon);
- ``statistics``: mean ± sd over seeds, paired differences, the tables;
- ``demo``: ``fxsplit demo``, the experiment in miniature on MultiDigits.

The paper's scale is ``python -m benchmarks.reproduce``, built on the same modules.
"""
