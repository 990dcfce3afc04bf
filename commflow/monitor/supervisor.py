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
   of the next attempt lacks it) or the local process slot on CPU;
3. restarts from the newest checkpoint under ``--checkpoint-dir`` (``DIR/checkpoints``),
   appending ``--resume-arg`` (e.g. ``--resume``) and setting ``COMMFLOW_RESUME=1``;
4. appends an incident to ``DIR/incidents.jsonl`` once the new attempt has finished its
   first iteration (that is when ``restart_s`` is known).

A crash needs no verdict to stop the attempt (elastic notices the dead worker and stops
the rest); the coordinator still names the culprit (the first worker whose channel
closed without a goodbye). The job ends when an attempt succeeds, or with an error
when the world would shrink below ``--min-world`` or ``--max-incidents`` is reached.

Multi-node (``--nnodes N --rdzv-endpoint host:port``): every node runs ``commflow
launch``; the rendezvous is c10d on that endpoint. The node whose supervisor binds the
monitor port (``--monitor-port``, default rendezvous port + 1) first hosts the
coordinator -- every worker of every node reports to it, so detection and localization
see the whole job -- and the others follow. On a verdict the leader stops the job and
writes the incident with the node(s) to leave out (a culprit removes its *node*:
torchrun needs the same process count per node); relaunching the smaller job is left
to the scheduler (every node's supervisor would have to agree on the new membership).
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

__all__ = ["SupervisorConfig", "Supervisor", "worker_command"]

INCIDENT_KINDS = ("hang", "crash", "slow_rank", "slow_link", "comm_hang", "comm_slow")


@dataclass(kw_only=True)
class SupervisorConfig:
    """What ``commflow launch`` was asked to do (one field per CLI option)."""

    cmd: list[str]
    """The worker command, e.g. ``["python", "train.py", "--lr", "0.1"]``."""
    nproc_per_node: int
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    """host:port of the c10d rendezvous (multi-node); None = this host, a free port."""
    out: Path = Path("commflow_out")
    """incidents.jsonl, injected.jsonl, verdicts.jsonl, iterations.jsonl, logs/."""
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
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(entry))
    return out


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


