"""Reproducible fault injection: hang, crash, slow rank, slow or dead link, jitter.

A fault is written as ``kind:key=value,...`` (the ``--inject`` syntax of
``commflow launch``)::

    hang:rank=1,at=30            rank 1 stops before its next collective at iteration 30
    hang:rank=1,at=30,hold=2s    ... and resumes after 2 s (a stall; used by the trials)
    crash:rank=3,at=40           rank 3 exits with code 1 (``code=``) at iteration 40
    slow:rank=2,factor=3,at=50   rank 2's compute between collectives takes 3x as long
    slowlink:src=0,dst=1,delay=20ms,at=20   traffic 0 -> 1 is delayed by 20 ms
    linkdown:src=0,dst=1,at=20   traffic 0 -> 1 stops (a communication hang)
    jitter:pct=20                every rank's compute varies by +-20 % per iteration

``at`` is the training iteration (``commflow.monitor.step`` or the inferred one),
``until`` (exclusive) ends slow/slowlink/linkdown/jitter faults; without it they last
for the rest of the run. A ``rank`` left out is drawn from the seed. Ranks here are
*slots*: the rank a process had in the first attempt of the job (its GPU on its host).
After the supervisor excludes a culprit the survivors get new ranks, but a fault stays
with its slot, as a broken GPU would; a fault whose slot was excluded never fires.

How each fault is emulated, and what it is a stand-in for:

* ``hang``: the main thread blocks on a ``threading.Event`` *before* entering
  the collective, so its peers wait for a rank that never arrives (non-communication
  hang). The GIL is released, as it is for a rank stuck in a CUDA sync.
* ``crash``: ``os._exit(code)`` -- no Python cleanup, sockets close at once.
* ``slow``: before each collective the rank sleeps ``(factor - 1) x`` the compute time
  it just spent since its previous collective, i.e. its compute runs at 1/factor
  speed. On CUDA the delay is a ``torch.cuda._sleep`` kernel on the current stream of
  the same length, so the GPU (not the host) is what is slow.
* ``slowlink`` / ``linkdown``: on the source rank, after the collective was *entered*
  (so the rank counts as arrived), the call is delayed (or blocked) before the data
  moves, for every collective whose group holds both ends and for point-to-point
  sends ``src -> dst``; the probe sweep's sends on that edge are delayed (or never
  posted). On CUDA the delay is a sleep kernel on the source's stream between the
  collective's start event and the collective itself. A collective cannot be slowed on
  one edge from Python, so this shows up as
  "everyone arrived, the transfer is slow" (communication slow / hang); the pairwise
  probe is what pins the edge, as it would be on real hardware.
* ``jitter``: per iteration and rank a factor ``u ~ U(0, 2 pct)`` drawn from
  ``(seed, slot, iteration)`` stretches that iteration's compute by ``u`` (mean
  ``1 + pct``, spread ``+- pct`` of the base); it models data-loader, GC and
  scheduling noise for false-alarm tests.

Every fault that fires is reported once (kind, slot, rank, iteration, wall time,
parameters) through a callback; the supervisor appends it to ``injected.jsonl``.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

__all__ = ["Fault", "Injector", "parse_duration", "parse_fault", "resolve_faults", "FAULT_KEYS"]

# kind -> (required keys, optional keys)
FAULT_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "hang": ({"at"}, {"rank", "hold"}),
    "crash": ({"at"}, {"rank", "code"}),
    "slow": ({"factor"}, {"rank", "at", "until"}),
    "slowlink": ({"delay"}, {"src", "dst", "at", "until"}),
    "linkdown": (set(), {"src", "dst", "at", "until", "hold"}),
    "jitter": ({"pct"}, {"rank", "at", "until"}),
}

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*(us|ms|s|m)?\s*$", re.IGNORECASE)
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str, *, what: str = "duration") -> float:
    """``"20ms"`` -> 0.02, ``"1.5s"`` / ``"1.5"`` -> 1.5, ``"250us"``, ``"2m"``; seconds."""
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"{what}={text!r} is not a duration: write a number with an optional unit us|ms|s|m")
    return float(m.group(1)) * _UNIT[m.group(2).lower() if m.group(2) else None]


@dataclass(frozen=True, kw_only=True)
class Fault:
    """One injected fault; ranks are slots (first-attempt global ranks)."""

    kind: str
    """hang | crash | slow | slowlink | linkdown | jitter."""
    rank: int | None = None
    """Culprit slot of hang/crash/slow; jitter: None means every rank."""
    src: int | None = None
    """Sending slot of a slowlink/linkdown edge."""
    dst: int | None = None
    """Receiving slot of a slowlink/linkdown edge."""
    at: int = 0
    """First iteration the fault is active at."""
    until: int | None = None
    """First iteration it is no longer active (None: never ends)."""
    factor: float = 1.0
    """slow: compute time multiplier (> 1)."""
    delay_s: float = 0.0
    """slowlink: added delay per message on the edge, seconds."""
    pct: float = 0.0
    """jitter: spread in percent of the compute time."""
    hold_s: float | None = None
    """hang: resume after this many seconds (None: forever)."""
    code: int = 1
    """crash: exit code."""
    text: str = ""
    """The spec it was parsed from."""

    def active(self, iteration: int) -> bool:
        return iteration >= self.at and (self.until is None or iteration < self.until)

    def slots(self) -> tuple[int, ...]:
        """The slots this fault lives on (used to drop faults of excluded slots)."""
        return tuple(s for s in (self.rank, self.src, self.dst) if s is not None)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def _int(spec: str, key: str, value: str, minimum: int) -> int:
    try:
        v = int(value)
    except ValueError:
        raise ValueError(f"--inject {spec!r}: {key}={value!r} must be an integer") from None
    if v < minimum:
        raise ValueError(f"--inject {spec!r}: {key}={v} must be >= {minimum}")
    return v


def parse_fault(spec: str) -> Fault:
    """Parse one ``kind:key=value,...`` spec; raise ValueError naming the bad part."""
    if not isinstance(spec, str) or ":" not in spec and spec.strip() not in FAULT_KEYS:
        raise ValueError(
            f"--inject {spec!r}: expected 'kind:key=value,...' with kind one of {sorted(FAULT_KEYS)}"
        )
    kind, _, body = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in FAULT_KEYS:
        raise ValueError(f"--inject {spec!r}: unknown fault kind {kind!r}; known: {sorted(FAULT_KEYS)}")
    required, optional = FAULT_KEYS[kind]
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip().lower()
        if not eq or not value.strip():
            raise ValueError(f"--inject {spec!r}: {part!r} is not key=value")
        if key not in required | optional:
            raise ValueError(
                f"--inject {spec!r}: unknown key {key!r} for {kind}; allowed: {sorted(required | optional)}"
            )
        if key in values:
            raise ValueError(f"--inject {spec!r}: key {key!r} given twice")
        values[key] = value.strip()
    missing = required - values.keys()
    if missing:
        raise ValueError(f"--inject {spec!r}: {kind} needs {sorted(missing)}")

    f: dict = {"kind": kind, "text": spec.strip()}
    for key in ("rank", "src", "dst"):
        if key in values:
            f[key] = _int(spec, key, values[key], 0)
    if "at" in values:
        f["at"] = _int(spec, "at", values["at"], 0)
    if "until" in values:
        f["until"] = _int(spec, "until", values["until"], 1)
        if f["until"] <= f.get("at", 0):
            raise ValueError(f"--inject {spec!r}: until={f['until']} must be > at={f.get('at', 0)}")
    if "code" in values:
        f["code"] = _int(spec, "code", values["code"], 1)
    if "factor" in values:
        try:
            factor = float(values["factor"])
        except ValueError:
            raise ValueError(f"--inject {spec!r}: factor={values['factor']!r} must be a number") from None
        if not factor > 1.0 or not np.isfinite(factor):
            raise ValueError(f"--inject {spec!r}: factor={factor} must be a finite number > 1")
        f["factor"] = factor
    if "delay" in values:
        delay = parse_duration(values["delay"], what=f"--inject {spec!r}: delay")
        if delay <= 0:
            raise ValueError(f"--inject {spec!r}: delay={values['delay']} must be > 0")
        f["delay_s"] = delay
    if "hold" in values:
        hold = parse_duration(values["hold"], what=f"--inject {spec!r}: hold")
        if hold <= 0:
            raise ValueError(f"--inject {spec!r}: hold={values['hold']} must be > 0")
        f["hold_s"] = hold
    if "pct" in values:
        try:
            pct = float(values["pct"])
        except ValueError:
            raise ValueError(f"--inject {spec!r}: pct={values['pct']!r} must be a number") from None
        if not 0 < pct < 100:
            raise ValueError(f"--inject {spec!r}: pct={pct} must be in (0, 100)")
        f["pct"] = pct
    if "src" in f and "dst" in f and f["src"] == f["dst"]:
        raise ValueError(f"--inject {spec!r}: src and dst are both {f['src']}; a link joins two ranks")
    return Fault(**f)


def resolve_faults(specs: Sequence[str | Fault], world_size: int, seed: int) -> list[Fault]:
    """Parse specs, draw left-out ranks/edges from ``seed``, check ranks < world_size.

    Deterministic: the same specs, world size and seed give the same faults.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    rng = np.random.default_rng(seed)
    out: list[Fault] = []
    for spec in specs:
        f = spec if isinstance(spec, Fault) else parse_fault(spec)
        if f.kind in ("hang", "crash", "slow") and f.rank is None:
            f = replace(f, rank=int(rng.integers(world_size)))
        if f.kind in ("slowlink", "linkdown"):
            if world_size < 2:
                raise ValueError(f"--inject {f.text!r}: a link fault needs world_size >= 2, got {world_size}")
            src = f.src if f.src is not None else int(rng.integers(world_size))
            dst = f.dst
            if dst is None:
                dst = int(rng.choice([r for r in range(world_size) if r != src]))
            if src == dst:
                raise ValueError(f"--inject {f.text!r}: src and dst are both {src}")
            f = replace(f, src=src, dst=dst)
        for key in ("rank", "src", "dst"):
            v = getattr(f, key)
            if v is not None and v >= world_size:
                raise ValueError(f"--inject {f.text!r}: {key}={v} must be < world size {world_size}")
        out.append(f)
    return out


