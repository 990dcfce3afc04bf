"""Fault specs: parsing, validation errors (before anything starts), seeded
resolution, and what each fault does in the worker-side injector."""

from __future__ import annotations

import time

import pytest

from commflow.monitor.inject import Fault, Injector, parse_duration, parse_fault, resolve_faults


def test_the_issue_examples_parse():
    assert parse_fault("hang:rank=1,at=30") == Fault(kind="hang", rank=1, at=30, text="hang:rank=1,at=30")
    f = parse_fault("slow:rank=2,factor=3,at=50")
    assert (f.rank, f.factor, f.at, f.until) == (2, 3.0, 50, None)
    f = parse_fault("slowlink:src=0,dst=1,delay=20ms,at=20")
    assert (f.src, f.dst, f.delay_s, f.at) == (0, 1, pytest.approx(0.02), 20)
    assert parse_fault("crash:rank=3,at=40").code == 1
    assert parse_fault("jitter:pct=20").pct == 20.0
    assert parse_fault("linkdown:src=1,dst=2,at=5,hold=1.5s").hold_s == 1.5


@pytest.mark.parametrize("text,seconds", [("20ms", 0.02), ("1.5s", 1.5), ("2", 2.0), ("250us", 2.5e-4), ("1m", 60)])
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("spec,message", [
    ("explode:rank=1", "unknown fault kind 'explode'"),
    ("hang:rank=1", "hang needs ['at']"),
    ("hang:rank=1,at=3,factor=2", "unknown key 'factor' for hang"),
    ("hang:rank=x,at=3", "rank='x' must be an integer"),
    ("hang:rank=-1,at=3", "rank=-1 must be >= 0"),
    ("slow:rank=1,factor=0.5", "factor=0.5 must be a finite number > 1"),
    ("slowlink:src=1,dst=1,delay=5ms", "src and dst are both 1"),
    ("slowlink:src=0,dst=1,delay=fast", "is not a duration"),
    ("jitter:pct=150", "pct=150.0 must be in (0, 100)"),
    ("slow:factor=2,at=5,until=5", "until=5 must be > at=5"),
    ("hang:rank=1,rank=2,at=1", "key 'rank' given twice"),
    ("hang rank=1", "expected 'kind:key=value,...'"),
])
def test_malformed_specs_name_the_part_and_the_rule(spec, message):
    with pytest.raises(ValueError, match=None) as err:
        parse_fault(spec)
    assert message in str(err.value) and repr(spec) in str(err.value)


def test_resolution_checks_ranks_against_the_world_and_is_seeded():
    with pytest.raises(ValueError, match="rank=4 must be < world size 4"):
        resolve_faults(["crash:rank=4,at=1"], 4, seed=0)
    a = resolve_faults(["hang:at=3", "slowlink:delay=1ms"], 8, seed=7)
    b = resolve_faults(["hang:at=3", "slowlink:delay=1ms"], 8, seed=7)
    assert a == b and a[0].rank is not None and a[1].src != a[1].dst
    assert {resolve_faults(["hang:at=3"], 8, seed=s)[0].rank for s in range(20)} != {a[0].rank}


def test_slow_stretches_compute_by_the_factor_and_reports_once():
    events = []
    inj = Injector([parse_fault("slow:rank=1,factor=3,at=2,until=4")], slot=1, slots=[0, 1, 2], report=events.append)
    t = time.perf_counter()
    inj.before_call(1, 0.05)  # not active yet
    assert time.perf_counter() - t < 0.03
    t = time.perf_counter()
    inj.before_call(2, 0.05)
    assert time.perf_counter() - t == pytest.approx(0.1, abs=0.04)  # (3 - 1) x 50 ms
    inj.before_call(3, 0.0)
    assert len(events) == 1 and events[0]["kind"] == "slow" and events[0]["slot"] == 1 and events[0]["iteration"] == 2


