"""Communication graphs: who can talk to whom.

A graph is a ``networkx.Graph`` on the integer nodes ``0..N-1``, undirected (a link
carries models both ways), without self-loops (every node always keeps its own model;
the averaging rules add the self term). It comes from a spec string, the form the CLI
takes::

    ba:m=2            Barabasi-Albert, each new node attaches to m existing ones
    er:p=0.05         Erdos-Renyi G(N, p); default p gives mean degree 4 (as ba:m=2)
    ring              cycle; ring:k=2 links each node to k neighbours on each side
    torus             2-D periodic grid; torus:rows=10,cols=10 (rows*cols must be N)
    file:PATH         an edge list: one "u v" per line (see :func:`read_edge_list`)

Random generators take their seed from :func:`commflow.decentral.rng.graph_seed`, so a
(spec, N, seed) triple is one graph on every process that builds it.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import networkx as nx
import numpy as np

from .rng import graph_seed

__all__ = ["GRAPH_KINDS", "build_graph", "parse_graph_spec", "read_edge_list", "edge_array"]

# kind -> {parameter: type}
GRAPH_KINDS: dict[str, dict[str, type]] = {
    "ba": {"m": int},
    "er": {"p": float},
    "ring": {"k": int},
    "torus": {"rows": int, "cols": int},
    "file": {},
}


def parse_graph_spec(spec: str) -> tuple[str, dict[str, int | float | str]]:
    """``"ba:m=2"`` -> ``("ba", {"m": 2})``; ``"file:PATH"`` -> ``("file", {"path": PATH})``."""
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind not in GRAPH_KINDS:
        raise ValueError(f"graph={spec!r}: unknown kind {kind!r}; choose from {sorted(GRAPH_KINDS)}")
    if kind == "file":
        if not rest:
            raise ValueError(f"graph={spec!r}: 'file:' needs a path, e.g. file:edges.txt")
        return kind, {"path": rest}
    params: dict[str, int | float | str] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in GRAPH_KINDS[kind]:
            known = ", ".join(f"{k}=<{t.__name__}>" for k, t in GRAPH_KINDS[kind].items()) or "none"
            raise ValueError(f"graph={spec!r}: bad parameter {item!r} for {kind!r}; parameters: {known}")
        try:
            params[name] = GRAPH_KINDS[kind][name](value)
        except ValueError:
            raise ValueError(
                f"graph={spec!r}: {name}={value!r} is not a valid {GRAPH_KINDS[kind][name].__name__}"
            ) from None
    return kind, params


def _torus_shape(n: int, rows: int | None, cols: int | None) -> tuple[int, int]:
    if rows is None and cols is None:
        # The most square factorisation; a prime N has none but 1 x N (a ring).
        rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
        cols = n // rows
    elif rows is None:
        rows = n // cols if cols and n % cols == 0 else -1
    elif cols is None:
        cols = n // rows if rows and n % rows == 0 else -1
    if rows < 3 or cols < 3 or rows * cols != n:
        raise ValueError(
            f"graph='torus': needs rows*cols == nodes={n} with rows, cols >= 3 (a periodic grid "
            f"smaller than 3 has double links); got rows={rows}, cols={cols}"
        )
    return rows, cols


def build_graph(spec: str, num_nodes: int | None, seed: int = 0) -> nx.Graph:
    """The graph of ``spec`` on nodes ``0..num_nodes-1``.

    ``num_nodes`` may be ``None`` only for ``file:`` specs (then the file decides).
    Raises ``ValueError`` naming the spec and the rule it breaks.
    """
    kind, params = parse_graph_spec(spec)
    if kind == "file":
        return read_edge_list(str(params["path"]), num_nodes)
    if num_nodes is None or num_nodes < 2:
        raise ValueError(f"nodes={num_nodes}: graph {spec!r} needs at least 2 nodes")
    n = num_nodes
    if kind == "ba":
        m = int(params.get("m", 2))
        if not 1 <= m < n:
            raise ValueError(f"graph={spec!r}: Barabasi-Albert needs 1 <= m < nodes={n}, got m={m}")
        g = nx.barabasi_albert_graph(n, m, seed=graph_seed(seed))
    elif kind == "er":
        p = float(params.get("p", min(1.0, 4.0 / (n - 1))))
        if not 0.0 < p <= 1.0:
            raise ValueError(f"graph={spec!r}: Erdos-Renyi needs 0 < p <= 1, got p={p}")
        g = nx.gnp_random_graph(n, p, seed=graph_seed(seed))
    elif kind == "ring":
        k = int(params.get("k", 1))
        if not 1 <= k <= (n - 1) // 2:
            raise ValueError(f"graph={spec!r}: ring needs 1 <= k <= (nodes-1)//2 = {(n - 1) // 2}, got k={k}")
        g = nx.circulant_graph(n, list(range(1, k + 1)))
    else:  # torus
        rows, cols = _torus_shape(n, params.get("rows"), params.get("cols"))  # type: ignore[arg-type]
        grid = nx.grid_2d_graph(rows, cols, periodic=True)
        g = nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})
    out = nx.Graph()
    out.add_nodes_from(range(n))
    out.add_edges_from(g.edges)
    return out


def read_edge_list(path: str | Path, num_nodes: int | None = None, *, allow_self_loops: bool = False) -> nx.Graph:
    """Read an undirected edge list: one ``u v`` pair of integer node ids per line.

    Blank lines and ``#`` comments are skipped; a trailing attribute dict (what
    ``networkx.write_edgelist`` writes by default, e.g. ``0 1 {}``) is accepted and
    ignored; a repeated edge counts once. Node ids must lie in ``0..num_nodes-1``
    (``num_nodes=None``: ``max id + 1``; ids that appear on no line are isolated nodes).
    Self-loops are an error unless ``allow_self_loops`` (then they are dropped: the
    averaging rules already include each node's own model).

    Raises ``ValueError`` with ``path:line`` for a malformed line, an unknown node
    id or a self-loop, and for a file with no edges.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"graph file {str(path)!r} does not exist or is not a file")
    edges: list[tuple[int, int]] = []
    with path.open() as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split(maxsplit=2)
            where = f"{path}:{lineno}"
            if len(fields) < 2:
                raise ValueError(f"{where}: expected two integer node ids 'u v', got {raw.strip()!r}")
            if len(fields) == 3 and not _is_attribute_dict(fields[2]):
                raise ValueError(
                    f"{where}: expected 'u v' optionally followed by an attribute dict, got {raw.strip()!r}"
                )
            try:
                u, v = int(fields[0]), int(fields[1])
            except ValueError:
                raise ValueError(f"{where}: node ids must be integers, got {raw.strip()!r}") from None
            for node in (u, v):
                if node < 0 or (num_nodes is not None and node >= num_nodes):
                    rule = f"0..{num_nodes - 1} (nodes={num_nodes})" if num_nodes is not None else ">= 0"
                    raise ValueError(f"{where}: unknown node id {node}; node ids must be {rule}")
            if u == v:
                if allow_self_loops:
                    continue
                raise ValueError(
                    f"{where}: self-loop on node {u}; self-loops are not allowed (every node keeps "
                    "its own model anyway); pass allow_self_loops=True to drop them"
                )
            edges.append((u, v))
    if not edges:
        raise ValueError(f"graph file {str(path)!r} has no edges (an empty graph cannot mix anything)")
    n = num_nodes if num_nodes is not None else 1 + max(max(e) for e in edges)
    if n < 2:
        raise ValueError(f"graph file {str(path)!r}: needs at least 2 nodes, got {n}")
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(edges)
    return g


def _is_attribute_dict(text: str) -> bool:
    try:
        return isinstance(ast.literal_eval(text), dict)
    except (ValueError, SyntaxError):
        return False


def edge_array(graph: nx.Graph) -> np.ndarray:
    """Edges as an int64 array ``[E, 2]`` with ``u < v``, sorted: a canonical order for every process."""
    if graph.number_of_edges() == 0:
        return np.zeros((0, 2), dtype=np.int64)
    e = np.array([(min(u, v), max(u, v)) for u, v in graph.edges], dtype=np.int64)
    return e[np.lexsort((e[:, 1], e[:, 0]))]
