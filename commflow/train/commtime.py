"""How long a training step waits on communication.

The number the trainer reports per step as ``comm_frac`` is *exposed* communication:
the time the training thread cannot compute because it is inside a collective or
waiting for one, divided by the step's wall time. It is measured, not modelled:

* Every collective and point-to-point call that Python issues goes through a method of
  ``torch.distributed.ProcessGroup`` (``allreduce``, ``all_gather_single``,
  ``all_to_all_single``, ``send``, ...), whatever module-level name the caller used.
  :class:`CommTimer` wraps those methods, and ``Work.wait``, in this process: a
  synchronous call counts from entry to return (including waiting for late peers, which
  is time lost to communication just the same), an asynchronous one counts its launch
  and later the time blocked in ``wait()``. That covers SP (Ulysses' all-to-all, ring's
  send/recv, the all-gathers of all-gather-KV and LASP-2) and FSDP2's all-gathers and
  reduce-scatters.
* DDP's reducer issues its bucket all-reduces from C++, overlapped with the backward.
  :meth:`CommTimer.ddp_comm_hook` launches them (as DDP's default hook does) and notes
  when the last bucket was launched, i.e. when the last gradient was computed; the rest
  of ``backward()`` is waiting for the all-reduces to finish, the exposed part of DP.

On CUDA the marks are CUDA events on the caller's current stream, so a span is how
long that stream was held up, read once per step after a synchronize (FSDP2 issues its
collectives on side streams: there a span is the collective itself, an upper bound of
what it exposes). Calls from any thread count (on GPU the backward, and with it SP's
backward collectives, runs on autograd's device thread); a call nested inside another
counts once.
"""

from __future__ import annotations

import functools
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["CommTimer"]

# ProcessGroup methods that move data (names across torch 2.4 - 2.13).
_PG_METHODS = (
    "allreduce", "allreduce_coalesced", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced",
    "all_gather_single", "all_gather_single_coalesced", "_allgather_base", "reduce_scatter", "reduce_scatter_single",
    "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced", "_reduce_scatter_base", "all_to_all_single",
    "alltoall", "alltoall_base", "broadcast", "reduce", "gather", "scatter", "barrier", "send", "recv",
    "recv_anysource", "_end_coalescing",
)


class CommTimer:
    """Exposed communication time of this process's training step.

    Usage::

        timer = CommTimer(device).install()
        timer.step_begin(); ...forward/backward/step...; comm_s = timer.step_end()
    """

    _active: CommTimer | None = None

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self._spans: list[tuple] = []
        self._nesting = threading.local()
        self._originals: dict[tuple[type, str], object] = {}
        self._last_bucket_launch = None
        self._ddp_tail: list[tuple] = []

    # --- marks: wall clock on CPU, CUDA events on the current stream on GPU -------
    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    # --- patching -----------------------------------------------------------------
    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            depth = getattr(self._nesting, "depth", 0)
            if depth:
                return fn(*args, **kwargs)
            self._nesting.depth = 1
            start = self._mark()
            try:
                return fn(*args, **kwargs)
            finally:
                self._spans.append((start, self._mark()))
                self._nesting.depth = 0

        return timed

    def install(self) -> CommTimer:
        """Wrap the ProcessGroup methods and ``Work.wait`` (one timer per process)."""
        if CommTimer._active is not None and CommTimer._active is not self:
            CommTimer._active.uninstall()
        targets = [(dist.ProcessGroup, name) for name in _PG_METHODS] + [(dist.distributed_c10d.Work, "wait")]
        for cls, name in targets:
            fn = cls.__dict__.get(name)
            if fn is None or (cls, name) in self._originals:
                continue
            self._originals[(cls, name)] = fn
            setattr(cls, name, self._wrap(fn))
        CommTimer._active = self
        return self

    def uninstall(self) -> None:
        for (cls, name), fn in self._originals.items():
            setattr(cls, name, fn)
        self._originals.clear()
        if CommTimer._active is self:
            CommTimer._active = None

    # --- DDP --------------------------------------------------------------------------
    def ddp_comm_hook(self, state, bucket):
        """DDP comm hook: average the bucket over the group (DDP's default), noting the launch.

        Register with ``ddp_model.register_comm_hook(group, timer.ddp_comm_hook)``.
        """
        group = state if state is not None else dist.group.WORLD
        self._last_bucket_launch = self._mark()
        tensor = bucket.buffer().div_(dist.get_world_size(group))
        self._nesting.depth = 1  # the launch is not a wait; the tail of backward() is
        try:
            fut = dist.all_reduce(tensor, group=group, async_op=True).get_future()
        finally:
            self._nesting.depth = 0
        return fut.then(lambda f: f.value()[0])

    def backward_done(self) -> None:
        """Call right after ``loss.backward()`` returns: closes DDP's exposed tail."""
        if self._last_bucket_launch is not None:
            self._ddp_tail.append((self._last_bucket_launch, self._mark()))
            self._last_bucket_launch = None

    # --- per step -----------------------------------------------------------------
    def step_begin(self) -> None:
        self._spans.clear()
        self._ddp_tail.clear()
        self._last_bucket_launch = None

    def step_end(self) -> float:
        """Seconds of exposed communication since :meth:`step_begin`."""
        if self.cuda:
            torch.cuda.synchronize()
        spans = self._spans + self._ddp_tail
        total = sum(self._seconds(a, b) for a, b in spans)
        self._spans.clear()
        self._ddp_tail.clear()
        return total
