"""Copy-engine schedules over symmetric memory (CUDA; no multicast, no NCCL on the hot path).

Why not NCCL per chunk: an NCCL collective is a kernel that holds SMs for its whole
duration (16-32 CTAs on H100 NVLink), so a chunked GEMM beside it loses SMs and
waves, and each chunk pays a collective's launch and latency. Here every transfer is
a ``copy_`` between a local tensor and a peer's symmetric-memory buffer mapped into
this process: ``cudaMemcpyAsync`` on peer memory runs on the GPU's copy engines over
NVLink and takes no SM (PyTorch's "low-contention" collectives rest on the same fact).
Synchronisation between ranks is the symmetric-memory barrier (one small kernel that
writes a flag into each peer's signal pad and waits for theirs; plain P2P stores, no
multicast objects).

Schedules (R ranks, this rank r, leading dims already flattened to rows; steps go
``d = r + 1, r + 2, ...`` so that at every step each rank sends to a different peer):

* :func:`matmul_reduce_scatter` ``x [M, K/R] @ w [K/R, N]`` -> block r ``[M/R, N]``
  of the sum over ranks. The GEMM runs per destination block of rows: the block for
  peer d is computed, then pushed by the copy engine into slot ``r`` of peer d's
  workspace while the GEMM of the next block runs; this rank's own block is computed
  last, straight into its own slot, so the last push hides under it. A barrier says
  every slot has landed, and one reduction sums the R slots in fp32 and rounds once.
* Two ranks, two or more row groups (:func:`_pair_accumulate`): the reduction moves
  into the GEMM. Each rank first computes the peer's rows of every group into its own
  buffer; the peer pulls them by copy engine straight into its output rows while the
  GEMMs go on; then each rank multiplies its own rows *onto* the pulled partials
  (``out.addmm_(x, w)``: cuBLAS adds the fp32 accumulator to the pulled bf16 partial
  and rounds once). No reduction pass and no slot for the own partial; the pull of
  the last group hides under the own GEMMs of the earlier groups. (T3 does the same
  accumulation near memory; with R > 2 each output row would receive R - 1 partials,
  which an in-place GEMM epilogue cannot add with a single rounding, so R > 2 keeps
  the slot-and-sum schedule.)
* :func:`matmul_all_reduce`: the same, per group of rows, followed by an all-gather
  of the reduced block (every rank pulls its peers' blocks by copy engine, on a second
  stream); the all-gather of group g runs beside the GEMMs and pushes of group g + 1.
* :func:`all_gather_matmul` ``all_gather(x_shard) [M, K] @ w [K, N/R]``: every rank
  copies its shard into its workspace, a barrier, then each rank pulls the peers'
  shards by copy engine while multiplying the shards it already has.

Buffer reuse without extra barriers. Each rank issues its pushes, barriers and
reductions of one workspace on one communication stream, in program order; the
caller's stream waits for it before an op returns. Where a peer could write into a
buffer this rank is still reading (reduce-scatter slots, all-gather shards), two
copies of the buffer alternate: a peer can only write into copy ``i % 2`` of step
``i + 2`` after the barrier of step ``i + 1``, which this rank reaches after it
finished reading step ``i``. The all-reduce's reduced block alternates the same way
between groups, guarded by the pull stream's barrier (see :func:`matmul_all_reduce`).
A split call (``split=True``, :func:`splits`) reads its last buffers in ``finish``, on the
caller's stream; the same argument holds because the next call's first transfer waits for
that stream: consecutive calls on one workspace come from one stream (as graph replays do).
The two copies are the two fixed halves of the workspace, and the step counter runs on
across calls: a call with other shapes than the last one must not lay its copy 0 over
the last call's copy 1, which a slower peer may still be reading (the GPU test
"symm back-to-back" alternates shapes to catch exactly that).

Workspaces are per (process group, op) and grow on demand: growing is collective (all
ranks pass the same shapes, so they grow at the same call) and synchronises once.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

from .pipeline import cached_stream
from .validate import GroupInfo

__all__ = ["accumulates", "all_gather_matmul", "available", "matmul_all_reduce", "matmul_reduce_scatter", "splits",
           "workspace", "workspace_bytes"]

_AVAILABLE: dict[tuple, bool] = {}


def _process_group(g: GroupInfo) -> dist.ProcessGroup:
    return g.group if g.group is not None else dist.group.WORLD


def available(g: GroupInfo, device: torch.device) -> bool:
    """The copy-engine schedules serve this group on this device: CUDA, a torch with
    ``torch.distributed._symmetric_memory``, and not switched off with
    ``COMMFLOW_OVERLAP_SYMM=0`` (then overlap uses NCCL per chunk). Every rank must see
    the same answer (same torch, same environment)."""
    if device.type != "cuda" or g.world_size < 2 or os.environ.get("COMMFLOW_OVERLAP_SYMM", "1") == "0":
        return False
    pg = _process_group(g)
    key = (id(pg), device.index)
    hit = _AVAILABLE.get(key)
    if hit is None:
        # First use on this group (every rank gets here at the same call: ops resolve
        # signatures in the same order everywhere): set up a small workspace for real,
        # and agree over the group, so that no rank picks a transport its peers lack.
        try:
            workspace(g, "probe", device).ensure(1 << 20)
            ok = 1
        except Exception as e:  # noqa: BLE001 - reported by unavailable_reason(); NCCL per chunk instead
            _WHY[key] = f"{type(e).__name__}: {e}"
            ok = 0
        flag = torch.tensor([ok], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=pg)
        hit = _AVAILABLE[key] = bool(flag.item())
        if not hit and key not in _WHY:
            _WHY[key] = "symmetric memory failed on another rank"
    return hit


_WHY: dict[tuple, str] = {}


def unavailable_reason() -> dict[str, str]:
    """Why the copy-engine transport was refused, per (group, device), where it was."""
    return {f"group {k[0]} cuda:{k[1]}": v for k, v in _WHY.items()}


_COMM_STREAMS: dict[int, torch.cuda.Stream] = {}


def comm_stream(device: torch.device) -> torch.cuda.Stream:
    """The high-priority stream that carries this device's transfers, barriers and reductions."""
    return cached_stream(_COMM_STREAMS, device)


