"""Collectives -> flows: every algorithm moves the bytes its textbook formula says."""

from __future__ import annotations

import numpy as np
import pytest

from commflow import net

M = 3 * 2**20  # divisible by every rank count used below
REL = 1e-12


def _sent_received(traffic, hosts):
    n = max(hosts) + 1
    out, inn = np.zeros(n), np.zeros(n)
    for job in traffic.jobs:
        for st in job.steps:
            out += np.bincount(st.src, weights=st.size, minlength=n) * st.repeat
            inn += np.bincount(st.dst, weights=st.size, minlength=n) * st.repeat
    return out[hosts], inn[hosts]


@pytest.mark.parametrize("op, algo, per_rank", [
    ("allreduce", "ring", lambda n: 2 * (n - 1) / n * M),
    ("allreduce", "halving_doubling", lambda n: 2 * (n - 1) / n * M),
    ("allgather", "ring", lambda n: (n - 1) / n * M),
    ("allgather", "halving_doubling", lambda n: (n - 1) / n * M),
    ("reducescatter", "ring", lambda n: (n - 1) / n * M),
    ("reducescatter", "halving_doubling", lambda n: (n - 1) / n * M),
    ("alltoall", "direct", lambda n: (n - 1) / n * M),
    ("alltoall", "pairwise", lambda n: (n - 1) / n * M),
])
def test_bytes_per_rank_match_the_textbook(op, algo, per_rank):
    hosts = [5, 1, 7, 3, 0, 2, 6, 4]  # a scrambled placement
    t = net.collective(op, algo, hosts=hosts, size_bytes=M, channels=1)
    out, inn = _sent_received(t, hosts)
    assert np.allclose(out, per_rank(8), rtol=REL) and np.allclose(inn, per_rank(8), rtol=REL)


def test_ring_steps_and_channels():
    t = net.collective("allreduce", "ring", hosts=range(6), size_bytes=M, channels=3)
    (job,) = t.jobs
    assert job.num_steps == 10 and [s.repeat for s in job.steps] == [5, 5]
    st = job.steps[0]
    assert st.num_flows == 18 and np.allclose(st.size, M / 6 / 3)
    assert len(np.unique(st.conn)) == 18  # channels are separate connections
    assert np.array_equal(np.sort(st.dst[st.src == 2]), [3, 3, 3])


def test_halving_doubling_partners():
    t = net.collective("reducescatter", "halving_doubling", hosts=range(8), size_bytes=M)
    steps = t.jobs[0].steps
    assert [s.label for s in steps] == ["halving d=4", "halving d=2", "halving d=1"]
    assert np.array_equal(steps[0].dst, np.arange(8) ^ 4) and np.allclose(steps[0].size, M / 2)
    assert np.allclose(steps[2].size, M / 8)


def test_hierarchical_bytes():
    n, g = 16, 4
    t = net.collective("allreduce", "hierarchical", hosts=range(n), size_bytes=M, gpus_per_node=g)
    out, _ = _sent_received(t, list(range(n)))
    nodes = n // g
    expect = 2 * (g - 1) / g * M + 2 * (nodes - 1) / nodes * M / g
    assert np.allclose(out, expect, rtol=REL)
    inter = [s for s in t.jobs[0].steps if s.label.startswith("inter")][0]
    # inter-node rings join local rank j of every node: the same rail.
    assert np.array_equal(inter.src % g, inter.dst % g) and (inter.src // g != inter.dst // g).all()


@pytest.mark.parametrize("n", [2, 5, 8, 13])
def test_double_binary_tree(n):
    t = net.collective("allreduce", "tree", hosts=range(n), size_bytes=M)
    (st,) = t.jobs[0].steps
    # Two trees, n-1 edges each, both directions, half the buffer per tree.
    assert st.num_flows == 4 * (n - 1) and np.allclose(st.size, M / 2)
    out, inn = _sent_received(t, list(range(n)))
    assert np.allclose(out, inn) and out.max() <= 2 * M * (1 + REL)
    # Every edge of each tree connects child and parent in both directions.
    pairs = set(zip(st.src.tolist(), st.dst.tolist()))
    assert all((b, a) in pairs for a, b in pairs)


def test_concurrent_jobs_get_unique_names():
    a = net.collective("allgather", "ring", hosts=[0, 1], size_bytes=M, name="dp")
    b = net.collective("allgather", "ring", hosts=[2, 3], size_bytes=M, name="dp")
    both = a + b
    assert [j.name for j in both.jobs] == ["dp", "dp#1"]


@pytest.mark.parametrize("kwargs, message", [
    ({"op": "broadcast", "algorithm": "ring", "hosts": range(4), "size_bytes": M}, "op: unknown collective 'broadcast'"),
    ({"op": "allgather", "algorithm": "tree", "hosts": range(4), "size_bytes": M}, "algorithm: 'tree' is not available"),
    ({"op": "allreduce", "algorithm": "halving_doubling", "hosts": range(6), "size_bytes": M},
     "hosts: halving_doubling needs a power-of-two rank count, got 6"),
    ({"op": "allreduce", "algorithm": "ring", "hosts": [0], "size_bytes": M}, "hosts: a collective needs at least 2 ranks"),
    ({"op": "allreduce", "algorithm": "ring", "hosts": [0, 1, 1], "size_bytes": M}, "hosts: each host may hold at most one"),
    ({"op": "allreduce", "algorithm": "ring", "hosts": range(4), "size_bytes": 0}, "size_bytes: must be > 0, got 0"),
    ({"op": "allreduce", "algorithm": "ring", "hosts": range(4), "size_bytes": M, "channels": 0}, "channels: must be a positive"),
    ({"op": "allreduce", "algorithm": "hierarchical", "hosts": range(6), "size_bytes": M, "gpus_per_node": 4},
     "gpus_per_node: must divide the rank count 6"),
])
def test_collective_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        net.collective(**kwargs)


def test_hosts_out_of_range_for_topology():
    topo = net.leaf_spine(2, 2, 2)
    t = net.collective("allgather", "ring", hosts=[0, 9], size_bytes=M)
    with pytest.raises(ValueError, match="hosts: host index 9 out of range for topology .* with 4 hosts"):
        net.simulate(topo, t)
    with pytest.raises(ValueError, match="policy: unknown policy 'adaptive'"):
        net.simulate(topo, net.collective("allgather", "ring", hosts=[0, 3], size_bytes=M), policy="adaptive")
    with pytest.raises(ValueError, match="splits: must be a positive integer"):
        net.simulate(topo, net.collective("allgather", "ring", hosts=[0, 3], size_bytes=M), splits=0)
