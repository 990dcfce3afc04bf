"""The copy-engine schedules' data flow, emulated on CPU.

Ranks are threads of one process, each rank's symmetric buffer is a shared CPU tensor
(poisoned with NaN bytes when allocated, so a slot read before it is written shows),
the symmetric-memory barrier is a thread barrier and streams run in program order.
This checks what the schedules compute (slot layout, row groups, the two alternating
copies across calls, direct stores, pulls) against the float64 product; the GPU test
(test_gpu.py) checks them with real streams, copy engines and barriers.
"""

from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch

from commflow.overlap import reference as ref
from commflow.overlap import symm
from commflow.overlap.validate import GroupInfo

TOL = 1e-5
"""fp32 against the float64 product: a few fp32 roundings of O(1) values."""


class _Stream:
    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self):
        return None


class _Workspace:
    """A rank's symmetric buffer: views of any rank's buffer, a barrier over the threads."""

    def __init__(self, buffers: dict, rank: int, barrier: threading.Barrier):
        self.buffers, self.rank, self.bar, self.counter, self.nbytes = buffers, rank, barrier, 0, 0
        self.touched: list[tuple[int, int, int, int]] = []  # (step, buffer's rank, first byte, end byte)

    next_copy = symm._Workspace.next_copy  # the real copy selection, on the emulated buffer

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.bar.wait()  # growing is collective on the GPU too
        self.buffers[self.rank] = torch.full((nbytes,), 255, dtype=torch.uint8)  # NaN in every float type
        self.nbytes = nbytes
        self.bar.wait()

    def view(self, rank, shape, dtype, offset):
        flat = self.buffers[rank].view(dtype)
        assert offset + math.prod(shape) <= flat.numel(), (offset, shape, flat.numel())
        size = dtype.itemsize
        self.touched.append((self.counter - 1, rank, offset * size, (offset + math.prod(shape)) * size))
        return flat[offset:offset + math.prod(shape)].view(shape)

    def barrier(self, channel: int = 0) -> None:
        self.bar.wait()  # every rank issues its barriers in one order here, whatever the channel