class Injector:
    """Worker-side fault runtime, driven by the tracer's hooks.

    Args:
        faults: resolved faults of the whole job.
        slot: this process's slot.
        slots: slot of every global rank of the current world (index = rank).
        seed: the job seed (jitter draws).
        report: called once per fault that fires, with a JSON-able dict.
        cuda: emulate ``slow`` with a GPU sleep kernel instead of a host sleep.
    """

    def __init__(
        self,
        faults: Sequence[Fault],
        *,
        slot: int,
        slots: Sequence[int],
        seed: int = 0,
        report: Callable[[dict], None] | None = None,
        cuda: bool = False,
    ):
        self.slot = slot
        self.slots = list(slots)
        self.rank_of_slot = {s: r for r, s in enumerate(self.slots)}
        live = set(self.slots)
        # A fault on an excluded slot (or on an edge to one) never fires.
        self.faults = [f for f in faults if all(s in live for s in f.slots())]
        self.seed = seed
        self.report = report or (lambda event: None)
        self.cuda = cuda
        self.emulate_compute = True
        """Emulate slow/jitter with a sleep before each call; a workload that scales its
        own compute by :meth:`compute_scale` (the GPU benchmark) turns this off."""
        self.emulate_links = True
        """Emulate slowlink/linkdown by holding the source's calls; a workload that
        loads the link for real (:meth:`active_links`) turns this off."""
        self._fired: set[int] = set()
        self._healed: set[int] = set()  # faults that are over (hold elapsed, or healed)
        self._wake = threading.Event()  # set by heal(): ends hangs and outages now
        self._iteration = 0
        self._jitter_cache: tuple[int, float] | None = None
        self._cycles_per_s: float | None = None
        self.mine = {i for i, f in enumerate(self.faults)
                     if f.rank == self.slot or (f.kind == "jitter" and f.rank is None)}
        self.edges_out = {i for i, f in enumerate(self.faults)
                          if f.kind in ("slowlink", "linkdown") and f.src == self.slot}

    def heal(self) -> list[int]:
        """End every fault that has fired (jitter excepted), as excluding its hardware
        would; faults yet to fire are untouched. Used by trials, which keep one job
        running through many faults instead of restarting. Returns the healed indices."""
        healed = [i for i in self._fired if i not in self._healed and self.faults[i].kind != "jitter"]
        for i in healed:
            self._healed.add(i)
            f = self.faults[i]
            self.report({"kind": "heal", "of": f.kind, "slot": self.slot, "iteration": self._iteration,
                         "t": time.time(), "fault": f.to_json()})
        if healed:
            self._wake.set()
        return healed

    def _block(self, seconds: float | None) -> None:
        """A hang or outage: until ``seconds`` pass (None: forever) or :meth:`heal`."""
        self._wake.clear()
        self._wake.wait(seconds)

    # -- bookkeeping -------------------------------------------------------------

    def _fire(self, index: int, f: Fault, iteration: int, **extra) -> None:
        if index in self._fired:
            return
        self._fired.add(index)
        event = {
            "kind": f.kind,
            "slot": self.slot,
            "rank": self.rank_of_slot.get(self.slot),
            "iteration": iteration,
            "t": time.time(),
            "fault": f.to_json(),
            "seed": self.seed,
            **extra,
        }
        if f.kind in ("slowlink", "linkdown"):
            event["link_ranks"] = [self.rank_of_slot.get(f.src), self.rank_of_slot.get(f.dst)]
        self.report(event)

    def _jitter(self, f: Fault, iteration: int) -> float:
        if self._jitter_cache and self._jitter_cache[0] == iteration:
            return self._jitter_cache[1]
        rng = np.random.default_rng([self.seed, self.slot, iteration, 7919])
        u = float(rng.uniform(0.0, 2.0 * f.pct / 100.0))
        self._jitter_cache = (iteration, u)
        return u

    def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.cuda:
            import torch

            if self._cycles_per_s is None:
                self._cycles_per_s = _calibrate_cuda_sleep()
            torch.cuda._sleep(int(seconds * self._cycles_per_s))
        else:
            time.sleep(seconds)

    # -- hooks called by the tracer ------------------------------------------------

    def before_call(self, iteration: int, compute_s: float) -> None:
        """Before a collective/p2p call is entered; ``compute_s`` = time since the last one."""
        extra = 0.0
        self._iteration = iteration
        for i, f in enumerate(self.faults):
            if i not in self.mine or i in self._healed or not f.active(iteration):
                continue
            if f.kind == "crash":
                self._fire(i, f, iteration)
                os._exit(f.code)
            elif f.kind == "hang" and i not in self._fired:
                self._fire(i, f, iteration)
                self._block(f.hold_s)
                self._healed.add(i)
            elif f.kind == "slow" and self.emulate_compute:
                self._fire(i, f, iteration)
                extra += (f.factor - 1.0) * compute_s
            elif f.kind == "jitter" and self.emulate_compute:
                self._fire(i, f, iteration)
                extra += self._jitter(f, iteration) * compute_s
        self._sleep(extra)

    def compute_scale(self, iteration: int, *, slow: bool = True) -> float:
        """How much longer this rank's compute of ``iteration`` should take (slow x
        jitter), for workloads that do the extra work themselves. ``slow=False``: the
        jitter alone, for a workload that slows the rank another way (:meth:`slow_active`)."""
        scale = 1.0
        for i, f in enumerate(self.faults):
            if i not in self.mine or i in self._healed or not f.active(iteration):
                continue
            if f.kind == "slow" and slow:
                self._fire(i, f, iteration)
                scale *= f.factor
            elif f.kind == "jitter":
                self._fire(i, f, iteration)
                scale *= 1.0 + self._jitter(f, iteration)
        return scale

    def slow_active(self, iteration: int) -> bool:
        """Whether a slow fault of this rank is active at ``iteration`` (logged when it
        fires), for workloads that slow the rank by other means than its factor, such
        as a competing kernel."""
        hit = False
        for i, f in enumerate(self.faults):
            if f.kind == "slow" and i in self.mine and i not in self._healed and f.active(iteration):
                self._fire(i, f, iteration)
                hit = True
        return hit

    def active_links(self, iteration: int) -> list[tuple[int, int]]:
        """(src, dst) global ranks of the slowlink faults active at ``iteration`` (on
        every rank: both ends must agree to load the link)."""
        out = []
        for i, f in enumerate(self.faults):
            if f.kind == "slowlink" and f.active(iteration) and i not in self._healed:
                if i in self.edges_out:
                    self._fire(i, f, iteration)
                out.append((self.rank_of_slot[f.src], self.rank_of_slot[f.dst]))
        return out

    def _edge_faults(self, iteration: int, dst_slots: Sequence[int]):
        for i, f in enumerate(self.faults):
            if i in self.edges_out and f.dst in dst_slots and f.active(iteration) and i not in self._healed:
                yield i, f

    def inside_collective(self, iteration: int, group_ranks: Sequence[int]) -> None:
        """After entering a collective whose group holds ``group_ranks`` (global ranks)."""
        if not self.edges_out or not self.emulate_links:
            return
        slots = [self.slots[r] for r in group_ranks if r < len(self.slots)]
        if self.slot in slots:
            self._delay_edges(iteration, slots)

    def before_send(self, iteration: int, dst_rank: int) -> None:
        """Before a point-to-point send to global rank ``dst_rank`` moves data."""
        if self.edges_out and self.emulate_links and dst_rank < len(self.slots):
            self._delay_edges(iteration, [self.slots[dst_rank]])

    def _delay_edges(self, iteration: int, dst_slots: Sequence[int]) -> None:
        for i, f in list(self._edge_faults(iteration, dst_slots)):
            self._fire(i, f, iteration)
            if f.kind == "linkdown":
                # The bytes never leave. With ``hold`` the link comes back after that
                # long and stays healthy (a flap); without it, never.
                self._block(f.hold_s)
                self._healed.add(i)
            elif self.cuda:
                # On a GPU the host runs ahead of the stream, so a host sleep would be
                # absorbed; a sleep kernel on the caller's stream holds the transfer
                # itself back (NCCL waits for that stream before it moves the bytes).
                self._sleep(f.delay_s)
            else:
                time.sleep(f.delay_s)

    def probe_edge(self, iteration: int, dst_rank: int) -> float | None:
        """For the probe sweep: extra delay on ``self -> dst_rank`` now, or None if the link is down."""
        delay = 0.0
        if dst_rank >= len(self.slots) or not self.emulate_links:
            return delay  # a real load on the link shows in the probe by itself
        for i, f in self._edge_faults(iteration, [self.slots[dst_rank]]):
            self._fire(i, f, iteration)
            if f.kind == "linkdown":
                return None
            delay += f.delay_s
        return delay


def _calibrate_cuda_sleep() -> float:
    """GPU clock cycles per second of ``torch.cuda._sleep`` (one sync, at first use)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 10_000_000
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)
