"""Topologies: builders, capacities, failures, files, and the validation errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from commflow import net


def _cables(t, a_prefix, b_prefix):
    m = np.array([t.nodes[s].startswith(a_prefix) and t.nodes[d].startswith(b_prefix)
                  for s, d in zip(t.link_src, t.link_dst)])
    return t.link_gbps[m]


def test_leaf_spine_counts_and_oversubscription():
    t = net.leaf_spine(leaves=4, spines=2, hosts_per_leaf=8, link_gbps=100, oversubscription=2.0)
    assert t.num_hosts == 32
    assert t.num_links == 2 * (32 + 4 * 2)
    # 8 hosts x 100G down, 2 uplinks: 2:1 means 800 / (2 * up) = 2 -> up = 200G.
    assert np.allclose(_cables(t, "leaf", "spine"), 200.0)
    assert np.allclose(_cables(t, "h", "leaf"), 100.0)
    assert t.nodes[t.link_dst[t.links_between("h9", "leaf1")[0]]] == "leaf1"


def test_fat_tree_counts():
    t = net.fat_tree(k=4)
    assert t.num_hosts == 16
    assert int((~t.is_host).sum()) == 4 * 4 + 4  # 8 edge + 8 agg + 4 core
    assert t.num_links == 2 * (16 + 4 * 2 * 2 + 4 * 2 * 2)


def test_rail_optimized_places_gpu_r_on_rail_r():
    t = net.rail_optimized(servers=4, spines=2, gpus_per_server=4, servers_per_leaf=2)
    pt = net.paths_of(t)
    for s in range(4):
        for r in range(4):
            h = t.hosts[s * 4 + r]
            (lk,) = pt.host_out[int(h)]
            assert t.nodes[t.link_dst[lk]] == f"leaf{s // 2}.r{r}"


def test_dual_plane_ports_go_to_both_planes():
    t = net.dual_plane(segments=2, servers_per_segment=2, spines_per_plane=2, gpus_per_server=2)
    pt = net.paths_of(t)
    for h in t.hosts:
        tors = sorted(t.nodes[t.link_dst[lk]] for lk in pt.host_out[int(h)])
        assert [x[-2:] for x in tors] == ["p0", "p1"]
    # A flow across segments can take either plane and any spine of it: 2 planes x 2 spines.
    c = pt.candidates(0, t.num_hosts - 2)
    assert c.shape == (4, 4)


def test_fail_removes_paths_and_detects_disconnection():
    t = net.leaf_spine(leaves=2, spines=2, hosts_per_leaf=1)
    f = t.fail([("leaf0", "spine0")])
    assert (~f.link_up).sum() == 2
    c = net.paths_of(f).candidates(0, 1)
    assert c.shape == (1, 4)
    assert "spine1" in f.link_name(int(c[0, 1]))
    with pytest.raises(ValueError, match="disconnected hosts"):
        f.fail([("leaf0", "spine1")])
    with pytest.raises(ValueError, match="no such link"):
        t.fail([("leaf0", "leaf1")])


def test_yaml_and_json_round_trip(tmp_path):
    t = net.leaf_spine(leaves=2, spines=2, hosts_per_leaf=2, link_gbps=100).fail([("leaf1", "spine1")])
    for ext in ("json", "yaml"):
        p = net.save(t, tmp_path / f"t.{ext}")
        u = net.load(p)
        assert u.nodes == t.nodes
        assert np.array_equal(u.link_src, t.link_src) and np.array_equal(u.link_dst, t.link_dst)
        assert np.array_equal(u.link_gbps, t.link_gbps) and np.array_equal(u.link_up, t.link_up)


def test_builder_file(tmp_path):
    p = tmp_path / "b.yaml"
    p.write_text("builder: fat_tree\nk: 4\nlink_gbps: 100\nfailed: [[edge0.0, agg0.0]]\n")
    t = net.load(p)
    assert t.num_hosts == 16 and (~t.link_up).sum() == 2


@pytest.mark.parametrize("doc, message", [
    ({"hosts": ["a", "b"], "switches": ["s"], "links": [["a", "s", 100], ["b", "x", 100]]},
     r"links\[1\]: unknown node 'x'"),
    ({"hosts": ["a", "b"], "switches": ["s"], "links": [["a", "s", 100], ["b", "s", 0]]},
     r"links\[1\]: capacity must be > 0 Gbit/s, got 0"),
    ({"hosts": ["a", "b"], "switches": ["s"], "links": [["a", "s", 100], ["b", "s", -5]]},
     r"capacity must be > 0"),
    ({"hosts": ["a", "b", "c"], "switches": ["s", "t"], "links": [["a", "s", 1], ["b", "s", 1], ["c", "t", 1]]},
     r"disconnected hosts: host '(a|c)' cannot reach host '(a|c)'"),
    ({"hosts": ["a", "b"], "switches": ["s"], "links": [["a", "s", 1]]},
     r"disconnected hosts: host 'b' has no working link"),
    ({"hosts": ["a", "a"], "switches": ["s"], "links": [["a", "s", 1]]}, r"duplicate node name 'a'"),
    ({"hosts": ["a"], "links": [["a", "s", 1]], "linx": []}, r"unknown key\(s\) \['linx'\]"),
    ({"builder": "torus", "n": 4}, r"builder: unknown builder 'torus'"),
    ({"builder": "leaf_spine", "leaves": 2, "spines": 0, "hosts_per_leaf": 1}, r"spines: must be a positive integer"),
    ({"builder": "leaf_spine", "leaves": 2, "spines": 2, "hosts_per_leaf": 1, "failed": [["leaf0", "nope"]]},
     r"failed\[0\]: unknown node 'nope'"),
])
def test_validation_errors(tmp_path, doc, message):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        net.load(p)


def test_builder_argument_errors():
    with pytest.raises(ValueError, match="k: a fat-tree needs an even k, got 5"):
        net.fat_tree(k=5)
    with pytest.raises(ValueError, match="give at most one"):
        net.leaf_spine(2, 2, 2, uplink_gbps=100, oversubscription=2)
    with pytest.raises(ValueError, match="link_gbps: must be > 0"):
        net.leaf_spine(2, 2, 2, link_gbps=0)
    with pytest.raises(ValueError, match="servers_per_leaf: must divide"):
        net.rail_optimized(servers=3, spines=2, servers_per_leaf=2)
    with pytest.raises(ValueError, match="unknown topology file type"):
        net.load(__file__)
