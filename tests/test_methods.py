import copy
import subprocess
import sys

import pytest
import torch

import fxsplit
from tests.models import MultiHead, Twice

torchjd = pytest.importorskip("torchjd", reason="gradient methods come from the optional torchjd (fxsplit[methods])")
from torchjd.aggregation import MGDA, UPGrad, CAGrad, PCGrad  # noqa: E402
from torchjd.autojac import jac_to_grad, mtl_backward  # noqa: E402

AGGREGATORS = {"UPGrad": UPGrad, "PCGrad": PCGrad, "MGDA": MGDA, "CAGrad": lambda: CAGrad(c=0.5)}


def _split(dtype=torch.float64):
    """Three tasks on a model split at its middle layer: copies, shared layers in the branches, heads."""
    torch.manual_seed(0)
    split = fxsplit.rewrite(MultiHead(Twice(), 8, tasks="abc"), ["backbone.mid"]).to(dtype)
    tasks = {t: (lambda t, i: lambda out, y: (out[t].sum(1) - y[:, i]).pow(2).mean())(t, i)
             for i, t in enumerate("abc")}
    x, y = torch.randn(7, 6, dtype=dtype), torch.randn(7, 3, dtype=dtype)
    return split, tasks, x, y


def _losses(model, tasks, x, y):
    out = model(x)
    return out, {t: loss(out, y) for t, loss in tasks.items()}


@pytest.mark.parametrize("name", AGGREGATORS)
def test_an_aggregator_gives_the_grads_of_torchjd_mtl_backward(name):
    split, tasks, x, y = _split()
    twin = copy.deepcopy(split)
    monitor = fxsplit.ConflictMonitor(split, tasks, aggregator=AGGREGATORS[name]())
    torch.manual_seed(1)  # PCGrad draws task orders
    monitor.backward(_losses(split, tasks, x, y)[1])
    out, losses = _losses(twin, tasks, x, y)
    shared = list(twin.shared_parameters())
    torch.manual_seed(1)
    mtl_backward(list(losses.values()), features=list(out.values()), shared_params=shared, retain_graph=True,
                 tasks_params=[list(twin.task_parameters(t)) for t in twin.tasks])
    jac_to_grad(shared, AGGREGATORS[name]())
    for (key, p), q in zip(split.named_parameters(), twin.parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=key)  # torchjd's own tests' tolerance
    assert monitor.report().steps == 1


def test_the_aggregator_changes_only_the_shared_parameters_update():
    split, tasks, x, y = _split()
    summed = copy.deepcopy(split)
    fxsplit.ConflictMonitor(split, tasks, aggregator="UPGrad").backward(_losses(split, tasks, x, y)[1])
    fxsplit.ConflictMonitor(summed, tasks).backward(_losses(summed, tasks, x, y)[1])
    owners = split.parameter_tasks()
    changed = {key for (key, p), q in zip(split.named_parameters(), summed.parameters())
               if not torch.allclose(p.grad, q.grad, rtol=1e-12, atol=1e-14)}
    assert changed and all(len(owners[key]) > 1 for key in changed)


def test_an_aggregator_under_a_grad_scaler_sees_the_unscaled_jacobian():
    split, tasks, x, y = _split(torch.float32)
    plain = copy.deepcopy(split)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    fxsplit.ConflictMonitor(split, tasks, aggregator=MGDA(), scaler=scaler).backward(_losses(split, tasks, x, y)[1])
    scaler.unscale_(torch.optim.SGD(split.parameters(), lr=0.1))
    fxsplit.ConflictMonitor(plain, tasks, aggregator=MGDA()).backward(_losses(plain, tasks, x, y)[1])
    for p, q in zip(split.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_aggregators_by_name_and_bad_names():
    split, tasks, x, y = _split()
    by_name = copy.deepcopy(split)
    torch.manual_seed(1)
    fxsplit.ConflictMonitor(split, tasks, aggregator=UPGrad()).backward(_losses(split, tasks, x, y)[1])
    fxsplit.ConflictMonitor(by_name, tasks, aggregator="UPGrad").backward(_losses(by_name, tasks, x, y)[1])
    for p, q in zip(split.parameters(), by_name.parameters()):
        assert torch.equal(p.grad, q.grad)
    with pytest.raises(fxsplit.FxsplitError, match=r"torchjd has no aggregator 'UpGrad'; it has \[.*'UPGrad'"):
        fxsplit.ConflictMonitor(split, tasks, aggregator="UpGrad")
    with pytest.raises(fxsplit.FxsplitError, match="must be a torchjd aggregator"):
        fxsplit.ConflictMonitor(split, tasks, aggregator=3)
    with pytest.raises(fxsplit.FxsplitError, match=r"torchjd's CAGrad cannot be built from its name alone .*'c'.*"
                       r"aggregator=torchjd.aggregation.CAGrad\(...\)"):
        fxsplit.ConflictMonitor(split, tasks, aggregator="CAGrad")


def test_without_torchjd_fxsplit_imports_and_monitors_and_says_what_to_install():
    script = """
import sys
sys.modules["torchjd"] = None  # as if it were not installed
import torch, fxsplit
net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
monitor = fxsplit.ConflictMonitor(net, ["a", "b"])
out = net(torch.randn(5, 3))
monitor.backward({"a": out[:, 0].sum(), "b": out[:, 1].sum()})
print(monitor.report().steps)
try:
    fxsplit.ConflictMonitor(net, ["a", "b"], aggregator="UPGrad")
except fxsplit.FxsplitError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "1", "the aggregator 'UPGrad' comes from torchjd, which is not installed: pip install 'fxsplit[methods]'"]
