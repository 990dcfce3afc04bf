"""Disruption schedules: who gets picked, what the network looks like, and impossible requests."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from commflow.decentral.graphs import build_graph
from commflow.decentral.schedule import (
    DropNodes,
    FailLinks,
    Rejoin,
    RelayOnly,
    Schedule,
    resolve,
    scenario_events,
)

ROUNDS = 10


@pytest.fixture(scope="module")
def ba():
    return build_graph("ba:m=2", 40, seed=0)


def _plan(graph, *events, seed=0):
    return resolve(Schedule(events=tuple(events)), graph, rounds=ROUNDS, seed=seed)


def test_degree_selectors_pick_the_extremes(ba):
    deg = dict(ba.degree)
    (_, _, top), = _plan(ba, DropNodes(at=2, count=5, by="degree")).actions
    (_, _, low), = _plan(ba, DropNodes(at=2, count=5, by="low-degree")).actions
    others = [deg[v] for v in ba if v not in top]
    assert min(deg[v] for v in top) >= max(others)
    assert max(deg[v] for v in low) == min(deg.values())


def test_betweenness_selector_picks_the_most_between_nodes(ba):
    bc = nx.betweenness_centrality(ba)
    (_, _, picked), = _plan(ba, DropNodes(at=0, count=4, by="betweenness")).actions
    assert sorted(picked) == sorted(sorted(bc, key=bc.get, reverse=True)[:4])


def test_random_selection_is_seeded(ba):
    a = _plan(ba, DropNodes(at=1, fraction=0.25), seed=1).actions
    b = _plan(ba, DropNodes(at=1, fraction=0.25), seed=1).actions
    c = _plan(ba, DropNodes(at=1, fraction=0.25), seed=2).actions
    assert a == b and a != c and len(a[0][2]) == 10


def test_topology_follows_drops_link_failures_and_rejoin(ba):
    plan = _plan(ba, DropNodes(at=2, nodes=(0, 1), holds_data=False), FailLinks(at=4, count=3), Rejoin(at=7))
    assert plan.relay_nodes == {0, 1} and plan.change_rounds == [0, 2, 4, 7]
    full = plan.topology(0)
    assert full.alive.all() and full.adjacency.sum() // 2 == ba.number_of_edges()
    t3 = plan.topology(3)
    assert not t3.alive[[0, 1]].any() and t3.alive[2:].all()
    assert not t3.live_adjacency()[[0, 1]].any()
    t5 = plan.topology(5)
    assert t5.adjacency.sum() // 2 == ba.number_of_edges() - 3
    t8 = plan.topology(8)
    assert t8.alive.all() and np.array_equal(t8.adjacency, full.adjacency)


def test_named_scenarios():
    assert scenario_events("none", fraction=0.3, at=5) == ()
    (relay,) = scenario_events("relay", fraction=0.3, at=5)
    assert (relay.by, relay.holds_data, relay.fraction, relay.at) == ("degree", False, 0.3, 5)
    (data,) = scenario_events("data", fraction=0.3, at=5)
    assert (data.by, data.holds_data) == ("low-degree", True)
    (custom,) = scenario_events("data:betweenness", fraction=0.1, at=0)
    assert custom.by == "betweenness"


@pytest.mark.parametrize(
    "events, match",
    [
        ((DropNodes(at=2, fraction=1.5),), r"events\[0\] DropNodes: fraction=1.5 must be in \[0, 1\]"),
        ((DropNodes(at=2, fraction=-0.1),), r"fraction=-0.1 must be in \[0, 1\]"),
        ((DropNodes(at=ROUNDS, fraction=0.1),), r"at=10 is beyond the run; rounds are 0..9"),
        ((DropNodes(at=-1, fraction=0.1),), r"at=-1 is beyond the run"),
        ((DropNodes(at=1, count=41),), r"count=41 must be in \[0, 40\] \(the graph has 40 nodes\)"),
        ((DropNodes(at=1, count=30), DropNodes(at=2, count=20)), r"events\[1\] DropNodes: asks for 20 nodes but only 10"),
        ((DropNodes(at=1, nodes=(3, 40)),), r"nodes=\(3, 40\) must be distinct ids in 0..39"),
        ((DropNodes(at=1, nodes=(3, 3)),), r"must be distinct ids"),
        ((DropNodes(at=1, fraction=0.1, count=3),), r"exactly one of fraction, count, nodes; got \['fraction', 'count'\]"),
        ((DropNodes(at=1),), r"exactly one of .* got none"),
        ((DropNodes(at=1, fraction=0.1, by="pagerank"),), r"by='pagerank' is unknown"),
        ((FailLinks(at=1, fraction=0.1, by="degree"),), r"FailLinks: by='degree' is unknown"),
        ((FailLinks(at=1, count=1000),), r"count=1000 must be in \[0, 76\] \(the graph has 76 links\)"),
        ((Rejoin(at=3),), r"Rejoin: at=3 but nothing was dropped or failed before it"),
        ((DropNodes(at=5, count=2), Rejoin(at=5)), r"nothing was dropped or failed before it"),
        ((DropNodes(at=1, fraction=1.0, holds_data=False),), r"all 40 nodes relay-only"),
        (("drop half",), r"events\[0\]: unknown event kind str"),
    ],
)
def test_impossible_schedules_fail_up_front(ba, events, match):
    with pytest.raises(ValueError, match=match):
        _plan(ba, *events)


@pytest.mark.parametrize(
    "name, match",
    [("crash", "unknown kind 'crash'"), ("relay:hubs", "unknown selector 'hubs'"), ("none:degree", "takes no selector")],
)
def test_unknown_scenarios_fail(name, match):
    with pytest.raises(ValueError, match=match):
        scenario_events(name, fraction=0.1, at=1)


def test_rounds_must_be_positive(ba):
    with pytest.raises(ValueError, match="rounds=0 must be >= 1"):
        resolve(Schedule(), ba, rounds=0, seed=0)


def test_relay_only_nodes_stay_and_can_still_be_dropped_later(ba):
    deg = dict(ba.degree)
    plan = _plan(ba, RelayOnly(count=4, by="degree"))
    assert plan.actions == () and plan.topology(ROUNDS - 1).alive.all()
    assert sorted(plan.relay_nodes) == sorted(sorted(deg, key=deg.get, reverse=True)[:4])
    (ev,) = scenario_events("relay-nodrop", fraction=0.1, at=3)
    assert ev == RelayOnly(fraction=0.1, by="degree")
    both = _plan(ba, RelayOnly(nodes=(5, 6)), DropNodes(at=1, nodes=(6, 7)))
    assert both.relay_nodes == {5, 6} and both.dropped_nodes() == [6, 7]
    with pytest.raises(ValueError, match=r"events\[0\] RelayOnly: count=41 must be in \[0, 40\]"):
        _plan(ba, RelayOnly(count=41))
    with pytest.raises(ValueError, match=r"RelayOnly: by='hubs' is unknown"):
        _plan(ba, RelayOnly(count=1, by="hubs"))