def _streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the caller's stream, the communication stream)."""
    return torch.cuda.current_stream(device), comm_stream(device)


_PULL_STREAMS: dict[int, torch.cuda.Stream] = {}


def pull_stream(device: torch.device) -> torch.cuda.Stream:
    """A second high-priority stream for the all-reduce's pulls (beside the pushes)."""
    return cached_stream(_PULL_STREAMS, device)


def _on(stream: torch.cuda.Stream):
    return torch.cuda.stream(stream)


class _Workspace:
    """One symmetric buffer of one group, and the views of it handed out so far."""

    def __init__(self, pg: dist.ProcessGroup, device: torch.device):
        self.pg, self.device = pg, device
        self.group_name = pg.group_name
        self.nbytes = 0
        self.tensor: torch.Tensor | None = None
        self.handle = None
        self.views: dict[tuple, torch.Tensor] = {}
        self.counter = 0  # calls (or groups of rows) so far: picks which copy of a buffer is used

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        import torch.distributed._symmetric_memory as symm_mem

        if self.handle is not None:
            # Peers may still read this buffer (their pulls of the last call): let every
            # rank finish all queued work before any of them frees its old buffer.
            torch.cuda.synchronize(self.device)
            flag = torch.zeros(1, device=self.device)
            dist.all_reduce(flag, group=self.pg)
            torch.cuda.synchronize(self.device)
        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by older torch, a deprecated no-op on newer
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                enable(self.group_name)
        nbytes = max(nbytes, 2 * self.nbytes)  # geometric growth: few re-rendezvous
        nbytes = (nbytes + 2**20 - 1) // 2**20 * 2**20
        self.views.clear()
        self.handle = None
        self.tensor = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.handle = symm_mem.rendezvous(self.tensor, self.group_name)
        self.nbytes = nbytes

    def next_copy(self, dtype: torch.dtype) -> int:
        """Element offset (in ``dtype``) of the half of the buffer the next step uses; advances the step."""
        base = (self.counter & 1) * (self.nbytes // 2 // dtype.itemsize)
        self.counter += 1
        return base

    def view(self, rank: int, shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> torch.Tensor:
        """``shape`` of ``dtype`` at element ``offset`` of ``rank``'s buffer (cached)."""
        key = (rank, shape, dtype, offset)
        t = self.views.get(key)
        if t is None:
            t = self.views[key] = self.handle.get_buffer(rank, list(shape), dtype, offset)
        return t

    def barrier(self, channel: int = 0) -> None:
        """All ranks' work queued before this point on their stream that uses ``channel`` is done."""
        self.handle.barrier(channel=channel)


_WORKSPACES: dict[tuple, _Workspace] = {}


def workspace(g: GroupInfo, op: str, device: torch.device) -> _Workspace:
    """The workspace of ``op`` (``"rs"``, ``"ar"``, ``"ag"``, or a probe's) on this group and device."""
    pg = _process_group(g)
    key = (id(pg), op, device.index)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.pg is not pg:
        ws = _WORKSPACES[key] = _Workspace(pg, device)
    return ws


def workspace_bytes() -> dict[str, int]:
    """Symmetric memory held per op (for reports)."""
    out: dict[str, int] = {}
    for (_, op, _), ws in _WORKSPACES.items():
        out[op] = out.get(op, 0) + ws.nbytes
    return out


# --- GEMM + reduce-scatter / all-reduce ----------------------------------------------------


def _offsets(sizes: tuple[int, ...]) -> list[int]:
    out, start = [], 0
    for s in sizes:
        out.append(start)
        start += s
    return out


def _reduce_scatter_groups(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, ws: _Workspace,
                           sizes: tuple[int, ...], row_of, after_sum, *, direct: bool) -> list:
    """The reduce-scatter pipeline shared by both ops.

    For each group ``i`` of ``sizes[i]`` rows per destination: the GEMM of each peer's
    rows (``row_of(d, i)`` is the first row of destination ``d`` in group ``i``), pushed
    into slot ``rank`` of that peer's buffer; this rank's own rows straight into its own
    slot; then, on the communication stream, a barrier and ``after_sum(i, slots, base)`` with
    ``slots`` the ``[R, rows, N]`` partials of this rank's block (all landed) and ``base``
    the element offset of the buffer copy the group used.
    Returns the tensors the caller must keep alive until its stream has waited.
    """
    world, rank = g.world_size, g.rank
    n, dtype, dev = w.shape[1], x2d.dtype, x2d.device
    main, comm = _streams(dev)
    keep: list = []
    summed: list[torch.cuda.Event] = []
    passed: list[torch.cuda.Event] = []
    for i, rows in enumerate(sizes):
        base = ws.next_copy(dtype)
        mine = base + rank * rows * n  # where this rank's partials go, in every rank's buffer
        if direct and i >= 2:
            # The GEMM writes into the peers' copy of two groups ago: wait until every
            # rank has summed it (they all reached the barrier of the group after it).
            main.wait_event(passed[i - 1])
        for step in range(1, world):
            d = (rank + step) % world
            a = row_of(d, i)
            if direct:
                torch.mm(x2d[a:a + rows], w, out=ws.view(d, (rows, n), dtype, mine))
                continue
            part = torch.mm(x2d[a:a + rows], w)
            keep.append(part)
            comm.wait_stream(main)
            with _on(comm):
                ws.view(d, (rows, n), dtype, mine).copy_(part)
        if i >= 2:  # this rank's own slot in this copy was last summed two groups ago
            main.wait_event(summed[i - 2])
        a = row_of(rank, i)
        torch.mm(x2d[a:a + rows], w, out=ws.view(rank, (rows, n), dtype, mine))
        comm.wait_stream(main)
        with _on(comm):
            ws.barrier()  # every partial of this group has landed here
            passed.append(comm.record_event())
            after_sum(i, ws.view(rank, (world, rows, n), dtype, base), base)
            summed.append(comm.record_event())
    return keep


def splits(world_size: int, groups: int, direct: bool = False) -> bool:
    """Whether the reduce-scatter / all-reduce schedules honour ``split=True`` for ``groups``
    row groups: one group on the slot-and-sum path.

    Why split: a CUDA graph writes its output into a buffer of its own, which the next
    replay overwrites, so a graphed call must copy its output out (graphs.py): one more
    pass over ``[M/R, N]`` (reduce-scatter) or ``[M, N]`` (all-reduce), 89 us of a 0.90 ms
    graphed all-reduce at Llama-3 8B attention-out M=16384 on 4 H100
    (benchmarks/results/overlap_copy_probe_4xH100_20261127-s11.json). Split, the graph
    ends where every input of the last step sits in the symmetric workspace (the slots; the
    reduced block), and ``finish``, run after each replay, writes the result straight into a
    new tensor: the sum for the reduce-scatter (one launch, as the copy was), the pulls for
    the all-reduce.
    """
    return groups == 1 and not accumulates(world_size, groups, direct)


def accumulates(world_size: int, groups: int, direct: bool = False) -> bool:
    """Whether the reduce-scatter / all-reduce schedules take the two-rank accumulate
    path (:func:`_pair_accumulate`) for ``groups`` row groups."""
    return world_size == 2 and groups >= 2 and not direct


def _pair_accumulate(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, ws: _Workspace, sizes: tuple[int, ...],
                     row_of, dest, after_own=None) -> None:
    """Two ranks: the reduction inside the GEMM, for ``len(sizes) >= 2`` row groups.

    Main stream: the GEMMs of the peer's rows of every group, into this rank's buffer
    (region ``A``); then, group by group, this rank's own rows multiplied onto the
    peer's partial (``dest(i).addmm_(x_own, w)``). Communication stream, per group:
    a barrier (both ranks' ``A`` rows of the group are computed), then the peer's
    partial pulled by the copy engine into ``dest(i)``. ``after_own(i)``, if given,
    runs as ``after_own(i, base)`` once group ``i``'s own GEMM is queued (the
    all-reduce's all-gather).

    ``row_of(d, i)``: first row of ``x2d`` for destination ``d`` in group ``i``;
    ``dest(i, base)``: the ``[sizes[i], N]`` tensor that receives group ``i``'s result
    (``base``: element offset of this call's half of the workspace).
    One copy of ``A`` per call (the two halves alternate across calls; see the
    module doc for why a peer never writes a half this rank still reads).
    """
    rank, peer = g.rank, 1 - g.rank
    n, dtype, dev = w.shape[1], x2d.dtype, x2d.device
    main, comm = _streams(dev)
    base = ws.next_copy(dtype)
    starts = _offsets(sizes)
    landed = []
    for i, rows in enumerate(sizes):
        a = row_of(peer, i)
        torch.mm(x2d[a:a + rows], w, out=ws.view(rank, (rows, n), dtype, base + starts[i] * n))
        comm.wait_stream(main)
        with _on(comm):
            ws.barrier()  # both ranks' partials of group i are in their buffers
            dest(i, base).copy_(ws.view(peer, (rows, n), dtype, base + starts[i] * n))
            landed.append(comm.record_event())
    for i, rows in enumerate(sizes):
        a = row_of(rank, i)
        main.wait_event(landed[i])
        dest(i, base).addmm_(x2d[a:a + rows], w)  # fp32 accumulator + the peer's partial, rounded once
        if after_own is not None:
            after_own(i, base)


def matmul_reduce_scatter(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, sizes: tuple[int, ...] | None = None,
                          *, direct: bool = False, split: bool = False, out: torch.Tensor | None = None):
    """``x2d [M, K/R] @ w [K/R, N]`` summed over ranks, row block ``g.rank`` ``[M/R, N]``.

    ``sizes``: rows of each group within every destination block (sum ``M/R``; default
    one group). Group ``i``'s reduction runs under the GEMMs of group ``i + 1``; on two
    ranks with two or more groups the reduction is inside the GEMM instead
    (:func:`_pair_accumulate`).
    ``direct``: the GEMM writes each peer's partial straight into the peer's slot (NVLink
    stores from the GEMM) instead of computing it locally for the copy engine to push.
    ``split``: with one group of rows, stop before the sum and return ``finish``, a callable
    that sums the slots into a new tensor (see :func:`splits`). ``out``: the ``[M/R, N]``
    result goes there (a graph's output buffer, graphs.py) instead of into new memory.
    """
    world = g.world_size
    m, n, dtype, dev = x2d.shape[0], w.shape[1], x2d.dtype, x2d.device
    mr = m // world
    sizes = sizes or (mr,)
    ws = workspace(g, "rs", dev)
    split = split and splits(world, len(sizes), direct)
    if split:
        out = None
    elif out is None:
        out = torch.empty(mr, n, dtype=dtype, device=dev)
    starts = _offsets(sizes)
    if accumulates(world, len(sizes), direct):
        ws.ensure(2 * mr * n * dtype.itemsize)  # per half: this rank's partials for the peer
        _pair_accumulate(x2d, w, g, ws, sizes, lambda d, i: d * mr + starts[i],
                         lambda i, base: out[starts[i]:starts[i] + sizes[i]])
        _streams(dev)[0].wait_stream(_streams(dev)[1])
        return out
    ws.ensure(2 * world * max(sizes) * n * dtype.itemsize)
    if split:
        landed: list[torch.Tensor] = []
        keep = _reduce_scatter_groups(x2d, w, g, ws, sizes, lambda d, i: d * mr, lambda i, slots, base:
                                      landed.append(slots), direct=direct)
        _streams(dev)[0].wait_stream(_streams(dev)[1])
        del keep
        slots = landed[0]

        def finish() -> torch.Tensor:  # on the caller's stream, after the barrier: every slot has landed
            return torch.sum(slots, dim=0)  # fp32 accumulation, rounded once, into a new tensor

        return finish

    def after_sum(i: int, slots: torch.Tensor, base: int) -> None:
        # One pass over the R partials, accumulated in fp32, rounded once.
        torch.sum(slots, dim=0, out=out[starts[i]:starts[i] + sizes[i]])

    keep = _reduce_scatter_groups(x2d, w, g, ws, sizes, lambda d, i: d * mr + starts[i], after_sum, direct=direct)
    _streams(dev)[0].wait_stream(_streams(dev)[1])
    del keep
    return out


def matmul_all_reduce(x2d: torch.Tensor, w: torch.Tensor, g: GroupInfo, sizes: tuple[int, ...] | None = None,
                      *, direct: bool = False, split: bool = False, out: torch.Tensor | None = None):
    """``x2d [M, K/R] @ w [K/R, N]`` summed over ranks, ``[M, N]`` on every rank.

    Rows go in groups of ``R * sizes[i]`` (``sizes`` sums to ``M/R``; default one
    group): each group is a reduce-scatter as above, then every rank pulls the peers'
    reduced blocks of the group. The pulls go on a second stream, so the all-gather of
    group ``i`` (data coming in) runs beside the pushes of group ``i + 1`` (data going
    out) and the GEMMs.

    The reduced block has two copies, alternating per group. The sum of group ``i``
    overwrites the copy the peers pulled for group ``i - 2``; it waits for this rank's
    pull-side barrier of group ``i - 1``, which every peer reaches after those pulls.
    (Across calls the push-side barrier of the new group already orders it: a rank
    reaches it after the caller's stream waited for all of its pulls.)

    ``split``: with one group, stop after the sum and return ``finish``, a callable that
    pulls every reduced block into a new tensor (see :func:`splits`). ``out``: where the
    ``[M, N]`` result goes instead of new memory.
    """
    world, rank = g.world_size, g.rank
    m, n, dtype, dev = x2d.shape[0], w.shape[1], x2d.dtype, x2d.device
    sizes = sizes or (m // world,)
    starts = _offsets(sizes)
    block = max(sizes) * n
    ws = workspace(g, "ar", dev)
    main, comm = _streams(dev)
    pull = pull_stream(dev)
    split = split and splits(world, len(sizes), direct)
    if split:
        out = None
    elif out is None:
        out = torch.empty(m, n, dtype=dtype, device=dev)
    if accumulates(world, len(sizes), direct):
        mr = m // world
        ws.ensure(2 * 2 * mr * n * dtype.itemsize)  # per half: partials for the peer, then the reduced rows

        def reduced(i: int, base: int) -> torch.Tensor:  # this rank's reduced rows of group i, pulled by the peer
            return ws.view(rank, (sizes[i], n), dtype, base + (mr + starts[i]) * n)

        def gather(i: int, base: int) -> None:  # beside the next group's GEMM
            rows, g0 = sizes[i], world * starts[i]
            pull.wait_stream(main)
            comm.wait_stream(main)
            with _on(pull):  # the peer's reduced rows, once it has them
                ws.barrier(channel=1)  # both ranks' reduced rows of group i are done
                peer = 1 - rank
                out[g0 + peer * rows:g0 + (peer + 1) * rows].copy_(ws.view(peer, (rows, n), dtype,
                                                                           base + (mr + starts[i]) * n))
            with _on(comm):  # this rank's own, on the other stream: the two copies run side by side
                out[g0 + rank * rows:g0 + (rank + 1) * rows].copy_(reduced(i, base))

        _pair_accumulate(x2d, w, g, ws, sizes, lambda d, i: world * starts[i] + d * sizes[i], reduced, gather)
        main.wait_stream(comm)
        main.wait_stream(pull)
        return out
    ws.ensure(2 * (world + 1) * block * dtype.itemsize)  # per copy: R slots, then the reduced block
    pulled_barrier: list[torch.cuda.Event] = []

    def pull_peers(dst: torch.Tensor, rows: int, red: int) -> None:
        """Every peer's reduced ``rows`` (element offset ``red`` of its buffer) into its rows of
        ``dst`` (the group's ``[R * rows, N]`` rows of the output)."""
        for step in range(1, world):
            p = (rank + step) % world
            dst[p * rows:(p + 1) * rows].copy_(ws.view(p, (rows, n), dtype, red))

    if split:
        reduced: list[int] = []

        def sum_only(i: int, slots: torch.Tensor, base: int) -> None:  # on the push stream
            red = base + world * block
            torch.sum(slots, dim=0, out=ws.view(rank, (sizes[0], n), dtype, red))
            reduced.append(red)

        keep = _reduce_scatter_groups(x2d, w, g, ws, sizes, lambda d, i: d * sizes[0], sum_only, direct=direct)
        main.wait_stream(comm)
        del keep
        rows, red = sizes[0], reduced[0]

        def finish() -> torch.Tensor:  # after the sum: the all-gather
            # The stream of *this* call, looked up now: under a CUDA graph ``main`` above was
            # the capture's stream, and waiting on it would let the pulls run ahead of the replay.
            caller = _streams(dev)[0]
            full = torch.empty(m, n, dtype=dtype, device=dev)
            pull.wait_stream(caller)
            with _on(pull):
                ws.barrier(channel=1)  # every rank's reduced block is ready
                pull_peers(full, rows, red)
            full[rank * rows:(rank + 1) * rows].copy_(ws.view(rank, (rows, n), dtype, red))
            caller.wait_stream(pull)
            return full

        return finish

    def after_sum(i: int, slots: torch.Tensor, base: int) -> None:  # on the push stream
        rows, g0 = sizes[i], world * starts[i]
        red = base + world * block  # this rank's reduced block in this copy, pulled by the peers
        if i >= 2:
            comm.wait_event(pulled_barrier[i - 1])
        torch.sum(slots, dim=0, out=ws.view(rank, (rows, n), dtype, red))
        pull.wait_stream(comm)
        with _on(pull):
            ws.barrier(channel=1)  # every rank's reduced block of this group is ready
            pulled_barrier.append(pull.record_event())
            pull_peers(out[g0:g0 + world * rows], rows, red)
        # The own block on the push stream, beside the pulls (on the pull stream it sat in
        # front of them: 19 us of 0.76 ms at Llama-3 8B attn-out M=16384 on 4 H100,
        # benchmarks/results/overlap_copy_probe_4xH100_20261127-s11-first.json).
        out[g0 + rank * rows:g0 + (rank + 1) * rows].copy_(ws.view(rank, (rows, n), dtype, red))

    keep = _reduce_scatter_groups(x2d, w, g, ws, sizes, lambda d, i: world * starts[i] + d * sizes[i], after_sum,
                                  direct=direct)
    main.wait_stream(comm)
    main.wait_stream(pull)
    del keep
    return out


# --- all-gather + GEMM ---------------------------------------------------------------------


def all_gather_matmul(xs: torch.Tensor, w: torch.Tensor, g: GroupInfo, sizes: tuple[int, ...] | None = None,
                      return_gathered: bool = False, *, out: torch.Tensor | None = None,
                      full: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``all_gather(xs [M/R, K]) @ w [K, N]`` -> ``[M, N]`` (and the gathered ``[M, K]``).

    ``sizes``: rows of each pulled piece of a peer's shard (sum ``M/R``; default the
    whole shard); the GEMM of a piece starts as soon as it has landed. ``out`` / ``full``:
    where the product ``[M, N]`` / the gathered input ``[M, K]`` go instead of new memory.
    """
    world, rank = g.world_size, g.rank
    ms, k = xs.shape
    n, dtype, dev = w.shape[1], xs.dtype, xs.device
    sizes = sizes or (ms,)
    starts = _offsets(sizes)
    shard = ms * k
    ws = workspace(g, "ag", dev)
    ws.ensure(2 * shard * dtype.itemsize)
    base = ws.next_copy(dtype)
    main, comm = _streams(dev)
    out = out if out is not None else torch.empty(world * ms, n, dtype=dtype, device=dev)
    full = full if full is not None else torch.empty(world * ms, k, dtype=dtype, device=dev)
    landed = []
    comm.wait_stream(main)
    with _on(comm):
        ws.view(rank, (ms, k), dtype, base).copy_(xs)
        ws.barrier()  # every shard is in its owner's buffer
        for step in range(1, world):
            p = (rank + step) % world
            for a, rows in zip(starts, sizes):
                full[p * ms + a:p * ms + a + rows].copy_(ws.view(p, (rows, k), dtype, base + a * k))
                landed.append((p * ms + a, rows, comm.record_event()))
    torch.mm(xs, w, out=out[rank * ms:(rank + 1) * ms])
    for a, rows, event in landed:
        main.wait_event(event)
        torch.mm(full[a:a + rows], w, out=out[a:a + rows])
    if return_gathered:
        full[rank * ms:(rank + 1) * ms].copy_(xs)
    main.wait_stream(comm)
    return out, (full if return_gathered else None)
