"""The probe schedule and the reading of the latency matrix."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from commflow.monitor.localize import analyze_matrix, choose_exclusion, matrix_from_rows, tournament


@pytest.mark.parametrize("world", [2, 3, 4, 5, 8, 16])
def test_tournament_meets_every_pair_once_in_disjoint_rounds(world):
    rounds = tournament(world)
    assert len(rounds) == (world - 1 if world % 2 == 0 else world)
    pairs = [p for r in rounds for p in r]
    assert sorted(pairs) == list(itertools.combinations(range(world), 2))
    for r in rounds:
        ends = [x for p in r for x in p]
        assert len(ends) == len(set(ends))


def _matrix(world=6, base=1e-3, seed=0):
    rng = np.random.default_rng(seed)
    m = base * (1 + 0.1 * rng.random((world, world)))
    np.fill_diagonal(m, np.nan)
    return m


def test_single_slow_cell_is_that_link_with_its_direction():
    m = _matrix()
    m[2, 5] = 0.021
    f = analyze_matrix(m)
    assert f.where == "link" and f.link == [2, 5] and f.ranks == [2, 5] and not f.dead


def test_a_cable_slow_both_ways_is_one_link():
    m = _matrix()
    m[1, 3] = m[3, 1] = 0.02
    f = analyze_matrix(m)
    assert f.where == "link" and sorted(f.link) == [1, 3] and "other_bad_edges" not in f.evidence


@pytest.mark.parametrize("where", ["sender", "receiver", "rank"])
def test_rows_and_columns_point_at_one_side_of_a_rank(where):
    m = _matrix()
    if where in ("sender", "rank"):
        m[4, :] = 0.02
    if where in ("receiver", "rank"):
        m[:, 4] = 0.02
    np.fill_diagonal(m, np.nan)
    f = analyze_matrix(m)
    assert f.where == where and f.ranks == [4]
    assert choose_exclusion(f, m) == [4]


def test_an_edge_that_never_delivered_is_a_dead_link():
    m = _matrix()
    m[0, 1] = np.inf
    f = analyze_matrix(m)
    assert f.where == "link" and f.link == [0, 1] and f.dead


def test_two_ranks_compare_the_cable_s_two_directions():
    # The median of two edges is their mean: against it a 20 ms direction beside a 1 ms
    # one was never bad. The faster direction is the reference with two ranks.
    m = _matrix(world=2)
    m[0, 1] = 0.021
    f = analyze_matrix(m)
    assert f.where == "link" and f.link == [0, 1] and not f.dead
    assert analyze_matrix(_matrix(world=2, seed=5)).where == "none"
    m = _matrix(world=2)
    m[1, 0] = 0.0025  # 2.5x the other way but only 1.5 ms more: under the 2 ms floor
    assert analyze_matrix(m).where == "none"


def test_noise_alone_is_no_finding():
    assert analyze_matrix(_matrix(seed=3)).where == "none"


def test_link_exclusion_takes_the_endpoint_whose_other_edges_are_worse():
    m = _matrix()
    m[1, 2] = 0.05
    m[2, [0, 3, 4, 5]] *= 1.5  # rank 2 is a bit slow on its other edges too
    f = analyze_matrix(m)
    assert f.link == [1, 2]
    assert choose_exclusion(f, m) == [2]
    assert choose_exclusion(analyze_matrix(_matrix(world=4)), None) == []


def test_rows_from_receivers_become_the_matrix():
    # An edge is as fast as its fastest repetition; dead only if none arrived.
    rows = {1: {"0": [0.003, 0.001, 0.002]}, 0: {"1": [None, None]}, 2: {"1": [None, 0.004]}}
    m = matrix_from_rows(rows, 3)
    assert m[0, 1] == pytest.approx(0.001) and np.isinf(m[1, 0]) and m[1, 2] == pytest.approx(0.004)
    assert np.isnan(m[0, 0]) and np.isnan(m[2, 0])
