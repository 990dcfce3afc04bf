"""Graph construction from specs and edge-list files, with their errors."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from commflow.decentral.graphs import build_graph, edge_array, parse_graph_spec, read_edge_list


@pytest.mark.parametrize(
    "spec, n, edges",
    [
        ("ba:m=2", 50, 2 * (50 - 2)),  # BA: m edges per node after the first m
        ("ring", 10, 10),
        ("ring:k=2", 10, 20),
        ("torus", 12, 24),  # 3 x 4 periodic grid: 2 links per node
        ("torus:rows=3,cols=5", 15, 30),
        ("er:p=1.0", 6, 15),  # p = 1 is the complete graph
    ],
)
def test_generators_give_nodes_0_to_n_and_the_expected_link_count(spec, n, edges):
    g = build_graph(spec, n, seed=3)
    assert sorted(g.nodes) == list(range(n))
    assert g.number_of_edges() == edges
    assert nx.number_of_selfloops(g) == 0


def test_random_graphs_depend_only_on_the_seed():
    a, b, c = (build_graph("ba:m=2", 40, seed=s) for s in (7, 7, 8))
    assert np.array_equal(edge_array(a), edge_array(b))
    assert not np.array_equal(edge_array(a), edge_array(c))


def test_erdos_renyi_default_mean_degree_is_about_four():
    g = build_graph("er", 400, seed=0)
    assert 3.4 < 2 * g.number_of_edges() / 400 < 4.6


@pytest.mark.parametrize(
    "spec, n, match",
    [
        ("star", 10, "unknown kind 'star'"),
        ("ba:k=2", 10, "bad parameter 'k=2'"),
        ("ba:m=two", 10, "m='two' is not a valid int"),
        ("ba:m=10", 10, "1 <= m < nodes=10"),
        ("er:p=0", 10, "0 < p <= 1"),
        ("ring:k=5", 10, r"1 <= k <= \(nodes-1\)//2 = 4"),
        ("torus", 13, "rows\\*cols == nodes=13"),
        ("torus:rows=4", 10, "rows\\*cols == nodes=10"),
        ("ba:m=2", 1, "at least 2 nodes"),
        ("file:", 10, "needs a path"),
    ],
)
def test_bad_specs_name_the_spec_and_the_rule(spec, n, match):
    with pytest.raises(ValueError, match=match):
        build_graph(spec, n)


def test_edge_list_reads_comments_blank_lines_and_networkx_output(tmp_path):
    g0 = nx.cycle_graph(5)
    nx.write_edgelist(g0, tmp_path / "nx.txt")  # writes "u v {}" lines
    g = read_edge_list(tmp_path / "nx.txt")
    assert sorted(map(sorted, g.edges)) == sorted(map(sorted, g0.edges))
    f = tmp_path / "e.txt"
    f.write_text("# my graph\n0 1\n\n1 2   # a comment\n2 0\n1 0\n")
    g = read_edge_list(f, num_nodes=5)  # nodes 3 and 4 exist but are isolated; 1 0 repeats 0 1
    assert sorted(g.nodes) == [0, 1, 2, 3, 4] and g.number_of_edges() == 3
    assert build_graph(f"file:{f}", 5).number_of_edges() == 3
    assert read_edge_list(f).number_of_nodes() == 3  # without num_nodes: max id + 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("0 1\n2\n", r"e\.txt:2: expected two integer node ids 'u v', got '2'"),
        ("0 1\na b\n", r"e\.txt:2: node ids must be integers, got 'a b'"),
        ("0 1 2\n", r"e\.txt:1: expected 'u v' optionally followed by an attribute dict"),
        ("0 1\n1 7\n", r"e\.txt:2: unknown node id 7; node ids must be 0\.\.4 \(nodes=5\)"),
        ("0 -1\n", r"e\.txt:1: unknown node id -1"),
        ("0 1\n3 3\n", r"e\.txt:2: self-loop on node 3"),
        ("# nothing\n\n", "has no edges"),
        ("", "has no edges"),
    ],
)
def test_bad_edge_list_files_get_the_line_and_the_rule(tmp_path, text, match):
    f = tmp_path / "e.txt"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_edge_list(f, num_nodes=5)


def test_self_loops_can_be_dropped_and_missing_files_are_named(tmp_path):
    f = tmp_path / "e.txt"
    f.write_text("0 1\n1 1\n")
    assert read_edge_list(f, allow_self_loops=True).number_of_edges() == 1
    with pytest.raises(ValueError, match="does not exist"):
        read_edge_list(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="does not exist"):
        build_graph(f"file:{tmp_path / 'missing.txt'}", None)


def test_parse_keeps_file_paths_whole():
    assert parse_graph_spec("file:/a:b/c=d.txt") == ("file", {"path": "/a:b/c=d.txt"})
    assert parse_graph_spec("BA:m=3") == ("ba", {"m": 3})
