"""Routing policies: which links each flow's bytes cross.

Every policy picks among the *equal-cost* (fewest-hop) paths between two hosts over
working links; hosts never forward.

- ``ecmp``: each (sub)flow takes one path. At every switch with several next hops the
  choice is ``hash(5-tuple, switch seed) % next_hops`` (the ns-3/SimAI switch model). The
  5-tuple is (src, dst, UDP source port, 4791, 17); the source port is drawn per
  connection and sub-flow from ``seed``, as RoCE derives it from the queue pair. A
  dual-port NIC is a switch here too: the port is hashed per QP (bonding).
- ``spray``: ideal packet spraying, a fluid split of every flow evenly over all its
  equal-cost paths (``splits`` is irrelevant).
- ``planned``: each sub-flow takes one path chosen by a central planner (C4P). For equal
  flows on a 2-tier fabric (leaf-spine, rail-optimized, dual-plane) the planner edge-colours
  the bipartite multigraph source-ToR -> destination-ToR with Delta colours (Koenig) and maps
  colour c to spine ``c mod S``; a dual-port stage first colours host -> host and maps colour
  c to port ``c mod 2``. Otherwise (3 tiers, failed links, unequal sizes, or flows already
  planned in an earlier step) it assigns sub-flows largest-first to the path with the least
  resulting congestion, then moves sub-flows off the hottest links while that helps.

``splits=k`` cuts every flow into ``k`` equal sub-flows (``k`` queue pairs per connection).
"""

from __future__ import annotations

import json
import math
import re
import weakref
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_bipartite_matching, shortest_path

from .topology import Topology
from .traffic import Traffic

__all__ = ["PathTable", "Routing", "RoutedStep", "route", "plan", "minimal_splits", "lockstep_phases",
           "POLICIES", "ecmp_hash"]

