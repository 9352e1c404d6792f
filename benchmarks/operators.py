"""Benchmark 5: dispatched ATen operators and host syncs per ``fxsplit.analyze`` step, against the floor.

What a GPU pays per step in kernel launches and synchronisations shows on any device as dispatched operators, so
this benchmark checks issue 13's per-step targets without a GPU. Counted by ``torch.profiler`` over analyze runs of
2 and 4 steps (the difference halved, so that the first step, which decides the scored layers, and the report
cancel out):

* operators: every ``aten::`` event, nested ones included (everything the dispatcher runs);
* host syncs: ``aten::_local_scalar_dense`` (every ``.item()``, ``bool()``, ``float()`` of a tensor) and, on CUDA,
  the runtime's synchronize calls (which ``.cpu()`` and ``.tolist()`` of a device tensor make). On the CPU a
  ``.tolist()`` dispatches nothing and is not seen.

The floor is one forward and T ``torch.autograd.grad`` calls. Sizes: batch 2 at 32 px on the CPU (the counts do not
depend on them), the realistic ones on CUDA.

The same is counted for analyze with a per-step hook, the TensorBoard logger (``on_step``, reading the device once
every 100 steps), against analyze alone: the operators its figures add on the device (reported, no target), and
no host sync per step.
"""

from __future__ import annotations

import tempfile

from torch.profiler import ProfilerActivity, profile

import fxsplit

from .common import Case, Row, Settings, compare, floor_step, say, setup

NAME = "operators"
SYNCS = {"aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
FEW, MANY = 2, 4


def count(fn, settings: Settings) -> tuple[int, int]:
    """Operators and host syncs that ``fn`` dispatches."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if settings.cuda else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    return sum(e.name.startswith("aten::") for e in events), sum(e.name in SYNCS for e in events)


def _case(case: Case, tasks: int, settings: Settings) -> list[Row]:
    model, batch, losses = setup(case, tasks, settings)
    graph = fxsplit.layer_graph(model)
    weights = [p for p in model.parameters() if p.requires_grad]

    def analyze(steps, hook=None):
        return lambda: fxsplit.analyze(model, losses, [batch] * steps, graph=graph, progress=False,
                                       on_step=hook and hook())

    def per_step(hook=None):
        (few, few_syncs), (many, many_syncs) = (count(analyze(n, hook), settings) for n in (FEW, MANY))
        return (many - few) / (MANY - FEW), (many_syncs - few_syncs) / (MANY - FEW)

    floor = lambda: floor_step(model, losses, batch, weights)  # noqa: E731
    for fn in (analyze(FEW), floor):
        fn()  # warm-up: lazy initialisation is not a per-step cost
    ops, syncs = per_step()
    floor_ops, floor_syncs = count(floor, settings)
    say(NAME, f"{case} T={tasks}: {ops:.0f} operators and {syncs:g} host syncs per analyze step; floor {floor_ops} "
              f"operators, {floor_syncs} syncs")
    label = f"{case} T={tasks}"
    rows = [
        compare(NAME, f"{label}: dispatched operators per step, analyze vs floor", ops, floor_ops, "ops", ("<=", 1.10)),
        Row(NAME, f"{label}: host syncs per analyze step (ratio column: the count)", f"{syncs:g}", f"{floor_syncs}",
            syncs, "= 0", syncs == 0),
    ]
    logger = _tensorboard_logger()
    if logger is None:
        say(NAME, "the rows with a per-step hook need TensorBoard: pip install 'fxsplit[tensorboard]'")
        return rows
    hooked_ops, hooked_syncs = per_step(logger)
    say(NAME, f"{case} T={tasks}: with the TensorBoard logger, {hooked_ops:.0f} operators and {hooked_syncs:g} host "
              f"syncs per analyze step")
    return rows + [
        compare(NAME, f"{label}: with a TensorBoard logger (on_step): operators per step vs analyze alone", hooked_ops,
                ops, "ops"),  # what the hook's figures cost on the device: measured, no target
        Row(NAME, f"{label}: with a TensorBoard logger (on_step): host syncs per step (ratio column: the count)",
            f"{hooked_syncs:g}", f"{syncs:g}", hooked_syncs, "= 0", hooked_syncs == 0),
    ]


def _tensorboard_logger():
    """A function that makes a new TensorBoard logger, writing every 100 steps; ``None`` without TensorBoard."""
    try:
        from fxsplit.integrations.tensorboard import TensorBoardLogger
    except ImportError:  # MissingExtraError
        return None
    return lambda: TensorBoardLogger(tempfile.mkdtemp(prefix="fxsplit-operators-"), every=100)


def run(settings: Settings) -> list[Row]:
    if settings.cuda:
        cases = settings.step_cases()
    else:
        cases = [Case(model, 2, 32) for model in (("resnet18",) if settings.quick else
                                                  ("resnet18", "resnet50", "vit_tiny", "vit_small"))]
    return [row for case in cases for tasks in (2, 4) for row in _case(case, tasks, settings)]
