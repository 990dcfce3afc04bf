"""Averaging rules: the vectorized matrix against the per-node reference, invariants, silencing."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from commflow.decentral.graphs import build_graph
from commflow.decentral.mixing import MIXING_RULES, invariant_weights, mixing_matrix, mixing_row

EXACT = 1e-12  # float64 sums of a few dozen terms of size <= 1


def _setup(seed=0, n=30, relay=(0, 1, 2)):
    adj = nx.to_numpy_array(build_graph("ba:m=2", n, seed=seed), nodelist=range(n)).astype(bool)
    sizes = np.random.default_rng(seed).integers(5, 40, n)
    sizes[list(relay)] = 0  # the hubs of a BA graph (oldest nodes) hold no data
    return adj, sizes


@pytest.mark.parametrize("rule", MIXING_RULES)
@pytest.mark.parametrize("floor", [0.0, 4.0])
def test_matrix_matches_the_per_node_reference_with_dropped_nodes(rule, floor):
    adj, sizes = _setup()
    alive = np.ones(len(sizes), dtype=bool)
    alive[[0, 7, 11]] = False
    w = mixing_matrix(adj, alive, sizes, rule=rule, floor=floor)
    live = adj & alive[:, None] & alive[None, :]
    deg = live.sum(1)
    for i in range(len(sizes)):
        if not alive[i]:
            assert np.array_equal(w[i], np.eye(len(sizes))[i]), "a dropped node's model must stay frozen"
            continue
        nbrs = np.flatnonzero(live[i])
        w_self, w_nbr = mixing_row(rule=rule, degree=deg[i], data_size=sizes[i], neighbour_degrees=deg[nbrs],
                                   neighbour_sizes=sizes[nbrs], floor=floor)
        expected = np.zeros(len(sizes))
        expected[i], expected[nbrs] = w_self, w_nbr
        np.testing.assert_allclose(w[i], expected, rtol=0, atol=EXACT)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=0, atol=EXACT)
    assert not w[alive][:, ~alive].any(), "nobody may hear a dropped node"


@pytest.mark.parametrize("rule", MIXING_RULES)
def test_averaging_preserves_the_rules_weighted_mean_on_a_connected_graph(rule):
    adj, sizes = _setup(seed=1)
    alive = np.ones(len(sizes), dtype=bool)
    assert nx.is_connected(nx.from_numpy_array(adj.astype(int)))
    w = mixing_matrix(adj, alive, sizes, rule=rule, floor=3.0)
    pi = invariant_weights(adj, alive, sizes, rule=rule, floor=3.0)
    x = np.random.default_rng(2).normal(size=(len(sizes), 5))
    # One round and many rounds both keep sum_i pi_i x_i.
    np.testing.assert_allclose(pi @ (w @ x), pi @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pi @ np.linalg.matrix_power(w, 50) @ x, pi @ x, rtol=1e-11, atol=1e-11)
    # Independent check of pi: the left eigenvector of W for eigenvalue 1.
    vals, vecs = np.linalg.eig(w.T)
    v = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
    np.testing.assert_allclose(v / v.sum(), pi / pi.sum(), rtol=1e-9, atol=1e-12)


def test_only_metropolis_preserves_the_plain_mean():
    adj, sizes = _setup(seed=4)
    alive = np.ones(len(sizes), dtype=bool)
    x = np.random.default_rng(5).normal(size=len(sizes))
    mh = mixing_matrix(adj, alive, sizes, rule="metropolis")
    np.testing.assert_allclose(mh, mh.T, atol=EXACT)
    assert abs((mh @ x).mean() - x.mean()) < 1e-12
    # uniform is not symmetric on a BA graph: the plain mean moves (anti-vacuity for the above).
    un = mixing_matrix(adj, alive, sizes, rule="uniform")
    assert abs((un @ x).mean() - x.mean()) > 1e-4


def test_pure_data_weighting_silences_relay_nodes_and_the_floor_restores_them():
    adj, sizes = _setup(relay=(0, 1, 2))
    alive = np.ones(len(sizes), dtype=bool)
    pure = mixing_matrix(adj, alive, sizes, rule="data", floor=0.0)
    assert not pure[:, [0, 1, 2]][~np.isin(np.arange(len(sizes)), [0, 1, 2])].any(), \
        "with floor 0 no data-holding node takes anything from a relay-only node"
    floored = mixing_matrix(adj, alive, sizes, rule="data", floor=2.0)
    for relay in (0, 1, 2):
        nbrs = np.flatnonzero(adj[relay])
        assert (floored[nbrs, relay] > 0).all()


def test_a_node_with_no_data_anywhere_near_keeps_its_model():
    adj = np.zeros((3, 3), dtype=bool)
    adj[0, 1] = adj[1, 0] = True
    w = mixing_matrix(adj, np.ones(3, dtype=bool), np.array([0, 0, 5]), rule="data", floor=0.0)
    np.testing.assert_array_equal(w, np.eye(3))
    w_self, w_nbr = mixing_row(rule="data", degree=1, data_size=0, neighbour_degrees=[1], neighbour_sizes=[0])
    assert w_self == 1.0 and w_nbr.tolist() == [0.0]


def test_bad_arguments_are_named():
    adj, sizes = _setup()
    alive = np.ones(len(sizes), dtype=bool)
    with pytest.raises(ValueError, match="mixing rule='gossip'"):
        mixing_matrix(adj, alive, sizes, rule="gossip")
    with pytest.raises(ValueError, match="floor=-1"):
        mixing_matrix(adj, alive, sizes, rule="data", floor=-1)
    with pytest.raises(ValueError, match="symmetric with an empty diagonal"):
        mixing_matrix(np.triu(adj), alive, sizes, rule="uniform")
    with pytest.raises(ValueError, match="adjacency must be \\[N, N\\]"):
        mixing_matrix(adj[:-1], alive, sizes, rule="uniform")
