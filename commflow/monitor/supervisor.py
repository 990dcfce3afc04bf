"""``commflow launch``: run workers under torch elastic, watch them, isolate, restart.

Each *attempt* is one ``torch.distributed.launcher.api.elastic_launch`` call -- the
machinery behind torchrun: c10d rendezvous, the worker environment (``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` ...), log redirection, process management -- with
``max_restarts=0``, because a restart here changes the world: the culprit is left out.

The supervisor hosts the :class:`~commflow.monitor.coordinator.Coordinator`, starts the
workers through ``python -m commflow.monitor.worker`` (so the user's script is traced
without edits) and, on a verdict:

1. stops the attempt (SIGKILL to the workers: a hung one would ignore anything else);
2. excludes the culprit: its *slot* -- the GPU on this host (``CUDA_VISIBLE_DEVICES``
   of the next attempt lacks it) or the local process slot on CPU; in a multi-node
   job its *node*;
3. restarts from the newest checkpoint under ``--checkpoint-dir`` (``DIR/checkpoints``),
   appending ``--resume-arg`` (e.g. ``--resume``) and setting ``COMMFLOW_RESUME=1``;
4. appends an incident to ``DIR/incidents.jsonl`` once the new attempt has finished its
   first iteration (that is when ``restart_s`` is known).

A crash needs no verdict to stop the attempt (elastic notices the dead worker and stops
the rest); the coordinator still names the culprit (the first worker whose channel
closed without a goodbye). The job ends when an attempt succeeds, or with an error
when the world would shrink below ``--min-world`` (or the nodes below ``--nnodes``
MIN) or ``--max-incidents`` is reached.

Multi-node (``--nnodes [MIN:]MAX --rdzv-endpoint host:port``): every node runs the same
``commflow launch``. The supervisor on the rendezvous host leads (control plane: the
rendezvous store, the coordinator every worker of every node reports to, the
decisions); the others follow its plans: on a verdict every node stops its workers,
the culprit's node leaves the job (its supervisor records why and exits 0), and the
rest meet in a new c10d rendezvous of the remaining nodes and resume from the
checkpoint. See :mod:`.multinode` for the protocol and why it is built this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .coordinator import Coordinator, ProbeConfig
from .detect import DetectConfig, Verdict
from .inject import Fault, resolve_faults
from .multinode import (
    Followers,
    NodeRoles,
    append_node_event,
    descendants,
    hold_rendezvous_store,
    node_slots,
    parent_pids,
    plan_nodes,
)

__all__ = ["SupervisorConfig", "Supervisor", "worker_command"]

INCIDENT_KINDS = ("hang", "crash", "slow_rank", "slow_link", "comm_hang", "comm_slow")


@dataclass(kw_only=True)
class SupervisorConfig:
    """What ``commflow launch`` was asked to do (one field per CLI option)."""

    cmd: list[str]
    """The worker command, e.g. ``["python", "train.py", "--lr", "0.1"]``."""
    nproc_per_node: int
    nnodes: int = 1
    """Nodes that start the job (MAX of ``--nnodes MIN:MAX``)."""
    min_nodes: int | None = None
    """Fewest nodes exclusions may shrink a multi-node job to (MIN of ``--nnodes``);
    None: ``nnodes``, as torchrun reads ``--nnodes N`` (a fixed size: an incident then
    stops the job and names the node to leave out)."""
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous (multi-node); None = this host, a free port."""
    out: Path = Path("commflow_out")
    """incidents.jsonl, injected.jsonl, verdicts.jsonl, iterations.jsonl, nodes.jsonl, logs/."""
    checkpoint_dir: Path | None = None
    """Where the job writes checkpoints (default ``out/checkpoints``)."""
    resume_arg: str | None = None
    """Appended to the command on restarts (e.g. ``--resume``)."""
    inject: list[str] = field(default_factory=list)
    seed: int = 0
    max_incidents: int = 8
    min_world: int = 1
    world_multiple: int = 1
    """Keep the world a multiple of this (e.g. the sp or tp degree) after an exclusion."""
    monitor_port: int = 0
    """Coordinator port (0: any; multi-node default: rendezvous port + 1)."""
    prometheus_port: int | None = None
    detect: DetectConfig = field(default_factory=DetectConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tee: bool = True
    """Show worker output on this console as well as in out/logs."""
    leader_timeout_s: float = 120.0
    """Multi-node: a follower gives up when the leader's coordinator port has not
    answered for this long at start."""
    decision_timeout_s: float = 600.0
    """Multi-node: a follower whose attempt ended waits this long for the leader's plan."""


@dataclass
class _Outcome:
    """How one elastic launch on this node ended."""

    ok: bool
    failures: dict[int, tuple[int, float]]
    """Global rank -> (exit code, time) of the workers elastic saw fail."""
    t_start: float
    t_stop: float
    error: str | None = None
    """The launch itself failed (rendezvous, agent): no worker verdict to wait for."""


def worker_command(cmd: list[str]) -> tuple[str, list[str]]:
    """(entrypoint, args) that run ``cmd`` with the monitor on.

    ``python [-u] script.py ...`` / ``python -m mod ...`` / ``commflow ...`` go through
    ``python -m commflow.monitor.worker``; any other executable runs as is (it can still
    call ``commflow.monitor.watch()`` itself, which reads the same environment).
    """
    if not cmd:
        raise ValueError("the worker command is empty: give it after '--', e.g. -- python train.py")
    exe = os.path.basename(cmd[0])
    wrap = [sys.executable, "-u", "-m", "commflow.monitor.worker"]
    if exe == "commflow":
        return wrap[0], [*wrap[1:], "-m", "commflow", *cmd[1:]]
    if exe.startswith("python") or cmd[0] == sys.executable:
        rest = list(cmd[1:])
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest.pop(0)  # interpreter flags (-u, -O, ...): the wrapper runs unbuffered anyway
        if not rest:
            raise ValueError(f"worker command {cmd!r} names no script or -m module")
        return wrap[0], [*wrap[1:], *rest]
    return cmd[0], list(cmd[1:])


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; elastic starts workers in new sessions)."""
    return [child for child, ppid in parent_pids().items() if ppid == pid]


def _latest_step(ckpt_dir: Path) -> int | None:
    from .demo import latest_checkpoint

    found = latest_checkpoint(ckpt_dir)
    if found is not None:
        return found[0]
    # Other layouts: any sub-directory whose name ends in a number.
    if not ckpt_dir.is_dir():
        return None
    steps = []
    for p in ckpt_dir.iterdir():
        digits = "".join(ch for ch in reversed(p.name) if ch.isdigit())[::-1]
        if p.is_dir() and digits and p.name.endswith(digits) and not p.name.endswith(".tmp"):
            steps.append(int(digits))
    return max(steps) if steps else None


class Supervisor(NodeRoles):
    """Runs attempts until the job succeeds; see the module docstring (multi-node
    roles: :class:`~commflow.monitor.multinode.NodeRoles`)."""

    def __init__(self, cfg: SupervisorConfig):
        if cfg.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node={cfg.nproc_per_node} must be >= 1")
        if cfg.nnodes < 1:
            raise ValueError(f"--nnodes={cfg.nnodes} must be >= 1")
        if cfg.min_nodes is None:
            cfg.min_nodes = cfg.nnodes
        if not 1 <= cfg.min_nodes <= cfg.nnodes:
            raise ValueError(f"--nnodes={cfg.min_nodes}:{cfg.nnodes}: MIN must be in 1..MAX")
        if cfg.nnodes > 1 and not cfg.rdzv_endpoint:
            raise ValueError(f"--nnodes={cfg.nnodes} needs --rdzv-endpoint host:port")
        if cfg.min_world < 1:
            raise ValueError(f"--min-world={cfg.min_world} must be >= 1")
        if cfg.world_multiple < 1 or (cfg.nproc_per_node * cfg.nnodes) % cfg.world_multiple:
            raise ValueError(f"--world-multiple={cfg.world_multiple} must be >= 1 and divide the world "
                             f"{cfg.nproc_per_node * cfg.nnodes}")
        self.cfg = cfg
        self.multi = cfg.nnodes > 1
        self.entry, self.args = worker_command(cfg.cmd)
        world = cfg.nproc_per_node * cfg.nnodes
        # Malformed or out-of-range faults fail here, before any worker starts.
        self.faults: list[Fault] = resolve_faults(cfg.inject, world, cfg.seed)
        self.out = Path(cfg.out)
        self.ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else self.out / "checkpoints"
        self.gpus = self._visible_gpus()
        if self.gpus is not None and len(self.gpus) < cfg.nproc_per_node:
            raise ValueError(f"--nproc-per-node={cfg.nproc_per_node} but only {len(self.gpus)} GPUs are visible")
        self.local_slots = list(range(cfg.nproc_per_node))  # slots still in use on this node
        self.nodes = list(range(cfg.nnodes))  # nodes (first-attempt group ranks) still in the job
        self.my_node: int | None = None  # multi-node: this supervisor's node, once known
        self.role = "single" if not self.multi else "undecided"
        self.host = socket.gethostname()
        self.incidents: list[dict] = []
        self.attempt = 0
        self._verdict: Verdict | None = None
        self._verdict_event = threading.Event()
        self._pending: dict | None = None
        self._launching: int | None = None  # the attempt whose elastic launch runs now
        self._stopped: set[int] = set()  # attempts told to stop
        self._left = False
        self.followers = Followers()
        self.coordinator: Coordinator | None = None
        self.monitor_endpoint = ""
        self._store: Any = None

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def _visible_gpus() -> list[str] | None:
        env = os.environ.get("CUDA_VISIBLE_DEVICES")
        if env is not None:
            return [d.strip() for d in env.split(",") if d.strip()]
        try:
            import torch

            if torch.cuda.is_available():
                return [str(i) for i in range(torch.cuda.device_count())]
        except Exception:  # noqa: BLE001 - no torch CUDA: CPU slots
            pass
        return None

    def _world_slots(self) -> list[int]:
        """Slot (first-attempt global rank) of every global rank of this attempt."""
        if not self.multi:
            return list(self.local_slots)
        return node_slots(self.nodes, self.cfg.nproc_per_node)

    def _append(self, name: str, rec: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / name, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    def _kill_workers(self) -> None:
        if self.multi:
            # Only this node's processes: the other nodes' supervisors kill theirs
            # (a pid from another host's hello means nothing here).
            pids = set(descendants(os.getpid()))
        else:
            pids = set(_children(os.getpid()))
            if self.coordinator is not None:
                pids |= {int(i["pid"]) for i in self.coordinator.infos.values() if i.get("pid")}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _stop_local(self, attempt: int) -> None:
        """Kill this node's workers of ``attempt``. Multi-node: a stop can come from
        another node a moment before this node's agent has spawned its workers, so
        keep killing until the attempt's launch returns."""
        first = attempt not in self._stopped
        self._stopped.add(attempt)
        self._kill_workers()
        if self.multi and first:
            def keep_killing() -> None:
                while self._launching == attempt:
                    self._kill_workers()
                    time.sleep(0.1)

            threading.Thread(target=keep_killing, name="commflow-stop", daemon=True).start()

    def _stop_everywhere(self) -> None:
        """End the current attempt on this node and (leader) on every other node."""
        self._stop_local(self.attempt)
        if self.multi and self.coordinator is not None:
            self.coordinator.post({"cmd": "stop", "attempt": self.attempt})

    def _on_verdict(self, v: Verdict) -> None:
        """Coordinator thread: remember the verdict and stop the attempt."""
        if self._verdict is None:
            self._verdict = v
            self._verdict_event.set()
            self._stop_everywhere()

    def _on_healthy(self, attempt: int, t: float) -> None:
        """Coordinator thread: the attempt finished its first iteration."""
        inc = self._pending
        if inc is not None and attempt == inc["attempt"] + 1:
            # From the decision (culprit known) to the new world's first finished iteration.
            inc["restart_s"] = round(t - inc["_t_decided"], 3)
            self._write_incident(inc)

    def _write_incident(self, inc: dict) -> None:
        if inc.get("_written"):
            return
        inc["_written"] = True
        rec = {k: v for k, v in inc.items() if not k.startswith("_") and k != "t_stop"}
        self._append("incidents.jsonl", rec)
        self._pending = None

    def _make_coordinator(self, host: str, port: int, advertise: str | None = None) -> Coordinator:
        cfg = self.cfg
        return Coordinator(cfg.detect, cfg.probe, host=host, port=port, out_dir=self.out,
                           on_verdict=self._on_verdict, prometheus_port=cfg.prometheus_port, advertise=advertise)

    # -- roles --------------------------------------------------------------------------

    def run(self) -> int:
        """Run attempts until success; returns the exit code (0 = the job finished)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.multi:
            self.coordinator = self._make_coordinator("127.0.0.1", cfg.monitor_port)
            return self._lead()
        advertise = _advertise(cfg)
        port = cfg.monitor_port or int(cfg.rdzv_endpoint.rsplit(":", 1)[1]) + 1
        self.monitor_endpoint = f"{advertise}:{port}"
        try:
            if not _is_local(advertise or ""):
                raise OSError("the rendezvous host is another machine")
            self.coordinator = self._make_coordinator("0.0.0.0", port, advertise)
        except OSError:
            # Another supervisor (the one on the rendezvous host) leads.
            return self._follow()
        try:
            self._store = hold_rendezvous_store(cfg.rdzv_endpoint)
        except OSError as e:
            self.coordinator.server.close()
            print(f"commflow launch: {e}", file=sys.stderr)
            return 1
        self.role = "leader"
        return self._lead()

    def _lead(self) -> int:
        """Single node, or the leader of a multi-node job: coordinator + decisions."""
        coord = self.coordinator
        assert coord is not None
        coord.on_healthy = self._on_healthy
        coord.on_supervisor = self.followers.on_message
        coord.start()
        if self.multi:
            append_node_event(self.out, {"event": "leader", "host": self.host, "pid": os.getpid(),
                                         "coordinator": coord.endpoint, "rendezvous": self.cfg.rdzv_endpoint})
        code = 1
        try:
            self._begin_attempt()
            while True:
                local = not self.multi or self.my_node is None or self.my_node in self.nodes
                code = self._attempt() if local else self._attempt_remote()
                if code is None:  # an incident; go again without the culprit
                    self._begin_attempt()
                    if self.multi and not self._send_plan():
                        code = 1
                        return code
                    continue
                if code == 0 and self._pending is not None:
                    self._write_incident(self._pending)
                return code
        finally:
            if self._pending is not None:
                self._write_incident(self._pending)
            if self.multi:
                code = code if isinstance(code, int) else 1  # None: interrupted mid-restart
                coord.post({"end": {"code": code}})
                # Followers exit on "end"; keep the coordinator and the rendezvous store
                # up until they have (their elastic agents still close the rendezvous).
                self.followers.wait(lambda: not self.followers.links, 15.0)
                append_node_event(self.out, {"event": "finished", "role": "leader", "node": self.my_node,
                                             "code": code})
            coord.stop()
            self._store = None

    # -- attempts -----------------------------------------------------------------------

    def _begin_attempt(self) -> None:
        """The coordinator forgets the old world; only hellos of this attempt count."""
        assert self.coordinator is not None
        self.coordinator.new_attempt(self.attempt, len(self._world_slots()))
        self._verdict = None
        self._verdict_event.clear()

    def _attempt(self) -> int | None:
        """One attempt with workers on this node. 0: success; None: an incident, go
        again; else: give up."""
        slots = self._world_slots()
        res = self._launch(slots)
        if res.error is not None:
            return 1
        if res.ok and self._verdict is None:
            return 0
        if self.multi:
            self._stop_everywhere()  # one node failed: the others' workers go too
        verdict = self._wait_verdict(res.failures, res.t_start)
        return self._handle(verdict, res.failures, res.t_stop, slots)

    def _launch(self, slots: list[int]) -> _Outcome:
        """One ``elastic_launch`` of this node's workers for the current attempt."""
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        cfg = self.cfg
        coord = self.coordinator
        env = {
            "COMMFLOW_MONITOR": coord.endpoint if coord is not None else self.monitor_endpoint,
            "COMMFLOW_INJECT": json.dumps({"faults": [f.to_json() for f in self.faults], "seed": cfg.seed}),
            "COMMFLOW_INJECT_LOG": str((self.out / "injected.jsonl").resolve()),
            "COMMFLOW_SLOTS": ",".join(map(str, slots)),
            "COMMFLOW_ATTEMPT": str(self.attempt),
            "COMMFLOW_OUT": str(self.out),
        }
        if not self.multi:
            env["COMMFLOW_NODE"] = "0"
        elif self.my_node is not None:
            env["COMMFLOW_NODE"] = str(self.my_node)  # else (first attempt) workers take GROUP_RANK
        if self.attempt > 0:
            env["COMMFLOW_RESUME"] = "1"
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[s] for s in self.local_slots)
        args = list(self.args)
        if self.attempt > 0 and cfg.resume_arg:
            args.append(cfg.resume_arg)
        rdzv_configs: dict[str, Any] = {}
        if self.multi:
            # The leader's process holds the store (hold_rendezvous_store); nobody
            # else may try to host it, even on the same machine.
            rdzv_configs["is_host"] = self.role == "leader"
        launch = LaunchConfig(
            # Exactly the planned nodes: the round closes when they are all in.
            min_nodes=len(self.nodes),
            max_nodes=len(self.nodes),
            nproc_per_node=len(self.local_slots),
            # Every node of a multi-node job must name the same rendezvous.
            run_id=(f"commflow-{cfg.rdzv_endpoint.replace(':', '-')}-{self.attempt}" if self.multi
                    else f"commflow-{uuid.uuid4().hex[:8]}-{self.attempt}"),
            rdzv_backend="c10d",
            rdzv_endpoint=cfg.rdzv_endpoint or "localhost:0",
            rdzv_configs=rdzv_configs,
            max_restarts=0,
            monitor_interval=0.1,
            logs_specs=DefaultLogsSpecs(
                log_dir=str(self.out / "logs" / f"attempt_{self.attempt}"),
                redirects=Std.ALL,
                tee=Std.ALL if cfg.tee else Std.NONE,
            ),
        )
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        t_start = time.time()
        self._launching = self.attempt
        try:
            elastic_launch(launch, self.entry)(*args)
            return _Outcome(ok=True, failures={}, t_start=t_start, t_stop=time.time())
        except ChildFailedError as e:
            failures = {int(r): (int(f.exitcode), float(f.timestamp)) for r, f in e.failures.items()}
            return _Outcome(ok=False, failures=failures, t_start=t_start, t_stop=time.time())
        except Exception as e:  # noqa: BLE001 - rendezvous or agent failure: report, stop
            print(f"commflow launch: attempt {self.attempt} failed to run: {e!r}", file=sys.stderr)
            return _Outcome(ok=False, failures={}, t_start=t_start, t_stop=time.time(), error=repr(e))
        finally:
            self._launching = None
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _wait_verdict(self, failures: dict[int, tuple[int, float]], t_start: float) -> Verdict:
        """The coordinator's verdict, or -- for a crash it had not settled yet -- one from
        the exit codes elastic reported (on any node)."""
        coord = self.coordinator
        assert coord is not None
        settled = self._verdict_event.wait(coord.detector.cfg.crash_settle_s + 2.0)
        if self.multi:
            failures = {**self.followers.failures(self.attempt), **failures}
        codes = {str(r): code for r, (code, _) in failures.items()}
        if not settled:
            first = min(failures.items(), key=lambda kv: kv[1][1]) if failures else None
            now = time.time()
            ranks = [first[0]] if first else []
            ev = {"class": "crash: a worker exited with an error (from the elastic agent)", "exit_codes": codes}
            t0 = first[1][1] if first else t_start
            self._verdict = Verdict(kind="crash", ranks=ranks, evidence={**ev, "exclude": ranks},
                                    t_onset=t0, t_detect=now, t_localized=now)
        v = self._verdict
        assert v is not None
        if failures:
            v.evidence.setdefault("exit_codes", codes)
        return v

    # -- decisions ----------------------------------------------------------------------

    def _handle(self, v: Verdict, failures: dict, t_stop: float, slots: list[int]) -> int | None:
        cfg = self.cfg
        coord = self.coordinator
        assert coord is not None
        exclude_ranks = [r for r in v.evidence.get("exclude", v.ranks) if 0 <= r < len(slots)]
        exclude_slots = sorted({slots[r] for r in exclude_ranks})
        last_step = max((st.max_step for st in coord.detector.ranks.values()), default=-1)
        resumed = _latest_step(self.ckpt_dir)
        # Every rank raised before the first iteration finished: the program or its
        # config is broken (e.g. the world no longer divides --sp), not a device.
        # Excluding slots would only burn healthy GPUs.
        byes = coord.byes
        software = (v.kind == "crash" and coord.detector.closed_iters == 0 and len(byes) >= len(slots)
                    and all(not b.get("ok", True) for b in byes.values()))
        if software:
            exclude_slots = []
        n = cfg.nproc_per_node
        shape_slots: list[int] = []
        node_fields: dict[str, Any] = {}
        if self.multi:
            # Node ids of every supervisor (this one's too); a node whose supervisor
            # went away cannot take part in the next rendezvous either.
            lost = self._lost_nodes(self._membership())
            culprit_nodes = [] if software else sorted({self._node_of(r, slots) for r in exclude_ranks})
            nodes_before = list(self.nodes)
            self.nodes, shape_nodes = plan_nodes(self.nodes, sorted(set(culprit_nodes) | set(lost)), n,
                                                 cfg.world_multiple)
            shape_slots = node_slots(shape_nodes, n)
            hosts = {(w.get("node"), w.get("host")) for w in v.evidence.get("where") or []}
            node_fields = {"excluded_nodes": culprit_nodes, "excluded_nodes_for_shape": shape_nodes,
                           "lost_nodes": lost, "nodes_before": nodes_before, "nodes_after": list(self.nodes),
                           "action": (f"left out node(s) {culprit_nodes} ({sorted(h for _, h in hosts if h)}); "
                                      f"restart on nodes {self.nodes}")}
        else:
            self.local_slots = [s for s in self.local_slots if s not in exclude_slots]
            # Keep the world a multiple of --world-multiple (tensor/sequence parallel
            # degree): leave out the highest healthy slots too (over-eviction).
            while cfg.world_multiple > 1 and len(self.local_slots) % cfg.world_multiple:
                shape_slots.append(self.local_slots.pop())
        world_after = len(self._world_slots())
        kind = v.kind if v.kind in INCIDENT_KINDS else "hang"
        inc = {
            "kind": kind,
            "ranks": list(v.ranks),
            "link": v.link,
            "slots": [slots[r] for r in v.ranks if 0 <= r < len(slots)],
            "excluded_slots": exclude_slots,
            "excluded_for_shape": shape_slots,
            **node_fields,
            "where": v.evidence.get("where"),
            "evidence": {k: val for k, val in v.evidence.items() if k not in ("where",)},
            "detect_s": round(v.detect_s, 3),
            "localize_s": round((v.t_localized or v.t_detect) - v.t_detect, 3),
            "restart_s": None,
            "attempt": self.attempt,
            "world_before": len(slots),
            "world_after": world_after,
            "gpus_after": ([self.gpus[s] for s in self.local_slots]
                           if self.gpus is not None and not self.multi else None),
            "last_step": last_step,
            "resumed_from_step": resumed,
            "lost_steps": None if resumed is None or last_step < 0 else max(0, last_step - resumed),
            "t_onset": v.t_onset,
            "t_detect": v.t_detect,
            "t_stop": t_stop,
            "_t_decided": v.t_localized or v.t_detect,
        }
        self.incidents.append(inc)
        if self._pending is not None:
            self._write_incident(self._pending)
        self._pending = inc
        if software:
            inc["evidence"]["stopped"] = "every rank failed before its first iteration: a program error, not a device"
            self._write_incident(inc)
            return 4
        if len(self.incidents) >= cfg.max_incidents:
            inc["evidence"]["stopped"] = f"--max-incidents={cfg.max_incidents} reached"
            self._write_incident(inc)
            return 3
        if world_after < cfg.min_world:
            inc["evidence"]["stopped"] = f"world of {world_after} is below --min-world={cfg.min_world}"
            self._write_incident(inc)
            return 3
        if self.multi and len(self.nodes) < cfg.min_nodes:
            inc["evidence"]["stopped"] = f"{len(self.nodes)} node(s) left, below --nnodes MIN={cfg.min_nodes}"
            self._write_incident(inc)
            return 3
        self.attempt += 1
        return None


def _is_local(ip: str) -> bool:
    """Whether ``ip`` belongs to this machine (binding to it only works here)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def _advertise(cfg: SupervisorConfig) -> str | None:
    if cfg.nnodes > 1 and cfg.rdzv_endpoint:
        host = cfg.rdzv_endpoint.rsplit(":", 1)[0]
        with contextlib.suppress(OSError):
            return socket.gethostbyname(host)
        return host
    return None


def launch(cfg: SupervisorConfig) -> int:
    """Entry point of ``commflow launch``."""
    return Supervisor(cfg).run()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records of a JSON Lines file (incidents.jsonl, injected.jsonl, ...)."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