POLICIES = ("ecmp", "spray", "planned")
_M64 = (1 << 64) - 1
_ROCE_DPORT, _UDP = 4791, 17
_TOL = 1e-12


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of a 64-bit integer."""
    x &= _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def ecmp_hash(src: int, dst: int, sport: int, switch_seed: int) -> int:
    """The ECMP hash of a RoCEv2 5-tuple at a switch: (src, dst, sport, 4791, udp) mixed with the seed."""
    h = _mix64(src * 0x9E3779B97F4A7C15 + dst)
    h = _mix64(h ^ ((sport << 32) | (_ROCE_DPORT << 8) | _UDP))
    return _mix64(h ^ switch_seed)


class PathTable:
    """Equal-cost paths between hosts, cached per topology (see :func:`paths_of`).

    ``candidates(a, b)`` is a ``[P, L]`` array of link ids: row ``p`` is one fewest-hop path
    from host index ``a`` to host index ``b``; rows are in lexicographic link-id order.
    """

    def __init__(self, topo: Topology, max_paths: int = 4096):
        self.topo = topo
        self.max_paths = max_paths
        up = topo.link_up
        src, dst = topo.link_src, topo.link_dst
        self.is_sw_link = up & ~topo.is_host[src] & ~topo.is_host[dst]
        ids = np.flatnonzero(self.is_sw_link)
        n = topo.num_nodes
        order = ids[np.lexsort((ids, src[ids]))]
        self.out_ptr = np.searchsorted(src[order], np.arange(n + 1))
        self.out_ids = order
        # Distances are computed on the switch-only graph (hosts never forward), compactly indexed.
        self.sw_ids = np.flatnonzero(~topo.is_host)
        compact = np.full(n, -1, np.int64)
        compact[self.sw_ids] = np.arange(len(self.sw_ids))
        self.compact = compact
        m = len(self.sw_ids)
        self.rev = sp.csr_matrix((np.ones(len(ids)), (compact[dst[ids]], compact[src[ids]])), shape=(m, m))
        host_links = up & (topo.is_host[src] | topo.is_host[dst])
        hl = np.flatnonzero(host_links)
        self.host_out = _group(hl, src[hl], topo.hosts)
        self.host_in = _group(hl, dst[hl], topo.hosts)
        self._dist: dict[int, np.ndarray] = {}
        self._sw: dict[tuple[int, int], np.ndarray | None] = {}
        self._parts: dict[tuple[int, int], list] = {}
        self._cand: dict[tuple[int, int], np.ndarray] = {}
        self._trie: dict[tuple, tuple | None] = {}
        self._spray: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def dist_to(self, t: int) -> np.ndarray:
        """Hops from every node to switch ``t`` over working switch links (inf: unreachable or a host)."""
        d = self._dist.get(t)
        if d is None:
            dc = shortest_path(self.rev, method="D", unweighted=True, indices=int(self.compact[t]))
            d = np.full(self.topo.num_nodes, np.inf)
            d[self.sw_ids] = dc
            self._dist[t] = d
        return d

    def switch_paths(self, s: int, t: int) -> np.ndarray | None:
        """All fewest-hop switch paths ``s -> t`` as ``[P, hops]`` link ids (None if unreachable)."""
        key = (s, t)
        if key in self._sw:
            return self._sw[key]
        if s == t:
            res = np.zeros((1, 0), np.int64)
        else:
            dist = self.dist_to(t)
            if not np.isfinite(dist[s]):
                res = None
            else:
                link_dst = self.topo.link_dst
                nodes, prefix = [s], np.zeros((1, 0), np.int64)
                for hop in range(int(dist[s])):
                    new_nodes, new_prefix = [], []
                    for v, pre in zip(nodes, prefix):
                        lk = self.out_ids[self.out_ptr[v]:self.out_ptr[v + 1]]
                        lk = lk[dist[link_dst[lk]] == dist[s] - hop - 1]
                        new_nodes.append(link_dst[lk])
                        new_prefix.append(np.column_stack([np.repeat(pre[None, :], len(lk), 0), lk]))
                    nodes = np.concatenate(new_nodes).tolist()
                    prefix = np.concatenate(new_prefix)
                    if len(nodes) > self.max_paths:
                        raise ValueError(f"max_paths: more than {self.max_paths} equal-cost paths between "
                                         f"{self.topo.nodes[s]!r} and {self.topo.nodes[t]!r}")
                res = prefix.astype(np.int64)
        self._sw[key] = res
        return res

    def parts(self, a: int, b: int) -> list[tuple[int, int, int, int]]:
        """Fewest-hop routes from host index ``a`` to ``b`` as ``(out link, first switch, last
        switch, in link)`` combinations (``(link, -1, -1, -1)`` for a direct host-host cable)."""
        key = (a, b)
        hit = self._parts.get(key)
        if hit is not None:
            return hit
        t = self.topo
        na, nb = int(t.hosts[a]), int(t.hosts[b])
        outs, ins = self.host_out[na], self.host_in[nb]
        direct = outs[t.link_dst[outs] == nb]
        if len(direct):
            res = [(int(lk), -1, -1, -1) for lk in direct]
        else:
            best, res = math.inf, []
            for lo in outs:
                s = int(t.link_dst[lo])
                if t.is_host[s]:
                    continue
                for li in ins:
                    u = int(t.link_src[li])
                    if t.is_host[u]:
                        continue
                    d = self.dist_to(u)[s]
                    if d < best:
                        best, res = d, []
                    if d == best and np.isfinite(d):
                        res.append((int(lo), s, u, int(li)))
            if not res:
                raise ValueError(f"flow {t.nodes[na]}->{t.nodes[nb]}: no path over working links")
        self._parts[key] = res
        return res

    def candidates(self, a: int, b: int) -> np.ndarray:
        """Equal-cost host paths from host index ``a`` to host index ``b``, ``[P, L]`` link ids,
        rows in lexicographic order."""
        key = (a, b)
        c = self._cand.get(key)
        if c is not None:
            return c
        parts = self.parts(a, b)
        if parts[0][1] < 0:
            c = np.asarray([[p[0]] for p in parts], np.int64)
        else:
            rows = []
            for lo, s, u, li in parts:
                sw = self.switch_paths(s, u)
                rows.append(np.column_stack([np.full(len(sw), lo), sw, np.full(len(sw), li)]))
            c = np.concatenate(rows).astype(np.int64)
            if len(parts) > 1:
                c = c[np.lexsort(c.T[::-1])]
        c.setflags(write=False)
        self._cand[key] = c
        return c

    def _trie_of(self, key, rows_fn) -> tuple | None:
        hit = self._trie.get(key)
        if hit is None and key not in self._trie:
            hit = _build_trie(self.topo.link_src, rows_fn())
            self._trie[key] = hit
        return hit

    def ecmp_path(self, a: int, b: int, choose) -> list[int]:
        """One path from host index ``a`` to ``b``: at every node with several next hops,
        ``choose(node, n)`` returns the index (in link-id order) of the next hop to take."""
        parts = self.parts(a, b)
        if parts[0][1] < 0:
            return [parts[0][0] if len(parts) == 1 else parts[choose(int(self.topo.hosts[a]), len(parts))][0]]
        los = sorted({p[0] for p in parts})
        lo = los[0] if len(los) == 1 else los[choose(int(self.topo.hosts[a]), len(los))]
        mine = [p for p in parts if p[0] == lo]
        if len(mine) == 1:
            _, s, u, li = mine[0]
            trie = self._trie_of(("sw", s, u), lambda: self.switch_paths(s, u))
            return [lo, *_walk(trie, choose), li]
        c = self.candidates(a, b)
        trie = self._trie_of(("host", a, b, lo), lambda: c[c[:, 0] == lo][:, 1:])
        return [lo, *_walk(trie, choose)]

    def spray(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Links and fractions of a flow ``a -> b`` split evenly over all its equal-cost paths."""
        parts = self.parts(a, b)
        if len(parts) == 1 and parts[0][1] >= 0:
            lo, s, u, li = parts[0]
            key = ("sw", s, u)
            hit = self._spray.get(key)
            if hit is None:
                sw = self.switch_paths(s, u)
                hit = np.unique(sw, return_counts=True) if sw.size else (np.zeros(0, np.int64), np.zeros(0))
                hit = (hit[0], hit[1] / max(sw.shape[0], 1))
                self._spray[key] = hit
            return np.concatenate([[lo], hit[0], [li]]), np.concatenate([[1.0], hit[1], [1.0]])
        c = self.candidates(a, b)
        links, counts = np.unique(c, return_counts=True)
        return links, counts / c.shape[0]


