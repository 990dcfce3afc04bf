"""Per-call records of torch.distributed collectives and point-to-point calls.

:class:`Tracer` replaces the public functions of ``torch.distributed`` (and the same
names in ``distributed_c10d`` and in modules that imported them by name) with thin
wrappers. Each call becomes a :class:`CommRecord`: a sequence number per group (per
directed channel for send/recv), the op, the group, the bytes this rank contributes,
the iteration, the enter time, and -- later -- the completion time.

Completion, without adding a synchronisation to the hot path:

* CPU, blocking call: the time it returned (gloo has finished by then).
* CPU, ``async_op=True``: a done-callback on the work's future (gloo collectives), or,
  where gloo has no future (send/recv), ``work.is_completed()`` polled from the
  reporter thread and at the next traced call -- a completion known to within that
  poll interval.
* CUDA, blocking call: a timing event recorded on the current stream before the call
  (the rank's *arrival* on the GPU: everything queued before it has run) and one after
  (NCCL runs a blocking collective on, or joins it back to, the current stream, so it
  completes with the collective). The reporter thread queries the end event lazily;
  ``dur`` is the exact GPU time between the two. The stream is looked up once per call
  and the events recorded through the C binding: the Python wrappers cost more than
  the records themselves, on every collective of a training step.
* CUDA, ``async_op=True`` collective on NCCL: NCCL's own timing of the work it hands
  back (``_enable_collectives_timing`` on the group's NCCL backend, switched on at the
  group's first such call): its start event is recorded in C++ once the NCCL stream
  has waited for the caller's, its end event when the collective is done; the reporter
  polls ``work.is_completed()`` and reads the duration. No CUDA call from Python. Not
  while link faults are emulated (their sleep kernel runs on the caller's stream,
  before NCCL's start event), nor with ``nccl_timing=False``: then the end is when
  ``work.is_completed()`` is polled true (``dur`` in host time, to that poll).
  Blocking calls are not turned into async ones to get a work: since torch 2.7 NCCL
  runs them on the caller's stream, without the stream joins and tensor stashing an
  async call costs.

``dur`` is wait-for-peers + transfer on this rank. Peers finish a collective together,
so within one collective the rank with the *shortest* ``dur`` arrived last; that is
how the detector measures lateness without comparing clocks across hosts.

Records go to a bounded ring (for local inspection and dumps) and to an outbox the
reporter thread drains; calls in progress are visible in :attr:`Tracer.inflight`, so
a collective that never returns is still reported.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CommRecord", "Tracer", "TRACED_OPS", "PeriodFinder"]

# name -> how to find (bytes-bearing tensors, group, async flag, peer) in the call.
# Every function here exists in torch 2.4-2.13 except the *_single names (2.13+),
# which are wrapped only when present.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "barrier",
)
P2P = ("send", "recv", "isend", "irecv")
TRACED_OPS = (*COLLECTIVES, *P2P, "batch_isend_irecv")

# Index of the tensor(s) whose bytes this rank contributes, by position and keyword.
_PAYLOAD: dict[str, tuple[int, str]] = {
    "all_reduce": (0, "tensor"),
    "all_gather": (1, "tensor"),
    "all_gather_into_tensor": (1, "input_tensor"),
    "all_gather_single": (1, "input_tensor"),
    "reduce_scatter": (1, "input_list"),
    "reduce_scatter_tensor": (1, "input"),
    "reduce_scatter_single": (1, "input"),
    "all_to_all": (1, "input_tensor_list"),
    "all_to_all_single": (1, "input"),
    "broadcast": (0, "tensor"),
    "reduce": (0, "tensor"),
    "gather": (0, "tensor"),
    "scatter": (0, "tensor"),
    "barrier": (-1, ""),
    "send": (0, "tensor"),
    "recv": (0, "tensor"),
    "isend": (0, "tensor"),
    "irecv": (0, "tensor"),
}

# Position of ``async_op`` in the collectives that take it and return a work handle
# timed by NCCL (barrier is left out: on NCCL it also synchronises the device).
_ASYNC_POSITION: dict[str, int] = {
    "all_reduce": 3, "all_gather": 3, "all_gather_into_tensor": 3, "all_gather_single": 3,
    "reduce_scatter": 4, "reduce_scatter_tensor": 4, "reduce_scatter_single": 4,
    "all_to_all": 3, "all_to_all_single": 5, "broadcast": 3, "reduce": 4, "gather": 4, "scatter": 4,
}


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (list, tuple)):
        for t in x:
            found = _first_tensor(t)
            if found is not None:
                return found
    return None


@dataclass(slots=True, eq=False)
class CommRecord:
    """One traced call on this rank."""

    idx: int
    """Local, monotonic id."""
    group: str
    """Group key, identical on every member (see :meth:`Tracer.group_key`)."""
    seq: int
    """Per-group sequence number of collectives; per directed (group, src, dst) for p2p."""
    op: str
    peer: int
    """Global rank of the other end of a send/recv; -1 for collectives."""
    nbytes: int
    iteration: int
    t_enter: float
    """Host wall clock when the call was entered (before any injected link delay)."""
    is_async: bool = False
    t_done: float | None = None
    """Host wall clock at completion (or when completion was first observed)."""
    dur: float | None = None
    """Seconds from arrival to completion: GPU event time on CUDA, t_done - t_enter on CPU."""
    error: str | None = None
    quiet: bool = False
    """Entered inside an expected long section (checkpoint, eval): no hang verdicts."""
    work: Any = field(default=None, repr=False)
    nccl_timed: bool = False
    """``work`` carries NCCL's start/end events: ``dur`` comes from it."""
    dev: int = -1
    """CUDA device index of the tensors (-1: CPU)."""
    ev_start: Any = field(default=None, repr=False)
    ev_end: Any = field(default=None, repr=False)
    stream: int = 0
    """The CUDA stream ``ev_end`` was recorded on (its stream id): events of one stream
    complete in the order they were recorded, which lets a poll stop early."""

    def wire(self) -> list:
        """Compact JSON form sent to the coordinator."""
        return [self.idx, self.group, self.seq, self.op, self.peer, self.nbytes, self.iteration,
                self.t_enter, self.t_done, self.dur, int(self.quiet), self.error]

    def inflight_wire(self) -> list:
        return [self.idx, self.group, self.seq, self.op, self.peer, self.iteration, self.t_enter, int(self.quiet)]


