"""The coordinator: the channel server, the detector, the probe sweep and the logs.

One thread runs everything (no locks between ingest and detection): it reads the
reporters' messages, feeds :class:`~commflow.monitor.detect.Detector`, checks the
deadlines every 20 ms, and when a communication verdict needs a culprit it asks
every worker for a probe sweep (:mod:`.localize`) and waits for the matrix before
passing the verdict on. Verdicts go to ``on_verdict`` (the supervisor) and, with
``out_dir``, to ``verdicts.jsonl``; per-iteration
numbers to ``iterations.jsonl`` and, optionally, Prometheus gauges.

In a multi-node job the other nodes' supervisors connect to the same port: a
connection that opens with ``{"sup": ...}`` is a supervisor, not a worker; its
messages go to ``on_supervisor`` and :meth:`Coordinator.post` sends to it (see
:mod:`.multinode`).
"""

from __future__ import annotations

import collections
import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .channel import ChannelServer
from .detect import DetectConfig, Detector, Verdict
from .localize import analyze_matrix, choose_exclusion, describe_ranks, matrix_from_rows

__all__ = ["Coordinator", "ProbeConfig"]


@dataclass(kw_only=True)
class ProbeConfig:
    """The pairwise probe sweep run to localize communication verdicts."""

    enabled: bool = True
    """Run it at all (off: communication verdicts stay unlocalized)."""
    nbytes: int = 1 << 18
    """Message size per edge (256 KiB on CPU; use MiBs on GPUs)."""
    reps: int = 3
    """Repetitions per edge, a whole sweep apart (the fastest counts)."""
    timeout_s: float = 1.0
    """A repetition silent for this long is lost; an edge with all lost is dead."""
    deadline_s: float = 20.0
    """Give up waiting for the workers' rows after this long."""
    backend: str = "auto"
    """"gloo" (CPU tensors over TCP: the host network), "nccl" (CUDA tensors: NVLink
    and the GPU's NIC path), "auto" (nccl where the worker has a GPU)."""
    confirm_sweeps: int = 2
    """Independent sweeps that must agree on a slow edge or rank (a dead edge needs one)."""


