"""Averaging rules: how much of each neighbour's model a node takes in one round.

One round of decentralized averaging is ``x_i <- sum_j W_ij x_j`` over the closed
neighbourhood ``N[i] = N(i) + {i}`` of the *current* graph (dropped nodes and failed
links removed). Every rule gives a row-stochastic ``W`` (rows sum to one):

``uniform``
    ``W_ij = 1 / (deg_i + 1)`` for ``j`` in ``N[i]``: every neighbour and self alike.
    Needs only the node's own degree. Not symmetric: the quantity it preserves is the
    average weighted by ``deg_i + 1``, so hubs pull the consensus toward themselves.

``metropolis`` (Metropolis-Hastings; Xiao & Boyd, 2004; the rule of decentralizepy)
    ``W_ij = 1 / (1 + max(deg_i, deg_j))`` for each neighbour, the rest on self.
    Symmetric, hence doubly stochastic: preserves the plain average of the models.

``data`` (DecAvg: data-size weighting, as in Palmieri et al.)
    ``W_ij = s_j / sum_{k in N[i]} s_k`` with ``s_j = max(|D_j|, floor)``.
    With ``floor = 0`` this is pure data weighting, and a relay-only node (no data,
    ``s_j = 0``) gets weight zero in every neighbour's average: whatever it carries,
    nobody takes it in, so a relay cannot relay. The floor gives such nodes a voice.
    A node whose whole closed neighbourhood has ``s = 0`` keeps its own model.

A dropped node's row is the identity (its model is frozen) and its column is zero
(nobody hears it). :func:`mixing_matrix` is the vectorized form over all nodes;
:func:`mixing_row` is one node's view of the same rule, computed only from what the
node knows and what its neighbours send it: the reference, and what the
multi-process mode runs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MIXING_RULES", "mixing_matrix", "mixing_row", "invariant_weights"]

MIXING_RULES = ("uniform", "metropolis", "data")


def _check(rule: str, floor: float) -> None:
    if rule not in MIXING_RULES:
        raise ValueError(f"mixing rule={rule!r}: choose from {MIXING_RULES}")
    if not floor >= 0:
        raise ValueError(f"floor={floor} must be >= 0 (a minimum data size, in samples)")


def _live_adjacency(adjacency: np.ndarray, alive: np.ndarray) -> np.ndarray:
    adj = np.asarray(adjacency, dtype=bool)
    if adj.ndim != 2 or adj.shape[0] != adj.shape[1] or adj.shape[0] != len(alive):
        raise ValueError(f"adjacency must be [N, N] with N = len(alive) = {len(alive)}, got {adj.shape}")
    if np.any(np.diag(adj)) or not np.array_equal(adj, adj.T):
        raise ValueError("adjacency must be symmetric with an empty diagonal (undirected, no self-loops)")
    alive = np.asarray(alive, dtype=bool)
    return adj & alive[:, None] & alive[None, :]


def mixing_matrix(
    adjacency: np.ndarray,
    alive: np.ndarray,
    data_sizes: np.ndarray,
    *,
    rule: str,
    floor: float = 0.0,
) -> np.ndarray:
    """The round's averaging matrix ``W [N, N]`` (float64, row-stochastic).

    Args:
        adjacency: ``[N, N]`` bool, the graph's links that have not failed (symmetric,
            empty diagonal); links of dropped nodes may be present, they are ignored.
        alive: ``[N]`` bool, nodes still in the network.
        data_sizes: ``[N]`` samples held by each node (0 for relay-only nodes).
        rule: one of :data:`MIXING_RULES`.
        floor: minimum ``s_j`` of the ``data`` rule, in samples.
    """
    _check(rule, floor)
    alive = np.asarray(alive, dtype=bool)
    adj = _live_adjacency(adjacency, alive)
    n = len(alive)
    deg = adj.sum(1).astype(np.float64)
    eye = np.eye(n)
    if rule == "uniform":
        w = (adj + eye) / (deg + 1.0)[:, None]
    elif rule == "metropolis":
        w = np.where(adj, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
        w[np.diag_indices(n)] = 1.0 - w.sum(1)
    else:
        s = np.maximum(np.asarray(data_sizes, dtype=np.float64), floor)
        w = (adj + eye) * s[None, :]
        total = w.sum(1)
        silent = total == 0  # no data anywhere in N[i] and no floor: keep own model
        w = np.where(silent[:, None], eye, w / np.where(silent, 1.0, total)[:, None])
    w[~alive] = eye[~alive]
    return w


def mixing_row(
    *,
    rule: str,
    degree: int,
    data_size: float,
    neighbour_degrees: np.ndarray,
    neighbour_sizes: np.ndarray,
    floor: float = 0.0,
) -> tuple[float, np.ndarray]:
    """One alive node's weights: ``(self weight, [k] weights of its k live neighbours)``.

    Reference for :func:`mixing_matrix`; uses only the node's own degree and data size
    and what each live neighbour reports (its degree, its data size).
    """
    _check(rule, floor)
    nd = np.asarray(neighbour_degrees, dtype=np.float64)
    ns = np.asarray(neighbour_sizes, dtype=np.float64)
    if rule == "uniform":
        share = 1.0 / (degree + 1.0)
        return share, np.full(len(nd), share)
    if rule == "metropolis":
        nbr = np.array([1.0 / (1.0 + max(degree, d)) for d in nd])
        return 1.0 - float(nbr.sum()), nbr
    own = max(float(data_size), floor)
    nbr = np.maximum(ns, floor)
    total = own + float(nbr.sum())
    if total == 0:
        return 1.0, np.zeros(len(nd))
    return own / total, nbr / total


def invariant_weights(
    adjacency: np.ndarray, alive: np.ndarray, data_sizes: np.ndarray, *, rule: str, floor: float = 0.0
) -> np.ndarray:
    """``pi [N]`` with ``pi @ W = pi``: averaging preserves ``sum_i pi_i x_i`` (alive nodes).

    On a connected graph the nodes reach consensus at ``sum pi_i x_i / sum pi_i``:
    the plain mean for ``metropolis``; weighted by ``deg + 1`` for ``uniform``; by
    ``s_i * sum_{k in N[i]} s_k`` for ``data`` (``W`` is ``diag(1/((A+I)s)) (A+I) diag(s)``).
    Dropped nodes get 0.
    """
    _check(rule, floor)
    alive = np.asarray(alive, dtype=bool)
    adj = _live_adjacency(adjacency, alive)
    if rule == "metropolis":
        pi = np.ones(len(alive))
    elif rule == "uniform":
        pi = adj.sum(1) + 1.0
    else:
        s = np.maximum(np.asarray(data_sizes, dtype=np.float64), floor) * alive
        pi = s * ((adj + np.eye(len(alive))) @ s)
    return np.where(alive, pi, 0.0)
