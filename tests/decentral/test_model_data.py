"""Data partitions and the batched MLP against its single-node reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from commflow.decentral.data import load_digits_dataset, pad_partition, partition
from commflow.decentral.model import (
    MLPLayout,
    accuracy_batched,
    accuracy_single,
    batch_order,
    forward_batched,
    forward_single,
    init_node_params,
    init_params,
    sgd_epoch_batched,
    sgd_epoch_single,
)

F64 = 1e-12  # float64: batched and single paths differ only in summation order


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(seed=0)


def test_digits_split_is_stratified_and_seeded(digits):
    assert digits.x_train.shape[1] == 64 and digits.num_classes == 10
    assert len(digits.y_train) + len(digits.y_test) == 1797
    assert digits.x_train.min() >= 0.0 and digits.x_train.max() <= 1.0
    again = load_digits_dataset(seed=0)
    assert np.array_equal(again.y_test, digits.y_test)
    per_class = np.bincount(np.concatenate([digits.y_train, digits.y_test]), minlength=10)
    # Stratified: each class is held out in proportion, up to rounding.
    assert np.abs(np.bincount(digits.y_test, minlength=10) - 0.25 * per_class).max() <= 1


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_partition_covers_the_training_set_once_and_skips_relay_nodes(digits, split):
    holders = [i for i in range(20) if i % 4]  # 0, 4, 8, ... are relay-only
    parts = partition(digits.y_train, num_nodes=20, holders=holders, split=split, alpha=0.3, seed=1)
    assert all(len(parts[i]) == 0 for i in range(20) if i not in holders)
    allidx = np.concatenate(parts)
    assert np.array_equal(np.sort(allidx), np.arange(len(digits.y_train)))
    if split == "iid":
        sizes = [len(parts[i]) for i in holders]
        assert max(sizes) - min(sizes) <= 1


def test_dirichlet_with_small_alpha_concentrates_classes(digits):
    def classes_per_node(split, alpha):
        parts = partition(digits.y_train, num_nodes=20, holders=range(20), split=split, alpha=alpha, seed=0)
        return np.mean([len(np.unique(digits.y_train[p])) for p in parts if len(p)])

    assert classes_per_node("iid", 1.0) == 10
    assert classes_per_node("dirichlet", 0.1) < 5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split": "shards"}, "split='shards'"),
        ({"split": "dirichlet", "alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"holders": []}, "holders is empty"),
        ({"holders": [3, 20]}, "node ids in 0..19"),
    ],
)
def test_partition_errors(digits, kwargs, match):
    args = {"num_nodes": 20, "holders": range(20), "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        partition(digits.y_train, **args)


def test_batch_order_rows_are_permutations_of_each_shard():
    counts = np.array([5, 0, 3, 8])
    order = batch_order(counts, seed=0, round=4, epoch=1)
    assert order.shape == (4, 8)
    for i, c in enumerate(counts):
        assert sorted(order[i, :c]) == list(range(c))
    assert np.array_equal(order, batch_order(counts, seed=0, round=4, epoch=1))
    assert not np.array_equal(order, batch_order(counts, seed=0, round=5, epoch=1))


def test_batched_model_matches_the_single_node_reference(digits):
    layout = MLPLayout((64, 16, 12, 10))
    n = 5
    params = init_params(layout, n, seed=3, same_init=False, dtype=torch.float64)
    for i in range(n):
        assert np.array_equal(params[i].numpy(), init_node_params(layout, i, seed=3, same_init=False))
    assert torch.equal(init_params(layout, 3, seed=3, same_init=True, dtype=torch.float64)[2], params[0])

    x_train = torch.tensor(digits.x_train)
    y_train = torch.from_numpy(digits.y_train)
    x_test, y_test = torch.tensor(digits.x_test), torch.from_numpy(digits.y_test)
    xb = x_train[:21].view(3, 7, 64)
    ref = torch.stack([forward_single(params[i], xb[i], layout) for i in range(3)])
    torch.testing.assert_close(forward_batched(params[:3], xb, layout), ref, rtol=0, atol=F64)

    # Shards of different sizes (one empty), one alive node that does not train.
    parts = [np.arange(0, 23), np.arange(23, 30), np.zeros(0, dtype=np.int64), np.arange(30, 70), np.arange(70, 75)]
    index, counts = (torch.from_numpy(a) for a in pad_partition(parts))
    trainers = torch.tensor([True, True, True, True, False])
    order_np = batch_order(counts.numpy(), seed=0, round=0, epoch=0)
    batched = params.clone()
    sgd_epoch_batched(batched, layout, x_train, y_train, index, counts, torch.from_numpy(order_np), trainers,
                      lr=0.2, batch_size=6)
    for i in range(n):
        if not trainers[i] or not len(parts[i]):
            assert torch.equal(batched[i], params[i]), f"node {i} must be untouched"
            continue
        single = sgd_epoch_single(params[i], layout, x_train, y_train, torch.from_numpy(parts[i]),
                                  torch.from_numpy(order_np[i]), lr=0.2, batch_size=6)
        assert not torch.equal(single, params[i])
        torch.testing.assert_close(batched[i], single, rtol=0, atol=F64)

    acc = accuracy_batched(batched, x_test, y_test, layout, chunk=2)
    for i in range(n):
        assert acc[i].item() == accuracy_single(batched[i], x_test, y_test, layout)


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="sizes=\\(64,\\)"):
        MLPLayout((64,))
