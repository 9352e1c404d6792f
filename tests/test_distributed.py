"""The monitor under torch.distributed: two gloo processes spawned once for the module (seconds), their results
compared with one process on the whole batches."""

import contextlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fxsplit
from tests.models import MultiHead, Twice

WORLD = 2
STEPS = 3


def _model():
    torch.manual_seed(0)
    return MultiHead(Twice(), 8, tasks="abc").double()  # no BatchNorm: a batch split over ranks computes the same


def _split():
    return fxsplit.rewrite(_model(), ["backbone.mid"])


def _tasks():
    return {t: (lambda t, i: lambda out, y: (out[t].sum(1) - y[:, i]).pow(2).mean())(t, i) for i, t in enumerate("abc")}


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=generator, dtype=torch.float64),
             torch.randn(8, 3, generator=generator, dtype=torch.float64)) for _ in range(STEPS)]


def _share(batch, rank, world=WORLD):
    return tuple(t.chunk(world)[rank] for t in batch)


def _train(model, batches, monitor=None, forward=None):
    """SGD steps on the tasks' summed loss (or the monitor's update); the model's state after them."""
    tasks = _tasks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for x, y in batches:
        out = (forward or model)(x)
        losses = {t: loss(out, y) for t, loss in tasks.items()}
        if monitor is None:
            sum(losses.values()).backward()
        else:
            monitor.backward(losses)
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, path, folder):
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    shares = [_share(batch, rank) for batch in _batches()]
    model = _model()
    graph = fxsplit.layer_graph(model)
    monitor = fxsplit.ConflictMonitor(model, _tasks(), graph=graph, threshold=[0.0, -0.1])
    results["global"] = (_train(model, shares, monitor), monitor.report().to_dict())
    model = _model()
    monitor = fxsplit.ConflictMonitor(model, _tasks(), graph=graph, distributed="local")
    for x, y in shares:
        out = model(x)
        monitor.backward({t: loss(out, y) for t, loss in _tasks().items()})
        results.setdefault("local grads", {k: p.grad.clone() for k, p in model.named_parameters()})
        model.zero_grad()
    results["local"] = monitor.report().to_dict()
    split = _split()
    ddp = nn.parallel.DistributedDataParallel(split)
    monitor = fxsplit.ConflictMonitor(ddp, _tasks(), graph=fxsplit.layer_graph(split), aggregator="UPGrad")
    results["ddp monitor upgrad"] = (_train(split, shares, monitor, forward=ddp), monitor.report().to_dict())
    split = _split()
    results["split under ddp"] = _train(split, shares, forward=nn.parallel.DistributedDataParallel(split))
    x, y = shares[0]
    for sync in (True, False):  # a fresh DDP each: a forward whose backward never ran leaves DDP expecting one
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)
        monitor = fxsplit.ConflictMonitor(ddp, _tasks(), graph=graph)
        with contextlib.nullcontext() if sync else ddp.no_sync():
            out = ddp(x)
            try:
                for k, (task, loss) in enumerate(_tasks().items()):
                    with monitor.task(task):
                        loss(out, y).backward(retain_graph=k < 2)
            except fxsplit.ScoringError as error:
                results["hooks without no_sync"] = str(error)
    results["hooks under no_sync"] = {k: p.grad for k, p in model.named_parameters()}
    from torch.distributed.fsdp import fully_shard

    split = fully_shard(_split())
    results["split under fsdp2"] = {k: v.full_tensor() for k, v in _train(split, shares).items()}
    try:
        fxsplit.ConflictMonitor(split, _tasks(), graph=graph)
    except fxsplit.ScoringError as error:
        results["fsdp2 monitor"] = str(error)
    model = _model()
    with torch.no_grad():
        model.heads.b.bias.add_(rank)  # ranks that start apart
    try:
        fxsplit.ConflictMonitor(model, _tasks(), graph=graph)
    except fxsplit.ScoringError as error:
        results["different parameters"] = str(error)
    dist.destroy_process_group()
    torch.save(results, f"{folder}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the two processes computed."""
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(str(folder / "rendezvous"), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(WORLD)]


def _assert_states_close(states, expected):
    for state in states:
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, rtol=1e-10, atol=1e-12, msg=key)


