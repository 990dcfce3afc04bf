"""Process groups, and running a function on N local processes.

Two ways in, one code path afterwards:

* Under ``torchrun`` (or ``commflow launch``) the environment carries ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
  :func:`init_distributed` reads it and builds the default group (NCCL for CUDA
  tensors, gloo for CPU tensors).
* On one machine, :func:`spawn` starts N processes with the same environment, so
  the function it runs calls :func:`init_distributed` exactly as it would under
  torchrun.

:func:`spawn` owns the rendezvous store. It listens on a port the OS picked
(port 0), so two tests never race for a port, and it tells workers to connect as
clients through ``TORCHELASTIC_USE_AGENT_STORE``, the same switch torchrun's agent
uses. A failing rank fails the caller with that rank's traceback and the other
ranks are killed: a rank that raised while its peers wait in a collective would
otherwise be a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "RankFailure",
    "all_gather_tensor",
    "free_port",
    "init_distributed",
    "reduce_scatter_tensor",
    "shutdown",
    "spawn",
]

# torch 2.13 renamed the flat-tensor collectives (all_gather_into_tensor ->
# all_gather_single, reduce_scatter_tensor -> reduce_scatter_single) and warns on the
# old names; the GPU machine runs 2.11, which has only the old ones. One name here.
all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


class RankFailure(RuntimeError):
    """One or more ranks of a :func:`spawn` raised, died or timed out.

    ``failures`` maps rank -> traceback text (or a one-line reason for ranks that
    died without a Python traceback, e.g. killed by a signal), in the order the
    failures were seen: the first is the likely cause, later ones are often peers
    whose collective broke because the first rank went away.
    """

    def __init__(self, failures: dict[int, str], reason: str = "failed"):
        self.failures = dict(failures)
        first = next(iter(self.failures))
        others = [r for r in self.failures if r != first]
        more = f" (ranks {others} also failed)" if others else ""
        super().__init__(f"rank {first} {reason}{more}:\n{self.failures[first]}")


def _device_for(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for but torch.cuda.is_available() is False")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
    return device


def init_distributed(
    backend: str | None = None,
    *,
    device: str | torch.device | None = None,
    timeout_s: float = 600.0,
) -> DistInfo:
    """Build the default process group from the torchrun environment.

    Idempotent: if the default group exists, describe it and return. Without
    ``RANK``/``WORLD_SIZE`` in the environment, a world of one is created in
    process (an in-memory store, no port), so single-process scripts and tests
    take the same path as distributed ones.

    Args:
        backend: ``None`` picks ``"cpu:gloo,cuda:nccl"`` on CUDA devices (CPU
            tensors such as monitoring payloads still work) and ``"gloo"`` on CPU.
        device: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). On CUDA the
            current device becomes ``cuda:LOCAL_RANK``.
        timeout_s: collective timeout of the group.
    """
    env = os.environ
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", rank))
    dev = _device_for(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), dev)
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    if world_size == 1 and "MASTER_PORT" not in env:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, backend, dev)


def free_port() -> int:
    """A TCP port that was free a moment ago (for tools that need a number up front).

    Prefer :func:`spawn`, which holds its port for the whole run instead.
    """
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    args: tuple,
    env: dict[str, str],
    init: bool,
    backend: str | None,
    threads: int,
    results: mp.Queue,
) -> None:
    os.environ.update(env)
    rank = int(env["RANK"])
    torch.set_num_threads(threads)
    try:
        if init:
            init_distributed(backend)
        out = fn(*args)
        if init:
            shutdown(clean=True)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - the traceback travels to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if init:
            shutdown(clean=False)


def shutdown(*, clean: bool) -> None:
    """Destroy the default process group (and every group made from it), if any.

    ``clean=True`` (the job ended normally on this rank): the ranks line up with a barrier
    first. Why: with gloo and sub-groups (a DeviceMesh's), torch 2.13 aborts a process at
    exit ("terminate called without an active exception") in about a third of runs when
    one rank tears the groups down while a peer is still finishing its last collective; a
    barrier before the teardown removed it (0 of 12 runs, 3 of 10 without). ``clean=False``
    (after an error): no barrier, since a peer may be gone.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def _stop(procs: Sequence[mp.Process], grace_s: float = 3.0) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            os.kill(p.pid, signal.SIGKILL)
            p.join()


def spawn(
    fn: Callable[..., Any],
    nprocs: int,
    *args: Any,
    backend: str | None = "gloo",
    init: bool = True,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``nprocs`` fresh processes; return each rank's result.

    Every process gets a torchrun-style environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). With ``init=True`` the default
    process group is built before ``fn`` runs and destroyed after it; with
    ``init=False`` the function calls :func:`init_distributed` itself.

    ``fn``, its arguments and its return value must be picklable (a module-level
    function). Raises :class:`RankFailure` with the failing rank's traceback as
    soon as any rank raises or dies, and on timeout (naming the ranks that had not
    finished); the remaining processes are killed in both cases.
    """
    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    ctx = mp.get_context("spawn")
    # The parent hosts the rendezvous store on an OS-chosen port for the whole run.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nprocs)
    results: mp.Queue = ctx.Queue()
    procs: list[mp.Process] = []
    for rank in range(nprocs):
        worker_env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nprocs),
            "LOCAL_WORLD_SIZE": str(nprocs),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(store.port),
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            **(env or {}),
        }
        p = ctx.Process(target=_worker, args=(fn, args, worker_env, init, backend, threads, results))
        p.start()
        procs.append(p)

    outputs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deaths: dict[int, str] = {}  # ranks gone without a Python traceback
    deadline = time.monotonic() + timeout_s
    exited_at: dict[int, float] = {}

    def collect(wait_s: float) -> None:
        try:
            rank, ok, payload = results.get(timeout=wait_s)
            (outputs if ok else failures)[rank] = payload
        except queue.Empty:
            pass
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if rank in outputs or rank in failures or rank in deaths or p.exitcode is None:
                continue
            # _worker catches every exception, so a non-zero code is a hard death
            # (signal, os._exit, segfault). A clean exit gets a moment for its
            # queued result to arrive.
            exited_at.setdefault(rank, now)
            if p.exitcode != 0 or now - exited_at[rank] > 2.0:
                deaths[rank] = f"process exited with code {p.exitcode} and no result"

    try:
        while len(outputs) < nprocs:
            collect(0.1)
            if failures or deaths:
                # Let peers that are also failing report, then stop the rest.
                grace = time.monotonic() + 1.0
                while time.monotonic() < grace and len(outputs) + len(failures) + len(deaths) < nprocs:
                    collect(0.1)
                # A hard death is almost always the cause; the peers' errors follow from it.
                raise RankFailure({**deaths, **failures})
            if time.monotonic() > deadline:
                pending = [r for r in range(nprocs) if r not in outputs]
                raise RankFailure(
                    dict.fromkeys(pending, f"no result after {timeout_s:.0f} s (still running)"),
                    reason="timed out",
                )
        for p in procs:
            p.join(timeout=10)
        return [outputs[r] for r in range(nprocs)]
    finally:
        _stop(procs)
        results.close()
        del store
