"""Training data, materialized shard by shard.

Two sources, one interface: ``source.batch(indices, positions) -> Batch``, where
``indices`` are global example numbers (the data order) and ``positions`` the global
token positions this rank holds (:func:`commflow.sp.positions`, so any layout works).
Each rank builds only its tokens ``[B_local, S_local]``; nothing is communicated.

* :class:`MQAR`, multi-query associative recall (Arora et al., "Zoology", 2023; the
  recall benchmark of Based and of linear-attention work since). A sequence holds
  ``num_pairs`` key-value pairs, then a query section where every key appears once
  more at a power-law-distributed distance; the model must output the key's value at
  the query's position. Other query-section tokens are noise. Keys come from the lower
  half of the vocabulary, values from the upper half, fresh for every example, so the
  only way to score is recall from context.
* :class:`TokenFile`, a byte-level text file (any file, vocabulary 256) or a ``.npy``
  array of token ids, read through a memory map; sequences start at pseudo-random
  offsets; the last eighth of the file is the held-out split.

Everything is a pure function of ``(seed, split, example index, position)``: the data
order survives checkpoint/resume and a change of the dp degree without any saved RNG
state. Per example, the O(pairs) structure (keys, values, query slots) is drawn from a
NumPy generator seeded by ``(seed, split, index)``; the O(sequence) noise comes from a
counter-based hash of the position, so a rank generates only its own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["IGNORE", "MQAR", "Batch", "TokenFile", "make_source"]

IGNORE = -100
"""Label of positions that are not scored (torch's cross-entropy ignore_index)."""

SPLITS = {"train": 0, "eval": 1}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijective 64-bit hash (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * _MIX1
        x = (x ^ (x >> np.uint64(27))) * _MIX2
        return x ^ (x >> np.uint64(31))


def _hash_positions(word: int, positions: np.ndarray) -> np.ndarray:
    """A pseudo-random uint64 per position, a pure function of (word, position)."""
    with np.errstate(over="ignore"):
        x = np.uint64(word) + (positions.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    return _mix64(x)


class Batch(NamedTuple):
    """One rank's slice of a batch: ``[B_local, S_local]`` each, int64."""

    inputs: torch.Tensor
    labels: torch.Tensor
    """Target at each held position; :data:`IGNORE` where nothing is scored."""


class MQAR:
    """Multi-query associative recall, generated on the fly from a seed.

    Layout of one sequence of length ``S`` with ``N`` pairs (as in Zoology's
    ``multiquery_ar``): positions ``[0, 2N)`` hold ``k_1 v_1 ... k_N v_N``; query slot
    ``j`` sits at position ``2N + 2 j`` for ``j`` in ``[0, (S - 2N) // 2)``; key ``k_i``
    is repeated at slot ``gap_i`` (distinct slots, ``P(gap = x) ~ x^(a - 1)``, so most
    queries come soon after the context and some far away), labelled with ``v_i``.
    Every other position of the query section is a uniform noise token.
    """

    def __init__(self, *, vocab_size: int, seq_len: int, num_pairs: int, seed: int, split: str = "train",
                 power_a: float = 0.01):
        if seq_len < 4 * num_pairs:
            raise ValueError(f"seq_len ({seq_len}) must be >= 4 x num_pairs ({4 * num_pairs})")
        if vocab_size // 2 - 1 < num_pairs:
            raise ValueError(f"vocab_size ({vocab_size}) too small for {num_pairs} distinct keys")
        self.vocab_size, self.seq_len, self.num_pairs = vocab_size, seq_len, num_pairs
        self.seed, self.split = seed, SPLITS[split]
        self.labels_per_sequence = num_pairs
        slots = (seq_len - 2 * num_pairs) // 2
        weights = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
        self._slot_p = weights / weights.sum()

    def structure(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(keys [N], values [N], query positions [N], noise word) of example ``index``."""
        rng = np.random.default_rng([self.seed, self.split, index])
        half = self.vocab_size // 2
        keys = rng.choice(np.arange(1, half), size=self.num_pairs, replace=False)
        values = rng.choice(np.arange(half, self.vocab_size), size=self.num_pairs, replace=False)
        gaps = rng.choice(len(self._slot_p), size=self.num_pairs, replace=False, p=self._slot_p)
        return keys, values, 2 * self.num_pairs + 2 * gaps, int(rng.integers(2**63))

    def example(self, index: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and labels of example ``index`` at the given global positions."""
        keys, values, query_pos, word = self.structure(index)
        n2 = 2 * self.num_pairs
        tokens = (_hash_positions(word, positions) % np.uint64(self.vocab_size)).astype(np.int64)
        labels = np.full(positions.shape, IGNORE, dtype=np.int64)
        in_context = positions < n2
        ctx_pos = positions[in_context]
        tokens[in_context] = np.where(ctx_pos % 2 == 0, keys[ctx_pos // 2], values[ctx_pos // 2])
        # Which held positions are query slots, and of which pair.
        order = np.argsort(query_pos)
        sorted_pos = query_pos[order]
        at = np.minimum(np.searchsorted(sorted_pos, positions), len(sorted_pos) - 1)
        hit = sorted_pos[at] == positions
        pair = order[at[hit]]
        tokens[hit], labels[hit] = keys[pair], values[pair]
        return tokens, labels

    def batch(self, indices: Sequence[int], positions: torch.Tensor) -> Batch:
        pos = positions.cpu().numpy()
        rows = [self.example(i, pos) for i in indices]
        return Batch(torch.from_numpy(np.stack([r[0] for r in rows])), torch.from_numpy(np.stack([r[1] for r in rows])))


class TokenFile:
    """Next-token prediction on a byte-level file or a ``.npy`` token array.

    Example ``index`` starts at a pseudo-random offset (hash of seed, split, index) in
    its split: the first seven eighths of the file for training, the last eighth for
    evaluation. A rank reads tokens ``offset + p`` and labels ``offset + p + 1`` for its
    positions ``p`` only, through the memory map.
    """

    def __init__(self, path: str | Path, *, seq_len: int, seed: int, split: str = "train"):
        path = Path(path)
        if path.suffix == ".npy":
            self.tokens = np.load(path, mmap_mode="r")
            if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
                raise ValueError(f"--data {str(path)!r}: a .npy token file must be a 1-D integer array")
        else:
            self.tokens = np.memmap(path, dtype=np.uint8, mode="r")
        n = len(self.tokens)
        cut = n - n // 8
        self.lo, self.hi = (0, cut) if split == "train" else (cut, n)
        if self.hi - self.lo < seq_len + 1:
            raise ValueError(f"--data {str(path)!r}: the {split} split has {self.hi - self.lo} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}")
        self.seq_len, self.seed, self.split = seq_len, seed, SPLITS[split]
        self.labels_per_sequence = seq_len

    def offset(self, index: int) -> int:
        word = _mix64(np.array([self.seed * 2 + self.split], dtype=np.uint64))[0]
        h = _hash_positions(int(word), np.array([index]))[0]
        return self.lo + int(h % np.uint64(self.hi - self.lo - self.seq_len))

    def batch(self, indices: Sequence[int], positions: torch.Tensor) -> Batch:
        pos = positions.cpu().numpy()
        starts = np.array([self.offset(i) for i in indices])[:, None]
        inputs = np.asarray(self.tokens[starts + pos], dtype=np.int64)
        labels = np.asarray(self.tokens[starts + pos + 1], dtype=np.int64)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(labels))


def make_source(cfg, split: str = "train") -> MQAR | TokenFile:
    """The data source a :class:`~commflow.train.config.TrainConfig` asks for."""
    d = cfg.data
    if d.data is None:
        return MQAR(vocab_size=d.mqar_vocab, seq_len=d.seq_len, num_pairs=d.mqar_pairs, seed=d.seed, split=split)
    return TokenFile(d.data, seq_len=d.seq_len, seed=d.seed, split=split)