def _one_process(model, monitor_options=None, forward=None):
    monitor = None if monitor_options is None else fxsplit.ConflictMonitor(model, _tasks(), **monitor_options)
    state = _train(model, _batches(), monitor, forward)
    return state, None if monitor is None else monitor.report().to_dict()


def test_global_scores_and_training_are_one_process_on_the_whole_batch(ranks):
    state, report = _one_process(_model(), dict(threshold=[0.0, -0.1]))
    for rank_state, rank_report in (r["global"] for r in ranks):
        assert rank_report["counts"] == report["counts"] and rank_report["steps"] == STEPS
        for got, expected in zip(rank_report["whole_cosine"], report["whole_cosine"]):
            assert got == pytest.approx(expected, rel=1e-9)
    _assert_states_close([r["global"][0] for r in ranks], state)


def test_local_scores_sum_the_ranks_and_grads_are_the_mean_over_ranks(ranks):
    model = _model()
    monitor = fxsplit.ConflictMonitor(model, _tasks())
    for batch in _batches():
        for rank in range(WORLD):
            x, y = _share(batch, rank)
            out = model(x)
            monitor.backward({t: loss(out, y) for t, loss in _tasks().items()}, update_grad=False)
    expected = monitor.report().to_dict()
    x, y = _batches()[0]
    out = model(x)
    sum(loss(out, y) for loss in _tasks().values()).backward()
    for r in ranks:
        assert r["local"]["counts"] == expected["counts"] and r["local"]["steps"] == WORLD * STEPS
        for got, want in zip(sorted(r["local"]["whole_cosine"]), sorted(expected["whole_cosine"])):
            assert got == pytest.approx(want, rel=1e-9)
        for key, p in model.named_parameters():
            torch.testing.assert_close(r["local grads"][key], p.grad, rtol=1e-10, atol=1e-12, msg=key)


def test_a_ddp_wrapped_split_model_with_an_aggregator_trains_like_one_process(ranks):
    split = _split()
    state, report = _one_process(split, dict(aggregator="UPGrad"))
    for rank_state, rank_report in (r["ddp monitor upgrad"] for r in ranks):
        assert rank_report["counts"] == report["counts"]
        for key, value in state.items():
            torch.testing.assert_close(rank_state[key], value, msg=key)  # torchjd's tolerance: a QP solver inside
    first, second = (r["ddp monitor upgrad"][0] for r in ranks)
    assert all(torch.equal(first[key], value) for key, value in second.items())  # the ranks agree bit for bit


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
def test_a_split_model_trains_under_ddp_and_fsdp2_unchanged(ranks, wrapper):
    state, _ = _one_process(_split())
    _assert_states_close([r[f"split under {wrapper}"] for r in ranks], state)


def test_hook_style_under_ddp_needs_no_sync_and_then_gives_the_global_gradient(ranks):
    model = _model()
    x, y = _batches()[0]
    out = model(x)
    sum(loss(out, y) for loss in _tasks().values()).backward()
    for r in ranks:
        assert "inside model.no_sync()" in r["hooks without no_sync"]
        for key, p in model.named_parameters():
            torch.testing.assert_close(r["hooks under no_sync"][key], p.grad, rtol=1e-10, atol=1e-12, msg=key)


def test_the_monitor_refuses_fsdp2_sharded_parameters_and_says_why(ranks):
    for r in ranks:
        assert "parameters are sharded DTensors" in r["fsdp2 monitor"] and "Score under Distributed" in \
            r["fsdp2 monitor"]


def test_ranks_that_start_from_different_parameters_are_refused(ranks):
    for r in ranks:
        assert "the 2 processes start from different parameters (1 differ, e.g. 'heads.b.bias')" in \
            r["different parameters"]
