"""MultiDigits: the MultiMNIST recipe on scikit-learn's bundled 8x8 digits, a small multi-task data set.

Each image overlays two digits from ``sklearn.datasets.load_digits()`` (1,797 images, 8x8, values 0..16) on
one canvas of ``H x W`` pixels: the *left* digit with its left edge at column 0, the *right* digit with its
left edge at column ``W - 8`` (so they overlap by ``16 - W`` columns when ``W < 16``). Each digit's top row is
drawn uniformly from ``0 .. H - 8`` (vertical jitter; none when ``H == 8``). Where they overlap the two
digits combine by pixel-wise maximum, as in MultiMNIST. The tasks are the class of the left digit and the
class of the right digit; the two digits are drawn independently from the same pool, so the labels are
independent.

Optional third task, ``"higher"``: which digit sits higher on the canvas (0: the left one, 1: level,
2: the right one; about 40/20/40 % on a 12-row canvas). It is independent of both classes, so features that
recognise digits cannot solve it, and it needs exactly the position information that the class tasks learn to
ignore; a task derived from the classes (parity, sum, comparison) shares all its features with them and so
gives little to disagree on.

Train and test images come from disjoint source images: the 1,797 digits are split once, stratified by
class and independently of ``seed``, into a train pool (80 %) and a test pool (20 %), and pairs are only
composed within a pool. Needs scikit-learn (it only loads the digits).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MultiDigits", "higher_label", "source_pools"]

DIGIT_SIZE = 8
MAX_PIXEL = 16  # load_digits' pixel values are counts 0..16 of the 4x4 blocks set in the original 32x32 bitmap
TEST_FRACTION = 0.2
_POOL_SEED = 0  # fixed, not the dataset's seed: every MultiDigits shares the same disjoint pools
_DEFAULT_SIZES = {"train": 8000, "test": 2000}
_SPLITS = ("train", "test")


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 source digits as (uint8 images (1797, 8, 8) with values 0..16, int64 labels (1797,))."""
    try:
        from sklearn.datasets import load_digits  # lazy: scikit-learn is only needed for this data set
    except ImportError as error:
        raise ImportError("MultiDigits needs scikit-learn: pip install scikit-learn") from error
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # cached and shared: nobody may change them
    return images, labels


def source_pools() -> dict[str, torch.Tensor]:
    """The disjoint pools of source-digit indices (into ``load_digits()``) that each split draws from.

    Stratified: per class, a fixed random 20 % goes to ``"test"`` and the rest to ``"train"``. Both are
    sorted LongTensors and together cover every source digit once.

    >>> pools = source_pools()
    >>> len(pools["train"]), len(pools["test"])
    (1438, 359)
    """
    _, labels = _load_digits()
    rng = np.random.default_rng(_POOL_SEED)
    test = []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        test.append(members[: round(TEST_FRACTION * len(members))])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.concatenate(test)] = True
    return {"train": torch.from_numpy(np.flatnonzero(~is_test)), "test": torch.from_numpy(np.flatnonzero(is_test))}