class Supervisor:
    """Runs attempts until the job succeeds; see the module docstring."""

    def __init__(self, cfg: SupervisorConfig):
        if cfg.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node={cfg.nproc_per_node} must be >= 1")
        if cfg.nnodes < 1:
            raise ValueError(f"--nnodes={cfg.nnodes} must be >= 1")
        if cfg.nnodes > 1 and not cfg.rdzv_endpoint:
            raise ValueError(f"--nnodes={cfg.nnodes} needs --rdzv-endpoint host:port")
        if cfg.min_world < 1:
            raise ValueError(f"--min-world={cfg.min_world} must be >= 1")
        if cfg.world_multiple < 1 or (cfg.nproc_per_node * cfg.nnodes) % cfg.world_multiple:
            raise ValueError(f"--world-multiple={cfg.world_multiple} must be >= 1 and divide the world "
                             f"{cfg.nproc_per_node * cfg.nnodes}")
        self.cfg = cfg
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
        self.nodes = list(range(cfg.nnodes))  # node indices still in the job
        self.node_index = 0
        self.incidents: list[dict] = []
        self.attempt = 0
        self._verdict: Verdict | None = None
        self._verdict_event = threading.Event()
        self._pending: dict | None = None
        self._stopping = False
        self.coordinator: Coordinator | None = None
        self.monitor_endpoint = ""

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
        n = self.cfg.nproc_per_node
        if self.cfg.nnodes == 1:
            return list(self.local_slots)
        return [node * n + s for node in self.nodes for s in range(n)]

    def _append(self, name: str, rec: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / name, "a") as fh:
            fh.write(json.dumps(rec, default=str) + "\n")

    def _kill_workers(self) -> None:
        pids = set(_children(os.getpid()))
        if self.coordinator is not None:
            pids |= {int(i["pid"]) for i in self.coordinator.infos.values() if i.get("pid")}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _on_verdict(self, v: Verdict) -> None:
        """Coordinator thread: remember the verdict and stop the attempt."""
        if self._verdict is None:
            self._verdict = v
            self._verdict_event.set()
            self._kill_workers()

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

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Run attempts until success; returns the exit code (0 = the job finished)."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        host, port = "127.0.0.1", cfg.monitor_port
        if cfg.nnodes > 1:
            host = "0.0.0.0"
            if not port:
                port = int(cfg.rdzv_endpoint.rsplit(":", 1)[1]) + 1
            self.monitor_endpoint = f"{_advertise(cfg)}:{port}"
        try:
            if cfg.nnodes > 1 and not _is_local(_advertise(cfg) or ""):
                raise OSError("the rendezvous host is another machine")
            self.coordinator = Coordinator(cfg.detect, cfg.probe, host=host, port=port, out_dir=self.out,
                                           on_verdict=self._on_verdict, prometheus_port=cfg.prometheus_port,
                                           advertise=_advertise(cfg))
        except OSError:
            if cfg.nnodes == 1:
                raise
            # Another node (the one the endpoint names) already hosts the coordinator.
            return self._follow()
        self.coordinator.on_healthy = self._on_healthy
        self.coordinator.start()
        try:
            while True:
                code = self._attempt()
                if code == 0:
                    if self._pending is not None:
                        self._write_incident(self._pending)
                    return 0
                if code is None:
                    if cfg.nnodes > 1:
                        # Restarting several nodes without the culprit needs every node's
                        # supervisor to agree on the new membership; here the leader
                        # stops the job and says which node to leave out.
                        inc = self._pending or {}
                        hosts = sorted({f"{w.get('host')} (node {w.get('node')})" for w in inc.get("where") or []})
                        if self._pending is not None:
                            self._pending["action"] = f"stopped: relaunch without node(s) {hosts}"
                        print(f"commflow launch: {inc.get('kind')} on {hosts}; relaunch without them",
                              file=sys.stderr)
                        return 3
                    continue  # restarted after an incident
                return code
        finally:
            if self._pending is not None:
                self._write_incident(self._pending)
            self.coordinator.stop()

    def _follow(self) -> int:
        """A node that does not host the coordinator: one attempt, reporting to it."""
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

        try:
            code = self._attempt()
        except ChildFailedError:
            code = 1
        return 0 if code == 0 else 1

    def _attempt(self) -> int | None:
        """One elastic launch. 0: success; None: an incident, go again; else: give up."""
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch

        cfg = self.cfg
        slots = self._world_slots()
        world = len(slots)
        coord = self.coordinator
        if coord is not None:
            coord.new_attempt(self.attempt, world)
        self._verdict = None
        self._verdict_event.clear()
        env = {
            "COMMFLOW_MONITOR": coord.endpoint if coord is not None else self.monitor_endpoint,
            "COMMFLOW_INJECT": json.dumps({"faults": [f.to_json() for f in self.faults], "seed": cfg.seed}),
            "COMMFLOW_INJECT_LOG": str((self.out / "injected.jsonl").resolve()),
            "COMMFLOW_SLOTS": ",".join(map(str, slots)),
            "COMMFLOW_ATTEMPT": str(self.attempt),
            "COMMFLOW_OUT": str(self.out),
        }
        if cfg.nnodes == 1:
            env["COMMFLOW_NODE"] = "0"  # multi-node: workers take elastic's GROUP_RANK
        if self.attempt > 0:
            env["COMMFLOW_RESUME"] = "1"
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.gpus[s] for s in self.local_slots)
        args = list(self.args)
        if self.attempt > 0 and cfg.resume_arg:
            args.append(cfg.resume_arg)
        nproc = len(self.local_slots)
        launch = LaunchConfig(
            min_nodes=len(self.nodes),
            max_nodes=len(self.nodes),
            nproc_per_node=nproc,
            # Every node of a multi-node job must name the same rendezvous.
            run_id=(f"commflow-{cfg.rdzv_endpoint.replace(':', '-')}-{self.attempt}" if cfg.nnodes > 1
                    else f"commflow-{uuid.uuid4().hex[:8]}-{self.attempt}"),
            rdzv_backend="c10d",
            rdzv_endpoint=cfg.rdzv_endpoint or "localhost:0",
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
        failures: dict = {}
        try:
            elastic_launch(launch, self.entry)(*args)
            ok = self._verdict is None
        except ChildFailedError as e:
            ok = False
            failures = {int(r): f for r, f in e.failures.items()}
        except Exception as e:  # noqa: BLE001 - rendezvous or agent failure: report, stop
            print(f"commflow launch: attempt {self.attempt} failed to run: {e!r}", file=sys.stderr)
            return 1
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        t_stop = time.time()
        if ok:
            return 0
        if coord is None:
            return 1  # a follower: the leader judges
        verdict = self._wait_verdict(failures, t_start)
        return self._handle(verdict, failures, t_stop, slots)

    def _wait_verdict(self, failures: dict, t_start: float) -> Verdict:
        """The coordinator's verdict, or -- for a crash it had not settled yet -- one from
        the exit codes elastic reported."""
        coord = self.coordinator
        assert coord is not None
        if not self._verdict_event.wait(coord.detector.cfg.crash_settle_s + 2.0):
            first = min(failures.items(), key=lambda kv: kv[1].timestamp) if failures else None
            now = time.time()
            ranks = [first[0]] if first else []
            ev = {"class": "crash: a worker exited with an error (from the elastic agent)",
                  "exit_codes": {str(r): f.exitcode for r, f in failures.items()}}
            t0 = first[1].timestamp if first else t_start
            self._verdict = Verdict(kind="crash", ranks=ranks, evidence={**ev, "exclude": ranks},
                                    t_onset=t0, t_detect=now, t_localized=now)
        v = self._verdict
        assert v is not None
        if failures:
            v.evidence.setdefault("exit_codes", {str(r): f.exitcode for r, f in failures.items()})
        return v

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
        if cfg.nnodes > 1:
            gone_nodes = sorted({s // n for s in exclude_slots})
            self.nodes = [nd for nd in self.nodes if nd not in gone_nodes]
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
            "where": v.evidence.get("where"),
            "evidence": {k: val for k, val in v.evidence.items() if k not in ("where",)},
            "detect_s": round(v.detect_s, 3),
            "localize_s": round((v.t_localized or v.t_detect) - v.t_detect, 3),
            "restart_s": None,
            "attempt": self.attempt,
            "world_before": len(slots),
            "world_after": world_after,
            "gpus_after": [self.gpus[s] for s in self.local_slots] if self.gpus is not None else None,
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