def _build_trie(link_src: np.ndarray, c: np.ndarray) -> tuple | None:
    """Next-hop tree of lexicographically sorted paths ``c`` (``[P, L]``).

    Nodes: ``("fixed", links, next)`` for hops without choice, ``("choice", node, links,
    kids)`` where ``node`` decides among ``links`` and ``kids[i]`` follows ``links[i]``.
    """
    if c.shape[1] == 0:
        return None
    if c.shape[0] == 1:
        return ("fixed", tuple(int(x) for x in c[0]), None)
    differ = np.flatnonzero((c != c[0]).any(0))
    h = int(differ[0])
    col = c[:, h]
    cut = np.flatnonzero(col[1:] != col[:-1]) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(col)]])
    links = tuple(int(col[s]) for s in starts)
    kids = tuple(_build_trie(link_src, c[s:e, h + 1:]) for s, e in zip(starts, ends))
    node = ("choice", int(link_src[links[0]]), links, kids)
    return ("fixed", tuple(int(x) for x in c[0, :h]), node) if h else node


def _walk(trie, choose) -> list[int]:
    path: list[int] = []
    node = trie
    while node is not None:
        if node[0] == "fixed":
            path.extend(node[1])
            node = node[2]
        else:
            _, sw, links, kids = node
            i = choose(sw, len(links))
            path.append(links[i])
            node = kids[i]
    return path


def _group(ids: np.ndarray, key: np.ndarray, wanted: np.ndarray) -> dict[int, np.ndarray]:
    """``{k: sorted ids with key == k}`` for every ``k`` in ``wanted`` (one sort, no scans)."""
    order = np.lexsort((ids, key))
    ids, key = ids[order], key[order]
    lo = np.searchsorted(key, wanted, side="left")
    hi = np.searchsorted(key, wanted, side="right")
    return {int(w): ids[a:b] for w, a, b in zip(wanted, lo, hi)}


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def paths_of(topo: Topology) -> PathTable:
    """The (cached) path table of a topology."""
    pt = _TABLES.get(topo)
    if pt is None:
        pt = PathTable(topo)
        _TABLES[topo] = pt
    return pt


@dataclass(frozen=True, eq=False)
class RoutedStep:
    """One step template of one job after routing: rows are (sub)flows."""

    matrix: sp.csr_matrix
    """``[R, num_links]``: fraction of a row's rate carried by each link (1 on its path; <1 for spray)."""
    size: np.ndarray
    """``[R]`` bytes of each row."""
    flow: np.ndarray
    """``[R]`` index of the step's flow a row belongs to."""
    paths: list[np.ndarray] | None
    """Single-path policies: the link ids of each row's path."""

    def link_bytes(self) -> np.ndarray:
        return self.matrix.T @ self.size