class Coordinator:
    """Hosts the side channel and turns reports into verdicts.

    Args:
        detect: detector thresholds.
        probe: probe sweep settings.
        host, port: where to listen (port 0: any free port; see :attr:`endpoint`).
        out_dir: where verdicts.jsonl / injected.jsonl / iterations.jsonl go.
        on_verdict: called in the coordinator thread with each final verdict.
        auto_ack: keep detecting after a verdict without a restart (trials).
        heal_on_verdict: tell the workers' fault injectors to end the faults that fired
            (trials: stands in for excluding the culprit).
        prometheus_port: serve gauges on this port (needs prometheus-client).
    """

    def __init__(
        self,
        detect: DetectConfig | None = None,
        probe: ProbeConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise: str | None = None,
        out_dir: str | Path | None = None,
        on_verdict: Callable[[Verdict], None] | None = None,
        auto_ack: bool = False,
        heal_on_verdict: bool = False,
        prometheus_port: int | None = None,
    ):
        self.detector = Detector(detect)
        self.probe_cfg = probe or ProbeConfig()
        self.server = ChannelServer(host, port, self._on_message, self._on_close)
        self.endpoint = f"{advertise or ('127.0.0.1' if host in ('0.0.0.0', '') else host)}:{self.server.port}"
        self.out = Path(out_dir) if out_dir else None
        if self.out:
            self.out.mkdir(parents=True, exist_ok=True)
        self.on_verdict = on_verdict or (lambda v: None)
        self.on_healthy: Callable[[int, float], None] = lambda attempt, t: None
        """Called once per attempt when its first iteration has been closed."""
        self._healthy_sent = -1
        self.auto_ack = auto_ack
        self.heal_on_verdict = heal_on_verdict
        self.attempt = 0
        self.conn_rank: dict[int, int] = {}
        self.infos: dict[int, dict] = {}
        self.byes: dict[int, dict] = {}
        self.verdicts: list[Verdict] = []
        self.suspicions: list[Verdict] = []  # comm slowdowns the probe found no culprit for
        self.injected: list[dict] = []
        self.events: list[tuple[float, str, Any]] = []
        self.errors: list[str] = []
        self.node_agents: dict[int, tuple[str, int]] = {}
        """node -> (host, pid of the process that launched its workers), from hellos; kept
        across attempts (a node's supervisor stays the same)."""
        self.supervisors: dict[int, dict] = {}  # connection id -> a follower supervisor's hello
        self.on_supervisor: Callable[[int, dict, float], None] = lambda cid, msg, now: None
        """Called (coordinator thread) with each follower supervisor's message and, on
        disconnect, ``{"closed": hello}``."""
        self._posts: collections.deque[tuple[int | None, dict]] = collections.deque()
        self._probe: dict | None = None
        self._probe_id = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="commflow-coordinator", daemon=True)
        self._lock = threading.Lock()  # guards new_attempt against the loop
        self.iteration_rows: list[dict] = []  # the detector's per-iteration rows (bounded)
        self.keep_rows = 100_000
        self.prom = _Prometheus(prometheus_port) if prometheus_port is not None else None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Coordinator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.server.close()

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def new_attempt(self, attempt: int, world_size: int) -> None:
        """A restart: forget the old world; only hellos of ``attempt`` count from now."""
        with self._lock:
            self.attempt = attempt
            self.detector.reset(world_size)
            self.conn_rank.clear()
            self.infos.clear()
            self.byes.clear()
            self._probe = None

    def post(self, msg: dict, cid: int | None = None) -> None:
        """Send ``msg`` to supervisor connection ``cid`` (None: every follower
        supervisor). Thread-safe: the loop sends it within one poll (20 ms)."""
        self._posts.append((cid, msg))

    def connected_ranks(self) -> list[int]:
        return sorted(set(self.conn_rank.values()))

    # -- messages -------------------------------------------------------------------------

    def _on_message(self, cid: int, msg: dict, now: float) -> None:
        if "sup" in msg or cid in self.supervisors:
            if "sup" in msg:
                self.supervisors[cid] = dict(msg["sup"])
            self.on_supervisor(cid, msg, now)
            return
        if "hello" in msg:
            info = msg["hello"]
            if int(info.get("attempt", 0)) != self.attempt:
                return  # a straggler from a previous attempt
            rank = int(info["rank"])
            self.conn_rank[cid] = rank
            if rank not in self.detector.ranks or self.detector.ranks[rank].closed_at is not None:
                self.detector.hello(rank, info, now)
            self.infos[rank] = info
            if info.get("node") is not None and info.get("agent_pid"):
                self.node_agents[int(info["node"])] = (str(info.get("host")), int(info["agent_pid"]))
            return
        rank = self.conn_rank.get(cid)
        if rank is None:
            return
        if "bye" in msg:
            self.byes[rank] = msg["bye"]
            return
        for ev in msg.get("ev", ()):
            tag = ev[0]
            if tag == "inj":  # the workers also append these to injected.jsonl themselves
                self.injected.append({**ev[1], "attempt": self.attempt})
            elif tag == "probe" and self._probe is not None and ev[1] == self._probe["id"]:
                self._probe["rows"][int(ev[2])] = ev[3]  # results so far (per round)
                if len(ev) > 4 and ev[4]:
                    self._probe["done"].add(int(ev[2]))
            elif tag == "log":
                self.events.append((now, "log", {"rank": rank, "text": ev[1]}))
        self.detector.ingest(rank, msg, now)

    def _on_close(self, cid: int, now: float) -> None:
        if cid in self.supervisors:
            self.on_supervisor(cid, {"closed": self.supervisors.pop(cid)}, now)
            return
        rank = self.conn_rank.pop(cid, None)
        if rank is None:
            return
        self.detector.closed(rank, now, self.byes.get(rank))

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception:  # noqa: BLE001 - keep watching; the error is kept for inspection
                import traceback

                self.errors.append(traceback.format_exc())
                if len(self.errors) > 100:
                    del self.errors[:50]

    def _step(self) -> None:
        try:
            self.server.poll(0.02)
        except OSError:
            return
        while self._posts:
            cid, msg = self._posts.popleft()
            for target in ([cid] if cid is not None else list(self.supervisors)):
                self.server.send(target, msg)
        with self._lock:
            now = time.time()
            if self._probe is not None:
                self._check_probe(now)
                return
            if self._healthy_sent != self.attempt and self.detector.closed_iters >= 1:
                self._healthy_sent = self.attempt
                try:
                    self.on_healthy(self.attempt, now)
                except Exception as e:  # noqa: BLE001
                    self.events.append((now, "callback_error", repr(e)))
            v = self.detector.tick(now)
            if v is not None:
                if v.needs_probe and self.probe_cfg.enabled and len(self.connected_ranks()) >= 2:
                    self._start_probe(v, now)
                else:
                    self._finalize(v, now)
            self._flush_metrics()

    def _start_probe(self, v: Verdict, now: float, *, sweeps: list | None = None, first: float | None = None) -> None:
        self._probe_id += 1
        world = self.detector.world_size or len(self.connected_ranks())
        self._probe = {"id": self._probe_id, "verdict": v, "t0": now, "rows": {}, "done": set(), "world": world,
                       "sweeps": sweeps or [], "first_t0": first if first is not None else now}
        cfg = self.probe_cfg
        cmd = {"cmd": "probe", "id": self._probe_id, "attempt": self.attempt, "nbytes": cfg.nbytes,
               "reps": cfg.reps, "timeout_s": cfg.timeout_s, "world": world, "backend": cfg.backend}
        for cid in list(self.conn_rank):
            self.server.send(cid, cmd)

    def _check_probe(self, now: float) -> None:
        p = self._probe
        assert p is not None
        complete = len(p["done"]) >= p["world"]
        if not complete and now - p["t0"] < self.probe_cfg.deadline_s:
            return
        self._probe = None
        v: Verdict = p["verdict"]
        m = matrix_from_rows(p["rows"], p["world"])
        finding = analyze_matrix(m)
        sweeps = p.get("sweeps", []) + [{"where": finding.where, "ranks": finding.ranks, "link": finding.link,
                                          "dead": finding.dead, "seconds": round(now - p["t0"], 3)}]
        # A slow (not dead) finding is confirmed by a second, independent sweep: a
        # rank starved of CPU during one sweep can make its edges look slow once.
        if (finding.where != "none" and not finding.dead and len(sweeps) < self.probe_cfg.confirm_sweeps):
            self._start_probe(v, now, sweeps=sweeps, first=p.get("first_t0", p["t0"]))
            return
        same = all((sw["where"], sw["ranks"], sw["link"]) == (finding.where, finding.ranks, finding.link)
                   for sw in sweeps)
        if not same:
            finding = type(finding)(where="none", evidence={**finding.evidence, "note": "sweeps disagree"})
        v.evidence["probe"] = {**finding.evidence, "seconds": round(now - p.get("first_t0", p["t0"]), 3),
                               "ranks_finished": sorted(p["done"]), "where": finding.where, "sweeps": sweeps}
        if finding.where == "link":
            v.link = finding.link
            v.ranks = list(finding.ranks)
            if v.kind == "comm_slow" and not finding.dead:
                v.kind = "slow_link"
        elif finding.where in ("rank", "sender", "receiver"):
            v.ranks = list(finding.ranks)
            v.evidence["probe"]["side"] = finding.where
        v.evidence["exclude"] = choose_exclusion(finding, m)
        v.t_localized = now
        if v.kind == "comm_slow" and finding.where == "none":
            # Statistics only *trigger* for slowness: transfers that slowed down
            # everywhere at once (a loaded host, congestion) have no culprit to
            # exclude. Logged as a suspicion; the detector waits for it to clear.
            self.suspicions.append(v)
            self._append("suspicions.jsonl", {**v.to_json(), "attempt": self.attempt})
            self.detector.acknowledge(v, unexplained=True)
            return
        self._finalize(v, now)

    def _finalize(self, v: Verdict, now: float) -> None:
        if v.t_localized is None:
            v.t_localized = v.t_detect
        v.evidence.setdefault("exclude", list(v.ranks))
        v.evidence["where"] = describe_ranks(sorted(set(v.ranks)), self.infos)
        self.verdicts.append(v)
        self._append("verdicts.jsonl", {**v.to_json(), "attempt": self.attempt,
                                        "localize_s": v.t_localized - v.t_detect})
        if self.prom:
            self.prom.verdict(v)
        if self.auto_ack:
            self.detector.acknowledge(v)
        if self.heal_on_verdict:  # trials: the fault ends as if its hardware were excluded
            for cid in list(self.conn_rank):
                self.server.send(cid, {"cmd": "heal"})
        try:
            self.on_verdict(v)
        except Exception as e:  # noqa: BLE001 - a callback bug must not stop detection
            self.events.append((now, "callback_error", repr(e)))

    def _flush_metrics(self) -> None:
        rows = self.detector.metrics
        while rows:
            row = rows.popleft()
            if len(self.iteration_rows) < self.keep_rows:
                self.iteration_rows.append(row)
            if self.prom:
                self.prom.iteration(row)
            if self.out:
                out = {k: row[k] for k in ("iteration", "t", "period", "comm_s", "collectives", "quiet")}
                out["late"] = {str(r): round(v, 5) for r, v in row["late"].items()}
                out["flags"] = [f[0] + ("" if f[1] is None else f":{f[1]}") for f in row["flags"]]
                out["attempt"] = self.attempt
                self._append("iterations.jsonl", out)

    def _append(self, name: str, rec: dict) -> None:
        if self.out is None:
            return
        with open(self.out / name, "a") as fh:
            fh.write(json.dumps(rec, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    with contextlib.suppress(Exception):
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
    return str(x)


class _Prometheus:
    """Gauges and counters for a Prometheus scrape (prometheus-client)."""

    def __init__(self, port: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        # A registry of our own: two coordinators in one process must not collide.
        self.registry = reg = CollectorRegistry()
        self.step = Gauge("commflow_monitor_step_seconds", "Median step period of the last closed iteration",
                          registry=reg)
        self.comm = Gauge("commflow_monitor_comm_seconds", "Transfer time per iteration (last arrivers' waits)",
                          registry=reg)
        self.late = Gauge("commflow_monitor_lateness_ratio", "Rank arrival lateness per step period", ["rank"],
                          registry=reg)
        self.iter = Gauge("commflow_monitor_iteration", "Last closed iteration", registry=reg)
        self.verdicts = Counter("commflow_monitor_verdicts_total", "Verdicts by kind", ["kind"], registry=reg)
        self.server = start_http_server(port, registry=reg)

    def iteration(self, row: dict) -> None:
        self.step.set(row["period"])
        self.comm.set(row["comm_s"])
        self.iter.set(row["iteration"])
        for r, v in row["late"].items():
            self.late.labels(rank=str(r)).set(v)

    def verdict(self, v: Verdict) -> None:
        self.verdicts.labels(kind=v.kind).inc()
