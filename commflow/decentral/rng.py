"""Named random streams, so the simulator and the multi-process mode draw the same numbers.

Every random choice in an experiment comes from a stream keyed by ``(seed, purpose,
*indices)`` through numpy's ``SeedSequence``: the data split, each node's initial
weights, the minibatch order of round ``r`` and epoch ``e``, the tie-breaks of a
disruption schedule. A stream depends only on its key, never on how many numbers were
drawn before it or by whom, so one process that simulates 1,000 nodes and 1,000
processes that each run one node draw bit-identical data splits, initialisations and
minibatch orders. (A single global generator would not: the order in which nodes draw
from it differs between the two modes.)
"""

from __future__ import annotations

import numpy as np

__all__ = ["STREAMS", "stream", "graph_seed"]

STREAMS = {
    "split": 1,  # train/test split and the partition of the training set over nodes
    "init": 2,  # initial weights (per node, or one draw shared by all nodes)
    "batches": 3,  # minibatch order: one stream per (round, epoch)
    "schedule": 4,  # which nodes / links a disruption picks, and tie-breaks
    "graph": 5,  # random graph generators (networkx takes an int seed)
}


def stream(seed: int, purpose: str, *indices: int) -> np.random.Generator:
    """A generator that depends only on ``(seed, purpose, *indices)``."""
    if purpose not in STREAMS:
        raise ValueError(f"purpose={purpose!r} is not a known random stream; known: {sorted(STREAMS)}")
    if seed < 0 or any(i < 0 for i in indices):
        raise ValueError(f"seed and stream indices must be >= 0, got seed={seed}, indices={indices}")
    return np.random.default_rng([seed, STREAMS[purpose], *indices])


def graph_seed(seed: int) -> int:
    """An int seed for networkx's random graph generators, derived from ``seed``."""
    return int(stream(seed, "graph").integers(0, 2**31 - 1))
