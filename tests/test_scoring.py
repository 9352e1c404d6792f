"""The scoring stage's parts together (gradient rows -> scored layers -> counter) against a direct computation, over
random layouts of parameters into layers."""

import itertools

import networkx as nx
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from fxsplit.scoring.counter import ConflictCounter
from fxsplit.scoring.rows import GradientRows
from fxsplit.scoring.scope import ScoredLayers

SHAPES = [(), (3,), (4,), (3, 4), (2, 4), (5, 4), (2, 3, 2), (1, 3, 2)]
THRESHOLDS = [0.0, -0.3, 0.4]


@st.composite
def layouts(draw):
    """Parameter shapes, layers (lists of parameter indices; a parameter may sit in two layers, as a tied one
    does), per step and task the gradients (``None`` where the task's loss does not reach), and per step which tasks
    have a loss."""
    tasks = draw(st.integers(2, 4))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=8))
    owner = draw(st.lists(st.integers(0, 3), min_size=len(shapes), max_size=len(shapes)))
    layers = [sorted({i for i, o in enumerate(owner) if o == k}) for k in range(4)]
    layers = [layer for layer in layers if layer]
    if draw(st.booleans()) and len(layers) > 1:
        layers[1].append(layers[0][0])  # a tied parameter: one tensor in two layers
    reached = draw(st.lists(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)),
                            min_size=tasks, max_size=tasks))
    seed = draw(st.integers(0, 2**16))
    present = draw(st.lists(st.lists(st.booleans(), min_size=tasks, max_size=tasks), min_size=2, max_size=2))
    return tasks, shapes, layers, reached, seed, present


def _gradients(shapes, reached, generator):
    return [[torch.randn(shape, generator=generator, dtype=torch.float64) if r else None
             for shape, r in zip(shapes, task)] for task in reached]


def _expected(layers, grads, shapes, tasks):
    """Per layer (of those two tasks reach), the cosine of every pair of its tasks, by F.cosine_similarity."""
    cosines = {}
    for k, params in enumerate(layers):
        users = [t for t in range(tasks) if any(grads[t][i] is not None for i in params)]
        if len(users) < 2:
            continue
        vector = {t: torch.cat([(grads[t][i] if grads[t][i] is not None else torch.zeros(shapes[i],
                                dtype=torch.float64)).reshape(-1) for i in params]) for t in users}
        cosines[k] = {(a, b): F.cosine_similarity(vector[a], vector[b], dim=0).item()
                      for a, b in itertools.combinations(users, 2)}
    return cosines


@given(layouts())
def test_counts_equal_direct_cosines_over_random_layer_layouts(layout):
    tasks, shapes, layers, reached, seed, present = layout
    generator = torch.Generator().manual_seed(seed)
    params = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
    graph = nx.DiGraph()
    for k, layer in enumerate(layers):
        graph.add_node(f"layer{k}", parameters=[f"p{i}" for i in layer])
    rows = GradientRows(params, tasks)
    names = [f"t{t}" for t in range(tasks)]
    scope = ScoredLayers(graph, {f"p{i}": i for i in range(len(params))}, names, reached)
    counter = ConflictCounter(scope.reach_matrix(torch.device("cpu")), THRESHOLDS)
    layer_grams = scope.gram(rows.slot, torch.float64, torch.device("cpu"))
    expected = []
    for step in range(2):
        grads = _gradients(shapes, reached, generator)
        for t in range(tasks):
            rows.store(t, grads[t])
        if step == 1:  # a second micro-batch, added to the first (gradient accumulation)
            more = _gradients(shapes, reached, generator)
            for t in range(tasks):
                rows.add(t, more[t])
            grads = [[None if a is None else a + b for a, b in zip(g, m)] for g, m in zip(grads, more)]
        counter.update(layer_grams(rows.grams()), torch.tensor(True), counter.pairs_of(torch.tensor(present[step])))
        expected.append(_expected(layers, grads, shapes, tasks))
        shared = sorted({i for k, layer in enumerate(layers) if k in expected[-1] for i in layer})
        whole = _expected([shared], grads, shapes, tasks).get(0, {}) if shared else {}
        for p, pair in enumerate(itertools.combinations(range(tasks), 2)):
            assert abs(counter.whole[-1][p].item() - whole.get(pair, 0.0)) < 1e-12
    scored = [k for k in range(len(layers)) if k in expected[0]]
    assert scope.layers == [f"layer{k}" for k in scored]
    tally = counter.tally()
    pairs = list(itertools.combinations(range(tasks), 2))
    both = [[present[step][a] and present[step][b] for a, b in pairs] for step in range(2)]
    assert tally.pair_steps.tolist() == [sum(step[p] for step in both) for p in range(len(pairs))]
    for row, k in enumerate(scored):
        for p, pair in enumerate(pairs):
            cosines = [step[k][pair] for step, counted in zip(expected, both) if pair in step[k] and counted[p]]
            for s, threshold in enumerate(THRESHOLDS):
                assert tally.counts[s, row, p].item() == sum(c < threshold for c in cosines)
            assert abs(tally.cosine_sum[row, p].item() - sum(cosines)) < 1e-12
        assert tally.histogram[row].sum().item() == sum(counted[pairs.index(pair)] for counted in both
                                                       for pair in expected[0][k])