class MultiDigits(Dataset):
    """Pairs of overlaid digits; item ``i`` is ``(image, target)``.

    ``image`` is a float32 tensor ``(1, H, W)`` with values in ``[0, 1]``: source pixels divided by 16, no
    mean or std subtracted. ``target`` is a LongTensor ``[left, right]`` of digit classes, with a third entry
    ``higher`` (0: left digit higher, 1: level, 2: right digit higher) when ``third_task=True``.

    The whole set is built at construction and kept in memory, in attributes that also show how it was made:

    - ``images``: float32 ``(N, 1, H, W)``; ``targets``: int64 ``(N, T)``
    - ``sources``: int64 ``(N, 2)``, indices into ``load_digits()`` of the left and right digit
    - ``rows``: int64 ``(N, 2)``, the canvas row of the top edge of the left and right digit
    - ``pool``: the source indices this split draws from (see :func:`source_pools`)

    Args:
        split: ``"train"`` or ``"test"``; they draw from disjoint source digits.
        size: number of images; default 8,000 for train and 2,000 for test.
        seed: the same arguments give bit-identical data, another seed other pairs and placements.
        canvas: ``(H, W)`` with ``H >= 8`` and ``W >= 8``; default 12x12, so the digits overlap by 4 columns.
        third_task: add the ``"higher"`` task (needs ``H > 8``, else both digits always sit level).

    >>> train = MultiDigits("train", size=100, third_task=True)
    >>> image, target = train[0]
    >>> len(train), image.shape, image.dtype, target.dtype, target.shape
    (100, torch.Size([1, 12, 12]), torch.float32, torch.int64, torch.Size([3]))
    >>> train.tasks, train.classes
    (('left', 'right', 'higher'), {'left': 10, 'right': 10, 'higher': 3})
    """

    def __init__(self, split: str = "train", size: int | None = None, seed: int = 0,
                 canvas: tuple[int, int] = (12, 12), third_task: bool = False):
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'test', not {split!r}")
        size = _DEFAULT_SIZES[split] if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, not {size!r}")
        height, width = canvas
        if height < DIGIT_SIZE or width < DIGIT_SIZE:
            raise ValueError(f"canvas must be at least {DIGIT_SIZE}x{DIGIT_SIZE} to hold a digit, not {height}x{width}")
        if third_task and height == DIGIT_SIZE:
            raise ValueError("third_task needs a canvas taller than 8 rows: otherwise both digits always sit level")

        self.split, self.seed, self.canvas = split, seed, (height, width)
        self.tasks = ("left", "right", "higher") if third_task else ("left", "right")
        self.classes = {"left": 10, "right": 10, "higher": 3} if third_task else {"left": 10, "right": 10}
        self.pool = source_pools()[split]

        # One stream per (seed, split), so train and test with the same seed are not drawn alike.
        rng = np.random.default_rng([seed, _SPLITS.index(split)])
        sources = self.pool.numpy()[rng.integers(len(self.pool), size=(size, 2))]  # left, right independent
        rows = rng.integers(height - DIGIT_SIZE + 1, size=(size, 2))
        images, labels = _load_digits()

        self.sources = torch.from_numpy(sources)
        self.rows = torch.from_numpy(rows)
        self.images = _compose(torch.from_numpy(images[sources]), self.rows, height, width).unsqueeze(1)
        targets = [torch.from_numpy(labels[sources])]
        if third_task:
            targets.append(higher_label(self.rows).unsqueeze(1))
        self.targets = torch.cat(targets, dim=1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.targets[index]

    def __repr__(self) -> str:
        return (f"MultiDigits(split={self.split!r}, size={len(self)}, seed={self.seed}, canvas={self.canvas}, "
                f"tasks={self.tasks})")


def higher_label(rows: torch.Tensor) -> torch.Tensor:
    """The ``"higher"`` label from top rows ``(N, 2)`` (left, right): 0 left digit higher, 1 level, 2 right higher.

    >>> higher_label(torch.tensor([[0, 3], [2, 2], [4, 1]])).tolist()
    [0, 1, 2]
    """
    return torch.sign(rows[:, 0] - rows[:, 1]) + 1  # a smaller top row sits higher


def _compose(digits: torch.Tensor, rows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Overlay ``digits`` (N, 2, 8, 8) (left, right; 0..16) at ``rows`` on (N, H, W) canvases scaled to [0, 1]."""
    n = len(digits)
    offsets = torch.arange(DIGIT_SIZE)
    layers = torch.zeros(2, n, height, width)
    for side, first_column in enumerate((0, width - DIGIT_SIZE)):
        row_index = (rows[:, side, None] + offsets)[:, :, None]  # (N, 8, 1)
        column_index = (first_column + offsets)[None, None, :]  # (1, 1, 8)
        layers[side, torch.arange(n)[:, None, None], row_index, column_index] = digits[:, side].float()
    # Dividing by 16 (a power of two) is exact, so the max of scaled digits equals the scaled max.
    return torch.maximum(layers[0], layers[1]) / MAX_PIXEL