@dataclass(frozen=True, eq=False)
class Routing:
    """Routed traffic: ``steps[j][s]`` is step template ``s`` of job ``j``."""

    topo: Topology
    traffic: Traffic
    policy: str
    splits: int
    seed: int
    steps: list[list[RoutedStep]]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The path assignment: one record per (job, step, flow, sub-flow) with node names."""
        if self.policy == "spray":
            raise ValueError("policy: 'spray' has no single-path assignment to write")
        t = self.topo
        out = []
        for job, routed in zip(self.traffic.jobs, self.steps):
            for s, (step, rs) in enumerate(zip(job.steps, routed)):
                sub_no = np.zeros(len(rs.flow), np.int64)
                for r in range(1, len(rs.flow)):
                    sub_no[r] = sub_no[r - 1] + 1 if rs.flow[r] == rs.flow[r - 1] else 0
                for r, path in enumerate(rs.paths):
                    f = int(rs.flow[r])
                    nodes = [t.nodes[t.link_src[path[0]]]] + [t.nodes[t.link_dst[lk]] for lk in path]
                    out.append({"job": job.name, "step": s, "label": step.label, "repeat": step.repeat,
                                "src": t.nodes[t.hosts[step.src[f]]], "dst": t.nodes[t.hosts[step.dst[f]]],
                                "connection": int(step.conn[f]), "subflow": int(sub_no[r]),
                                "bytes": float(rs.size[r]), "path": nodes})
        return {"topology": t.name, "policy": self.policy, "splits": self.splits, "seed": self.seed,
                "assignments": out}

    def write_json(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)


# --- phases ------------------------------------------------------------------------------

def lockstep_phases(traffic: Traffic) -> list[tuple[tuple[tuple[int, int], ...], int]]:
    """Steps of all jobs in lockstep: ``[(((job, template), ...), length), ...]``.

    Phase ``i`` holds step ``i`` of every job that still has one. Consecutive phases with
    the same templates are merged (``length`` counts them). The static views (congestion,
    planning, the LP bound) look at these phases; the simulator does not assume lockstep.
    """
    bounds: set[int] = {0}
    runs = []
    for job in traffic.jobs:
        ends = np.cumsum([s.repeat for s in job.steps])
        runs.append(ends)
        bounds.update(int(e) for e in ends)
    edges = sorted(bounds)
    phases: list[tuple[tuple[tuple[int, int], ...], int]] = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        combo = tuple((j, int(np.searchsorted(ends, lo, side="right")))
                      for j, ends in enumerate(runs) if lo < ends[-1])
        if phases and phases[-1][0] == combo:
            phases[-1] = (combo, phases[-1][1] + hi - lo)
        else:
            phases.append((combo, hi - lo))
    return phases


# --- policies ----------------------------------------------------------------------------

def _check_traffic(topo: Topology, traffic: Traffic) -> None:
    if not isinstance(traffic, Traffic):
        raise ValueError(f"flows: expected a Traffic (from net.collective), got {type(traffic).__name__}")
    hi = traffic.max_host()
    if hi >= topo.num_hosts:
        raise ValueError(f"hosts: host index {hi} out of range for topology {topo.name!r} "
                         f"with {topo.num_hosts} hosts")


def _check_splits(splits) -> int:
    if isinstance(splits, bool) or not isinstance(splits, (int, np.integer)) or splits < 1:
        raise ValueError(f"splits: must be a positive integer or 'auto', got {splits!r}")
    return int(splits)


def _sports(seed: int, job: int, conn: np.ndarray, splits: int) -> list[int]:
    """RoCE UDP source port of every (connection, sub-flow), in [49152, 65536)."""
    base = _mix64(seed * 0x51ED27 + job * 0x2545F491 + 1)
    return [49152 + _mix64(base ^ (int(c) * 64 + q)) % 16384 for c in conn for q in range(splits)]


def _matrix(paths: list[np.ndarray], num_links: int) -> sp.csr_matrix:
    lengths = np.fromiter((len(p) for p in paths), np.int64, len(paths))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    idx = np.concatenate(paths) if paths else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(idx)), idx, indptr), shape=(len(paths), num_links))


def _route_ecmp(topo, pt, job_id, step, splits, seed, switch_seed) -> RoutedStep:
    sports = _sports(seed, job_id, step.conn, splits)
    paths = []
    hosts = topo.hosts
    for f in range(step.num_flows):
        a, b = int(step.src[f]), int(step.dst[f])
        na, nb = int(hosts[a]), int(hosts[b])
        for q in range(splits):
            sport = sports[f * splits + q]
            paths.append(np.asarray(pt.ecmp_path(
                a, b, lambda node, n, sport=sport, na=na, nb=nb: ecmp_hash(na, nb, sport, switch_seed[node]) % n), np.int64))
    size = np.repeat(step.size / splits, splits)
    flow = np.repeat(np.arange(step.num_flows), splits)
    return RoutedStep(_matrix(paths, topo.num_links), size, flow, paths)


def _route_spray(topo, pt, step) -> RoutedStep:
    idx, val, ptr = [], [], [0]
    for f in range(step.num_flows):
        links, w = pt.spray(int(step.src[f]), int(step.dst[f]))
        idx.append(links)
        val.append(w)
        ptr.append(ptr[-1] + len(links))
    m = sp.csr_matrix((np.concatenate(val), np.concatenate(idx), np.asarray(ptr)),
                      shape=(step.num_flows, topo.num_links))
    return RoutedStep(m, step.size.astype(np.float64), np.arange(step.num_flows), None)


def route(topo: Topology, traffic: Traffic, policy: str = "ecmp", splits: int | str = 1, seed: int = 0) -> Routing:
    """Route every step of every job with ``policy`` (see the module docstring).

    ``splits="auto"`` (planned only) uses the theorem's minimal split count
    :func:`minimal_splits`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy: unknown policy {policy!r} (choose from {POLICIES})")
    _check_traffic(topo, traffic)
    if splits == "auto":
        if policy != "planned":
            raise ValueError(f"splits: 'auto' is the planner's minimal split count; policy is {policy!r}")
        splits = minimal_splits(topo, traffic)
    splits = _check_splits(splits)
    pt = paths_of(topo)
    if policy == "planned":
        return _plan(topo, pt, traffic, splits, seed)
    switch_seed = [_mix64(seed * 0x1F3D5B79 + node + 7) for node in range(topo.num_nodes)]
    steps = []
    for j, job in enumerate(traffic.jobs):
        if policy == "ecmp":
            steps.append([_route_ecmp(topo, pt, j, s, splits, seed, switch_seed) for s in job.steps])
        else:
            steps.append([_route_spray(topo, pt, s) for s in job.steps])
    return Routing(topo, traffic, policy, splits if policy == "ecmp" else 1, seed, steps)


