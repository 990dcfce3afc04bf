"""Disruption schedules: which nodes leave, which links fail, and when things come back.

A :class:`Schedule` is a declarative list of events, each at the *start* of a round
(before that round's local training):

* :class:`DropNodes`: a fraction, a count or an explicit list of nodes leaves the
  network, chosen at random, by degree or by betweenness (highest first, or lowest
  first with ``low-``). ``holds_data=False`` makes them *relay-only*: they never hold
  training data (the training set is split over the other nodes from round 0), so
  losing them loses connectivity only. A dropped node's model is frozen.
* :class:`FailLinks`: a fraction or count of links stops carrying traffic, chosen at
  random or by edge betweenness.
* :class:`Rejoin`: every node dropped and every link failed before it comes back; a
  rejoining node resumes from its frozen (stale) model.
* :class:`RelayOnly` (not an event: true for the whole run): nodes that hold no data but
  stay, to measure what relays cost or give without any drop.

:func:`resolve` turns a schedule into a :class:`Plan` of concrete node ids and links,
once, up front: selections are scored on the *initial* graph (the data partition must
know the relay-only nodes before round 0), ties are broken by the ``"schedule"``
random stream, and every impossible request (a fraction outside [0, 1], a round beyond
the run, more nodes than exist, an unknown kind) is a ``ValueError`` before anything
runs.

Named scenarios (the CLI's ``--compare``; the seed finding compares the first two):

``relay[:BY]``  drop ``round(f*N)`` relay-only nodes, by default the highest-degree ones
``data[:BY]``   drop ``round(f*N)`` data-holding nodes, by default the lowest-degree ones
``none``        no node drops (every node holds data)
``relay-nodrop[:BY]``  ``round(f*N)`` relay-only nodes (default: the hubs) that never drop
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np

from .graphs import edge_array
from .rng import stream

__all__ = [
    "DropNodes",
    "FailLinks",
    "Rejoin",
    "RelayOnly",
    "Schedule",
    "Plan",
    "Topology",
    "NODE_SELECTORS",
    "LINK_SELECTORS",
    "SCENARIO_KINDS",
    "resolve",
    "scenario_events",
]

NODE_SELECTORS = ("random", "degree", "betweenness", "low-degree", "low-betweenness")
LINK_SELECTORS = ("random", "betweenness")
SCENARIO_KINDS = {"none": None, "data": "low-degree", "relay": "degree", "relay-nodrop": "degree"}  # -> default BY


@dataclass(kw_only=True, frozen=True)
class DropNodes:
    """Nodes leave the network at the start of round ``at``. Give one of fraction, count, nodes."""

    at: int
    """Round (0-based) at whose start the nodes are gone."""
    fraction: float | None = None
    """Share of all N nodes, in [0, 1]; rounded to the nearest count."""
    count: int | None = None
    """Number of nodes, in [0, N]."""
    nodes: tuple[int, ...] | None = None
    """Explicit node ids (``by`` is then unused)."""
    by: str = "random"
    """One of :data:`NODE_SELECTORS`, scored on the initial graph."""
    holds_data: bool = True
    """False: the nodes are relay-only (no training data, ever)."""


@dataclass(kw_only=True, frozen=True)
class FailLinks:
    """Links stop carrying traffic at the start of round ``at``. Give one of fraction, count."""

    at: int
    """Round (0-based) at whose start the links are down."""
    fraction: float | None = None
    """Share of the graph's links, in [0, 1]."""
    count: int | None = None
    """Number of links."""
    by: str = "random"
    """One of :data:`LINK_SELECTORS`."""


@dataclass(kw_only=True, frozen=True)
class Rejoin:
    """At the start of round ``at``, every node dropped and link failed before ``at`` is back."""

    at: int
    """Round (0-based)."""


@dataclass(kw_only=True, frozen=True)
class RelayOnly:
    """Nodes that hold no training data for the whole run but stay in the network.

    Give one of fraction, count, nodes. A later :class:`DropNodes` may still drop them.
    """

    fraction: float | None = None
    """Share of all N nodes, in [0, 1]."""
    count: int | None = None
    """Number of nodes, in [0, N]."""
    nodes: tuple[int, ...] | None = None
    """Explicit node ids."""
    by: str = "random"
    """One of :data:`NODE_SELECTORS`, scored on the initial graph."""


Event = DropNodes | FailLinks | Rejoin | RelayOnly


@dataclass(kw_only=True, frozen=True)
class Schedule:
    """Events of one run, applied in round order (list order within a round)."""

    events: tuple[Event, ...] = ()
    """The events; see :class:`DropNodes`, :class:`FailLinks`, :class:`Rejoin`, :class:`RelayOnly`."""


