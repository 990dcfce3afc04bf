"""ECMP against balls-into-bins, the planner against ECMP, dual-port NICs, failures, the LP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from commflow import net

REL = 1e-9
LP_REL = 1e-6


def _p_max_at_most(t: int, balls: int, bins: int) -> float:
    """P(max bin load <= t) for ``balls`` uniform balls in ``bins`` bins, exactly:
    balls! / bins^balls * [x^balls] (sum_{j<=t} x^j / j!)^bins."""
    poly = np.zeros(balls + 1)
    poly[0] = 1.0
    one = np.array([1 / math.factorial(j) if j <= t else 0.0 for j in range(balls + 1)])
    for _ in range(bins):
        poly = np.convolve(poly, one)[: balls + 1]
    return poly[balls] * math.factorial(balls) / bins**balls


def _expected_max_of_maxima(balls, bins, experiments):
    """E[max over independent experiments of the max bin load]."""
    return sum(1 - _p_max_at_most(t, balls, bins) ** experiments for t in range(balls))


def _shift(L, S, H):
    topo = net.leaf_spine(leaves=L, spines=S, hosts_per_leaf=H, link_gbps=400)
    # Leaf l's H hosts each send to the matching host of leaf l+1: H flows per uplink set.
    src = np.arange(L * H)
    dst = (src + H) % (L * H)
    return topo, net.flows(src, dst, 2**20)


def _uplink_counts(topo, routing):
    """Flows per leaf->spine link, counted from the chosen paths."""
    counts = np.zeros(topo.num_links)
    for p in routing.steps[0][0].paths:
        for lk in p:
            counts[lk] += 1
    return counts[topo.fabric_links]


@pytest.mark.parametrize("L, H, S, note", [(8, 8, 8, 3.65), (16, 16, 16, 4.58), (32, 32, 32, 5.30),
                                           (16, 32, 16, 3.36)])
def test_exact_ecmp_expectation_against_the_research_note(L, H, S, note):
    # network_anchors.md B2 gives Monte Carlo values with a +-3 % tolerance; the exact
    # expectation (max over L leaves of H flows on S uplinks, in units of H/S) is within it.
    exact = _expected_max_of_maxima(H, S, L) / (H / S)
    assert abs(exact - note) / note < 0.03


def test_ecmp_is_balls_into_bins_and_planner_is_exact():
    L, S, H = 8, 8, 8
    topo, tr = _shift(L, S, H)
    seeds = range(300)
    maxima = []
    for seed in seeds:
        r = net.route(topo, tr, "ecmp", seed=seed)
        maxima.append(_uplink_counts(topo, r).max())
        if seed < 5:  # the simulator's congestion is the busiest link's flow count (H = S, 1:1)
            assert net.simulate(topo, tr, routing=r).max_congestion == pytest.approx(maxima[-1], rel=REL)
    maxima = np.asarray(maxima)
    expect = _expected_max_of_maxima(H, S, L)
    stderr = maxima.std(ddof=1) / math.sqrt(len(maxima))
    assert abs(maxima.mean() - expect) < 4 * stderr, (maxima.mean(), expect)
    assert net.simulate(topo, tr, policy="planned").max_congestion == pytest.approx(1.0, rel=REL)
    assert net.simulate(topo, tr, policy="spray").max_congestion == pytest.approx(1.0, rel=REL)


def test_more_queue_pairs_dilute_ecmp_collisions():
    topo, tr = _shift(8, 8, 8)
    mean = {k: np.mean([net.simulate(topo, tr, "ecmp", splits=k, seed=s).max_congestion for s in range(20)])
            for k in (1, 4)}
    assert 1.0 < mean[4] < mean[1]


def test_dual_port_bonding_and_the_planner():
    # One flow between two hosts of a dual-plane fabric: one QP lands on one 200G port of a
    # 2x200G NIC (congestion 2.0); two planned QPs use both ports (1.0); so does spraying.
    topo = net.dual_plane(segments=2, servers_per_segment=1, spines_per_plane=2, gpus_per_server=1)
    tr = net.flows([0], [1], 2**20)
    assert net.simulate(topo, tr, "ecmp", splits=1).max_congestion == pytest.approx(2.0, rel=REL)
    assert net.simulate(topo, tr, "planned", splits=1).max_congestion == pytest.approx(2.0, rel=REL)
    assert net.simulate(topo, tr, "planned", splits=2).max_congestion == pytest.approx(1.0, rel=REL)
    assert net.simulate(topo, tr, "spray").max_congestion == pytest.approx(1.0, rel=REL)
    res = net.simulate(topo, tr, "planned", splits=2)
    ports = sorted(topo.nodes[topo.link_dst[p[0]]] for p in res.routing.steps[0][0].paths)
    assert ports == ["tor0.r0.p0", "tor0.r0.p1"]


def test_dual_plane_planner_balances_ports_and_spines():
    topo = net.dual_plane(segments=2, servers_per_segment=2, spines_per_plane=2, gpus_per_server=2)
    n = topo.num_hosts
    tr = net.collective("alltoall", "direct", hosts=range(n), size_bytes=n * 2**20)
    planned = net.simulate(topo, tr, "planned", splits=2)
    lp = net.optimal(topo, tr, paths="shortest")
    ecmp = np.mean([net.simulate(topo, tr, "ecmp", splits=2, seed=s).max_congestion for s in range(5)])
    assert lp.max_congestion <= planned.max_congestion * (1 + LP_REL)
    assert planned.max_congestion <= 1.25 * lp.max_congestion
    assert planned.max_congestion < ecmp


def test_failed_uplink_planner_matches_lp_and_spray_detours():
    # B7: one leaf loses one of its 4 uplinks. Spraying spreads evenly over the 3 surviving
    # spines (S/(S-1) = 4/3 on that leaf's uplinks); the planner re-plans to the LP value.
    topo = net.leaf_spine(leaves=4, spines=4, hosts_per_leaf=4).fail([("leaf0", "spine0")])
    hosts = [(i % 4) * 4 + i // 4 for i in range(16)]
    tr = net.collective("allgather", "ring", hosts=hosts, size_bytes=16 * 2**20)
    lp = net.optimal(topo, tr)
    spray = net.simulate(topo, tr, "spray")
    planned = net.simulate(topo, tr, "planned", splits=3)
    assert spray.max_congestion == pytest.approx(4 / 3, rel=REL)
    assert lp.max_congestion == pytest.approx(4 / 3, rel=LP_REL)
    assert planned.max_congestion == pytest.approx(lp.max_congestion, rel=LP_REL)
    for res in (spray, planned):
        assert res.link_bytes[topo.links_between("leaf0", "spine0")].sum() == 0.0


def test_lp_bounds_every_policy_on_a_fat_tree():
    topo = net.fat_tree(k=4)
    tr = net.collective("allreduce", "halving_doubling", hosts=[0, 5, 10, 15, 3, 6, 9, 12], size_bytes=2**24)
    lp = net.optimal(topo, tr)
    short = net.optimal(topo, tr, paths="shortest")
    assert lp.max_congestion <= short.max_congestion * (1 + LP_REL)
    for policy in ("ecmp", "spray", "planned"):
        res = net.simulate(topo, tr, policy=policy, seed=2)
        assert (lp.phase_congestion <= res.phase_congestion * (1 + LP_REL)).all()
        assert lp.completion_lower_bound_s <= res.completion_s * (1 + LP_REL)


def test_single_path_milp_agrees_with_the_planner_on_leaf_spine():
    topo = net.leaf_spine(leaves=3, spines=2, hosts_per_leaf=3)
    tr = net.collective("allgather", "ring", hosts=[0, 3, 6, 1, 4, 7, 2, 5, 8], size_bytes=9 * 2**20)
    milp = net.optimal(topo, tr, single_path=True)
    planned = net.simulate(topo, tr, "planned")
    assert milp.max_congestion == pytest.approx(planned.max_congestion, rel=LP_REL)
    # One flow leaves every leaf per spine pair... 3 cross-leaf flows on 2 spines: ceil(3/2) = 2.
    assert planned.max_congestion == pytest.approx(2.0, rel=REL)


def test_unequal_flows_planner_stays_within_twice_the_lp():
    # B8: unsplittable unequal flows; the greedy + local-search planner against the LP.
    rng = np.random.default_rng(0)
    topo = net.leaf_spine(leaves=4, spines=3, hosts_per_leaf=3)
    src = np.arange(12)
    dst = (src + 3 + rng.integers(0, 9, 12)) % 12
    dst = np.where(dst // 3 == src // 3, (dst + 3) % 12, dst)
    tr = net.flows(src, dst, rng.integers(1, 8, 12) * 2**20)
    lp = net.optimal(topo, tr)
    planned = net.simulate(topo, tr, "planned")
    assert lp.max_congestion <= planned.max_congestion * (1 + LP_REL) <= 2 * lp.max_congestion


def test_plan_json_lists_node_paths(tmp_path):
    topo = net.leaf_spine(leaves=2, spines=2, hosts_per_leaf=2)
    tr = net.collective("allgather", "ring", hosts=[0, 2, 1, 3], size_bytes=2**20)
    r = net.plan(topo, tr, splits=2)
    doc = r.to_json()
    assert doc["policy"] == "planned" and doc["splits"] == 2
    a = doc["assignments"]
    assert len(a) == 4 * 2
    first = a[0]
    assert first["path"][0] == first["src"] and first["path"][-1] == first["dst"]
    assert {x["subflow"] for x in a} == {0, 1}
    spines = {(x["src"], x["subflow"]): x["path"][2] for x in a}
    assert {spines[("h0", 0)], spines[("h0", 1)]} == {"spine0", "spine1"}
    with pytest.raises(ValueError, match="policy: 'spray' has no single-path assignment"):
        net.route(topo, tr, "spray").to_json()
    with pytest.raises(ValueError, match="minimal_splits needs a 2-tier leaf-spine"):
        net.minimal_splits(net.fat_tree(4), tr)


@pytest.mark.parametrize("case", range(12))
def test_fat_tree_recursive_colouring_matches_the_single_path_milp(case):
    # Equal flows on an intact k=4 fat-tree: the planner's two-stage Clos colouring against
    # the exact single-path optimum (HiGHS MILP over all equal-cost paths).
    rng = np.random.default_rng(case)
    topo = net.fat_tree(k=4)
    n = int(rng.integers(4, 17))
    hosts = [int(h) for h in rng.permutation(16)[:n]]
    if case % 2:
        n2 = 1 << (n.bit_length() - 1)
        tr = net.collective("reducescatter", "halving_doubling", hosts=hosts[:n2], size_bytes=n2 * 2**20)
    else:
        tr = net.collective("allgather", "ring", hosts=hosts, size_bytes=n * 2**20)
    k = 1 + case % 3
    routing = net.route(topo, tr, "planned", splits=k)
    assert routing.meta["planner"] == ["colouring"]
    milp = net.optimal(topo, tr, single_path=True, splits=k)
    assert net.congestion(topo, tr, routing=routing) == pytest.approx(milp.max_congestion, rel=LP_REL)


def test_degraded_cable_spray_is_oblivious_and_the_planner_avoids_it():
    # One leaf-spine cable at 100G instead of 400G. Spraying still gives it 1/S of every flow;
    # the planner must not colour blindly onto it: it reaches the single-path MILP optimum.
    topo = net.leaf_spine(4, 3, 4).with_capacity([("leaf0", "spine0")], 100)
    hosts = [int(h) for h in np.random.default_rng(0).permutation(16)]
    tr = net.collective("allreduce", "ring", hosts=hosts, size_bytes=2**24, channels=2)
    planned = net.simulate(topo, tr, "planned", splits=2)
    milp = net.optimal(topo, tr, single_path=True, splits=2)
    lp = net.optimal(topo, tr)
    spray = net.simulate(topo, tr, "spray")
    assert planned.routing.meta["planner"] == ["greedy"]
    assert planned.max_congestion == pytest.approx(milp.max_congestion, rel=LP_REL)
    assert lp.max_congestion <= planned.max_congestion * (1 + LP_REL) < spray.max_congestion
