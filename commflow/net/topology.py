"""Network topologies as arrays: named nodes, directed links, capacities.

A :class:`Topology` is a directed multigraph held as numpy arrays. Every physical
cable is two directed links (full duplex), so the load in one direction never
competes with the other. Hosts are the endpoints of traffic (one host = one GPU and
its NIC, possibly with several ports); switches forward. Hosts never forward: a path
enters a host only at its end. Link ``i`` goes ``link_src[i] -> link_dst[i]`` with
``link_gbps[i]`` gigabits per second; a failed link keeps its capacity but has
``link_up[i] == False`` and no route uses it.

Builders: :func:`leaf_spine` (2 tiers), :func:`fat_tree` (3-tier k-ary), :func:`rail_optimized`
(NIC ``r`` of every server on the rail-``r`` leaf) and :func:`dual_plane` (HPN-like: every NIC
has two ports, port ``p`` on a ToR of plane ``p``; the planes share no switch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

__all__ = ["Topology", "leaf_spine", "fat_tree", "rail_optimized", "dual_plane"]

BYTES_PER_GBIT = 1e9 / 8


@dataclass(frozen=True, eq=False)
class Topology:
    """A network: nodes by name, directed links as parallel arrays.

    Validated on construction (names unique, links between known nodes, capacity > 0,
    every host attached and every pair of hosts connected over working links).
    """

    name: str
    """Free text, shown in tables."""
    nodes: tuple[str, ...]
    """Node names; a node's id is its position."""
    is_host: np.ndarray
    """``[num_nodes]`` bool: True for traffic endpoints (GPU NICs), False for switches."""
    link_src: np.ndarray
    """``[num_links]`` int: tail node id of each directed link."""
    link_dst: np.ndarray
    """``[num_links]`` int: head node id."""
    link_gbps: np.ndarray
    """``[num_links]`` float: capacity in Gbit/s, > 0."""
    link_up: np.ndarray
    """``[num_links]`` bool: False for failed links (never routed over)."""
    hosts: np.ndarray
    """``[num_hosts]`` int: node ids of the hosts; host index ``i`` (what traffic refers to) is ``hosts[i]``."""
    meta: dict = field(default_factory=dict)
    """The builder and its arguments (``{"kind": "leaf_spine", ...}``); planners read the kind."""

    def __post_init__(self) -> None:
        _validate(self)

    # --- sizes and lookups -------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    @property
    def num_links(self) -> int:
        return len(self.link_src)

    @property
    def num_hosts(self) -> int:
        return len(self.hosts)

    @cached_property
    def node_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.nodes)}

    @cached_property
    def host_index(self) -> dict[int, int]:
        """Node id -> host index."""
        return {int(n): i for i, n in enumerate(self.hosts)}

    @property
    def capacity_Bps(self) -> np.ndarray:
        """``[num_links]`` capacity in bytes per second."""
        return self.link_gbps * BYTES_PER_GBIT

    @property
    def fabric_links(self) -> np.ndarray:
        """``[num_links]`` bool: switch-to-switch links (where routing choices show)."""
        return ~self.is_host[self.link_src] & ~self.is_host[self.link_dst]

    def node(self, name: str) -> int:
        try:
            return self.node_index[name]
        except KeyError:
            raise ValueError(f"node {name!r}: unknown node in topology {self.name!r}") from None

    def links_between(self, a: str | int, b: str | int) -> np.ndarray:
        """Ids of the directed links ``a -> b`` (parallel cables give several)."""
        ia = self.node(a) if isinstance(a, str) else int(a)
        ib = self.node(b) if isinstance(b, str) else int(b)
        ids = np.flatnonzero((self.link_src == ia) & (self.link_dst == ib))
        if len(ids) == 0:
            raise ValueError(f"link ({self.nodes[ia]!r}, {self.nodes[ib]!r}): no such link in topology {self.name!r}")
        return ids

    def link_name(self, i: int) -> str:
        return f"{self.nodes[self.link_src[i]]}->{self.nodes[self.link_dst[i]]}"

    @cached_property
    def host_out_Bps(self) -> np.ndarray:
        """``[num_hosts]`` total working egress capacity of each host (all its ports), bytes/s."""
        cap = np.where(self.link_up, self.capacity_Bps, 0.0)
        out = np.bincount(self.link_src, weights=cap, minlength=self.num_nodes)
        return out[self.hosts]

    @cached_property
    def host_in_Bps(self) -> np.ndarray:
        """``[num_hosts]`` total working ingress capacity of each host, bytes/s."""
        cap = np.where(self.link_up, self.capacity_Bps, 0.0)
        inn = np.bincount(self.link_dst, weights=cap, minlength=self.num_nodes)
        return inn[self.hosts]

    # --- variants ------------------------------------------------------------------------
    def _select(self, links: Iterable, both_directions: bool) -> np.ndarray:
        ids: list[int] = []
        for item in links:
            if isinstance(item, (int, np.integer)):
                if not 0 <= int(item) < self.num_links:
                    raise ValueError(f"links: link id {item} out of range [0, {self.num_links})")
                pair = [int(item)]
                if both_directions:
                    rev = np.flatnonzero((self.link_src == self.link_dst[item]) & (self.link_dst == self.link_src[item]))
                    pair += [int(r) for r in rev[:1]]
                ids += pair
            else:
                a, b = item
                ids += list(self.links_between(a, b)[:1])
                if both_directions:
                    ids += list(self.links_between(b, a)[:1])
        return np.asarray(ids, dtype=np.int64)

    def fail(self, links: Iterable, *, both_directions: bool = True) -> Topology:
        """A copy with ``links`` failed: ``(a, b)`` node-name pairs or link ids.

        A pair fails one cable (both directions unless ``both_directions=False``).
        Raises ValueError if a host loses its last path to another host.
        """
        up = self.link_up.copy()
        up[self._select(links, both_directions)] = False
        return replace(self, link_up=up, meta={**self.meta, "failed": True})

    def with_capacity(self, links: Iterable, gbps: float, *, both_directions: bool = True) -> Topology:
        """A copy where ``links`` (pairs or ids) have capacity ``gbps`` (a degraded cable)."""
        if not gbps > 0:
            raise ValueError(f"gbps: must be > 0, got {gbps}")
        cap = self.link_gbps.astype(np.float64).copy()
        cap[self._select(links, both_directions)] = gbps
        return replace(self, link_gbps=cap, meta={**self.meta, "degraded": True})

    def describe(self) -> str:
        sw = int((~self.is_host).sum())
        return (f"{self.name}: {self.num_hosts} hosts, {sw} switches, {self.num_links} directed links"
                f" ({int((~self.link_up).sum())} failed)")

    def to_dict(self) -> dict:
        """The explicit form read by :func:`commflow.net.io.from_dict` (one entry per cable direction)."""
        return {
            "name": self.name,
            "hosts": [self.nodes[h] for h in self.hosts],
            "switches": [n for n, h in zip(self.nodes, self.is_host) if not h],
            "links": [{"src": self.nodes[s], "dst": self.nodes[d], "gbps": float(g), "duplex": False}
                      for s, d, g in zip(self.link_src, self.link_dst, self.link_gbps)],
            "failed": [[self.nodes[self.link_src[i]], self.nodes[self.link_dst[i]]]
                       for i in np.flatnonzero(~self.link_up)],
        }