def plan(topo: Topology, traffic: Traffic, splits: int | str = 1, seed: int = 0) -> Routing:
    """C4P-style planned single paths for every (sub)flow; ``.to_json()`` is the assignment."""
    return route(topo, traffic, "planned", splits, seed)


# --- the planner ---------------------------------------------------------------------------

def _colour(u: np.ndarray, v: np.ndarray, n: int) -> np.ndarray:
    """Proper edge colouring of a bipartite multigraph (left ``u``, right ``v``, vertices
    ``0..n-1`` on each side) with exactly Delta colours (Koenig's theorem).

    Dummy edges make it Delta-regular; a regular bipartite multigraph has a perfect
    matching (Hall), and peeling Delta of them off gives the colour classes.
    """
    E = len(u)
    if E == 0:
        return np.zeros(0, np.int64)
    du = np.bincount(u, minlength=n)
    dv = np.bincount(v, minlength=n)
    delta = int(max(du.max(), dv.max()))
    counts = np.zeros((n, n), np.int64)
    np.add.at(counts, (u, v), 1)
    real = counts.copy()
    # Pad: pair left and right deficits greedily (both sum to n*delta - E).
    lu, lv = delta - du, delta - dv
    i = j = 0
    while i < n and j < n:
        if lu[i] == 0:
            i += 1
            continue
        if lv[j] == 0:
            j += 1
            continue
        k = min(lu[i], lv[j])
        counts[i, j] += k
        lu[i] -= k
        lv[j] -= k
    order = np.lexsort((v, u))
    pair_start = np.zeros(n * n + 1, np.int64)
    pair_start[1:] = np.cumsum(np.bincount(u * n + v, minlength=n * n))
    used = np.zeros(n * n, np.int64)
    colour = np.full(E, -1, np.int64)
    rows = np.arange(n)
    for c in range(delta):
        r, cc = np.nonzero(counts)
        g = sp.csr_matrix((np.ones(len(r)), (r, cc)), shape=(n, n))
        match = maximum_bipartite_matching(g, perm_type="column")
        if (match < 0).any():  # cannot happen for a regular bipartite multigraph
            raise RuntimeError("edge colouring: no perfect matching in a regular bipartite multigraph")
        counts[rows, match] -= 1
        pid = rows * n + match
        has_real = used[pid] < real[rows, match]
        take = pid[has_real]
        colour[order[pair_start[take] + used[take]]] = c
        used[take] += 1
    return colour


