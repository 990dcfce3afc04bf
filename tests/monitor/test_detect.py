"""The detector's decisions on synthetic report streams with known ground truth.

A plain model of a training loop writes the reports: every iteration each rank
computes for C seconds (plus noise, plus an injected delay on a chosen rank), enters
one all-reduce, and all ranks leave it together T seconds after the last one arrived
(plus injected transfer delay). So the truth -- who is late, by how much, whether the
transfer slowed -- is known exactly, and each test checks the verdict against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from commflow.monitor.detect import DetectConfig, Detector

W = 4
GROUP = "0,1,2,3"


def _msg(t, it, inflight=(), ev=(), quiet=0):
    return {"t": t, "hb": {"it": it, "quiet": quiet, "inflight": list(inflight), "calls": 0, "dropped": 0},
            "ev": list(ev)}


class Loop:
    """Synthesizes the reports of a W-rank loop and feeds them to a detector."""

    def __init__(self, det: Detector, *, period=0.1, comm=0.01, noise=0.05, seed=0, world=W):
        self.det, self.C, self.T, self.noise = det, period - comm, comm, noise
        self.rng = np.random.default_rng(seed)
        self.world = world
        self.t = 1000.0
        self.it = 0
        self.seq = 0
        self.idx = 0
        group = ",".join(map(str, range(world)))
        self.group = group
        for r in range(world):
            det.hello(r, {"rank": r, "world": world, "slot": r, "host": "h", "pid": 100 + r}, self.t)
            det.ingest(r, {"t": self.t, "ev": [["group", group, list(range(world))]]}, self.t)

    def iteration(self, *, late_rank=None, late=0.0, extra_comm=0.0):
        t0 = self.t
        compute = self.C * (1 + self.noise * self.rng.standard_normal(self.world))
        if late_rank is not None:
            compute[late_rank] += late
        enter = t0 + np.maximum(compute, 0.0)
        done = enter.max() + self.T + extra_comm
        self.idx += 1
        for r in range(self.world):
            rec = ["r", self.idx, self.group, self.seq, "all_reduce", -1, 64, self.it, enter[r], done, done - enter[r], 0,
                   None]
            ev = [["step", self.it, t0], rec, ["step", self.it + 1, done]]
            self.det.ingest(r, _msg(done, self.it + 1, ev=ev), done)
        self.seq += 1
        self.it += 1
        self.t = done
        return self.det.tick(done)

    def run(self, n, **kw):
        for i in range(n):
            v = self.iteration(**kw)
            if v is not None:
                return i, v
        return None, None


def test_healthy_noisy_loop_gives_no_verdict():
    det = Detector()
    loop = Loop(det, noise=0.2, seed=1)
    i, v = loop.run(600)
    assert v is None, v and v.to_json()
    assert det.closed_iters == 600


@pytest.mark.parametrize("factor,within", [(1.5, 6), (3.0, 4)])
def test_a_late_rank_is_named_within_a_few_iterations(factor, within):
    det = Detector()
    loop = Loop(det, noise=0.05, seed=2)
    assert loop.run(40) == (None, None)
    i, v = loop.run(50, late_rank=2, late=(factor - 1) * loop.C)
    assert v is not None and v.kind == "slow_rank" and v.ranks == [2]
    assert i + 1 <= within
    lat = v.evidence["lateness_by_rank"]
    truth = (factor - 1) * loop.C / 0.1  # the injected delay, in step periods
    assert lat["2"] == pytest.approx(truth, rel=0.25)
    assert max(abs(lat[k]) for k in ("0", "1", "3")) < 0.2 * lat["2"]


def test_slower_transfers_are_flagged_as_communication_for_the_probe():
    det = Detector()
    loop = Loop(det, noise=0.05, seed=3)
    assert loop.run(40) == (None, None)
    i, v = loop.run(20, extra_comm=0.05)  # every collective 5x slower, everyone on time
    assert v is not None and v.kind == "comm_slow" and v.needs_probe and v.ranks == []
    assert i + 1 <= 4


def _warm(det: Detector, n=30) -> Loop:
    loop = Loop(det, noise=0.02, seed=4)
    assert loop.run(n) == (None, None)
    return loop


def test_hang_names_the_rank_that_never_entered_after_the_period_deadline():
    det = Detector()
    loop = _warm(det)
    seq, t0 = loop.seq, loop.t + 0.05
    deadline = det.hang_deadline()
    assert deadline == pytest.approx(max(1.5 * 0.1, DetectConfig.min_hang_s), rel=0.05)
    for t in np.arange(t0, t0 + deadline + 0.3, 0.1):
        for r in (0, 2, 3):  # in the collective, still reporting
            det.ingest(r, _msg(t, loop.it, inflight=[[99, GROUP, seq, "all_reduce", -1, loop.it, t0, 0]]), t)
        det.ingest(1, _msg(t, loop.it), t)  # alive, outside any collective
        v = det.tick(t)
        if t - t0 <= deadline:
            assert v is None
        elif v is not None:
            break
    assert v is not None and v.kind == "hang" and v.ranks == [1]
    assert v.evidence["missing"] == [1] and v.evidence["culprit_state"]["1"]["inside"] is None
    assert deadline < v.t_detect - t0 <= deadline + 0.11


def test_hang_follows_the_wait_chain_to_the_root():
    det = Detector()
    loop = _warm(det)
    t0 = loop.t + 0.05
    for r in range(W):
        det.ingest(r, {"t": t0, "ev": [["group", "1,3", [1, 3]]]}, t0)
    t = t0 + 2.0
    for r in (0, 2):  # wait in the world all-reduce that rank 1 never reaches ...
        det.ingest(r, _msg(t, loop.it, inflight=[[99, GROUP, loop.seq, "all_reduce", -1, loop.it, t0, 0]]), t)
    # ... because rank 1 waits in a sub-group collective that rank 3 never entered.
    det.ingest(1, _msg(t, loop.it, inflight=[[98, "1,3", 0, "all_gather", -1, loop.it, t0, 0]]), t)
    det.ingest(3, _msg(t, loop.it), t)
    v = det.tick(t)
    assert v is not None and v.kind == "hang" and v.ranks == [3]
    assert v.evidence["wait_chain"] and v.evidence["wait_chain"][0]["rank"] == 1


def test_everyone_inside_and_nobody_done_is_a_communication_hang():
    det = Detector()
    loop = _warm(det)
    t0 = loop.t + 0.05
    t = t0 + 2.0
    for r in range(W):
        det.ingest(r, _msg(t, loop.it, inflight=[[99, GROUP, loop.seq, "all_reduce", -1, loop.it, t0 + 0.01 * r, 0]]),
                   t)
    v = det.tick(t)
    assert v is not None and v.kind == "comm_hang" and v.needs_probe and v.ranks == []


def test_a_lagging_coordinator_does_not_invent_hangs():
    """Ranks are inside a collective in their last report, but that report is recent
    relative to their entry: however late the coordinator looks, nobody has waited."""
    det = Detector()
    loop = _warm(det)
    t0 = loop.t
    for r in range(W):
        det.ingest(r, _msg(t0 + 0.01, loop.it, inflight=[[99, GROUP, loop.seq, "all_reduce", -1, loop.it, t0, 0]]),
                   t0 + 0.01)
    assert det.tick(t0 + 30.0) is None


def test_quiet_sections_are_exempt_from_the_hang_deadline():
    det = Detector()
    loop = _warm(det)
    t0 = loop.t + 0.05
    t = t0 + 5.0
    for r in (0, 2, 3):
        det.ingest(r, _msg(t, loop.it, inflight=[[99, GROUP, loop.seq, "all_reduce", -1, loop.it, t0, 0]]), t)
    det.ingest(1, _msg(t, loop.it, quiet=1), t)  # rank 1 is checkpointing
    assert det.tick(t) is None


def test_crash_blames_the_silent_closure_not_the_peers_that_failed_after_it():
    det = Detector()
    _warm(det)
    det.closed(3, 2000.0, None)  # vanished
    det.closed(0, 2000.01, {"ok": False, "error": "Connection closed by peer"})
    det.closed(1, 2000.02, {"ok": False, "error": "Connection reset"})
    assert det.tick(2000.1) is None  # still settling
    v = det.tick(2000.5)
    assert v is not None and v.kind == "crash" and v.ranks == [3]


def test_a_rank_whose_heartbeat_stops_while_peers_report_is_a_hang():
    det = Detector()
    loop = _warm(det)
    t0 = loop.t
    limit = 2 * max(det.hang_deadline(), 1.0)
    v = None
    for t in np.arange(t0, t0 + limit + 0.5, 0.1):
        for r in (0, 1, 3):
            det.ingest(r, _msg(t, loop.it), t)
        v = det.tick(t)
        if v is not None:
            break
    assert v is not None and v.kind == "hang" and v.ranks == [2]
    assert v.t_detect - t0 > limit


def test_acknowledged_anomaly_is_not_reported_twice_and_the_next_one_is():
    det = Detector()
    loop = Loop(det, noise=0.05, seed=5)
    loop.run(40)
    _, v = loop.run(30, late_rank=1, late=loop.C)
    assert v is not None and v.ranks == [1]
    det.acknowledge(v)
    assert loop.run(10, late_rank=1, late=loop.C) == (None, None)  # same anomaly, still going
    assert loop.run(40) == (None, None)  # cleared
    _, v2 = loop.run(30, late_rank=3, late=loop.C)
    assert v2 is not None and v2.ranks == [3]
