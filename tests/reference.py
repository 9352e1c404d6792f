"""What fxsplit's results are checked against: the plain loop that ``fxsplit.analyze`` must agree with (per step,
each task's gradient by its own ``autograd.grad``, each layer's weight and bias as one vector, the cosine of every
task pair); the relative error by which a rewrite's output may differ from the original's; and the per-task
contract of a split whose copies trained apart (``assert_per_task``), written independently of fxsplit's own check."""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Mapping

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


def perturb_copies(split, scale: float = 0.1, seed: int = 0) -> None:
    """Move every task's copies apart (in place): each copied parameter gets its own noise, ``scale`` times its
    root mean square (or ``scale`` / 10 where it is all zeros), as if the copies had trained apart."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in split.named_parameters():
            if name.startswith("copies.") and parameter.is_floating_point():
                rms = parameter.double().pow(2).mean().sqrt().item()
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.add_((noise * (scale * rms if rms > 0 else scale / 10)).to(parameter.dtype))


def held_as(split, task: str):
    """Model name -> the name under which ``split`` holds what task ``task`` computes with: the copy of the group
    serving ``task`` (found through the split's records: its ``groups`` and ``holder``) where there is one."""
    holders = [split.holder(task, layer) for layer, groups in split.groups.items()
               if any(task in group for group in groups)]
    names = {*split.state_dict(keep_vars=True), *dict(split.named_parameters(remove_duplicate=False))}

    def name_in_split(name: str) -> str:
        return next((f"copies.{holder}.{name}" for holder in holders if f"copies.{holder}.{name}" in names), name)
    return name_in_split


def task_model(model, split, task: str):
    """A copy of the original ``model`` holding what task ``task`` computes with in ``split``: its (group's)
    copies in place of the split layers, the split's shared tensors everywhere else."""
    reference = copy.deepcopy(model)
    state = split.state_dict()
    own = reference.state_dict()
    name_in_split = held_as(split, task)
    reference.load_state_dict({name: state.get(name_in_split(name), value) for name, value in own.items()})
    return reference


def leaves(output) -> list:
    """The leaves of ``output``, a dataclass's fields among them (pytree takes a dataclass for one leaf)."""
    if dataclasses.is_dataclass(output) and not isinstance(output, Mapping):
        return [leaf for field in dataclasses.fields(output) for leaf in leaves(getattr(output, field.name))]
    return torch.utils._pytree.tree_leaves(output)


def probe(output) -> torch.Tensor:
    """A fixed linear function of every floating-point tensor in ``output``: what gradients are compared on."""
    tensors = [x for x in leaves(output) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    generator = torch.Generator().manual_seed(1234)
    return sum((x.double() * torch.randn(x.shape, generator=generator, dtype=torch.float64)).sum() for x in tensors)


def assert_per_task(model, split, args: tuple, outputs: dict | None = None, tolerance: float = 1e-5,
                    modes=(False, True), kwargs: dict | None = None) -> None:
    """The contract after the copies train apart: with every copy perturbed independently, each task's output of
    ``split``, and its gradients with respect to every parameter, equal those of the original model with that
    task's copies (or its group's) loaded (``task_model``), in each mode; no task's gradient reaches a parameter
    the task does not compute with.

    ``outputs`` maps tasks to output keys as rewrite takes them (default: the output is keyed by task); ``kwargs``
    are keyword inputs of the call. Works on copies: neither model changes.
    """
    split = copy.deepcopy(split)
    perturb_copies(split)
    keys = outputs or {task: task for task in split.tasks}
    split_names = dict(split.named_parameters(remove_duplicate=False))
    for training in modes:
        for task in split.tasks:
            name_in_split = held_as(split, task)
            reference = task_model(model, split, task).train(training)
            split.train(training).zero_grad(set_to_none=True)
            torch.manual_seed(0)
            expected = _select(reference(*copy.deepcopy(args), **copy.deepcopy(kwargs or {})), keys[task])
            torch.manual_seed(0)
            got = split(*copy.deepcopy(args), **copy.deepcopy(kwargs or {}))[task]
            assert torch.utils._pytree.tree_structure(got) == torch.utils._pytree.tree_structure(expected), task
            assert type(got) is type(expected) and len(leaves(got)) == len(leaves(expected)), task
            for e, g in zip(leaves(expected), leaves(got)):
                assert e.shape == g.shape and e.dtype == g.dtype, (task, e.shape, g.shape)
                assert relative_error(e.double(), g.double()) <= tolerance, (task, training)
            probe(expected).backward()
            probe(got).backward()
            pairs = {}
            for name, p in reference.named_parameters(remove_duplicate=False):
                twin = split_names.get(name_in_split(name))
                if twin is not None:
                    assert (p.grad is None) == (twin.grad is None), (task, name, p.grad is None)
                    if p.grad is not None:
                        pairs[name] = (p.grad.double(), twin.grad.double())
            whole = sum(e.pow(2).sum() for e, _ in pairs.values()).sqrt().item() if pairs else 0.0
            for name, (e, g) in pairs.items():  # a gradient that is zero but for rounding is measured by the whole
                scale = max(e.norm().item(), 1e-3 * whole, 1e-12)
                assert (e - g).norm().item() <= 10 * tolerance * scale, (task, name, training)
            reached = {id(split_names.get(name_in_split(name))) for name in pairs}
            strays = [name for name, p in split.named_parameters() if p.grad is not None and id(p) not in reached]
            assert not strays, (task, training, strays)


def _select(output, key):
    """The part of ``output`` at ``key`` (one key or a tuple of them): a field name reads a dataclass or a
    namedtuple by attribute. A list of keys names several parts: the output pruned to them."""
    if isinstance(key, list):
        return _pruned(output, [part if isinstance(part, tuple) else (part,) for part in key])
    for part in key if isinstance(key, tuple) else (key,):
        by_name = isinstance(part, str) and not isinstance(output, Mapping)
        output = getattr(output, part) if by_name else output[part]
    return output


def _pruned(output, paths: list[tuple]):
    """``output`` with only the parts at ``paths``: other keys of a mapping left out, other elements of a tuple or a
    list ``None``."""
    if () in paths:
        return output
    firsts = {path[0] for path in paths}

    def rest(key):
        return [path[1:] for path in paths if path[0] == key]

    if isinstance(output, Mapping):
        return {key: _pruned(value, rest(key)) for key, value in output.items() if key in firsts}
    return type(output)(_pruned(value, rest(i)) if i in firsts else None for i, value in enumerate(output))