def _validate(t: Topology) -> None:
    n = len(t.nodes)
    if len(set(t.nodes)) != n:
        seen: set[str] = set()
        dup = next(x for x in t.nodes if x in seen or seen.add(x))
        raise ValueError(f"nodes: duplicate node name {dup!r}")
    for name in ("is_host", "link_src", "link_dst", "link_gbps", "link_up", "hosts"):
        if not isinstance(getattr(t, name), np.ndarray):
            raise ValueError(f"{name}: must be a numpy array")
    if t.is_host.shape != (n,):
        raise ValueError(f"is_host: shape {t.is_host.shape}, expected ({n},)")
    m = len(t.link_src)
    if not (t.link_dst.shape == t.link_gbps.shape == t.link_up.shape == (m,)):
        raise ValueError("link_src, link_dst, link_gbps, link_up: must have the same length")
    if m and (t.link_src.min() < 0 or t.link_src.max() >= n or t.link_dst.min() < 0 or t.link_dst.max() >= n):
        raise ValueError(f"links: a link endpoint is not a node id in [0, {n})")
    bad = np.flatnonzero(~(t.link_gbps > 0))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"link {t.nodes[t.link_src[i]]}->{t.nodes[t.link_dst[i]]}: capacity must be > 0 Gbit/s, "
                         f"got {t.link_gbps[i]}")
    loops = np.flatnonzero(t.link_src == t.link_dst)
    if len(loops):
        raise ValueError(f"link {t.nodes[t.link_src[loops[0]]]}->itself: self-loops are not allowed")
    if len(t.hosts) < 1:
        raise ValueError("hosts: a topology needs at least one host")
    if not np.array_equal(np.sort(t.hosts), np.flatnonzero(t.is_host)):
        raise ValueError("hosts: must list every host node exactly once")
    _check_connected(t)