@dataclass(frozen=True)
class Topology:
    """The network during one round."""

    alive: np.ndarray
    """``[N]`` bool."""
    adjacency: np.ndarray
    """``[N, N]`` bool, links that have not failed (those of dropped nodes included)."""

    def live_adjacency(self) -> np.ndarray:
        """Links that carry traffic: not failed, both ends alive."""
        return self.adjacency & self.alive[:, None] & self.alive[None, :]


@dataclass(frozen=True)
class Plan:
    """A resolved schedule: concrete node ids and links per round."""

    num_nodes: int
    rounds: int
    edges: np.ndarray
    """``[E, 2]`` the initial graph's links (u < v)."""
    relay_nodes: frozenset[int]
    """Nodes that hold no data."""
    actions: tuple[tuple[int, str, tuple], ...] = field(default=())
    """``(round, "drop" | "fail" | "rejoin", payload)`` sorted by round; payload is node
    ids for drop, ``(u, v)`` pairs for fail, ``()`` for rejoin."""

    @property
    def change_rounds(self) -> list[int]:
        """Rounds at whose start the topology changes (always including 0)."""
        return sorted({0, *(r for r, _, _ in self.actions)})

    def dropped_nodes(self) -> list[int]:
        """Every node some event drops, in event order."""
        return [n for _, kind, payload in self.actions if kind == "drop" for n in payload]

    def topology(self, round: int) -> Topology:
        """The network during ``round`` (events at ``<= round`` applied)."""
        alive = np.ones(self.num_nodes, dtype=bool)
        failed: set[tuple[int, int]] = set()
        for at, kind, payload in self.actions:
            if at > round:
                break
            if kind == "drop":
                alive[list(payload)] = False
            elif kind == "fail":
                failed.update(payload)
            else:
                alive[:] = True
                failed.clear()
        adj = np.zeros((self.num_nodes, self.num_nodes), dtype=bool)
        keep = [(u, v) for u, v in self.edges.tolist() if (u, v) not in failed]
        if keep:
            u, v = np.array(keep).T
            adj[u, v] = adj[v, u] = True
        return Topology(alive=alive, adjacency=adj)


def scenario_events(name: str, *, fraction: float, at: int) -> tuple[Event, ...]:
    """The events of a named scenario ``none`` | ``data[:BY]`` | ``relay[:BY]`` (see module doc)."""
    kind, _, by = name.strip().partition(":")
    if kind not in SCENARIO_KINDS:
        raise ValueError(f"scenario={name!r}: unknown kind {kind!r}; choose from {sorted(SCENARIO_KINDS)}")
    if kind == "none":
        if by:
            raise ValueError(f"scenario={name!r}: 'none' takes no selector")
        return ()
    by = by or SCENARIO_KINDS[kind]
    if by not in NODE_SELECTORS:
        raise ValueError(f"scenario={name!r}: unknown selector {by!r}; choose from {NODE_SELECTORS}")
    if kind == "relay-nodrop":
        return (RelayOnly(fraction=fraction, by=by),)
    return (DropNodes(at=at, fraction=fraction, by=by, holds_data=(kind == "data")),)


def _amount(event: DropNodes | FailLinks | RelayOnly, total: int, what: str, i: int) -> int:
    has_nodes = isinstance(event, DropNodes | RelayOnly)
    given = [k for k in ("fraction", "count") if getattr(event, k) is not None]
    if has_nodes and event.nodes is not None:
        given.append("nodes")
    if len(given) != 1:
        raise ValueError(f"events[{i}] {type(event).__name__}: give exactly one of fraction, count"
                         f"{', nodes' if has_nodes else ''}; got {given or 'none'}")
    if event.fraction is not None:
        if not 0.0 <= event.fraction <= 1.0:
            raise ValueError(f"events[{i}] {type(event).__name__}: fraction={event.fraction} must be in [0, 1]")
        return int(np.floor(event.fraction * total + 0.5))
    if event.count is not None:
        if not 0 <= event.count <= total:
            raise ValueError(
                f"events[{i}] {type(event).__name__}: count={event.count} must be in [0, {total}] "
                f"(the graph has {total} {what})"
            )
        return event.count
    return len(event.nodes)  # type: ignore[arg-type]


def _ranked(scores: dict, keys: list, by: str, rng: np.random.Generator) -> list:
    """``keys`` best first: by score (highest, or lowest for ``low-``), ties in random order."""
    tiebreak = rng.permutation(len(keys))
    if by == "random":
        return [keys[j] for j in tiebreak]
    sign = 1.0 if by.startswith("low-") else -1.0
    order = sorted(range(len(keys)), key=lambda j: (sign * scores[keys[j]], tiebreak[j]))
    return [keys[j] for j in order]


