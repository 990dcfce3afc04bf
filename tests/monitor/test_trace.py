"""The tracer on a real 4-rank gloo world: every wrapped call becomes a record with
the right op, group, sequence number, peer, bytes and iteration, completes (sync,
future callback, or polled), DDP's gradient all-reduce is traced without changing
its result, and unwatch() puts torch.distributed back as it was."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from commflow.monitor.trace import PeriodFinder

W = 4
FLOAT = 4  # bytes


def _all_ops() -> dict:
    import commflow.dist as cdist
    from commflow import monitor

    originals = {name: getattr(dist, name) for name in ("all_reduce", "isend", "batch_isend_irecv")}
    rank = dist.get_rank()
    sub = dist.new_group([0, 1])  # collective: every rank creates it
    tr = monitor.watch(infer_iterations=False)
    try:
        monitor.step(7)
        x = torch.ones(8)
        dist.all_reduce(x)
        dist.all_gather([torch.empty(8) for _ in range(W)], x)
        # commflow.dist bound these aliases at import, before watch(): patched in place too.
        cdist.all_gather_tensor(torch.empty(8 * W), x)
        dist.reduce_scatter(torch.empty(8), [torch.ones(8) for _ in range(W)])
        cdist.reduce_scatter_tensor(torch.empty(8), torch.ones(8 * W))
        dist.all_to_all_single(torch.empty(4 * W), torch.ones(4 * W))
        dist.all_to_all([torch.empty(2) for _ in range(W)], [torch.ones(2) for _ in range(W)])
        dist.broadcast(x, 0)
        dist.barrier()
        if rank in (0, 1):
            dist.all_reduce(torch.ones(3), group=sub)
        nxt, prv = (rank + 1) % W, (rank - 1) % W
        buf = torch.empty(5)
        s, r = dist.isend(torch.ones(5), nxt), dist.irecv(buf, prv)
        s.wait()
        r.wait()
        if rank % 2 == 0:
            dist.send(torch.ones(6), rank + 1)
        else:
            dist.recv(torch.empty(6), rank - 1)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, torch.ones(2), nxt),
                                        dist.P2POp(dist.irecv, torch.empty(2), prv)])
        for w in works:
            w.wait()
        w = dist.all_reduce(torch.ones(16), async_op=True)
        w.wait()
        time.sleep(0.05)
        tr.poll()
        recs = [(r.op, r.group, r.seq, r.peer, r.nbytes, r.iteration, r.t_done is not None and r.t_done >= r.t_enter,
                 r.error) for r in tr.records()]
        inflight = len(tr.inflight)
    finally:
        monitor.unwatch()
    restored = all(getattr(dist, n) is f for n, f in originals.items())
    return {"recs": recs, "inflight": inflight, "restored": restored, "rank": rank}


def _expected(rank: int) -> list[tuple]:
    """What a plain reading of each call says the record must be."""
    world = "0,1,2,3"
    nxt, prv = (rank + 1) % W, (rank - 1) % W
    exp = [
        ("all_reduce", world, 0, -1, 8 * FLOAT),
        ("all_gather", world, 1, -1, 8 * FLOAT),
        (None, world, 2, -1, 8 * FLOAT),  # all_gather_single on 2.13+, all_gather_into_tensor before
        ("reduce_scatter", world, 3, -1, 8 * W * FLOAT),
        (None, world, 4, -1, 8 * W * FLOAT),
        ("all_to_all_single", world, 5, -1, 4 * W * FLOAT),
        ("all_to_all", world, 6, -1, 2 * W * FLOAT),
        ("broadcast", world, 7, -1, 8 * FLOAT),
        ("barrier", world, 8, -1, 0),
    ]
    if rank in (0, 1):
        exp.append(("all_reduce", "0,1", 0, -1, 3 * FLOAT))
    exp += [("isend", world, 0, nxt, 5 * FLOAT), ("irecv", world, 0, prv, 5 * FLOAT)]
    if rank % 2 == 0:
        exp.append(("send", world, 1, rank + 1, 6 * FLOAT))
    else:
        exp.append(("recv", world, 1, rank - 1, 6 * FLOAT))
    # batch: per directed channel the next number after what this rank already used on it
    used_send = {nxt: 1 + (1 if rank % 2 == 0 and rank + 1 == nxt else 0)}
    used_recv = {prv: 1 + (1 if rank % 2 == 1 and rank - 1 == prv else 0)}
    exp += [("isend", world, used_send[nxt], nxt, 2 * FLOAT), ("irecv", world, used_recv[prv], prv, 2 * FLOAT)]
    exp.append(("all_reduce", world, 9, -1, 16 * FLOAT))
    return exp


def test_every_call_is_recorded_with_op_group_seq_peer_bytes(dist_pool):
    results = dist_pool(W).run(_all_ops)
    for res in results:
        rank = res["rank"]
        got = res["recs"]
        exp = _expected(rank)
        assert len(got) == len(exp), (rank, [g[0] for g in got])
        for g, e in zip(got, exp):
            op, group, seq, peer, nbytes, iteration, done, error = g
            if e[0] is not None:
                assert op == e[0], (rank, g, e)
            assert (group, seq, peer, nbytes) == e[1:], (rank, g, e)
            assert iteration == 7 and done and error is None, (rank, g)
        assert got[2][0] in ("all_gather_single", "all_gather_into_tensor")
        assert got[4][0] in ("reduce_scatter_single", "reduce_scatter_tensor")
        assert res["inflight"] == 0
        assert res["restored"]


def _ddp_grads() -> dict:
    from torch import nn

    from commflow import monitor

    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    ref = nn.Linear(6, 3)
    ref.load_state_dict(model.state_dict())
    tr = monitor.watch(infer_iterations=False)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.full((2, 6), float(rank + 1))
        ddp(x).sum().backward()
        time.sleep(0.05)
        tr.poll()
        recs = [(r.op, r.nbytes, r.is_async, r.t_done is not None) for r in tr.records()]
    finally:
        monitor.unwatch()
    # Reference: the mean over ranks of each rank's gradient, computed here by hand.
    grads = []
    for r in range(W):
        ref.zero_grad()
        ref(torch.full((2, 6), float(r + 1))).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ref.parameters()]))
    want = torch.stack(grads).mean(0)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    return {"recs": recs, "err": (got - want).abs().max().item()}


def test_ddp_gradient_allreduce_is_traced_and_unchanged(dist_pool):
    for res in dist_pool(W).run(_ddp_grads):
        assert res["err"] < 1e-6
        buckets = [r for r in res["recs"] if r[0] == "all_reduce" and r[2]]
        assert buckets, res["recs"]
        assert sum(b[1] for b in buckets) == (6 * 3 + 3) * FLOAT  # every gradient, once
        assert all(b[3] for b in buckets)


def _inferred_iterations() -> list[int]:
    from commflow import monitor

    tr = monitor.watch()
    try:
        x = torch.ones(4)
        for _ in range(8):  # an iteration: all_reduce, all_gather, barrier
            dist.all_reduce(x)
            dist.all_gather([torch.empty(4) for _ in range(W)], x)
            dist.barrier()
        return [r.iteration for r in tr.records()]
    finally:
        monitor.unwatch()


def test_iterations_inferred_from_the_call_pattern_agree_across_ranks(dist_pool):
    per_rank = dist_pool(W).run(_inferred_iterations)
    assert all(p == per_rank[0] for p in per_rank)
    its = per_rank[0]
    # Locked after three periods; from then on one iteration per period, starting at the all_reduce.
    locked = its[9:]
    assert locked == [1 + i // 3 for i in range(len(locked))]


@pytest.mark.parametrize("seq,anchor", [
    (["a", "b", "c"] * 4, "a"),
    (["x", "a", "b", "a", "b"] + ["a", "b", "c"] * 3, "a"),  # prologue before the loop
    (["a", "a", "b"] * 4, "b"),  # the anchor must occur once per period
])
def test_period_finder_anchor(seq, anchor):
    pf = PeriodFinder()
    for s in seq:
        pf.observe(s)
    assert pf.anchor == anchor


def _toggled() -> dict:
    """Tracer taken out and put back between steps (the overhead benchmark's train
    workload does this): only the calls of the watched steps are recorded, and every
    record carries its own step."""
    from commflow import monitor

    tr = monitor.watch(infer_iterations=False)
    try:
        for step in range(6):
            if step % 2:
                tr.install()
            else:
                tr.uninstall()
            monitor.step(step)
            dist.all_reduce(torch.ones(4))
        tr.install()
        time.sleep(0.05)
        tr.poll()
        steps = [r.iteration for r in tr.records()]
    finally:
        monitor.unwatch()
    return {"steps": steps, "restored": dist.all_reduce.__module__ == "torch.distributed.distributed_c10d"}


def test_tracer_toggled_between_steps_records_only_watched_steps(dist_pool):
    for res in dist_pool(2).run(_toggled):
        assert res["steps"] == [1, 3, 5]
        assert res["restored"]


def test_overhead_schedule_is_abba_after_the_warmup():
    from benchmarks.monitor_overhead import watched_schedule

    got = [watched_schedule(s, 3) for s in range(11)]
    assert got == [False] * 3 + [False, True, True, False, False, True, True, False]


class _FakeEvent:
    """Stands in for a CUDA event: done or not, and how often it was asked."""

    def __init__(self, done: bool):
        self.done, self.queries = done, 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def elapsed_time(self, end) -> float:
        return 1.0


def test_a_poll_stops_at_each_stream_s_first_unfinished_event(monkeypatch):
    # Events of one stream finish in order: after an unfinished one the poll skips the
    # rest of that stream (a poll holds the GIL the training thread launches with), and
    # still completes what has finished on another stream.
    from commflow.monitor.trace import CommRecord, Tracer

    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: None)
    tr = Tracer(rank=0)
    plan = [(7, True), (7, False), (7, True), (9, True), (9, False)]
    recs = []
    for i, (stream, done) in enumerate(plan):
        rec = CommRecord(i, "g", i, "all_reduce", -1, 8, 0, time.time(), dev=0, stream=stream)
        rec.ev_start, rec.ev_end = _FakeEvent(True), _FakeEvent(done)
        tr.pending_poll[i] = rec
        recs.append(rec)
    ends = [r.ev_end for r in recs]
    tr.poll()
    assert [e.queries for e in ends] == [1, 1, 0, 1, 1]
    assert [r.t_done is not None for r in recs] == [True, False, False, True, False]
    assert recs[0].dur == pytest.approx(1e-3) and list(tr.pending_poll) == [1, 2, 4]


class _FakeWork:
    def __init__(self, done: bool = True, ms: float = 2.5):
        self.done, self.ms, self.waits = done, ms, 0

    def wait(self):
        self.waits += 1
        return True

    def is_completed(self) -> bool:
        return self.done

    def _get_duration(self) -> float:
        return self.ms


class _FakeGroup:
    """A process group whose NCCL backend counts the timing switch."""

    def __init__(self):
        self.switched = 0

    def _get_backend(self, device):
        assert str(device) == "cuda"
        return self

    def _enable_collectives_timing(self):
        self.switched += 1


class _FakeStream:
    stream_id = 4242


def _fake_cuda_tracer(monkeypatch, **kw):
    """A tracer whose CUDA calls are stand-ins (this runs on a CPU machine): the stream
    lookups and event records are counted in ``tr.cuda_calls``."""
    import types

    from commflow.monitor import trace

    cuda_calls: list = []
    monkeypatch.setattr(torch._C, "_cuda_getCurrentStream", lambda dev: cuda_calls.append(("stream", dev)) or (4242, dev, 1),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "Stream", lambda **ids: _FakeStream())
    monkeypatch.setattr(trace, "_record", lambda ev, stream: cuda_calls.append(("record", stream)))
    fake = types.SimpleNamespace(is_cuda=True, device=types.SimpleNamespace(index=0))
    monkeypatch.setattr(trace, "_first_tensor", lambda payload: fake)
    tr = trace.Tracer(rank=0, **kw)
    monkeypatch.setattr(tr, "_event", object)
    monkeypatch.setattr(tr, "group_key", lambda group: ("0,1", (0, 1)))
    tr._rank_known = True
    tr.cuda_calls = cuda_calls
    tr.step(0)
    return tr


def test_an_async_cuda_collective_is_timed_by_nccl_without_cuda_calls_from_python(monkeypatch):
    # async_op=True (by keyword or position): the work is NCCL-timed, the timing switch
    # thrown once per group, no stream lookup or event record; the poll takes dur from
    # the work and keeps each group's NCCL stream in order. A blocking call keeps the
    # tracer's two events, recorded on one looked-up stream.
    tr = _fake_cuda_tracer(monkeypatch)
    group = _FakeGroup()
    x = torch.ones(4)
    w1 = tr._traced("all_reduce", lambda *a, **k: _FakeWork(True), (x,), {"group": group, "async_op": True})
    w2 = tr._traced("reduce_scatter_tensor", lambda *a, **k: _FakeWork(False), (x, x, dist.ReduceOp.SUM, group, True), {})
    w3 = tr._traced("all_gather_into_tensor", lambda *a, **k: _FakeWork(True), (x, x), {"group": group, "async_op": True})
    assert group.switched == 1 and tr.cuda_calls == [] and tr.nccl_timed_calls == 3
    recs = tr.records()
    assert [r.nccl_timed for r in recs] == [True, True, True] and all(r.is_async for r in recs)
    assert [r.work for r in recs] == [w1, w2, w3] and all(w.waits == 0 for w in (w1, w2, w3))
    tr.poll()
    # The second call has not finished: the third, behind it on the same stream, waits.
    assert [r.t_done is not None for r in recs] == [True, False, False]
    assert recs[0].dur == pytest.approx(2.5e-3)
    w2.done = True
    tr.poll()
    assert all(r.t_done is not None for r in recs) and not tr.pending_poll

    assert tr._traced("all_reduce", lambda *a, **k: None, (x,), {"group": group}) is None
    rec = tr.records()[-1]
    assert not rec.nccl_timed and rec.stream == 4242 and rec.dev == 0
    assert tr.cuda_calls == [("stream", 0), ("record", tr._streams[(4242, 0, 1)]), ("record", tr._streams[(4242, 0, 1)])]
    tr._traced("all_reduce", lambda *a, **k: None, (x,), {"group": group})
    assert len(tr._streams) == 1  # the stream object is built once


def test_emulated_link_faults_and_a_backend_without_timing_fall_back_to_cuda_events(monkeypatch):
    import types

    tr = _fake_cuda_tracer(monkeypatch)
    tr.injector = types.SimpleNamespace(edges_out=[("slowlink", 1)])
    assert tr._nccl_timing_on("0,1", _FakeGroup()) is False

    class NoTiming(_FakeGroup):
        def _enable_collectives_timing(self):
            raise RuntimeError("Backend gloo is missing implementation of enableCollectivesTiming")

    assert _fake_cuda_tracer(monkeypatch)._nccl_timing_on("0,1", NoTiming()) is False
    assert _fake_cuda_tracer(monkeypatch, nccl_timing=False)._nccl_timing_on("0,1", _FakeGroup()) is False
    assert _fake_cuda_tracer(monkeypatch)._nccl_timing_on("0,1", _FakeGroup()) is True

    class GroupLevelSwitch(_FakeGroup):  # torch 2.11: only the group has the switch
        def _get_backend(self, device):
            return object()

    g = GroupLevelSwitch()
    assert _fake_cuda_tracer(monkeypatch)._nccl_timing_on("0,1", g) is True and g.switched == 1


def test_a_work_without_timing_completes_in_host_time_and_turns_the_group_to_events(monkeypatch):
    tr = _fake_cuda_tracer(monkeypatch)
    group = _FakeGroup()

    class Untimed(_FakeWork):
        def _get_duration(self):
            raise RuntimeError("getDuration only works if timing was enabled")

    tr._traced("all_reduce", lambda *a, **k: Untimed(True), (torch.ones(4),), {"group": group, "async_op": True})
    (rec,) = tr.records()
    assert rec.nccl_timed
    tr.poll()
    assert rec.t_done is not None and rec.dur is not None and rec.dur >= 0
    tr._traced("all_reduce", lambda *a, **k: _FakeWork(True), (torch.ones(4),), {"group": group, "async_op": True})
    assert not tr.records()[-1].nccl_timed and ("stream", 0) in tr.cuda_calls


def test_async_op_passed_by_position_is_seen(dist_pool):
    dist_pool(W).run(_positional_async)


def _positional_async() -> None:
    from commflow import monitor

    tr = monitor.watch(infer_iterations=False)
    try:
        monitor.step(0)
        w = dist.all_reduce(torch.ones(4), dist.ReduceOp.SUM, None, True)
        assert w is not None
        w.wait()
        time.sleep(0.05)
        tr.poll()
        (rec,) = tr.records()
        assert rec.is_async and rec.t_done is not None
    finally:
        monitor.unwatch()