class PeriodFinder:
    """Infers iterations from the repeating pattern of collectives.

    Training issues the same sequence of collectives every iteration, on every rank.
    Once the last ``3 p`` call signatures (op, group, bytes) repeat with period ``p``,
    the first signature that occurs once per period becomes the anchor; each later
    occurrence of the anchor starts a new iteration. All ranks see the same sequence,
    so they agree on the iteration numbers without talking.
    """

    def __init__(self, max_calls: int = 1024, repeats: int = 3):
        self.sigs: list[tuple] = []
        self.max_calls = max_calls
        self.repeats = repeats
        self.anchor: tuple | None = None
        self.gave_up = False

    def observe(self, sig: tuple) -> bool:
        """Feed one call; True if it starts a new iteration."""
        if self.anchor is not None:
            return sig == self.anchor
        if self.gave_up:
            return False
        self.sigs.append(sig)
        n = len(self.sigs)
        if n > self.max_calls:
            self.gave_up, self.sigs = True, []
            return False
        for p in range(1, n // self.repeats + 1):
            tail = self.sigs[n - self.repeats * p:]
            if all(tail[i] == tail[i + p] for i in range(len(tail) - p)):
                period = tail[-p:]
                counts = {s: period.count(s) for s in period}
                unique = [s for s in period if counts[s] == 1]
                if unique:
                    # Anchor on the earliest unique signature of the *first* period
                    # seen, so the iteration boundary sits where training starts it.
                    first = tail[:p]
                    self.anchor = next(s for s in first if s in unique)
                    self.sigs = []
                    return sig == self.anchor
                break
        return False


class Tracer:
    """Wraps torch.distributed calls and records them. Use :func:`commflow.monitor.watch`.

    Args:
        rank: global rank (defaults to the process group's, or ``RANK``).
        ring_size: records kept for :meth:`records` / :meth:`dump`.
        outbox_size: records waiting for the reporter; the oldest are dropped
            (and counted in :attr:`dropped`) if nobody drains them.
        injector: optional :class:`commflow.monitor.inject.Injector`.
        infer_iterations: infer iterations from the call pattern until
            :meth:`step` is first called.
        nccl_timing: time ``async_op=True`` CUDA collectives with NCCL's own events
            (the module docstring says how); False: in host time to the poll, as
            before. Blocking CUDA calls always get the tracer's two events.
    """

    def __init__(
        self,
        *,
        rank: int = 0,
        ring_size: int = 4096,
        outbox_size: int = 65536,
        injector: Any = None,
        infer_iterations: bool = True,
        nccl_timing: bool = True,
    ):
        self.rank = rank
        self.nccl_timing = nccl_timing
        self._nccl_timed: dict[str, bool] = {}  # group key -> NCCL timing switched on
        self._streams: dict[tuple, Any] = {}  # (stream id, device, type) -> torch.cuda.Stream
        self.ring: deque[CommRecord] = deque(maxlen=ring_size)
        self.outbox: deque = deque(maxlen=outbox_size)
        self.inflight: dict[int, CommRecord] = {}
        self.pending_poll: dict[int, CommRecord] = {}  # async works without futures / CUDA events
        self.injector = injector
        self.iteration = 0
        self.explicit_steps = False
        self.period = PeriodFinder() if infer_iterations else None
        self.quiet_depth = 0
        self.quiet_reason = ""
        self.dropped = 0
        self.calls = 0
        self.nccl_timed_calls = 0  # of ``calls``: timed by NCCL's own events (async CUDA collectives)
        self._idx = 0
        self._seq: dict[str, int] = {}
        self._groups: dict[int, tuple[str, tuple[int, ...], Any]] = {}  # id(group) -> (key, ranks, group)
        self._group_names_used: dict[str, int] = {}
        self._default_entry: tuple | None = None
        self._tls = threading.local()
        self._last_return = time.time()
        self._originals: dict[tuple[Any, str], Callable] = {}
        self._wrapped: dict[str, Callable] = {}
        self._ddp_patch: tuple | None = None
        self._cuda_events: list = []
        self._poll_lock = threading.Lock()
        self._rank_known = False
        self.installed = False

    # -- groups -------------------------------------------------------------------

    def group_key(self, group: Any) -> tuple[str, tuple[int, ...]]:
        """A key for ``group`` that every member computes the same: its global ranks,
        plus ``#n`` when several groups share the ranks (they are created in the same
        order on every member, as torch requires)."""
        # The hot path: one dict probe (and, for ``None``, one look at the default
        # group, so a re-initialised world is not mistaken for the old one).
        if group is None:
            entry = self._default_entry
            if entry is None or entry[2] is not c10d.GroupMember.WORLD:
                entry = self._default_entry = self._entry(c10d._get_default_group())
        else:
            entry = self._entry(group)
        return entry[0], entry[1]

    def _entry(self, group: Any) -> tuple[str, tuple[int, ...], Any]:
        entry = self._groups.get(id(group))
        return entry if entry is not None and entry[2] is group else self._register_group(group)

    def _register_group(self, group: Any) -> tuple[str, tuple[int, ...], Any]:
        ranks = tuple(dist.get_process_group_ranks(group))
        base = ",".join(map(str, ranks))
        n = self._group_names_used.get(base, 0)
        self._group_names_used[base] = n + 1
        key = base if n == 0 else f"{base}#{n}"
        entry = (key, ranks, group)
        self._groups[id(group)] = entry
        self.outbox.append(("group", key, list(ranks)))
        return entry

    # -- iterations ---------------------------------------------------------------

    def step(self, iteration: int | None = None) -> int:
        """Mark the start of an iteration (``iteration`` or the previous one + 1)."""
        if not self.explicit_steps:
            self.explicit_steps = True
            self.period = None
        self.iteration = self.iteration + 1 if iteration is None else int(iteration)
        self.outbox.append(("step", self.iteration, time.time()))
        return self.iteration

    @contextlib.contextmanager
    def quiet(self, reason: str = "expected long section") -> Iterator[None]:
        """Calls inside are exempt from hang deadlines (checkpoint, eval, ...)."""
        self.quiet_depth += 1
        self.quiet_reason = reason
        self.outbox.append(("quiet", 1, reason, time.time()))
        try:
            yield
        finally:
            self.quiet_depth -= 1
            self.outbox.append(("quiet", 0, reason, time.time()))

    # -- the hot path -------------------------------------------------------------

    def _new_record(self, op: str, key: str, peer: int, nbytes: int, t_enter: float, direction: str) -> CommRecord:
        seq_key = key if peer < 0 else f"{key}|{direction}"
        seq = self._seq.get(seq_key, 0)
        self._seq[seq_key] = seq + 1
        self._idx += 1
        return CommRecord(self._idx, key, seq, op, peer, nbytes, self.iteration, t_enter,
                          quiet=self.quiet_depth > 0)

    def _count_iteration(self, op: str, key: str, nbytes: int) -> None:
        if self.period is None:
            return
        if self.period.observe((op, key, nbytes)):
            self.iteration += 1
            self.outbox.append(("step", self.iteration, time.time()))

    def _finish(self, rec: CommRecord, t_done: float, dur: float | None = None) -> None:
        if rec.t_done is not None:  # already completed by another path
            return
        rec.t_done = t_done
        rec.dur = (t_done - rec.t_enter) if dur is None else dur
        self.inflight.pop(rec.idx, None)
        self.pending_poll.pop(rec.idx, None)
        rec.work = None
        self.outbox.append(rec)

    def poll(self) -> None:
        """Complete async records whose work finished; called by the reporter thread."""
        if not self.pending_poll or not self._poll_lock.acquire(blocking=False):
            return
        try:
            self._poll_locked()
        finally:
            self._poll_lock.release()

    def _poll_locked(self) -> None:
        now = time.time()
        # A poll holds the GIL the training thread needs to launch kernels, and a job
        # that runs ahead of its GPU has a step's worth of calls pending: query each
        # stream only up to its first unfinished event (the rest finish after it).
        busy: set[tuple[int, int]] = set()
        for rec in list(self.pending_poll.values()):
            try:
                if rec.ev_end is not None and rec.work is None:
                    if (rec.dev, rec.stream) in busy:
                        continue
                    if rec.dev != getattr(self._tls, "poll_dev", -2):  # query in the device's context
                        torch.cuda.set_device(rec.dev)
                        self._tls.poll_dev = rec.dev
                    if not rec.ev_end.query():
                        busy.add((rec.dev, rec.stream))
                        continue
                    dur = rec.ev_start.elapsed_time(rec.ev_end) / 1e3
                    self._cuda_events.extend((rec.ev_start, rec.ev_end))
                    rec.ev_start = rec.ev_end = None
                    self._finish(rec, now, dur)
                elif rec.nccl_timed:
                    # One NCCL stream per group and device runs its collectives in order.
                    lane = (rec.dev, rec.group)
                    if lane in busy:
                        continue
                    if not rec.work.is_completed():
                        busy.add(lane)
                        continue
                    try:
                        dur = rec.work._get_duration() / 1e3
                    except Exception:  # noqa: BLE001 - failed, or the switch did not take
                        dur = None  # host time for this one; the tracer's events from now on
                        if "timing was enabled" in str(sys.exc_info()[1]):
                            self._nccl_timed[rec.group] = False
                    self._finish(rec, now, dur)
                elif rec.work is not None and rec.work.is_completed():
                    self._finish(rec, now)
            except Exception as e:  # noqa: BLE001 - a failed work is still a completion
                rec.error = f"{type(e).__name__}: {e}"
                self._finish(rec, now)

    def _event(self):
        return self._cuda_events.pop() if self._cuda_events else torch.cuda.Event(enable_timing=True)

    def _traced(self, op: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        tls = self._tls
        if getattr(tls, "inside", False):  # a traced function calling another one
            return fn(*args, **kwargs)
        if op == "batch_isend_irecv":
            return self._traced_batch(fn, args, kwargs)
        if not self._rank_known and dist.is_initialized():
            self.rank, self._rank_known = dist.get_rank(), True
        pos, name = _PAYLOAD[op]
        payload = kwargs.get(name) if name in kwargs else (args[pos] if 0 <= pos < len(args) else None)
        group = kwargs.get("group")
        if group is None:
            group = _positional_group(op, args)
        is_async = op in ("isend", "irecv") or _async_requested(op, args, kwargs)
        peer, direction = -1, ""
        if op in P2P:
            peer = _peer(op, args, kwargs, group)
            me = self.rank
            direction = f"{me}>{peer}" if op in ("send", "isend") else f"{peer}>{me}"
        nbytes = _nbytes(payload) if pos >= 0 else 0
        tensor = _first_tensor(payload)
        cuda = tensor is not None and tensor.is_cuda

        t_call = time.time()
        if self.pending_poll and not cuda:
            self.poll()
        key, ranks = self.group_key(group)
        self._count_iteration(op, key, nbytes)
        if self.injector is not None:
            self.injector.before_call(self.iteration, t_call - self._last_return)
        t_enter = time.time()
        rec = self._new_record(op, key, peer, nbytes, t_enter, direction)
        self.calls += 1
        self.ring.append(rec)
        self.inflight[rec.idx] = rec
        stream = None
        if cuda:
            rec.dev = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
            if is_async and op in _ASYNC_POSITION and self._nccl_timing_on(key, group):
                rec.nccl_timed = True  # the work handed back carries NCCL's own start/end events
            else:
                # One stream lookup for both marks: the stream NCCL orders the call after.
                stream = self._current_stream(rec.dev)
                rec.ev_start = self._event()
                _record(rec.ev_start, stream)
        tls.inside = True
        try:
            if self.injector is not None:
                if peer >= 0 and op in ("send", "isend"):
                    self.injector.before_send(self.iteration, peer)
                elif peer < 0:
                    self.injector.inside_collective(self.iteration, ranks)
            out = fn(*args, **kwargs)
        except BaseException as e:
            rec.error = f"{type(e).__name__}: {e}"[:500]
            self._finish(rec, time.time())
            raise
        finally:
            tls.inside = False
            self._last_return = time.time()
        self._complete_later(rec, out if is_async else None, stream)
        return out

    def _current_stream(self, dev: int) -> Any:
        """``torch.cuda.current_stream(dev)`` without building a Stream object per call
        (that wrapper costs more than the two event records): one C call, one dict probe."""
        ids = torch._C._cuda_getCurrentStream(dev)
        stream = self._streams.get(ids)
        if stream is None:
            stream = self._streams[ids] = torch.cuda.Stream(stream_id=ids[0], device_index=ids[1], device_type=ids[2])
        return stream

    def _nccl_timing_on(self, key: str, group: Any) -> bool:
        """Whether ``group``'s NCCL backend times its collectives (switched on here at the
        group's first async CUDA call). Not while link faults are emulated: their sleep
        kernel runs on the caller's stream, before NCCL's start event."""
        on = self._nccl_timed.get(key)
        if on is None:
            on = self.nccl_timing and not (self.injector is not None and self.injector.edges_out)
            if on:
                try:
                    # The switch sits on the NCCL backend in some torch versions and only on
                    # the group (which forwards it to every backend) in others (2.11).
                    pg = group if group is not None else c10d._get_default_group()
                    backend = pg._get_backend(torch.device("cuda"))
                    (getattr(backend, "_enable_collectives_timing", None) or pg._enable_collectives_timing)()
                except Exception:  # noqa: BLE001 - not NCCL, or a torch without the switch
                    on = False
            self._nccl_timed[key] = on
        return on

    def _complete_later(self, rec: CommRecord, work: Any, stream: Any) -> None:
        """``stream``: the CUDA stream the call was ordered on (None on CPU)."""
        now = self._last_return
        rec.is_async = work is not None
        if rec.nccl_timed:
            if work is None or isinstance(work, _NO_WORK):  # e.g. inside a coalescing manager
                rec.nccl_timed = False
                self._finish(rec, now)
                return
            rec.work = work
            self.nccl_timed_calls += 1
            self.pending_poll[rec.idx] = rec
            return
        if stream is not None:
            if work is None:
                rec.ev_end = self._event()
                _record(rec.ev_end, stream)
                rec.stream = stream.stream_id
            else:
                rec.work = work
            self.pending_poll[rec.idx] = rec
            return
        if work is None:
            self._finish(rec, now)
            return
        try:
            fut = work.get_future()
        except RuntimeError:  # gloo send/recv: no future, poll is_completed
            rec.work = work
            self.pending_poll[rec.idx] = rec
            return
        fut.add_done_callback(lambda _f, rec=rec: self._finish(rec, time.time()))

    def _traced_batch(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        ops = list(args[0] if args else kwargs["p2p_op_list"])
        if not self._rank_known and dist.is_initialized():
            self.rank, self._rank_known = dist.get_rank(), True
        orig_isend = self._originals.get((c10d, "isend"))
        orig_irecv = self._originals.get((c10d, "irecv"))
        for p in ops:  # P2POps built before watch() hold the unwrapped functions
            if p.op is orig_isend:
                p.op = c10d.isend
            elif p.op is orig_irecv:
                p.op = c10d.irecv
        t_call = time.time()
        if self.pending_poll:
            self.poll()
        if self.injector is not None:
            self.injector.before_call(self.iteration, t_call - self._last_return)
        t_enter = time.time()
        recs = []
        for p in ops:
            send = p.op is c10d.isend
            peer = p.peer if getattr(p, "peer", None) is not None else -1
            direction = f"{self.rank}>{peer}" if send else f"{peer}>{self.rank}"
            key = self.group_key(p.group)[0]
            rec = self._new_record("isend" if send else "irecv", key, peer, _nbytes(p.tensor), t_enter, direction)
            rec.is_async = True
            self.ring.append(rec)
            self.inflight[rec.idx] = rec
            recs.append(rec)
        self.calls += len(recs)
        self._tls.inside = True
        try:
            if self.injector is not None:
                for rec in recs:
                    if rec.op == "isend":
                        self.injector.before_send(self.iteration, rec.peer)
            works = fn(*args, **kwargs)
        except BaseException as e:
            for rec in recs:
                rec.error = f"{type(e).__name__}: {e}"[:500]
                self._finish(rec, time.time())
            raise
        finally:
            self._tls.inside = False
            self._last_return = time.time()
        works = list(works or [])
        for i, rec in enumerate(recs):
            rec.work = works[i] if len(works) == len(recs) else (works[0] if works else None)
            if rec.work is None:
                self._finish(rec, self._last_return)
            else:
                self.pending_poll[rec.idx] = rec
        return works

    # -- install / uninstall ----------------------------------------------------------

    def install(self) -> Tracer:
        """Swap the wrappers into torch.distributed (idempotent)."""
        if self.installed:
            return self
        targets = [dist, c10d]
        by_id: dict[int, Callable] = {}
        for name in TRACED_OPS:
            original = getattr(c10d, name, None) or getattr(dist, name, None)
            if original is None:
                continue
            wrapper = _make_wrapper(self, name, original)
            self._wrapped[name] = wrapper
            by_id[id(original)] = wrapper
            for mod in targets:
                if getattr(mod, name, None) is original:
                    self._originals[(mod, name)] = original
                    setattr(mod, name, wrapper)
        originals = {id(o): o for o in self._originals.values()}
        # Modules that did ``from torch.distributed import all_reduce`` (or aliased it,
        # like commflow.dist.all_gather_tensor) before watch() was called.
        for mod in list(sys.modules.values()):
            if mod is None or mod in targets or not _may_hold_collectives(mod):
                continue
            d = getattr(mod, "__dict__", None)
            if not isinstance(d, dict):
                continue
            for attr, value in list(d.items()):
                wrapper = by_id.get(id(value))
                if wrapper is not None and originals.get(id(value)) is value:
                    self._originals[(mod, attr)] = value
                    setattr(mod, attr, wrapper)
        self._patch_ddp()
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Put the original functions back."""
        for (mod, attr), original in self._originals.items():
            setattr(mod, attr, original)
        self._originals.clear()
        if self._ddp_patch is not None:
            cls, init = self._ddp_patch
            cls.__init__ = init
            self._ddp_patch = None
        self.installed = False

    def _patch_ddp(self) -> None:
        """Route DDP's gradient all-reduce through the traced ``dist.all_reduce``.

        DDP's reducer calls the process group from C++, past any Python wrapper. Unless
        the user registers a comm hook, we register torch's stock ``allreduce_hook``
        (same arithmetic as the built-in path) on the first forward; it calls
        ``dist.all_reduce(async_op=True)``, which is traced.
        """
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        from torch.nn.parallel import DistributedDataParallel as DDP

        init = DDP.__init__

        def traced_init(ddp, *args, **kwargs):
            init(ddp, *args, **kwargs)

            def install_hook(module, _inputs):
                handle.remove()
                if not module._comm_hooks and getattr(module, "_commflow_no_hook", False) is False:
                    with contextlib.suppress(RuntimeError):  # a built-in hook is already set
                        module.register_comm_hook(None, allreduce_hook)

            handle = ddp.register_forward_pre_hook(install_hook)

        DDP.__init__ = traced_init
        self._ddp_patch = (DDP, init)

    # -- inspection -------------------------------------------------------------------

    def records(self) -> list[CommRecord]:
        """The ring's records, oldest first."""
        return list(self.ring)

    def dump(self, path: str) -> None:
        """Write the ring as JSON Lines (one record per line)."""
        keys = ("idx", "group", "seq", "op", "peer", "nbytes", "iteration", "t_enter", "t_done", "dur",
                "quiet", "error")
        with open(path, "w") as fh:
            for rec in self.records():
                fh.write(json.dumps(dict(zip(keys, rec.wire()))) + "\n")


def _may_hold_collectives(mod: Any) -> bool:
    name = getattr(mod, "__name__", "") or ""
    # torch's own modules reach collectives through dist./c10d. attributes (patched
    # above); scanning them would only cost time. Everything else may have imported
    # a collective by name.
    return not (name.startswith("torch") and not name.startswith("torch.distributed"))


_GROUP_POSITION = {  # position of ``group`` in each signature when passed positionally
    "all_reduce": 2, "all_gather": 2, "all_gather_into_tensor": 2, "all_gather_single": 2,
    "reduce_scatter": 3, "reduce_scatter_tensor": 3, "reduce_scatter_single": 3,
    "all_to_all": 2, "all_to_all_single": 4, "broadcast": 2, "reduce": 3, "gather": 3,
    "scatter": 3, "barrier": 0, "send": 2, "recv": 2, "isend": 2, "irecv": 2,
}


# Event.record's Python wrapper only defaults the stream; the tracer always passes one.
_record = getattr(getattr(torch._C, "_CudaEventBase", None), "record", None) or (lambda ev, st: ev.record(st))
# What a collective hands back inside a coalescing manager: no work to time.
_NO_WORK = getattr(c10d, "_IllegalWork", ())


def _async_requested(op: str, args: tuple, kwargs: dict) -> bool:
    if "async_op" in kwargs:
        return bool(kwargs["async_op"])
    pos = _ASYNC_POSITION.get(op, 1 if op == "barrier" else -1)
    return 0 <= pos < len(args) and bool(args[pos])


def _positional_group(op: str, args: tuple) -> Any:
    pos = _GROUP_POSITION.get(op, -1)
    return args[pos] if 0 <= pos < len(args) and not isinstance(args[pos], (int, bool)) else None


def _peer(op: str, args: tuple, kwargs: dict, group: Any) -> int:
    key, gkey = ("dst", "group_dst") if op in ("send", "isend") else ("src", "group_src")
    peer = kwargs.get(key, args[1] if len(args) > 1 else None)
    if peer is None and kwargs.get(gkey) is not None:
        g = group if group is not None else c10d._get_default_group()
        peer = dist.get_global_rank(g, kwargs[gkey])
    return -1 if peer is None else int(peer)


def _make_wrapper(tracer: Tracer, op: str, fn: Callable) -> Callable:
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return tracer._traced(op, fn, args, kwargs)

    wrapper.__commflow_traced__ = True  # type: ignore[attr-defined]
    return wrapper