def resolve(schedule: Schedule, graph: nx.Graph, *, rounds: int, seed: int) -> Plan:
    """Check ``schedule`` against the graph and the run, and pick the concrete nodes and links.

    Raises ``ValueError`` naming the event, the value and the rule for: an unknown
    event kind or selector, a round outside ``[0, rounds)``, a fraction outside [0, 1],
    a count above what exists (or above what earlier drops left), unknown or repeated
    node ids, a rejoin with nothing to bring back, and a plan that leaves no node with data.
    """
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        raise ValueError("graph nodes must be 0..N-1 (build it with commflow.decentral.graphs)")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    edges = edge_array(graph)
    events = list(schedule.events)
    for i, ev in enumerate(events):
        if not isinstance(ev, Event):
            raise ValueError(f"events[{i}]: unknown event kind {type(ev).__name__}; "
                             "use DropNodes, FailLinks, Rejoin, RelayOnly")
        if not isinstance(ev, RelayOnly) and not 0 <= ev.at < rounds:
            raise ValueError(
                f"events[{i}] {type(ev).__name__}: at={ev.at} is beyond the run; rounds are 0..{rounds - 1}"
            )
        if isinstance(ev, DropNodes | RelayOnly) and ev.nodes is None and ev.by not in NODE_SELECTORS:
            raise ValueError(f"events[{i}] {type(ev).__name__}: by={ev.by!r} is unknown; choose from {NODE_SELECTORS}")
        if isinstance(ev, FailLinks) and ev.by not in LINK_SELECTORS:
            raise ValueError(f"events[{i}] FailLinks: by={ev.by!r} is unknown; choose from {LINK_SELECTORS}")

    scores: dict[str, dict] = {}

    def node_scores(by: str) -> dict:
        key = by.removeprefix("low-")
        if key not in scores:
            scores[key] = dict(graph.degree) if key == "degree" else nx.betweenness_centrality(graph)
        return scores[key]

    def pick_nodes(ev: DropNodes | RelayOnly, i: int, taken: set[int], rng: np.random.Generator) -> list[int]:
        name = type(ev).__name__
        k = _amount(ev, n, "nodes", i)
        if ev.nodes is not None:
            picked = [int(v) for v in ev.nodes]
            if any(not 0 <= v < n for v in picked) or len(set(picked)) != len(picked):
                raise ValueError(f"events[{i}] {name}: nodes={ev.nodes} must be distinct ids in 0..{n - 1}")
            if taken & set(picked):
                raise ValueError(f"events[{i}] {name}: nodes {sorted(taken & set(picked))} "
                                 "are already dropped by an earlier event")
            return picked
        candidates = [v for v in range(n) if v not in taken]
        if k > len(candidates):
            raise ValueError(f"events[{i}] {name}: asks for {k} nodes but only {len(candidates)} "
                             f"of {n} are left after earlier drops")
        return _ranked(node_scores(ev.by) if ev.by != "random" else {}, candidates, ev.by, rng)[:k]

    actions: list[tuple[int, str, tuple]] = []
    taken_nodes: set[int] = set()
    taken_links: set[tuple[int, int]] = set()
    relay: set[int] = set()
    # RelayOnly holds for the whole run: resolve it first (round -1).
    order = sorted(range(len(events)), key=lambda j: (getattr(events[j], "at", -1), j))
    for i in order:
        ev = events[i]
        rng = stream(seed, "schedule", i)
        if isinstance(ev, RelayOnly):
            relay.update(pick_nodes(ev, i, set(), rng))
        elif isinstance(ev, Rejoin):
            if not any(at < ev.at and kind != "rejoin" for at, kind, _ in actions):
                raise ValueError(f"events[{i}] Rejoin: at={ev.at} but nothing was dropped or failed before it")
            actions.append((ev.at, "rejoin", ()))
        elif isinstance(ev, DropNodes):
            picked = pick_nodes(ev, i, taken_nodes, rng)
            taken_nodes.update(picked)
            if not ev.holds_data:
                relay.update(picked)
            actions.append((ev.at, "drop", tuple(sorted(picked))))
        else:
            all_links = [tuple(e) for e in edges.tolist()]
            candidates = [e for e in all_links if e not in taken_links]
            k = _amount(ev, len(all_links), "links", i)
            if k > len(candidates):
                raise ValueError(f"events[{i}] FailLinks: asks for {k} links but only {len(candidates)} "
                                 f"of {len(all_links)} are left after earlier failures")
            link_scores = {} if ev.by == "random" else {
                (min(u, v), max(u, v)): s for (u, v), s in nx.edge_betweenness_centrality(graph).items()
            }
            picked_links = _ranked(link_scores, candidates, ev.by, rng)[:k]
            taken_links.update(picked_links)
            actions.append((ev.at, "fail", tuple(sorted(picked_links))))
    if len(relay) == n:
        raise ValueError(f"the schedule makes all {n} nodes relay-only: no node would hold training data")
    return Plan(num_nodes=n, rounds=rounds, edges=edges, relay_nodes=frozenset(relay),
                actions=tuple(sorted(actions, key=lambda a: a[0])))
