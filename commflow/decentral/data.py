"""Data: scikit-learn's bundled digits, split into a held-out test set and node shards.

The digits set (1,797 8x8 grey images, 10 classes) ships inside scikit-learn, so
nothing is downloaded. Pixels 0..16 are scaled to 0..1 (a fixed scale, so no statistic
of the test set leaks into training). The test set is stratified and shared: every node
is scored on the same held-out images.

The training set is partitioned over the *data-holding* nodes only; relay-only nodes
get an empty shard. Two partitions:

* ``iid``: shuffle, then cut into equal parts (sizes differ by at most one);
* ``dirichlet``: for each class, draw the share of each holder from Dirichlet(alpha)
  (Hsu et al., 2019, "Measuring the effects of non-identical data distribution");
  small alpha means each node sees few classes. A holder may get no samples at all.

Both depend only on ``(seed, holders)``, through the ``"split"`` random stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .rng import stream

__all__ = ["Dataset", "SPLITS", "load_digits_dataset", "partition", "pad_partition"]

SPLITS = ("iid", "dirichlet")


@dataclass(frozen=True)
class Dataset:
    """Train and held-out test arrays (float64 features, int64 labels)."""

    x_train: np.ndarray
    """``[n_train, features]``"""
    y_train: np.ndarray
    """``[n_train]``"""
    x_test: np.ndarray
    """``[n_test, features]``"""
    y_test: np.ndarray
    """``[n_test]``"""
    num_classes: int

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def load_digits_dataset(*, seed: int, test_fraction: float = 0.25) -> Dataset:
    """Digits, stratified into train and test by the ``"split"`` stream of ``seed``."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    y = digits.target.astype(np.int64)
    state = int(stream(seed, "split", 0).integers(0, 2**31 - 1))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=state)
    return Dataset(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=int(y.max()) + 1)


def partition(
    labels: np.ndarray,
    *,
    num_nodes: int,
    holders: Sequence[int],
    split: str = "iid",
    alpha: float = 0.5,
    seed: int,
) -> list[np.ndarray]:
    """Indices into the training set for each of ``num_nodes`` nodes.

    Args:
        labels: ``[n_train]`` training labels.
        holders: the nodes that hold data (sorted order is used); the others get ``[]``.
        split: ``"iid"`` or ``"dirichlet"``.
        alpha: Dirichlet concentration (``split="dirichlet"`` only), > 0.

    Returns:
        ``num_nodes`` sorted int64 arrays; the holders' arrays partition ``range(n_train)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose from {SPLITS}")
    holders = sorted({int(h) for h in holders})
    if not holders:
        raise ValueError("holders is empty: at least one node must hold data")
    if holders[0] < 0 or holders[-1] >= num_nodes:
        raise ValueError(f"holders must be node ids in 0..{num_nodes - 1}, got {holders[0]}..{holders[-1]}")
    rng = stream(seed, "split", 1)
    shards: list[list[np.ndarray]] = [[] for _ in holders]
    if split == "iid":
        for k, part in enumerate(np.array_split(rng.permutation(len(labels)), len(holders))):
            shards[k].append(part)
    else:
        if not alpha > 0:
            raise ValueError(f"alpha={alpha} must be > 0 for split='dirichlet'")
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(len(holders), alpha))
            cuts = np.floor(np.cumsum(share)[:-1] * len(idx)).astype(np.int64)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
    out = [np.zeros(0, dtype=np.int64) for _ in range(num_nodes)]
    for k, node in enumerate(holders):
        out[node] = np.sort(np.concatenate(shards[k])).astype(np.int64)
    return out


def pad_partition(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(index [N, max_n] int64 padded with 0, counts [N] int64)``: the batched form of a partition."""
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    index = np.zeros((len(parts), max(1, int(counts.max(initial=0)))), dtype=np.int64)
    for i, p in enumerate(parts):
        index[i, : len(p)] = p
    return index, counts
