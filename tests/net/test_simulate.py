"""The max-min solver and the event-driven simulator against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from commflow import net

REL = 1e-9  # float accumulation over a few events
GB = 1e9
ONE_GBPS_IN_GBIT = 8.0  # 8 Gbit/s = 1e9 bytes/s


def test_max_min_textbook_example():
    # f1 on link 0; f2 on links 0 and 1; f3 on link 1; capacities 1 and 3.
    A = sp.csr_matrix(np.array([[1, 0], [1, 1], [0, 1]], float))
    assert np.allclose(net.max_min_rates(A, np.array([1.0, 3.0])), [0.5, 0.5, 2.5], rtol=REL)
    # A sprayed flow (half on each link) and a single-path flow on link 0.
    A = sp.csr_matrix(np.array([[0.5, 0.5], [1.0, 0.0]]))
    assert np.allclose(net.max_min_rates(A, np.array([1.0, 1.0])), [2 / 3, 2 / 3], rtol=REL)


@pytest.mark.parametrize("seed", range(5))
def test_max_min_matches_reference_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    R, E = 25, 12
    dense = (rng.random((R, E)) < 0.25) * rng.choice([1.0, 0.5, 0.25], size=(R, E))
    dense[np.arange(R), rng.integers(0, E, R)] = 1.0  # every flow uses a link
    cap = rng.choice([1.0, 2.0, 5.0], size=E)
    fast = net.max_min_rates(sp.csr_matrix(dense), cap)
    paths = [{e: dense[r, e] for e in np.flatnonzero(dense[r])} for r in range(R)]
    ref = net.max_min_rates_reference(paths, dict(enumerate(cap)))
    assert np.allclose(fast, ref, rtol=1e-7)
    assert (dense.T @ fast <= cap * (1 + 1e-9)).all()


def _tiny(spines=1, uplink=ONE_GBPS_IN_GBIT):
    return net.leaf_spine(leaves=2, spines=spines, hosts_per_leaf=2, link_gbps=ONE_GBPS_IN_GBIT, uplink_gbps=uplink)


def test_two_flows_of_unequal_size_share_an_uplink():
    # h0->h2 (1 GB) and h1->h3 (3 GB) share leaf0->spine0 at 1 GB/s: 0.5 GB/s each until
    # t=2 s, then the big one alone at 1 GB/s for its last 2 GB: done at 4 s.
    topo = _tiny()
    tr = net.flows([0, 1], [2, 3], [1 * GB, 3 * GB])
    for policy in ("ecmp", "spray", "planned"):
        res = net.simulate(topo, tr, policy=policy)
        assert res.completion_s == pytest.approx(4.0, rel=REL)
        up = topo.links_between("leaf0", "spine0")[0]
        assert res.link_bytes[up] == pytest.approx(4 * GB, rel=REL)
        assert res.link_utilization[up] == pytest.approx(1.0, rel=REL)


def test_jobs_advance_independently():
    # Job A: step 0 h0->h2 1 GB, step 1 h0->h3 1 GB. Job B: h1->h3 1.5 GB.
    # [0,2] A0 and B share the uplink at 0.5 -> A0 done at 2 (B has 0.5 left);
    # [2,3] A1 and B share at 0.5 -> B done at 3 (A1 has 0.5 left); [3,3.5] A1 alone.
    topo = _tiny()
    a = net.flows([0, 0], [2, 3], [GB, GB], steps=[0, 1], name="A")
    b = net.flows([1], [3], [1.5 * GB], name="B")
    res = net.simulate(topo, a + b, policy="spray")
    ja, jb = res.jobs
    assert ja.completion_s == pytest.approx(3.5, rel=REL) and jb.completion_s == pytest.approx(3.0, rel=REL)
    assert np.allclose(ja.step_times_s, [2.0, 1.5], rtol=REL)
    assert res.completion_s == pytest.approx(3.5, rel=REL)


def test_ring_allreduce_inside_one_leaf_runs_at_line_rate():
    topo = net.leaf_spine(leaves=1, spines=1, hosts_per_leaf=4, link_gbps=400)
    M = 2**30
    res = net.simulate(topo, net.collective("allreduce", "ring", hosts=range(4), size_bytes=M))
    B = 400e9 / 8
    assert res.completion_s == pytest.approx(2 * 3 / 4 * M / B, rel=REL)
    assert res.jobs[0].busbw_GBps == pytest.approx(B / 1e9, rel=REL)  # busbw = line rate
    assert np.allclose(res.step_times_s, M / 4 / B, rtol=REL) and len(res.step_times_s) == 6
    assert res.max_congestion == pytest.approx(1.0, rel=REL)


@pytest.mark.parametrize("uplink, per_step", [(ONE_GBPS_IN_GBIT, 2.0), (2 * ONE_GBPS_IN_GBIT, 1.0)])
def test_ring_across_leaves_halves_with_a_shared_uplink(uplink, per_step):
    # Ranks alternate leaves: 0->2, 2->1, 1->3, 3->0; two flows per uplink; M/4 = 1 GB chunks.
    topo = _tiny(uplink=uplink)
    res = net.simulate(topo, net.collective("allreduce", "ring", hosts=[0, 2, 1, 3], size_bytes=4 * GB))
    assert np.allclose(res.step_times_s, per_step, rtol=REL)
    assert res.completion_s == pytest.approx(6 * per_step, rel=REL)
    assert res.max_congestion == pytest.approx(per_step, rel=REL)


def test_ecmp_collision_costs_exactly_what_its_paths_say():
    topo = _tiny(spines=2)
    tr = net.flows([0, 1], [2, 3], GB)
    for seed in range(6):
        res = net.simulate(topo, tr, policy="ecmp", seed=seed)
        spines = [topo.link_dst[p[1]] for p in res.routing.steps[0][0].paths]
        expect = 2.0 if spines[0] == spines[1] else 1.0
        assert res.completion_s == pytest.approx(expect, rel=REL)
    for policy in ("spray", "planned"):
        assert net.simulate(topo, tr, policy=policy).completion_s == pytest.approx(1.0, rel=REL)


def test_collapse_equals_full_event_loop():
    topo = net.leaf_spine(leaves=4, spines=2, hosts_per_leaf=2)
    tr = net.collective("allreduce", "halving_doubling", hosts=[0, 2, 4, 6, 1, 3, 5, 7], size_bytes=2**24)
    a = net.simulate(topo, tr, policy="ecmp", seed=3)
    b = net.simulate(topo, tr, policy="ecmp", seed=3, collapse=False)
    assert np.allclose(a.step_times_s, b.step_times_s, rtol=REL)
    assert np.allclose(a.link_bytes, b.link_bytes, rtol=REL)


def test_symmetric_completion_is_sum_of_phase_bottlenecks():
    # B4: when every flow of a step sees the same bottleneck, CCT = sum(bottleneck * length).
    topo = net.leaf_spine(leaves=4, spines=4, hosts_per_leaf=4, oversubscription=2.0)
    hosts = [(i % 4) * 4 + i // 4 for i in range(16)]
    tr = net.collective("allreduce", "ring", hosts=hosts, size_bytes=2**28)
    for policy in ("spray", "planned"):
        res = net.simulate(topo, tr, policy=policy)
        assert res.completion_s == pytest.approx(float((res.phase_bottleneck_s * res.phase_length).sum()), rel=1e-6)


def test_link_bytes_conserve_flow_bytes():
    topo = net.fat_tree(k=4)
    tr = net.collective("alltoall", "direct", hosts=range(16), size_bytes=2**20)
    res = net.simulate(topo, tr, policy="ecmp", splits=2, seed=1)
    rs = res.routing.steps[0][0]
    expect = sum(rs.size[i] * len(p) for i, p in enumerate(rs.paths))
    assert res.link_bytes.sum() == pytest.approx(expect, rel=REL)


def test_hierarchical_allreduce_on_rail_optimized_with_nvlink():
    # 2 servers x 2 GPUs, one leaf per rail, NIC 1 GB/s, NVLink 2 GB/s, M = 4 GB, g = 2:
    # intra RS (M/2 over NVLink: 1 s) + inter RS and AG per rail (M/4 each over the rail leaf:
    # 1 s + 1 s) + intra AG (1 s) = 4 s.
    topo = net.rail_optimized(servers=2, spines=1, gpus_per_server=2, link_gbps=ONE_GBPS_IN_GBIT,
                              nvlink_gbps=2 * ONE_GBPS_IN_GBIT)
    tr = net.collective("allreduce", "hierarchical", hosts=range(4), size_bytes=4 * GB, gpus_per_node=2)
    res = net.simulate(topo, tr, policy="ecmp")
    assert np.allclose(res.step_times_s, [1.0, 1.0, 1.0, 1.0], rtol=REL)
    nv = [i for i in range(topo.num_links) if "nvs" in topo.link_name(i)]
    spine = [i for i in range(topo.num_links) if "spine" in topo.link_name(i)]
    # 4 GPUs x (RS + AG) x 2 GB chunks x 2 hops (GPU -> NVSwitch -> GPU)
    assert res.link_bytes[nv].sum() == pytest.approx(4 * 2 * 2 * 2 * GB, rel=REL)
    assert res.link_bytes[spine].sum() == 0.0  # rails never leave their leaf
