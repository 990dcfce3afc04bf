"""A pool of long-lived gloo ranks for the test suite.

Starting a Python process that imports torch costs seconds on the 2-core CI
machine, so tests do not spawn a world per case: :class:`DistPool` keeps
``world_size`` processes alive with the default group built once, and runs each
submitted function on every rank. Functions must be module-level (picklable);
they find their rank through ``torch.distributed`` as they would under torchrun.

If a rank raises, the others are given a moment to finish or raise too; if any
is still stuck (typically inside a collective its failed peer never joined), the
whole pool is killed and rebuilt, so one bad test cannot hang the next.
Use :func:`commflow.dist.spawn` instead for tests of process lifecycle itself.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from commflow.dist import RankFailure, _stop


def _serve(rank: int, world_size: int, port: int, tasks: mp.Queue, results: mp.Queue) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    from commflow.dist import init_distributed

    init_distributed("gloo", timeout_s=300)
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, fn, args, kwargs = item
        try:
            results.put((task_id, rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - the traceback goes to the test
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    """``world_size`` gloo ranks that run test functions on demand."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._procs: list[mp.Process] = []
        self._task_id = 0

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._results = ctx.Queue()
        self._procs = [
            ctx.Process(
                target=_serve,
                args=(r, self.world_size, self._store.port, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn, *args: Any, timeout_s: float = 120.0, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the per-rank results.

        Raises :class:`commflow.dist.RankFailure` with the first failing rank's
        traceback if any rank raised, died or did not answer within ``timeout_s``.
        """
        if not self._procs or not all(p.is_alive() for p in self._procs):
            self.close()
            self._start()
        self._task_id += 1
        tid = self._task_id
        for q in self._tasks:
            q.put((tid, fn, args, kwargs))
        outputs: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout_s
        failed_at: float | None = None
        while len(outputs) + len(failures) < self.world_size:
            # After a first failure, peers get 3 s to report before we call them stuck.
            limit = deadline if failed_at is None else min(deadline, failed_at + 3.0)
            try:
                got_tid, rank, ok, payload = self._results.get(timeout=max(0.05, limit - time.monotonic()))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if time.monotonic() < limit and not dead:
                    continue
                missing = [r for r in range(self.world_size) if r not in outputs and r not in failures]
                for r in missing:
                    failures.setdefault(r, "died" if r in dead else f"no answer within {timeout_s:.0f} s")
                self.close()  # a rank is stuck or gone: rebuild the pool before the next run
                break
            if got_tid != tid:  # a straggler answer from an earlier, failed task
                continue
            if ok:
                outputs[rank] = payload
            else:
                failed_at = failed_at or time.monotonic()
                failures[rank] = payload
        if failures:
            raise RankFailure(failures)
        return [outputs[r] for r in range(self.world_size)]

    def close(self) -> None:
        if not self._procs:
            return
        for q in self._tasks:
            with contextlib.suppress(ValueError, OSError):
                q.put(None)
        deadline = time.monotonic() + 2.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        _stop(self._procs, grace_s=1.0)
        self._procs = []
