"""MultiDigits: shapes, determinism, disjoint splits, exact overlay, label independence, learnability."""

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402

from fxsplit import datasets  # noqa: E402
from fxsplit.datasets import MultiDigits, source_pools  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    """The source digits, loaded independently of fxsplit: (images (1797, 8, 8) float, labels (1797,))."""
    source = load_digits()
    return torch.from_numpy(source.images).float(), torch.from_numpy(source.target).long()


@pytest.fixture(scope="module")
def train():
    return MultiDigits("train", third_task=True)


@pytest.fixture(scope="module")
def test():
    return MultiDigits("test", third_task=True)


@pytest.mark.parametrize("canvas", [(12, 12), (8, 8), (10, 14), (12, 20)])
def test_shapes_dtypes_and_ranges(canvas):
    data = MultiDigits("train", size=64, seed=3, canvas=canvas)
    image, target = data[5]
    assert len(data) == 64
    assert image.shape == (1, *canvas) and image.dtype == torch.float32
    assert target.shape == (2,) and target.dtype == torch.int64
    assert data.images.shape == (64, 1, *canvas) and data.targets.shape == (64, 2)
    assert data.images.min() == 0 and data.images.max() == 1
    assert ((data.targets >= 0) & (data.targets < 10)).all()
    assert data.tasks == ("left", "right") and data.classes == {"left": 10, "right": 10}


def test_default_sizes_and_third_task_labels_in_range(train, test):
    assert (len(train), len(test)) == (8000, 2000)
    assert train.targets.shape == (8000, 3)
    for k, task in enumerate(train.tasks):
        assert train.targets[:, k].min() == 0 and train.targets[:, k].max() == train.classes[task] - 1


def test_same_seed_is_bit_identical_and_another_seed_differs():
    first, again = MultiDigits("train", size=500, seed=7), MultiDigits("train", size=500, seed=7)
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    assert torch.equal(first.sources, again.sources) and torch.equal(first.rows, again.rows)
    other = MultiDigits("train", size=500, seed=8)
    assert not torch.equal(first.images, other.images)
    assert not torch.equal(first.targets, other.targets)


def test_train_and_test_use_disjoint_source_digits_for_any_seeds():
    pools = source_pools()
    assert len(pools["train"]) + len(pools["test"]) == 1797
    assert not set(pools["train"].tolist()) & set(pools["test"].tolist())
    train_sources = torch.cat([MultiDigits("train", size=2000, seed=s).sources.flatten() for s in (0, 1)])
    test_sources = torch.cat([MultiDigits("test", size=2000, seed=s).sources.flatten() for s in (0, 2)])
    assert set(train_sources.tolist()) <= set(pools["train"].tolist())
    assert set(test_sources.tolist()) <= set(pools["test"].tolist())
    assert not set(train_sources.tolist()) & set(test_sources.tolist())


def test_test_pool_is_a_stratified_fifth(digits):
    _, labels = digits
    test_share = torch.bincount(labels[source_pools()["test"]], minlength=10) / torch.bincount(labels)
    assert ((test_share - 0.2).abs() < 0.01).all()


@pytest.mark.parametrize("canvas", [(12, 12), (12, 16), (9, 10)])
def test_image_is_the_max_overlay_of_its_two_placed_digits(digits, canvas):
    images, labels = digits
    data = MultiDigits("test", size=50, seed=1, canvas=canvas)
    height, width = canvas
    for i in range(len(data)):
        (left, right), (left_row, right_row) = data.sources[i].tolist(), data.rows[i].tolist()
        left_canvas, right_canvas = torch.zeros(height, width), torch.zeros(height, width)
        left_canvas[left_row:left_row + 8, 0:8] = images[left]
        right_canvas[right_row:right_row + 8, width - 8:width] = images[right]
        expected = torch.maximum(left_canvas, right_canvas) / 16
        assert torch.equal(data.images[i, 0], expected)
        assert data.targets[i].tolist() == [labels[left].item(), labels[right].item()]


def test_vertical_jitter_covers_every_row_the_canvas_allows(train):
    assert set(train.rows.flatten().tolist()) == {0, 1, 2, 3, 4}
    assert torch.equal(MultiDigits("train", size=100, canvas=(8, 12)).rows, torch.zeros(100, 2, dtype=torch.long))


def test_left_and_right_labels_are_independent(train):
    left, right = train.targets[:, 0], train.targets[:, 1]
    assert abs((left == right).float().mean().item() - 0.1) < 0.02
    # And the joint distribution is close to the product of its marginals (not just on the diagonal).
    joint = torch.bincount(left * 10 + right, minlength=100).float().view(10, 10) / len(train)
    product = torch.outer(torch.bincount(left, minlength=10).float(), torch.bincount(right, minlength=10).float())
    assert (joint - product / len(train) ** 2).abs().max() < 0.01


def test_third_task_says_which_digit_sits_higher(train):
    left_row, right_row = train.rows[:, 0], train.rows[:, 1]
    expected = torch.where(left_row < right_row, 0, torch.where(left_row == right_row, 1, 2))
    assert torch.equal(train.targets[:, 2], expected)
    assert torch.equal(train.targets[:, :2], MultiDigits("train").targets)  # the third task changes nothing else
    assert set(expected.tolist()) == {0, 1, 2}


def test_every_task_is_learnable_by_a_linear_model():
    # A ridge-regression classifier on one-hot targets: one linear solve, so it stays fast on a busy CPU
    # (an iterative fit's many small steps can crawl there under thread contention).
    train, test = MultiDigits("train", size=1500, third_task=True), MultiDigits("test", size=500, third_task=True)

    def features(data):
        return torch.cat([data.images.flatten(1), torch.ones(len(data), 1)], dim=1).double()  # pixels and a bias

    x, x_test = features(train), features(test)
    for k, task in enumerate(train.tasks):
        one_hot = F.one_hot(train.targets[:, k], train.classes[task]).double()
        weights = torch.linalg.solve(x.T @ x + torch.eye(x.shape[1], dtype=x.dtype), x.T @ one_hot)
        accuracy = ((x_test @ weights).argmax(1) == test.targets[:, k]).double().mean().item()
        majority = torch.bincount(test.targets[:, k]).max().item() / len(test)
        assert accuracy > majority + 0.2, (task, accuracy, majority)


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "val"}, "split"),
    ({"size": 0}, "size"),
    ({"size": 2.5}, "size"),
    ({"canvas": (7, 12)}, "canvas"),
    ({"canvas": (8, 12), "third_task": True}, "taller"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiDigits(**kwargs)


def test_missing_scikit_learn_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    datasets._load_digits.cache_clear()
    try:
        with pytest.raises(ImportError, match="MultiDigits needs scikit-learn: pip install scikit-learn"):
            MultiDigits("train", size=10)
    finally:
        datasets._load_digits.cache_clear()