def _colour_plan(topo: Topology, pt: PathTable, cands: list[np.ndarray], src_h: np.ndarray,
                 dst_h: np.ndarray) -> np.ndarray | None:
    """Row chosen per sub-flow by two-stage colouring, or None where the structure doesn't fit
    (more than 2 tiers, ports not aligned with planes, or a pair missing some spine)."""
    t = topo
    lengths = {c.shape[1] for c in cands}
    if not lengths <= {1, 2, 4}:
        return None
    # Colouring counts sub-flows per link; that is the congestion only if the links a colour
    # class can land on have equal capacity (else a degraded cable would get a full share).
    inner = [c[:, 1:-1].ravel() for c in cands if c.shape[1] == 4]
    if inner and len(np.unique(t.link_gbps[np.concatenate(inner)])) > 1:
        return None
    ports = [c[:, 0] for c in cands] + [c[:, -1] for c in cands]
    if len(np.unique(t.link_gbps[np.concatenate(ports)])) > 1:
        return None
    n_sub = len(cands)
    choice = np.zeros(n_sub, np.int64)
    # Stage 1: port (plane) of every sub-flow.
    out_port, in_port = {}, {}
    for h in t.hosts:
        for q, lk in enumerate(pt.host_out[int(h)]):
            out_port[int(lk)] = q
        for q, lk in enumerate(pt.host_in[int(h)]):
            in_port[int(lk)] = q
    nports = {len(pt.host_out[int(h)]) for h in t.hosts}
    row_port = []
    for c in cands:
        pa = np.fromiter((out_port[int(x)] for x in c[:, 0]), np.int64, len(c))
        pb = np.fromiter((in_port[int(x)] for x in c[:, -1]), np.int64, len(c))
        if c.shape[1] > 1 and (pa != pb).any():
            return None
        row_port.append(pa)
    multi = [len(np.unique(p)) > 1 for p in row_port]
    if any(multi):
        if not all(multi) or len(nports) != 1:
            return None
        q = nports.pop()
        if any(len(np.unique(p)) != q for p in row_port):
            return None
        port = _colour(src_h, dst_h, t.num_hosts) % q
    else:
        port = np.array([p[0] for p in row_port], np.int64)
    # Stage 2: spine within the plane.
    keep = [np.flatnonzero(p == port[i]) for i, p in enumerate(row_port)]
    four = [i for i, c in enumerate(cands) if c.shape[1] == 4]
    for i, c in enumerate(cands):
        if c.shape[1] != 4:
            if len(keep[i]) != 1:
                return None
            choice[i] = keep[i][0]
    if not four:
        return choice
    planes: dict[int, list[int]] = {}
    mids: dict[int, np.ndarray] = {}
    for i in four:
        rows = keep[i]
        m = np.sort(t.link_dst[cands[i][rows, 1]])
        planes.setdefault(int(port[i]), []).append(i)
        ref = mids.setdefault(int(port[i]), m)
        if not np.array_equal(ref, m):
            return None
    for q, members in planes.items():
        mid = mids[q]
        a = np.array([t.link_src[cands[i][keep[i][0], 1]] for i in members])
        b = np.array([t.link_dst[cands[i][keep[i][0], 2]] for i in members])
        tors, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
        col = _colour(inv[:len(a)], inv[len(a):], len(tors)) % len(mid)
        for i, cc in zip(members, col):
            rows = keep[i]
            choice[i] = rows[np.flatnonzero(t.link_dst[cands[i][rows, 1]] == mid[cc])[0]]
    return choice


