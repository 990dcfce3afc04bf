"""Data: MQAR's structure and determinism; every shard equals its slice of the whole sequence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from commflow.sp.layout import positions
from commflow.train.data import IGNORE, MQAR, TokenFile


def test_mqar_sequence_is_pairs_then_queries_labelled_with_their_values():
    m = MQAR(vocab_size=64, seq_len=48, num_pairs=6, seed=3)
    b = m.batch(range(20), torch.arange(48))
    for tokens, labels in zip(b.inputs.tolist(), b.labels.tolist()):
        keys, values = tokens[0:12:2], tokens[1:12:2]
        assert all(1 <= k < 32 for k in keys) and all(32 <= v < 64 for v in values)
        assert len(set(keys)) == 6
        pair_of = dict(zip(keys, values))
        scored = [(p, y) for p, y in enumerate(labels) if y != IGNORE]
        assert len(scored) == 6  # every key is queried exactly once
        assert sorted(tokens[p] for p, _ in scored) == sorted(keys)
        for p, y in scored:
            assert p >= 12 and (p - 12) % 2 == 0  # query slots follow the context at even offsets
            assert y == pair_of[tokens[p]]  # the label is the value bound to the queried key
        assert all(0 <= t < 64 for t in tokens)


def test_mqar_is_a_pure_function_of_seed_split_and_index():
    pos = torch.arange(64)
    a = MQAR(vocab_size=128, seq_len=64, num_pairs=8, seed=0).batch([5, 6], pos)
    b = MQAR(vocab_size=128, seq_len=64, num_pairs=8, seed=0).batch([5, 6], pos)
    other_seed = MQAR(vocab_size=128, seq_len=64, num_pairs=8, seed=1).batch([5, 6], pos)
    held_out = MQAR(vocab_size=128, seq_len=64, num_pairs=8, seed=0, split="eval").batch([5, 6], pos)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.inputs, other_seed.inputs)
    assert not torch.equal(a.inputs, held_out.inputs)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world", [2, 4])
def test_mqar_shards_reassemble_the_whole_sequence(layout, world):
    m = MQAR(vocab_size=256, seq_len=64, num_pairs=8, seed=7)
    whole = m.batch([0, 1, 2], torch.arange(64))
    inputs = torch.full_like(whole.inputs, -1)
    labels = torch.full_like(whole.labels, -1)
    for r in range(world):
        p = positions(64, r, world, layout)
        part = m.batch([0, 1, 2], p)
        inputs[:, p], labels[:, p] = part.inputs, part.labels
    assert torch.equal(inputs, whole.inputs) and torch.equal(labels, whole.labels)


def test_token_file_labels_are_the_next_token_and_shards_agree(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, size=4000, dtype=np.uint8)
    path = tmp_path / "bytes.bin"
    path.write_bytes(data.tobytes())
    src = TokenFile(path, seq_len=32, seed=1)
    whole = src.batch([0, 1, 2, 3], torch.arange(32))
    for i, (tokens, labels) in enumerate(zip(whole.inputs, whole.labels)):
        start = src.offset(i)
        assert start >= 0 and start + 33 <= 3500  # inside the training split (first 7/8)
        assert torch.equal(tokens, torch.from_numpy(data[start:start + 32].astype(np.int64)))
        assert torch.equal(labels, torch.from_numpy(data[start + 1:start + 33].astype(np.int64)))
    for r in range(2):
        p = positions(32, r, 2, "zigzag")
        part = src.batch([0, 1, 2, 3], p)
        assert torch.equal(part.inputs, whole.inputs[:, p]) and torch.equal(part.labels, whole.labels[:, p])
    held_out = TokenFile(path, seq_len=32, seed=1, split="eval")
    assert all(held_out.offset(i) >= 3500 for i in range(50))


def test_npy_token_file(tmp_path):
    tokens = np.arange(1000, dtype=np.int32) % 97
    path = tmp_path / "tokens.npy"
    np.save(path, tokens)
    b = TokenFile(path, seq_len=16, seed=0).batch([0], torch.arange(16))
    assert torch.equal(b.labels[0], (b.inputs[0] + 1) % 97)
