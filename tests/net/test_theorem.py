"""The singlepath-vs-spraying theorem on 2-tier leaf-spine, as property tests.

Claim proved in docs/net.md (Addanki et al., arXiv 2407.00550, rebuilt): for one phase of
equal flows of size d on a leaf-spine with S spines and uplink capacity c, let Delta be
the most cross-leaf flows leaving or entering one leaf. Then

* spraying puts ``Delta * d / (S * c)`` seconds on the busiest fabric link, which equals
  the multi-commodity-flow LP optimum;
* the best single-path routing of ``k`` equal sub-flows per flow has exactly
  ``ceil(k * Delta / S) * (d / k) / c`` there (Koenig colouring reaches it; pigeonhole
  bounds it from below), so it equals spraying iff S divides k * Delta, first at
  ``k* = S / gcd(S, Delta)``.

The expected values below are computed from the placement alone, not by the library.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commflow import net

LP_REL = 1e-6  # HiGHS feasibility tolerance ~1e-7 on scaled data
EXACT_REL = 1e-12  # sums of a few equal floats


@st.composite
def scenario(draw):
    L = draw(st.integers(2, 5))
    S = draw(st.integers(1, 6))
    H = draw(st.integers(1, 5))
    uplink = draw(st.sampled_from([100.0, 200.0, 400.0]))
    topo = net.leaf_spine(leaves=L, spines=S, hosts_per_leaf=H, link_gbps=400.0, uplink_gbps=uplink)
    perm = draw(st.permutations(range(L * H)))
    n = draw(st.integers(2, L * H))
    hosts = list(perm[:n])
    kind = draw(st.sampled_from(["ring", "shift", "permutation", "halving_doubling"]))
    size = 2**20 * draw(st.integers(1, 4))
    if kind == "ring":
        tr = net.collective("allgather", "ring", hosts=hosts, size_bytes=size * n)
    elif kind == "halving_doubling" and n >= 2:
        n2 = 1 << (n.bit_length() - 1)
        tr = net.collective("reducescatter", "halving_doubling", hosts=hosts[:n2], size_bytes=size * n2)
    else:
        shift = draw(st.integers(1, n - 1))
        if kind == "shift":
            dst = [(i + shift) % n for i in range(n)]
        else:
            order = draw(st.permutations(range(n)))  # a random cyclic permutation has no fixed point
            dst = [0] * n
            for i in range(n):
                dst[order[i]] = order[(i + 1) % n]
        tr = net.flows([hosts[i] for i in range(n)], [hosts[d] for d in dst], size)
    return topo, tr, L, S, H, uplink


def _phase_deltas(tr, H):
    """Per lockstep phase: (Delta, flow size) from the placement (leaf = host // H)."""
    out = []
    for combo, _ in net.lockstep_phases(tr):
        src = np.concatenate([tr.jobs[j].steps[s].src for j, s in combo])
        dst = np.concatenate([tr.jobs[j].steps[s].dst for j, s in combo])
        size = np.concatenate([tr.jobs[j].steps[s].size for j, s in combo])
        a, b = src // H, dst // H
        cross = a != b
        delta = 0 if not cross.any() else max(np.bincount(a[cross]).max(), np.bincount(b[cross]).max())
        out.append((int(delta), float(size[0])))
    return out


def _fabric_bottleneck(topo, res):
    fab = topo.fabric_links
    cap = topo.capacity_Bps[fab]
    return np.array([float((lb[fab] / cap).max()) if fab.any() else 0.0 for lb in res.phase_link_bytes])


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario())
def test_spraying_equals_the_lp_optimum(sc):
    topo, tr, L, S, H, uplink = sc
    spray = net.simulate(topo, tr, policy="spray")
    lp = net.optimal(topo, tr)  # any path, edge formulation
    assert np.allclose(spray.phase_congestion, lp.phase_congestion, rtol=LP_REL)
    c = uplink * 1e9 / 8
    expect = np.array([delta * d / (S * c) for delta, d in _phase_deltas(tr, H)])
    assert np.allclose(_fabric_bottleneck(topo, spray), expect, rtol=EXACT_REL, atol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario(), st.integers(1, 4))
def test_planned_single_path_with_k_splits_is_exactly_the_bound(sc, k):
    topo, tr, L, S, H, uplink = sc
    c = uplink * 1e9 / 8
    deltas = _phase_deltas(tr, H)
    planned = net.simulate(topo, tr, policy="planned", splits=k)
    expect = np.array([math.ceil(k * delta / S) * (d / k) / c for delta, d in deltas])
    assert np.allclose(_fabric_bottleneck(topo, planned), expect, rtol=EXACT_REL, atol=0)
    # The theorem's minimal split count, and equality with spraying there.
    kstar = math.lcm(*[S // math.gcd(S, delta) for delta, _ in deltas])
    assert net.minimal_splits(topo, tr) == kstar
    spray = net.simulate(topo, tr, policy="spray")
    exact = net.simulate(topo, tr, policy="planned", splits="auto")
    assert np.allclose(exact.phase_congestion, spray.phase_congestion, rtol=EXACT_REL)
    assert np.allclose(_fabric_bottleneck(topo, exact), _fabric_bottleneck(topo, spray), rtol=EXACT_REL)