def _fat_tree_plan(topo: Topology, cands: list[np.ndarray]) -> np.ndarray | None:
    """Row chosen per sub-flow on an intact k-ary fat-tree by recursive (Clos) colouring, or None.

    Stage 1 colours the multigraph source-edge -> destination-edge of every sub-flow that leaves
    its edge switch and maps colour c to aggregation index ``j = c mod k/2`` (core group ``j``
    joins aggregation switch ``j`` of every pod, so ``j`` is the same at both ends): every
    edge uplink and downlink carries at most ``ceil(Delta_edge / (k/2))`` sub-flows, the
    optimum at that tier. Stage 2, per ``j``, colours source-pod -> destination-pod among the
    inter-pod sub-flows on index ``j`` and maps colour c to core ``(j, c mod k/2)``.
    """
    t = topo
    if t.meta.get("kind") != "fat_tree" or t.meta.get("failed") or t.meta.get("degraded"):
        return None
    half = t.meta["k"] // 2
    idx = {}  # node id -> (pod or group, index), from the builder's names edge{p}.{i}, agg{p}.{j}, core{j}.{m}
    for i, name in enumerate(t.nodes):
        m = re.fullmatch(r"(?:edge|agg|core)(\d+)\.(\d+)", name)
        if m:
            idx[i] = (int(m.group(1)), int(m.group(2)))
    choice = np.zeros(len(cands), np.int64)
    up = [i for i, c in enumerate(cands) if c.shape[1] >= 4]
    if not up:
        return choice
    src_e = np.array([t.link_src[cands[i][0, 1]] for i in up])
    dst_e = np.array([t.link_dst[cands[i][0, -2]] for i in up])
    edges, inv = np.unique(np.concatenate([src_e, dst_e]), return_inverse=True)
    agg_j = _colour(inv[:len(up)], inv[len(up):], len(edges)) % half
    inter: dict[int, list[tuple[int, np.ndarray]]] = {}  # j -> [(sub-flow, rows through aggregation j)]
    for i, j in zip(up, agg_j):
        c = cands[i]
        rows = np.flatnonzero([idx[int(t.link_dst[x])][1] == j for x in c[:, 1]])
        if c.shape[1] == 4:
            choice[i] = rows[0]
        else:
            inter.setdefault(int(j), []).append((i, rows))
    for members in inter.values():
        pa = np.array([idx[int(t.link_src[cands[i][0, 1]])][0] for i, _ in members])
        pb = np.array([idx[int(t.link_dst[cands[i][0, -2]])][0] for i, _ in members])
        pods, inv = np.unique(np.concatenate([pa, pb]), return_inverse=True)
        core_m = _colour(inv[:len(members)], inv[len(members):], len(pods)) % half
        for (i, rows), m in zip(members, core_m):
            c = cands[i]
            hit = [r for r in rows if idx[int(t.link_dst[c[r, 2]])][1] == m]
            if not hit:
                return None
            choice[i] = hit[0]
    return choice


def _greedy_plan(cands: list[np.ndarray], size: np.ndarray, cap: np.ndarray, load: np.ndarray,
                 max_passes: int = 50) -> np.ndarray:
    """Largest-first onto the least-congested path, then local moves off the hottest links.

    ``load`` (bytes per link, updated in place) starts with what earlier plans put there.
    """
    n = len(cands)
    choice = np.zeros(n, np.int64)
    for i in np.argsort(-size, kind="stable"):
        c = cands[i]
        if c.shape[0] > 1:
            lv = (load[c] + size[i]) / cap[c]
            worst = lv.max(1)
            best = np.flatnonzero(worst <= worst.min() * (1 + 1e-12))
            # Ties: the path whose links are least loaded in total.
            choice[i] = best[np.argmin((load[c[best]] / cap[c[best]]).sum(1))] if len(best) > 1 else best[0]
        load[c[choice[i]]] += size[i]
    multi = np.flatnonzero([c.shape[0] > 1 for c in cands])
    if len(multi) == 0:
        return choice
    for _ in range(max_passes):
        cong = load / cap
        cmax = cong.max()
        moved = False
        for i in multi[np.argsort(-size[multi], kind="stable")]:
            c = cands[i]
            cur = c[choice[i]]
            if (load[cur] / cap[cur]).max() < cmax * (1 - 1e-9):
                continue
            load[cur] -= size[i]
            worst = ((load[c] + size[i]) / cap[c]).max(1)
            p = int(np.argmin(worst))
            if worst[p] < cmax * (1 - 1e-9):
                choice[i] = p
                moved = True
            load[c[choice[i]]] += size[i]
        if not moved:
            break
    return choice


