"""The chunk pipeline: compute on the caller's stream, communication beside it.

Two shapes of pipeline cover the three ops:

* :func:`produce_then_communicate` (GEMM + reduce-scatter, GEMM + all-reduce): chunk
  ``c`` is computed on the caller's stream; as soon as it exists, its communication
  chain (one or more collectives with local work between them) is issued on a side
  stream, while the caller's stream goes on with chunk ``c + 1``.
* :func:`communicate_then_consume` (all-gather + GEMM): every chunk's collective is
  issued on the side stream up front (it needs nothing but the input); the caller's
  stream first does the work that needs no communication, then, chunk by chunk, waits
  for that chunk's collective and consumes it.

CUDA. The side stream is one per device, created with high priority so that the
collective's few CTAs are scheduled ahead of the next GEMM's when both become ready
(the GEMM would otherwise take every SM and delay the transfer). Collectives are
issued with ``async_op=False`` inside ``torch.cuda.stream(side)``: ProcessGroupNCCL
then enqueues the NCCL kernel on the current stream, the side stream, and returns
without blocking the host. Ordering is explicit: the side stream waits for the
caller's stream before each chunk's chain (the chunk and every earlier allocation are
then complete), and the caller's stream waits for the side stream before returning.
Memory safety without ``record_stream``: every tensor the side stream touches is
either allocated on the caller's stream and kept referenced until the caller's stream
has waited for the side stream (so the allocator can only hand its block to work
ordered after the side stream's use), or allocated on the side stream, used only
there and dropped there (its block returns to the side stream's pool, whose reuse is
stream-ordered).

CPU (gloo). No streams: collectives are issued with ``async_op=True`` and gloo runs
them on its own thread while this thread computes the next chunk, so the chunked
schedule and its ordering logic run for real. Every rank must issue collectives in
the same order, so the CPU driver advances chains deterministically (never "whichever
finished first"): after issuing chunk ``c``'s first collective it drives chunk
``c - 1``'s chain to its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["side_stream", "is_async", "produce_then_communicate", "communicate_then_consume"]

Chain = Iterator["dist.Work | None"]
"""A chunk's communication: a generator that issues one collective per step and yields
its work handle (``None`` on CUDA, where collectives are stream-ordered); the code
between two ``yield``s runs after the previous collective has completed."""

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def cached_stream(streams: dict[int, torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream:
    """``streams``' high-priority stream of ``device``, created on first use (one per device
    index; each dict of streams is one role: side, transfers, pulls)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = streams.get(index)
    if stream is None:
        _, high = torch.cuda.Stream.priority_range()
        stream = streams[index] = torch.cuda.Stream(device=index, priority=high)
    return stream


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The high-priority side stream of ``device`` (created once, shared by every op)."""
    return cached_stream(_SIDE_STREAMS, device)


def is_async(device: torch.device) -> bool:
    """Collectives return work handles to wait on (CPU/gloo) instead of being stream-ordered."""
    return device.type != "cuda"


def _drive(chain: Chain, first: dist.Work | None) -> None:
    """Run the rest of a chain whose first collective was issued and returned ``first``."""
    work = first
    while True:
        if work is not None:
            work.wait()
        try:
            work = next(chain)
        except StopIteration:
            return


_DONE = object()


def _start(chain: Chain) -> Any:
    try:
        return next(chain)
    except StopIteration:
        return _DONE


def produce_then_communicate(
    device: torch.device,
    n_chunks: int,
    produce: Callable[[int], Any],
    communicate: Callable[[int, Any], Chain],
) -> None:
    """``produce(c)`` on the caller's stream, then ``communicate(c, produced)`` beside it.

    Returns once the caller's stream is ordered after every chain (CUDA) or every chain
    has completed (CPU).
    """
    if device.type == "cuda":
        main = torch.cuda.current_stream(device)
        side = side_stream(device)
        keep: list[Any] = []  # chunk outputs live until main has waited for side (see module doc)
        for c in range(n_chunks):
            produced = produce(c)
            keep.append(produced)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                _drive(communicate(c, produced), None)
        main.wait_stream(side)
        del keep
        return
    pending: tuple[Chain, Any] | None = None
    for c in range(n_chunks):
        produced = produce(c)
        chain = communicate(c, produced)
        first = _start(chain)  # issue chunk c's first collective ...
        if pending is not None:
            _drive(*pending)  # ... then finish chunk c-1 while it runs
        pending = None if first is _DONE else (chain, first)
    if pending is not None:
        _drive(*pending)


def communicate_then_consume(
    device: torch.device,
    n_chunks: int,
    communicate: Callable[[int], Chain],
    local_work: Callable[[], None],
    consume: Callable[[int], None],
) -> None:
    """Issue every ``communicate(c)`` beside the caller's stream, run ``local_work()``
    (which needs no communication) meanwhile, then ``consume(c)`` as each chunk lands."""
    if device.type == "cuda":
        main = torch.cuda.current_stream(device)
        side = side_stream(device)
        side.wait_stream(main)
        landed: list[torch.cuda.Event] = []
        with torch.cuda.stream(side):
            for c in range(n_chunks):
                _drive(communicate(c), None)
                landed.append(side.record_event())
        local_work()
        for c in range(n_chunks):
            main.wait_event(landed[c])
            consume(c)
        main.wait_stream(side)
        return
    chains = [communicate(c) for c in range(n_chunks)]
    firsts = [_start(chain) for chain in chains]  # all chunks' first collectives in flight
    local_work()
    for c in range(n_chunks):
        if firsts[c] is not _DONE:
            _drive(chains[c], firsts[c])
        consume(c)
