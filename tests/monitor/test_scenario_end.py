"""A scenario ends a grace period after its first failed rank, as a restart would.

On NCCL the survivors of a crashed rank block in their collective until the watchdog's
10 minutes; a scenario that waited for them would take that long per crash. Here the
survivor that never returns is rank 1, held in a 60 s hang while rank 0 crashes.
"""

from __future__ import annotations

from commflow.monitor.coordinator import ProbeConfig
from commflow.monitor.scenario import Scenario, run_scenario

PROBE = ProbeConfig(nbytes=64 << 10, reps=3, timeout_s=0.2)


def test_crash_ends_the_job_without_waiting_for_a_blocked_survivor():
    sc = Scenario(iterations=40, compute_ms=5.0, probe=PROBE, timeout_s=120, failure_grace_s=3.0,
                  heal_on_verdict=False, faults=["crash:rank=0,at=8", "hang:rank=1,at=8,hold=60s"])
    r = run_scenario(sc)
    assert r.wall_s < 30, f"scenario waited {r.wall_s:.1f} s for a rank held 60 s"
    assert r.worker[0]["error"] == "exit code 1"
    assert r.worker[1]["iterations"] is None  # killed while held, never reported
    # The crash verdict still arrives although the job ended early (score() is not used:
    # with both faults at one iteration it may pair the crash verdict with the hang).
    assert any(v.kind == "crash" and v.ranks == [0] for v in r.verdicts), r.verdicts



def test_score_counts_a_repeated_verdict_on_a_running_fault_apart_from_false_alarms():
    """Without heal (CUDA), a fault runs its whole length and may be named twice: the
    second verdict is a repeat; a verdict naming another rank stays a false alarm."""
    from commflow.monitor.detect import Verdict
    from commflow.monitor.scenario import ScenarioResult, score

    fired = [{"kind": "hang", "t": 10.0, "iteration": 40, "rank": 1, "fault": {"text": "hang:rank=1,at=40"}},
             {"kind": "hang", "t": 30.0, "iteration": 95, "rank": 3, "fault": {"text": "hang:rank=3,at=95"}}]
    verdicts = [Verdict(kind="hang", ranks=[r], t_detect=t) for r, t in
                ((1, 11.5), (1, 13.0), (2, 14.0), (3, 31.5), (1, 32.0))]
    r = ScenarioResult(verdicts=verdicts, injected=fired, faults=[], iterations=[], worker={}, wall_s=40.0)
    s = score(r)
    assert [row["localized"] for row in s["faults"]] == [True, True]
    assert [(v["ranks"], v["t_detect"]) for v in s["repeats"]] == [([1], 13.0)]
    # rank 2 never had a fault; rank 1's fault ended when rank 3's fired
    assert sorted(v["ranks"][0] for v in s["false_alarms"]) == [1, 2]
    # A healed fault (CPU trials) is over at its heal: naming the rank again is false.
    heal = {"kind": "heal", "t": 12.0, "fault": {"text": "hang:rank=1,at=40"}}
    r.injected = [*fired, heal]
    s = score(r)
    assert s["repeats"] == [] and sorted(v["ranks"][0] for v in s["false_alarms"]) == [1, 1, 2]


def test_unknown_emulation_modes_are_refused_by_name():
    import pytest

    with pytest.raises(ValueError, match="link_mode must be 'delay' or 'congest'"):
        Scenario(link_mode="flood")
    with pytest.raises(ValueError, match="slow_mode must be 'work' or 'contend'"):
        Scenario(slow_mode="sleep")