def _plan(topo: Topology, pt: PathTable, traffic: Traffic, splits: int, seed: int) -> Routing:
    cap = topo.capacity_Bps
    assigned: dict[tuple[int, int, int], np.ndarray] = {}  # (job, conn, sub) -> path
    methods = set()
    for combo, _ in lockstep_phases(traffic):
        load = np.zeros(topo.num_links)
        new_keys, new_cands, new_size, new_src, new_dst = [], [], [], [], []
        for j, s in combo:
            step = traffic.jobs[j].steps[s]
            for f in range(step.num_flows):
                c = pt.candidates(int(step.src[f]), int(step.dst[f]))
                for q in range(splits):
                    key = (j, int(step.conn[f]), q)
                    if key in assigned:
                        load[assigned[key]] += step.size[f] / splits
                    else:
                        new_keys.append(key)
                        new_cands.append(c)
                        new_size.append(step.size[f] / splits)
                        new_src.append(step.src[f])
                        new_dst.append(step.dst[f])
        if not new_keys:
            continue
        size = np.asarray(new_size)
        choice = None
        if not load.any() and np.allclose(size, size[0], rtol=_TOL, atol=0):
            choice = _colour_plan(topo, pt, new_cands, np.asarray(new_src), np.asarray(new_dst))
            if choice is None:
                choice = _fat_tree_plan(topo, new_cands)
            if choice is not None:
                methods.add("colouring")
        if choice is None:
            choice = _greedy_plan(new_cands, size, cap, load)
            methods.add("greedy")
        for key, c, p in zip(new_keys, new_cands, choice):
            assigned[key] = c[p]
    steps = []
    for j, job in enumerate(traffic.jobs):
        routed = []
        for step in job.steps:
            paths = [assigned[(j, int(step.conn[f]), q)] for f in range(step.num_flows) for q in range(splits)]
            routed.append(RoutedStep(_matrix(paths, topo.num_links), np.repeat(step.size / splits, splits),
                                     np.repeat(np.arange(step.num_flows), splits), paths))
        steps.append(routed)
    return Routing(topo, traffic, "planned", splits, seed, steps, meta={"planner": sorted(methods)})


def minimal_splits(topo: Topology, traffic: Traffic) -> int:
    """The theorem's minimal split count on a 2-tier leaf-spine: ``k* = S / gcd(S, Delta)``.

    ``Delta`` is the largest number of cross-leaf flows leaving or entering one leaf in a
    (lockstep) phase, ``S`` the number of spines. Planned single paths with ``k`` equal
    splits reach the sprayed maximum congestion iff ``S`` divides ``k * Delta``; over all
    phases the least common multiple of the per-phase ``k*`` is returned.
    """
    kind = topo.meta.get("kind")
    if kind not in ("leaf_spine", "rail_optimized") or topo.meta.get("failed") or topo.meta.get("nvlink_gbps"):
        raise ValueError(f"topo: minimal_splits needs a 2-tier leaf-spine (or rail-optimized) fabric without "
                         f"failed links or NVLink, got {kind!r}")
    _check_traffic(topo, traffic)
    pt = paths_of(topo)
    S = int(topo.meta["spines"])
    leaf = np.array([topo.link_dst[pt.host_out[int(h)][0]] for h in topo.hosts])
    k = 1
    for combo, _ in lockstep_phases(traffic):
        a, b, sizes = [], [], []
        for j, s in combo:
            st = traffic.jobs[j].steps[s]
            a.append(leaf[st.src])
            b.append(leaf[st.dst])
            sizes.append(st.size)
        a, b, sizes = np.concatenate(a), np.concatenate(b), np.concatenate(sizes)
        if not np.allclose(sizes, sizes[0], rtol=_TOL, atol=0):
            raise ValueError("flows: the theorem needs equal flow sizes within a phase")
        cross = a != b
        if not cross.any():
            continue
        delta = int(max(np.bincount(a[cross]).max(), np.bincount(b[cross]).max()))
        k = math.lcm(k, S // math.gcd(S, delta))
    return k
