"""Per-round metrics: accuracy over surviving nodes, consensus, and what is left of the graph.

Every number is over the nodes *alive* in that round: a dropped node's frozen model
is not scored (it has left the network), a rejoined node is scored again. So
``mean_acc`` after a drop is the mean over survivors, and it can rise when a drop
removes poor models; read it beside ``alive`` and ``components``.

Fields of one record (one per scenario per scored round, the rows of ``rounds.jsonl``):

=================  ===============================================================
``mean_acc``       mean test accuracy of the alive nodes' models (after averaging)
``min_acc``        worst alive node; ``max_acc`` best alive node
``giant_acc``      mean accuracy inside the largest connected component
``consensus_dist`` ``sqrt(mean_i ||x_i - x_bar||^2)`` over alive nodes' parameter
                   vectors, ``x_bar`` their mean (Kong et al., 2021, "Consensus
                   control for decentralized deep learning"); 0 means consensus
``alive``          nodes in the network
``links``          links carrying traffic (not failed, both ends alive)
``components``     connected components of the alive graph (isolated nodes count)
``giant_size``     nodes in the largest component
``isolated``       alive nodes with no live link
=================  ===============================================================
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .schedule import Topology

__all__ = ["topology_stats", "consensus_distance", "round_record"]


def topology_stats(topology: Topology) -> dict:
    """Connectivity of the alive part of the network.

    Returns ``alive``, ``links``, ``components``, ``giant_size``, ``isolated`` (ints)
    and ``giant``, the ``[N]`` bool mask of the largest component.
    """
    alive = topology.alive
    live = topology.live_adjacency()
    idx = np.flatnonzero(alive)
    sub = live[np.ix_(idx, idx)]
    giant = np.zeros(len(alive), dtype=bool)
    if len(idx) == 0:
        return {"alive": 0, "links": 0, "components": 0, "giant_size": 0, "isolated": 0, "giant": giant}
    count, labels = connected_components(csr_matrix(sub), directed=False)
    sizes = np.bincount(labels)
    giant[idx[labels == int(np.argmax(sizes))]] = True
    return {
        "alive": int(len(idx)),
        "links": int(sub.sum() // 2),
        "components": int(count),
        "giant_size": int(sizes.max()),
        "isolated": int((sub.sum(1) == 0).sum()),
        "giant": giant,
    }


def consensus_distance(params: torch.Tensor, alive: np.ndarray) -> float:
    """``sqrt(mean_i ||x_i - x_bar||^2)`` over alive rows of ``params [N, P]``, in float64."""
    x = params[torch.as_tensor(alive)].to(torch.float64)
    if x.shape[0] == 0:
        return float("nan")
    return float(((x - x.mean(0)) ** 2).sum(1).mean().sqrt())


def round_record(
    *, scenario: str, round: int, accuracy: np.ndarray, params: torch.Tensor, stats: dict, alive: np.ndarray
) -> dict:
    """One row of ``rounds.jsonl``; ``accuracy [N]`` is every node's, only alive ones count."""
    acc = np.asarray(accuracy, dtype=np.float64)
    live_acc = acc[alive]
    giant_acc = acc[stats["giant"]]
    return {
        "scenario": scenario,
        "round": round,
        "mean_acc": float(live_acc.mean()) if live_acc.size else float("nan"),
        "min_acc": float(live_acc.min()) if live_acc.size else float("nan"),
        "max_acc": float(live_acc.max()) if live_acc.size else float("nan"),
        "giant_acc": float(giant_acc.mean()) if giant_acc.size else float("nan"),
        "consensus_dist": consensus_distance(params, alive),
        **{k: v for k, v in stats.items() if k != "giant"},
    }
