"""What fxsplit's results are checked against: the plain loop that ``fxsplit.analyze`` must agree with (per step,
each task's gradient by its own ``autograd.grad``, each layer's weight and bias as one vector, the cosine of every
task pair), and the relative error by which a rewrite's output may differ from the original's."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def reference_cosines(model, tasks, batches, graph, optimizer=None) -> dict[str, list[float]]:
    """Every layer's cosines, one per (step, pair of tasks that reach it); with ``optimizer``, each step also
    trains on the summed loss."""
    named = dict(model.named_parameters())
    names = list(named)
    cosines: dict[str, list[float]] = {}
    for batch in batches:
        out = model(batch[0])
        losses = {t: loss(out, batch) for t, loss in tasks.items()}
        grads = {t: dict(zip(names, torch.autograd.grad(v, list(named.values()), retain_graph=True,
                                                        allow_unused=True))) for t, v in losses.items()}
        for layer, params in graph.nodes(data="parameters"):
            users = [t for t in tasks if any(grads[t][p] is not None for p in params)]
            if len(users) < 2:
                continue
            vectors = {t: torch.cat([grads[t][p].reshape(-1) for p in params]) for t in users}
            cosines.setdefault(layer, []).extend(F.cosine_similarity(vectors[a], vectors[b], dim=0).item()
                                                 for a, b in itertools.combinations(users, 2))
        if optimizer is not None:
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    return cosines


def reference(model, tasks, batches, graph, thresholds, optimizer=None) -> dict[float, dict[str, int]]:
    """Recon's scores by the plain loop: for each threshold S, each layer's count of cosines < S."""
    cosines = reference_cosines(model, tasks, batches, graph, optimizer)
    return {S: {layer: sum(c < S for c in values) for layer, values in cosines.items()} for S in thresholds}


def relative_error(expected: torch.Tensor, got: torch.Tensor) -> float:
    """``|expected - got| / |expected|`` (Frobenius norms)."""
    return ((expected - got).norm() / expected.norm().clamp_min(1e-30)).item()