def test_a_fault_on_an_excluded_slot_never_fires():
    inj = Injector([parse_fault("crash:rank=3,at=0")], slot=3, slots=[0, 1, 2])  # slot 3 was excluded
    inj.before_call(10, 0.0)  # would os._exit if armed
    assert inj.faults == []


def test_links_delay_their_source_only_and_probes_see_a_dead_link():
    slots = [0, 1, 2, 3]
    src = Injector([parse_fault("slowlink:src=2,dst=0,delay=30ms")], slot=2, slots=slots)
    other = Injector([parse_fault("slowlink:src=2,dst=0,delay=30ms")], slot=1, slots=slots)
    t = time.perf_counter()
    src.inside_collective(0, [0, 1, 2, 3])
    assert time.perf_counter() - t >= 0.03
    t = time.perf_counter()
    other.inside_collective(0, [0, 1, 2, 3])
    src.inside_collective(0, [1, 2])  # dst not in this group
    assert time.perf_counter() - t < 0.02
    assert src.probe_edge(0, 0) == pytest.approx(0.03) and src.probe_edge(0, 1) == 0.0
    down = Injector([parse_fault("linkdown:src=2,dst=0,at=1")], slot=2, slots=slots)
    assert down.probe_edge(0, 0) == 0.0 and down.probe_edge(1, 0) is None


def test_on_cuda_a_slow_link_delays_the_stream_not_the_host(monkeypatch):
    # The host runs ahead of a GPU stream, so a host sleep would vanish into the queue:
    # the CUDA emulation is a sleep kernel (Injector._sleep) on the source's stream,
    # for collectives with the destination and for sends to it; the probe keeps its delay.
    src = Injector([parse_fault("slowlink:src=2,dst=0,delay=30ms")], slot=2, slots=[0, 1, 2, 3], cuda=True)
    kernels: list[float] = []
    monkeypatch.setattr(src, "_sleep", kernels.append)
    t = time.perf_counter()
    src.inside_collective(0, [0, 1, 2, 3])
    src.before_send(0, 0)
    src.before_send(0, 1)  # another edge: untouched
    assert time.perf_counter() - t < 0.02
    assert kernels == [pytest.approx(0.03), pytest.approx(0.03)]
    assert src.probe_edge(0, 0) == pytest.approx(0.03)


def test_jitter_is_reproducible_from_the_seed():
    f = parse_fault("jitter:pct=20")
    a = [Injector([f], slot=1, slots=[0, 1], seed=5)._jitter(f, it) for it in range(50)]
    b = [Injector([f], slot=1, slots=[0, 1], seed=5)._jitter(f, it) for it in range(50)]
    c = [Injector([f], slot=1, slots=[0, 1], seed=6)._jitter(f, it) for it in range(50)]
    assert a == b and a != c and all(0 <= u <= 0.4 for u in a)


def test_a_competing_kernel_follows_the_slow_fault_not_the_jitter():
    """CUDA "contend" mode: the competing stream runs while the slow fault is active and
    only then; the jitter keeps scaling the rank's own work. (Switching the contender on
    whenever compute_scale() came out above 1 turned it on at random on every jittered
    rank and hid the slow one: 1 of 2 slow GPUs found on 4 H100s.)"""
    faults = [parse_fault("slow:rank=1,factor=3,at=5,until=8"), parse_fault("jitter:pct=20")]
    events = []
    slow = Injector(faults, slot=1, slots=[0, 1, 2], seed=3, report=events.append)
    peer = Injector(faults, slot=0, slots=[0, 1, 2], seed=3)
    assert [slow.slow_active(it) for it in range(10)] == [4 < it < 8 for it in range(10)]
    assert not any(peer.slow_active(it) for it in range(10))
    for it in range(10):
        jitter = slow.compute_scale(it, slow=False)
        assert 1.0 <= jitter <= 1.4  # 1 + U(0, 2 x pct)
        assert slow.compute_scale(it) == pytest.approx(jitter * (3.0 if 4 < it < 8 else 1.0))
    assert [e["iteration"] for e in events if e["kind"] == "slow"] == [5]