@pytest.fixture
def ranks(monkeypatch):
    """``run(world, fn)``: ``fn(g)`` on ``world`` emulated ranks, their results in rank order."""

    def run(world, fn, spaces=None):
        buffers: dict = {}
        barrier = threading.Barrier(world, timeout=60)
        spaces = {} if spaces is None else spaces

        def workspace(g, op, device):
            return spaces.setdefault((g.rank, op), _Workspace(buffers.setdefault(op, {}), g.rank, barrier))

        monkeypatch.setattr(symm, "_streams", lambda device: (_Stream(), _Stream()))
        monkeypatch.setattr(symm, "pull_stream", lambda device: _Stream())
        monkeypatch.setattr(symm, "_on", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(symm, "workspace", workspace)
        results, errors = [None] * world, []

        def body(r):
            try:
                results[r] = fn(GroupInfo(group=None, rank=r, world_size=world))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    return run


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("world", [2, 4])
def test_reduce_scatter_and_all_reduce(ranks, world):
    g0 = torch.Generator().manual_seed(0)
    m, k, n = 24 * world, 8 * world, 10
    X, W = torch.randn(m, k, generator=g0, dtype=torch.float64), torch.randn(k, n, generator=g0, dtype=torch.float64)
    splits = [None, (12, 12), (10, 7, 7), (24,)]  # rows per destination block: m / world = 24

    def fn(g):
        x, w = (t.float() for t in ref.row_parallel_shards(X, W, world, g.rank))
        errs = []
        for sizes in splits * 2:  # twice: the second pass reuses both copies of the slots
            for direct in (False, True):
                errs.append(_rel(symm.matmul_reduce_scatter(x, w, g, sizes, direct=direct),
                                 ref.matmul_reduce_scatter_reference(X, W, world, g.rank)))
                errs.append(_rel(symm.matmul_all_reduce(x, w, g, sizes, direct=direct), X @ W))
            for direct in (False, True):  # split: one group returns its last step as a callable
                rs = symm.matmul_reduce_scatter(x, w, g, sizes, direct=direct, split=True)
                ar = symm.matmul_all_reduce(x, w, g, sizes, direct=direct, split=True)
                assert callable(rs) == callable(ar) == symm.splits(world, len(sizes or (1,)), direct)
                errs.append(_rel(rs() if callable(rs) else rs, ref.matmul_reduce_scatter_reference(X, W, world, g.rank)))
                errs.append(_rel(ar() if callable(ar) else ar, X @ W))
        return errs

    for errs in ranks(world, fn):
        assert all(e <= TOL for e in errs), errs  # (a NaN fails too)


@pytest.mark.parametrize("world", [2, 4])
def test_all_gather_matmul(ranks, world):
    g0 = torch.Generator().manual_seed(1)
    m, k, n = 12 * world, 16, 6 * world
    X, W = torch.randn(m, k, generator=g0, dtype=torch.float64), torch.randn(k, n, generator=g0, dtype=torch.float64)

    def fn(g):
        xs, w = (t.float() for t in ref.column_parallel_shards(X, W, world, g.rank))
        errs = []
        for sizes in (None, (6, 6), (5, 4, 3)) * 2:
            out, full = symm.all_gather_matmul(xs, w, g, sizes, return_gathered=True)
            errs += [_rel(out, ref.all_gather_matmul_reference(X, W, world, g.rank)), _rel(full, X)]
            errs.append(0.0 if symm.all_gather_matmul(xs, w, g, sizes)[1] is None else 1.0)
        return errs

    for errs in ranks(world, fn):
        assert all(e <= TOL for e in errs), errs


@pytest.mark.parametrize("world", [2, 4])
def test_schedules_write_into_given_output_buffers(ranks, world):
    """A graphed call hands the schedule its kind's output buffers (graphs.kind_buffers): the
    result must be those buffers, fully written (NaN-filled first), for every path that keeps an
    output (multi-group reduce-scatter and all-reduce, the two-rank accumulate path, all-gather)."""
    g0 = torch.Generator().manual_seed(3)
    m, k, n = 24 * world, 8 * world, 10
    X, W = torch.randn(m, k, generator=g0, dtype=torch.float64), torch.randn(k, n, generator=g0, dtype=torch.float64)
    XC, WC = torch.randn(m, 16, generator=g0, dtype=torch.float64), torch.randn(16, 6 * world, generator=g0,
                                                                            dtype=torch.float64)

    def fn(g):
        x, w = (t.float() for t in ref.row_parallel_shards(X, W, world, g.rank))
        xs, wc = (t.float() for t in ref.column_parallel_shards(XC, WC, world, g.rank))
        errs = []
        for sizes in ((12, 12), (10, 7, 7)):
            out = torch.full((m // world, n), float("nan"))
            y = symm.matmul_reduce_scatter(x, w, g, sizes, out=out)
            errs += [0.0 if y is out else 1.0, _rel(y, ref.matmul_reduce_scatter_reference(X, W, world, g.rank))]
            out = torch.full((m, n), float("nan"))
            y = symm.matmul_all_reduce(x, w, g, sizes, out=out)
            errs += [0.0 if y is out else 1.0, _rel(y, X @ W)]
            out, full = torch.full((m, wc.shape[1]), float("nan")), torch.full((m, 16), float("nan"))
            y, gathered = symm.all_gather_matmul(xs, wc, g, sizes[:1] + (24 - sizes[0],), return_gathered=True,
                                                 out=out, full=full)
            errs += [0.0 if (y is out and gathered is full) else 1.0,
                     _rel(y, ref.all_gather_matmul_reference(XC, WC, world, g.rank)), _rel(gathered, XC)]
        return errs

    for errs in ranks(world, fn):
        assert all(e <= TOL for e in errs), errs


def test_growing_workspace_keeps_results(ranks):
    world = 2
    g0 = torch.Generator().manual_seed(2)
    X, W = torch.randn(64, 8, generator=g0, dtype=torch.float64), torch.randn(8, 5, generator=g0, dtype=torch.float64)

    def fn(g):
        errs = []
        for rows in (8, 64, 16):  # small, larger (the buffer grows), small again
            x, w = (t.float() for t in ref.row_parallel_shards(X[:rows], W, world, g.rank))
            errs.append(_rel(symm.matmul_reduce_scatter(x, w, g), (X[:rows] @ W).chunk(world)[g.rank]))
        return errs

    for errs in ranks(world, fn):
        assert all(e <= TOL for e in errs), errs


@pytest.mark.parametrize("world", [2, 4])
def test_consecutive_steps_use_disjoint_bytes_whatever_the_shapes(ranks, world):
    """A peer may still read step s's copy while this rank writes step s + 1's: the two
    must not share a byte, also when calls alternate shapes (the first symmetric-memory
    layout put a call's copy 0 over the last call's copy 1 when the rows shrank or grew)."""
    g0 = torch.Generator().manual_seed(3)
    X, W = torch.randn(96, 8, generator=g0, dtype=torch.float64), torch.randn(8, 6, generator=g0, dtype=torch.float64)
    XC, WC = torch.randn(48, 8, generator=g0, dtype=torch.float64), torch.randn(8, 12, generator=g0, dtype=torch.float64)

    def fn(g):
        errs = []
        calls = ((96, None), (32, (4, 4, 8)), (96, (24, 24)), (64, None), (96, None))  # sizes sum to rows / 2
        for rows, sizes in ((r, s and tuple(v * 2 // world for v in s)) for r, s in calls):
            x, w = (t.float() for t in ref.row_parallel_shards(X[:rows], W, world, g.rank))
            errs.append(_rel(symm.matmul_reduce_scatter(x, w, g, sizes), (X[:rows] @ W).chunk(world)[g.rank]))
            errs.append(_rel(symm.matmul_all_reduce(x, w, g, sizes), X[:rows] @ W))
        for rows in (48, 16, 48, 24):
            xs, w = (t.float() for t in ref.column_parallel_shards(XC[:rows], WC, world, g.rank))
            errs.append(_rel(symm.all_gather_matmul(xs, w, g)[0],
                             ref.all_gather_matmul_reference(XC[:rows], WC, world, g.rank)))
        return errs

    spaces: dict = {}
    for errs in ranks(world, fn, spaces):
        assert all(e <= TOL for e in errs), errs
    for op in ("rs", "ar", "ag"):
        touched = [t for (_, o), ws in spaces.items() if o == op for t in ws.touched]
        assert touched, op
        by_step: dict = {}
        for step, buf, a, b in touched:
            by_step.setdefault((step, buf), []).append((a, b))
        for (step, buf), ranges in by_step.items():
            for a, b in ranges:
                for c, d in by_step.get((step + 1, buf), []):
                    assert b <= c or d <= a, f"{op}: steps {step} and {step + 1} share bytes of rank {buf}'s buffer"


def test_two_ranks_with_row_groups_accumulate_in_the_gemm(ranks, monkeypatch):
    """World 2 with two or more row groups runs the accumulate schedule (the peer's partial
    pulled into the output, the own rows multiplied onto it); one group, direct stores and
    world 4 keep the slot-and-sum schedule. Both give the float64 product."""
    calls = []
    real = symm._pair_accumulate
    monkeypatch.setattr(symm, "_pair_accumulate", lambda *a, **kw: calls.append(len(a[4])) or real(*a, **kw))
    g0 = torch.Generator().manual_seed(3)
    X, W = torch.randn(48, 16, generator=g0, dtype=torch.float64), torch.randn(16, 6, generator=g0, dtype=torch.float64)

    def fn(g):
        x, w = (t.float() for t in ref.row_parallel_shards(X, W, 2, g.rank))
        errs = []
        for sizes, direct in (((12, 12), False), ((24,), False), ((8, 8, 8), True), ((5, 9, 10), False)):
            errs.append(_rel(symm.matmul_reduce_scatter(x, w, g, sizes, direct=direct),
                             ref.matmul_reduce_scatter_reference(X, W, 2, g.rank)))
            errs.append(_rel(symm.matmul_all_reduce(x, w, g, sizes, direct=direct), X @ W))
        return errs

    for errs in ranks(2, fn):
        assert all(e <= TOL for e in errs), errs
    assert sorted(calls) == [2, 2, 2, 2, 3, 3, 3, 3], calls  # 2 ranks x (RS, AR) x the two accumulating splits


def test_split_all_reduce_finishes_on_the_stream_it_is_called_from(ranks, monkeypatch):
    """The all-reduce's ``finish`` runs after a graph replay, on the caller's stream of that
    call: it must order its pulls after that stream, not after the stream the schedule was
    captured on (on the GPU that let the pulls read the reduced block before the replay had
    summed it)."""
    log: list[tuple[str, str]] = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append((self.name, other.name))

        def wait_event(self, event):
            pass

        def record_event(self):
            return None

    current, comm, pull = [Rec("capture")], Rec("comm"), Rec("pull")
    x, w = torch.randn(8, 4), torch.randn(4, 3)

    def fn(g):
        monkeypatch.setattr(symm, "_streams", lambda device: (current[0], comm))
        monkeypatch.setattr(symm, "pull_stream", lambda device: pull)
        finish = symm.matmul_all_reduce(x, w, g, split=True)
        current[0] = Rec("caller")  # a later replay's stream
        log.clear()
        return finish()

    (y,) = ranks(1, fn)
    torch.testing.assert_close(y, x @ w)
    assert ("pull", "caller") in log and ("caller", "pull") in log
    assert not any("capture" in pair for pair in log), log