def _check_connected(t: Topology) -> None:
    """Every host can reach every other host over working links without transiting a host.

    Switch components are taken on the undirected graph of working switch-switch links;
    two hosts are connected when they touch a common component (or share a cable).
    """
    up = t.link_up
    src, dst = t.link_src[up], t.link_dst[up]
    n = t.num_nodes
    ok_out = np.zeros(n, bool)
    ok_out[src] = True
    ok_in = np.zeros(n, bool)
    ok_in[dst] = True
    for h in t.hosts:
        if not (ok_out[h] and ok_in[h]):
            raise ValueError(f"disconnected hosts: host {t.nodes[h]!r} has no working link "
                             f"{'out' if not ok_out[h] else 'in'}")
    if len(t.hosts) == 1:
        return
    sw = ~t.is_host[src] & ~t.is_host[dst]
    g = sp.coo_matrix((np.ones(int(sw.sum())), (src[sw], dst[sw])), shape=(n, n))
    _, comp = connected_components(g, directed=False)
    # A host joins the components of the switches it is cabled to; a host-host cable makes
    # a private component shared by both ends.
    touch_src = np.where(t.is_host[src] & ~t.is_host[dst], dst, -1)
    touch_dst = np.where(t.is_host[dst] & ~t.is_host[src], src, -1)
    pairs = set()
    for h, s in zip(src, touch_src):
        if s >= 0:
            pairs.add((int(h), int(comp[s])))
    for h, s in zip(dst, touch_dst):
        if s >= 0:
            pairs.add((int(h), int(comp[s])))
    direct = t.is_host[src] & t.is_host[dst]
    for a, b in zip(src[direct], dst[direct]):
        key = n + min(a, b) * n + max(a, b)
        pairs.add((int(a), key))
        pairs.add((int(b), key))
    sets: dict[int, frozenset] = {}
    for h, c in pairs:
        sets.setdefault(h, set()).add(c)
    sig = {h: frozenset(c) for h, c in sets.items()}
    groups: dict[frozenset, int] = {}
    for h in t.hosts:
        groups.setdefault(sig[int(h)], int(h))
    reps = list(groups.items())
    for i, (ca, ha) in enumerate(reps):
        for cb, hb in reps[i + 1:]:
            if not (ca & cb):
                raise ValueError(f"disconnected hosts: host {t.nodes[ha]!r} cannot reach host {t.nodes[hb]!r} "
                                 "over working links")


