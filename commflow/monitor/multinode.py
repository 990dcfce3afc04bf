"""Multi-node ``commflow launch``: who leads, how every node hears a verdict, and
which nodes run the next attempt.

Every node runs the same ``commflow launch --nnodes [MIN:]MAX --rdzv-endpoint HOST:PORT
...`` command. Two roles:

* The **leader** is the supervisor on the rendezvous host -- the one that binds the
  coordinator port (rendezvous port + 1 unless ``--monitor-port``). It is the job's
  control plane: it holds the c10d rendezvous store for the whole job (a multi-tenant
  ``TCPStore`` server on the rendezvous port, which every attempt's elastic
  rendezvous on that host reuses), it hosts the coordinator that every worker of
  every node reports to, and it decides. On a verdict it stops the attempt on every
  node, picks the nodes of the next attempt (:func:`plan_nodes`) and sends that
  *plan* to the followers.
* A **follower** runs its node's workers and obeys: it connects to the coordinator
  port as a supervisor (:class:`LeaderLink`), kills its workers on ``stop``, reports
  how its attempt ended, and after each attempt waits for the plan: run the next
  attempt with the given nodes and slots, *leave* (its node was excluded: it records
  the incident and exits 0, so a scheduler that ends a job step on a failed task keeps
  the others), or end with the job's exit code.

Each attempt is a fresh torch elastic c10d rendezvous (run id ``...-<attempt>``) of
exactly the planned nodes (``min_nodes = max_nodes = len(nodes)``), not one long
rendezvous whose rounds admit whoever arrives between MIN and MAX: the culprit must
not rejoin, the round should close the moment the survivors are in (no last-call
wait, no waiting for the culprit's rendezvous heartbeat to expire), and the slot map
(which hardware each new rank runs on, which the fault injector and the incident
records use) must be known before the workers start. ``--nnodes MIN:MAX`` keeps
torchrun's spelling: MAX nodes start, exclusions may shrink the job down to MIN.

Node identity: a node is its group rank in the first attempt (torchrun's
``GROUP_RANK``), and its slots are ``node * nproc_per_node + local slot``. The
coordinator learns which supervisor process launched which node from the workers'
hellos (``node``, ``host`` and ``agent_pid``, the worker's parent). Later attempts
keep that order: the c10d rendezvous ranks nodes by sorting their descriptors
(address, supervisor pid), which do not change across attempts, so the survivors'
group ranks come out in the same order as their first-attempt node ids.

When the leader's own node is the culprit, its *workers* leave but the leader stays
as control plane only (the rendezvous store and the coordinator live in its process,
and torch elastic's c10d backend cannot move its store to another host). If the whole
rendezvous host dies, the job dies with it -- as any torchrun job with a c10d
rendezvous does.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from .channel import parse_endpoint

__all__ = ["Followers", "LeaderLink", "NodeRoles", "append_node_event", "descendants", "hold_rendezvous_store", "node_key",
           "node_slots", "parent_pids", "parse_nnodes", "plan_nodes"]


def parse_nnodes(text: str | int) -> tuple[int, int]:
    """``--nnodes``: ``"3"`` -> (3, 3), ``"2:3"`` -> (2, 3) as (MIN, MAX)."""
    raw = str(text).strip()
    parts = raw.split(":")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--nnodes={raw!r} must be N or MIN:MAX with positive integers")
    lo, hi = (int(parts[0]), int(parts[-1]))
    if lo < 1 or hi < lo:
        raise ValueError(f"--nnodes={raw!r} needs 1 <= MIN <= MAX")
    return lo, hi


def node_key(host: str, pid: int) -> str:
    """How a supervisor is named in plans: ``host:pid``."""
    return f"{host}:{int(pid)}"


def node_slots(nodes: Sequence[int], nproc: int) -> list[int]:
    """Slot of every global rank of an attempt on ``nodes`` (ascending first-attempt
    group ranks) with ``nproc`` workers each: rank ``i * nproc + l`` runs on node
    ``nodes[i]``, local slot ``l``."""
    return [node * nproc + s for node in sorted(nodes) for s in range(nproc)]


def plan_nodes(nodes: Sequence[int], culprit_nodes: Sequence[int], nproc: int,
               world_multiple: int = 1) -> tuple[list[int], list[int]]:
    """The nodes of the next attempt after excluding ``culprit_nodes``.

    Returns ``(remaining, excluded_for_shape)``: if the remaining world
    (``len(remaining) * nproc``) is not a multiple of ``world_multiple`` (a tensor or
    sequence parallel degree), the highest healthy nodes leave too until it is.
    """
    gone = set(culprit_nodes)
    remaining = [n for n in sorted(nodes) if n not in gone]
    shape: list[int] = []
    while world_multiple > 1 and remaining and (len(remaining) * nproc) % world_multiple:
        shape.append(remaining.pop())
    return remaining, shape


def parent_pids() -> dict[int, int]:
    """``{pid: parent pid}`` of every process (Linux /proc); processes that vanish while
    being read are skipped."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parent


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc): the elastic agent's workers and
    whatever they started."""
    children = collections.defaultdict(list)
    for child, ppid in parent_pids().items():
        children[ppid].append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


def hold_rendezvous_store(endpoint: str, timeout_s: float = 60.0):
    """The c10d rendezvous store's server on ``endpoint``'s port, held by the leader
    for the whole job. torch elastic's c10d backend opens its store with
    ``multi_tenant=True``, so every attempt's rendezvous in this process shares this
    server, and it outlives attempts the leader's own node sits out."""
    from torch.distributed import TCPStore

    host, port = parse_endpoint(endpoint)
    try:
        return TCPStore(host, port, is_master=True, multi_tenant=True, wait_for_workers=False,
                        timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise OSError(f"cannot host the rendezvous store on {endpoint}: {e}") from e


class LeaderLink:
    """A follower's connection to the leader's coordinator port.

    Sends ``{"sup": hello}`` once, then ``{"done": ...}`` per attempt. Receives
    ``{"cmd": "stop", "attempt": k}`` (handed to ``on_stop`` at once, in the reader
    thread: the workers must die now, not when the attempt returns) and ``plan`` /
    ``end`` decisions (queued for :meth:`next_decision`).
    """

    def __init__(self, endpoint: str, hello: dict, on_stop: Callable[[int], None]):
        self.addr = parse_endpoint(endpoint)
        self.hello = dict(hello)
        self.on_stop = on_stop
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inbox: collections.deque[dict] = collections.deque()
        self.closed = False

    def connect(self, timeout_s: float) -> None:
        """Connect, retrying while the leader starts; OSError after ``timeout_s``."""
        deadline = time.time() + timeout_s
        while True:
            try:
                sock = socket.create_connection(self.addr, timeout=2.0)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self._sock = sock
        self.send({"sup": self.hello})
        threading.Thread(target=self._read_loop, name="commflow-leader-link", daemon=True).start()

    def send(self, msg: dict) -> bool:
        if self._sock is None:
            return False
        try:
            with self._send_lock:
                self._sock.sendall((json.dumps(msg, separators=(",", ":"), default=str) + "\n").encode())
            return True
        except OSError:
            return False

    def _read_loop(self) -> None:
        buf = b""
        sock = self._sock
        assert sock is not None
        try:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    msg = json.loads(line)
                    if msg.get("cmd") == "stop":
                        self.on_stop(int(msg.get("attempt", -1)))
                    else:
                        with self._cond:
                            self._inbox.append(msg)
                            self._cond.notify_all()
        except (OSError, ValueError):
            pass
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def next_decision(self, after_attempt: int, timeout_s: float) -> dict | None:
        """The leader's next word: ``{"plan": {...}}`` for an attempt after
        ``after_attempt`` or ``{"end": {...}}``; None if the link closed or the wait
        timed out first."""
        deadline = time.time() + timeout_s
        with self._cond:
            while True:
                while self._inbox:
                    msg = self._inbox.popleft()
                    if "end" in msg or ("plan" in msg and int(msg["plan"]["attempt"]) > after_attempt):
                        return msg
                left = deadline - time.time()
                if self.closed or left <= 0:
                    return None
                self._cond.wait(min(left, 1.0))

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                self._sock.close()


class Followers:
    """The leader's view of the follower supervisors (fed by the coordinator thread)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.links: dict[int, str] = {}  # coordinator connection id -> node_key
        self.reports: dict[int, dict[str, dict]] = {}  # attempt -> node_key -> done report
        self.gone: set[str] = set()

    def on_message(self, cid: int, msg: dict, now: float) -> None:
        with self._cond:
            if "sup" in msg:
                info = msg["sup"]
                key = node_key(info.get("host", "?"), info.get("pid", 0))
                self.links[cid] = key
                self.gone.discard(key)
            elif "closed" in msg:
                key = self.links.pop(cid, None)
                if key is not None:
                    self.gone.add(key)
            elif "done" in msg and cid in self.links:
                rep = dict(msg["done"])
                rep["t"] = now
                self.reports.setdefault(int(rep.get("attempt", -1)), {})[self.links[cid]] = rep
            self._cond.notify_all()

    def connected(self) -> set[str]:
        with self._cond:
            return set(self.links.values())

    def wait(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until ``predicate()`` -- called under the lock,
        reading :attr:`reports` / :attr:`gone` -- holds."""
        deadline = time.time() + timeout_s
        with self._cond:
            while not predicate():
                left = deadline - time.time()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def failures(self, attempt: int) -> dict[int, tuple[int, float]]:
        """Global rank -> (exit code, time) of the workers the followers saw fail."""
        out: dict[int, tuple[int, float]] = {}
        with self._cond:
            for rep in self.reports.get(attempt, {}).values():
                for rank, (code, t) in (rep.get("failures") or {}).items():
                    out[int(rank)] = (int(code), float(t))
        return out


def append_node_event(out: Path, record: dict) -> None:
    """One line in ``OUT/nodes.jsonl``: what this node's supervisor did (joined,
    restarted, was excluded, finished). A single short O_APPEND write, so supervisors
    sharing an output directory do not interleave."""
    out.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"t": time.time(), **record}, default=str) + "\n").encode()
    fd = os.open(out / "nodes.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


class NodeRoles:
    """The multi-node half of :class:`~commflow.monitor.supervisor.Supervisor`: the
    follower's loop and the leader's membership and plans. Mixed into the supervisor,
    whose state these methods share (``cfg``, ``attempt``, ``nodes``, ``my_node``,
    ``coordinator``, ``followers``) and whose attempt machinery they call
    (``_launch``, ``_stop_local``, ``_stop_everywhere``, ``_wait_verdict``, ``_handle``).
    """

    cfg: Any
    attempt: int
    nodes: list[int]
    my_node: int | None
    host: str
    out: Path
    role: str
    monitor_endpoint: str
    coordinator: Any
    followers: Followers
    incidents: list[dict]
    _verdict_event: threading.Event
    _left: bool

    def _follow(self) -> int:
        """A node that does not lead: run the leader's plans until it says end or
        excludes this node."""
        cfg = self.cfg
        self.role = "follower"
        me = node_key(self.host, os.getpid())
        link = LeaderLink(self.monitor_endpoint, {"host": self.host, "pid": os.getpid(),
                                                  "nproc": cfg.nproc_per_node}, on_stop=self._remote_stop)
        try:
            link.connect(cfg.leader_timeout_s)
        except OSError as e:
            print(f"commflow launch: no leader answers at {self.monitor_endpoint} ({e})", file=sys.stderr)
            return 1
        append_node_event(self.out, {"event": "joined", "role": "follower", "host": self.host,
                                     "pid": os.getpid(), "leader": self.monitor_endpoint})
        slots = self._world_slots()  # first attempt: every node, slot = rank
        try:
            while True:
                res = self._launch(slots)
                link.send({"done": {"attempt": self.attempt, "ok": res.ok, "error": res.error,
                                    "failures": {str(r): list(f) for r, f in res.failures.items()}}})
                msg = link.next_decision(self.attempt, cfg.decision_timeout_s)
                if msg is None:
                    code = 0 if res.ok else 1
                    append_node_event(self.out, {"event": "finished", "node": self.my_node, "code": code,
                                                 "note": "no word from the leader"})
                    return code
                if "end" in msg:
                    code = msg["end"].get("code")
                    code = int(code) if isinstance(code, int) else 1
                    append_node_event(self.out, {"event": "finished", "node": self.my_node, "code": code})
                    return code
                plan = msg["plan"]
                if me in plan["members"]:
                    self.my_node = int(plan["members"][me])
                    self.attempt = int(plan["attempt"])
                    self.nodes = [int(n) for n in plan["nodes"]]
                    slots = [int(x) for x in plan["slots"]]
                    append_node_event(self.out, {"event": "restart", "node": self.my_node, "attempt": self.attempt,
                                                 "nodes": self.nodes, "incident": plan.get("incident")})
                    continue
                node = plan.get("excluded", {}).get(me)
                inc = plan.get("incident") or {}
                if node is None:  # the leader never learned which node this is
                    append_node_event(self.out, {"event": "finished", "code": 1, "note": "not in the plan"})
                    print(f"commflow launch: the leader's plan names no node for this supervisor ({me})",
                          file=sys.stderr)
                    return 1
                append_node_event(self.out, {"event": "excluded", "node": node, "host": self.host,
                                             "attempt": plan["attempt"], "incident": inc,
                                             "nodes_after": plan["nodes"]})
                print(f"commflow launch: node {node} ({self.host}) is left out after a {inc.get('kind')} "
                      f"on ranks {inc.get('ranks')}; leaving the job", file=sys.stderr)
                return 0
        finally:
            link.close()

    def _remote_stop(self, attempt: int) -> None:
        """Leader link thread: stop this node's workers of ``attempt``."""
        if attempt == self.attempt:
            self._stop_local(attempt)

    def _attempt_remote(self) -> int | None:
        """The leader's node was excluded: the attempt runs on the followers; wait for
        their reports or a verdict."""
        slots = self._world_slots()
        members = self._membership()
        keys = {members[n] for n in self.nodes if n in members}
        if len(keys) < len(self.nodes):
            print(f"commflow launch: no supervisor is known for some of nodes {self.nodes}", file=sys.stderr)
            return 1
        attempt, t_start = self.attempt, time.time()

        def settled() -> bool:
            reps = self.followers.reports.get(attempt, {})
            return (self._verdict_event.is_set() or keys <= set(reps)
                    or any(k in self.followers.gone and k not in reps for k in keys))

        while not self.followers.wait(settled, 1.0):
            pass
        reps = self.followers.reports.get(attempt, {})
        if not self._verdict_event.is_set() and keys <= set(reps) and all(reps[k]["ok"] for k in keys):
            return 0
        t_stop = time.time()
        self._stop_everywhere()
        verdict = self._wait_verdict({}, t_start)
        return self._handle(verdict, self.followers.failures(attempt), t_stop, slots)

    def _membership(self) -> dict[int, str]:
        """node -> ``host:pid`` of the supervisor that runs it (multi-node), from the
        workers' hellos; a node none of whose workers ever said hello is matched by
        elimination when exactly one supervisor is unaccounted for."""
        assert self.coordinator is not None
        out = {node: node_key(h, p) for node, (h, p) in dict(self.coordinator.node_agents).items()}
        mine = node_key(self.host, os.getpid())
        spare = sorted((self.followers.connected() | {mine}) - set(out.values()))
        missing = [n for n in range(self.cfg.nnodes) if n not in out]
        if len(missing) == 1 and len(spare) == 1:
            out[missing[0]] = spare[0]
        self.my_node = next((n for n, k in out.items() if k == mine), self.my_node)
        return out

    def _lost_nodes(self, members: dict[int, str]) -> list[int]:
        """Nodes still in the job whose follower supervisor has disconnected."""
        mine = node_key(self.host, os.getpid())
        live = self.followers.connected()
        return sorted(n for n in self.nodes if n in members and members[n] != mine and members[n] not in live)

    def _node_of(self, rank: int, slots: list[int]) -> int:
        assert self.coordinator is not None
        node = (self.coordinator.infos.get(rank) or {}).get("node")
        return int(node) if node is not None else slots[rank] // self.cfg.nproc_per_node

    def _send_plan(self) -> bool:
        """Leader: tell every follower the next attempt (or that its node is out)."""
        assert self.coordinator is not None
        members = self._membership()
        unknown = [n for n in self.nodes if n not in members]
        if unknown:
            print(f"commflow launch: no supervisor is known for node(s) {unknown}; cannot restart", file=sys.stderr)
            return False
        inc = self.incidents[-1] if self.incidents else {}
        summary = {k: inc.get(k) for k in ("kind", "ranks", "slots", "where", "excluded_nodes", "attempt",
                                           "world_before", "world_after", "detect_s", "resumed_from_step")}
        summary["class"] = (inc.get("evidence") or {}).get("class")
        plan = {"attempt": self.attempt, "nodes": list(self.nodes), "slots": self._world_slots(),
                "members": {members[n]: n for n in self.nodes},
                "excluded": {k: n for n, k in members.items() if n not in self.nodes},
                "incident": summary}
        self.coordinator.post({"plan": plan})
        if self.my_node is not None and self.my_node not in self.nodes and not self._left:
            self._left = True
            append_node_event(self.out, {"event": "excluded", "node": self.my_node, "host": self.host,
                                         "attempt": self.attempt, "incident": summary, "nodes_after": self.nodes,
                                         "note": "workers left out; this supervisor stays as the control plane "
                                                 "(rendezvous store, coordinator)"})
            print(f"commflow launch: this node ({self.my_node}, {self.host}) is left out; it keeps serving the "
                  f"rendezvous and the coordinator for nodes {self.nodes}", file=sys.stderr)
        return True