class _Builder:
    """Collects nodes and full-duplex cables, then freezes them into a Topology."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.host: list[bool] = []
        self.src: list[int] = []
        self.dst: list[int] = []
        self.gbps: list[float] = []

    def add(self, name: str, host: bool = False) -> int:
        self.names.append(name)
        self.host.append(host)
        return len(self.names) - 1

    def cable(self, a: int, b: int, gbps: float) -> None:
        self.src += [a, b]
        self.dst += [b, a]
        self.gbps += [gbps, gbps]

    def build(self, name: str, meta: dict, hosts: Sequence[int] | None = None) -> Topology:
        is_host = np.asarray(self.host, bool)
        return Topology(
            name=name, nodes=tuple(self.names), is_host=is_host,
            link_src=np.asarray(self.src, np.int64), link_dst=np.asarray(self.dst, np.int64),
            link_gbps=np.asarray(self.gbps, np.float64), link_up=np.ones(len(self.src), bool),
            hosts=np.asarray(hosts if hosts is not None else np.flatnonzero(is_host), np.int64), meta=meta)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    return int(v)


def _positive(name: str, v) -> float:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v!r}")
    return float(v)


def _uplink(down_total: float, uplinks: int, uplink_gbps, oversubscription, default: float) -> float:
    """Uplink capacity from an explicit value or an oversubscription ratio (down / up capacity)."""
    if uplink_gbps is not None and oversubscription is not None:
        raise ValueError("uplink_gbps, oversubscription: give at most one of them")
    if oversubscription is not None:
        return down_total / (uplinks * _positive("oversubscription", oversubscription))
    return _positive("uplink_gbps", uplink_gbps) if uplink_gbps is not None else default


def leaf_spine(leaves: int, spines: int, hosts_per_leaf: int, link_gbps: float = 400.0, *,
               host_gbps: float | None = None, uplink_gbps: float | None = None,
               oversubscription: float | None = None, name: str | None = None) -> Topology:
    """2-tier leaf-spine: ``hosts_per_leaf`` hosts on each leaf, every leaf cabled to every spine.

    Host ``i`` sits on leaf ``i // hosts_per_leaf``. Host cables run at ``host_gbps``
    (default ``link_gbps``); leaf-spine cables at ``uplink_gbps`` or, given
    ``oversubscription = hosts_per_leaf * host_gbps / (spines * uplink_gbps)``, at the
    capacity that ratio implies (1:1 is non-blocking).
    """
    leaves, spines, hpl = (_positive_int(k, v) for k, v in
                           (("leaves", leaves), ("spines", spines), ("hosts_per_leaf", hosts_per_leaf)))
    link_gbps = _positive("link_gbps", link_gbps)
    host_gbps = _positive("host_gbps", host_gbps) if host_gbps is not None else link_gbps
    up = _uplink(hpl * host_gbps, spines, uplink_gbps, oversubscription, link_gbps)
    b = _Builder()
    hosts = [b.add(f"h{i}", host=True) for i in range(leaves * hpl)]
    leaf = [b.add(f"leaf{i}") for i in range(leaves)]
    spine = [b.add(f"spine{i}") for i in range(spines)]
    for i, h in enumerate(hosts):
        b.cable(h, leaf[i // hpl], host_gbps)
    for lf in leaf:
        for s in spine:
            b.cable(lf, s, up)
    meta = {"kind": "leaf_spine", "leaves": leaves, "spines": spines, "hosts_per_leaf": hpl,
            "host_gbps": host_gbps, "uplink_gbps": up}
    return b.build(name or f"leaf-spine {leaves}x{spines}x{hpl}", meta, hosts)


def fat_tree(k: int, link_gbps: float = 400.0, *, hosts_per_edge: int | None = None,
             oversubscription: float = 1.0, name: str | None = None) -> Topology:
    """3-tier k-ary fat-tree (Al-Fares et al.): ``k`` pods of ``k/2`` edge and ``k/2`` aggregation
    switches, ``(k/2)^2`` cores; core ``(j, m)`` links to aggregation switch ``j`` of every pod.

    ``hosts_per_edge`` defaults to ``k/2`` (``k^3/4`` hosts, non-blocking). ``oversubscription``
    divides every switch-switch capacity (2.0 halves them).
    """
    k = _positive_int("k", k)
    if k % 2:
        raise ValueError(f"k: a fat-tree needs an even k, got {k}")
    half = k // 2
    hpe = _positive_int("hosts_per_edge", hosts_per_edge if hosts_per_edge is not None else half)
    link_gbps = _positive("link_gbps", link_gbps)
    fab = link_gbps * hpe / half / _positive("oversubscription", oversubscription)
    b = _Builder()
    hosts = [b.add(f"h{i}", host=True) for i in range(k * half * hpe)]
    edge = [[b.add(f"edge{p}.{i}") for i in range(half)] for p in range(k)]
    agg = [[b.add(f"agg{p}.{j}") for j in range(half)] for p in range(k)]
    core = [[b.add(f"core{j}.{m}") for m in range(half)] for j in range(half)]
    for i, h in enumerate(hosts):
        p, e = divmod(i // hpe, half)
        b.cable(h, edge[p][e], link_gbps)
    for p in range(k):
        for e in range(half):
            for j in range(half):
                b.cable(edge[p][e], agg[p][j], fab)
        for j in range(half):
            for m in range(half):
                b.cable(agg[p][j], core[j][m], fab)
    meta = {"kind": "fat_tree", "k": k, "hosts_per_edge": hpe, "fabric_gbps": fab}
    return b.build(name or f"fat-tree k={k}", meta, hosts)


def rail_optimized(servers: int, spines: int, *, gpus_per_server: int = 8, servers_per_leaf: int | None = None,
                   link_gbps: float = 400.0, uplink_gbps: float | None = None,
                   oversubscription: float | None = None, nvlink_gbps: float | None = None,
                   name: str | None = None) -> Topology:
    """Rail-optimized 2-tier (NVIDIA SuperPOD style): GPU ``r`` of every server in a group of
    ``servers_per_leaf`` servers sits on the rail-``r`` leaf of that group; every leaf is cabled
    to every spine. Host index ``s * gpus_per_server + r`` is GPU ``r`` of server ``s``.

    ``nvlink_gbps`` adds one NVSwitch per server, cabled to its GPUs at that rate, so
    traffic inside a server stays off the network.
    """
    servers, spines, gps = (_positive_int(k, v) for k, v in
                            (("servers", servers), ("spines", spines), ("gpus_per_server", gpus_per_server)))
    spl = _positive_int("servers_per_leaf", servers_per_leaf if servers_per_leaf is not None else servers)
    if servers % spl:
        raise ValueError(f"servers_per_leaf: must divide servers={servers}, got {spl}")
    link_gbps = _positive("link_gbps", link_gbps)
    up = _uplink(spl * link_gbps, spines, uplink_gbps, oversubscription, link_gbps)
    groups = servers // spl
    b = _Builder()
    hosts = [b.add(f"s{s}.g{r}", host=True) for s in range(servers) for r in range(gps)]
    leaf = [[b.add(f"leaf{g}.r{r}") for r in range(gps)] for g in range(groups)]
    spine = [b.add(f"spine{i}") for i in range(spines)]
    for s in range(servers):
        for r in range(gps):
            b.cable(hosts[s * gps + r], leaf[s // spl][r], link_gbps)
    if nvlink_gbps is not None:
        nv = _positive("nvlink_gbps", nvlink_gbps)
        for s in range(servers):
            sw = b.add(f"nvs{s}")
            for r in range(gps):
                b.cable(hosts[s * gps + r], sw, nv)
    for row in leaf:
        for lf in row:
            for s in spine:
                b.cable(lf, s, up)
    meta = {"kind": "rail_optimized", "servers": servers, "spines": spines, "gpus_per_server": gps,
            "servers_per_leaf": spl, "uplink_gbps": up, "nvlink_gbps": nvlink_gbps}
    return b.build(name or f"rail-optimized {servers}x{gps} GPUs", meta, hosts)


def dual_plane(segments: int, servers_per_segment: int, spines_per_plane: int, *, gpus_per_server: int = 8,
               port_gbps: float = 200.0, uplink_gbps: float | None = None, oversubscription: float | None = None,
               rails: bool = True, nvlink_gbps: float | None = None, name: str | None = None) -> Topology:
    """HPN-like dual-plane fabric (Qian et al., SIGCOMM'24): every GPU NIC has two ports;
    port ``p`` goes to a ToR of plane ``p`` and the planes share no switch, so a flow's port
    fixes its plane. With ``rails`` each segment has one ToR per (rail, plane), otherwise one
    per plane (dual-ToR, not rail-optimized). Each plane's ToRs connect to all
    ``spines_per_plane`` spines of that plane.
    """
    segments, sps, spp, gps = (_positive_int(k, v) for k, v in (
        ("segments", segments), ("servers_per_segment", servers_per_segment),
        ("spines_per_plane", spines_per_plane), ("gpus_per_server", gpus_per_server)))
    port = _positive("port_gbps", port_gbps)
    per_tor = sps * (1 if rails else gps)
    up = _uplink(per_tor * port, spp, uplink_gbps, oversubscription, 2 * port)
    nrails = gps if rails else 1
    b = _Builder()
    hosts = [b.add(f"s{s}.g{r}", host=True) for s in range(segments * sps) for r in range(gps)]
    tor = [[[b.add(f"tor{g}.r{r}.p{p}") for p in range(2)] for r in range(nrails)] for g in range(segments)]
    spine = [[b.add(f"spine{p}.{m}") for m in range(spp)] for p in range(2)]
    for s in range(segments * sps):
        g = s // sps
        for r in range(gps):
            for p in range(2):
                b.cable(hosts[s * gps + r], tor[g][r if rails else 0][p], port)
    if nvlink_gbps is not None:
        nv = _positive("nvlink_gbps", nvlink_gbps)
        for s in range(segments * sps):
            sw = b.add(f"nvs{s}")
            for r in range(gps):
                b.cable(hosts[s * gps + r], sw, nv)
    for g in range(segments):
        for r in range(nrails):
            for p in range(2):
                for m in range(spp):
                    b.cable(tor[g][r][p], spine[p][m], up)
    meta = {"kind": "dual_plane", "segments": segments, "servers_per_segment": sps, "gpus_per_server": gps,
            "spines_per_plane": spp, "port_gbps": port, "uplink_gbps": up, "rails": rails}
    return b.build(name or f"dual-plane {segments}x{sps}x{gps}", meta, hosts)
