"""Multi-node ``commflow launch`` on one machine: three supervisors on localhost act as
three nodes (one gloo worker each) around a torch elastic c10d rendezvous on a free
port, running the DDP + DCP demo (checkpoints every 10 steps) with ``--nnodes 1:3``.

Two faults, both named by *slot* (first-attempt rank = node here):

* a crash on slot 2 at step 13 -> node 2 (a follower) is left out: its supervisor
  records why and exits 0; nodes 0 and 1 meet in a new rendezvous and resume from
  step 10 with a world of 2;
* a hang on slot 0 at step 24 -> node 0 is left out. Node 0 is the leader's own node
  (the rendezvous host: it holds the rendezvous store and the coordinator), so its
  workers leave while its supervisor stays as control plane; node 1 alone resumes from
  step 20 and finishes.

What this proves: verdicts reach every node's supervisor, the culprit node leaves
cleanly, the survivors re-rendezvous through torch elastic with the smaller world,
the incident records name the node, and the final weights equal an uninterrupted
single-process run (no checkpointed step lost or repeated wrongly).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from commflow.monitor.coordinator import Coordinator
from commflow.monitor.demo import reference_params
from commflow.monitor.multinode import (
    Followers,
    LeaderLink,
    descendants,
    node_slots,
    parse_nnodes,
    plan_nodes,
)
from commflow.monitor.supervisor import read_jsonl

STEPS, CKPT = 30, 10


def _free_port_pair() -> int:
    """A port P with P and P + 1 free (rendezvous store, coordinator)."""
    for _ in range(200):
        p = random.randint(20000, 45000)
        try:
            for q in (p, p + 1):
                with socket.socket() as s:
                    s.bind(("", q))
            return p
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def _wait_port(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the leader exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout_s} s")


def _run_nodes(root, nodes: int, launch_args: list[str], job_args: list[str]) -> dict[str, int]:
    """``commflow launch`` once per "node" on localhost (n0 first: it leads); the exit
    code of each. Output in ROOT/nI.log, supervisor records in ROOT/nI/."""
    port = _free_port_pair()
    common = ["--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--quiet-workers", *launch_args,
              "--", "python", "-m", "commflow.monitor.demo", *job_args]
    procs: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as files:

        def start(name: str) -> None:
            log = files.enter_context(open(root / f"{name}.log", "w"))
            procs[name] = subprocess.Popen([sys.executable, "-m", "commflow", "launch", "--out", str(root / name),
                                            *common], stdout=log, stderr=subprocess.STDOUT)

        try:
            start("n0")  # first: it binds the coordinator port and leads
            _wait_port(port + 1, procs["n0"], 120)
            for i in range(1, nodes):
                start(f"n{i}")
            return {name: p.wait(timeout=240) for name, p in procs.items()}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    shared = root / "shared"  # the job's own output: checkpoints on a "shared filesystem"
    codes = _run_nodes(
        root, 3,
        ["--nnodes", "1:3", "--checkpoint-dir", str(shared / "checkpoints"), "--resume-arg=--resume",
         "--inject", "crash:rank=2,at=13", "--inject", "hang:rank=0,at=24"],
        ["--steps", str(STEPS), "--ckpt-every", str(CKPT), "--out", str(shared), "--compute-ms", "20"])
    return root, shared, codes


def _log_tail(root, name: str) -> str:
    return (root / f"{name}.log").read_text()[-2000:]


def test_every_node_finishes_cleanly(job):
    root, _, codes = job
    assert codes == {"n0": 0, "n1": 0, "n2": 0}, {n: _log_tail(root, n) for n in codes}


def test_incidents_name_the_node_and_the_world_shrinks_by_nodes(job):
    root, _, codes = job
    crash, hang = read_jsonl(root / "n0" / "incidents.jsonl")
    assert crash["kind"] == "crash" and crash["slots"] == [2] and crash["excluded_nodes"] == [2]
    assert [w["node"] for w in crash["where"]] == [2] and crash["where"][0]["host"] == socket.gethostname()
    assert (crash["world_before"], crash["world_after"], crash["nodes_after"]) == (3, 2, [0, 1])
    # Attempt 1 runs nodes 0 and 1 as ranks 0 and 1: slot 0 is rank 0 on node 0.
    assert hang["kind"] == "hang" and hang["slots"] == [0] and hang["ranks"] == [0]
    assert hang["excluded_nodes"] == [0] and [w["node"] for w in hang["where"]] == [0]
    assert (hang["world_before"], hang["world_after"], hang["nodes_after"]) == (2, 1, [1])
    assert hang["evidence"]["missing"] == [0]
    assert hang["detect_s"] <= max(3 * hang["evidence"]["period_s"], 2.0)
    assert crash["detect_s"] < 2.0
    assert (crash["resumed_from_step"], hang["resumed_from_step"]) == (10, 20)
    for inc in (crash, hang):
        assert inc["restart_s"] is not None and inc["restart_s"] > 0
    # Ground truth: each fault fired once, on its slot, logged by the node it ran on.
    left, stayed = _followers_by_fate(root)
    fired = {name: [(e["kind"], e["slot"], e["iteration"]) for e in read_jsonl(root / name / "injected.jsonl")
                    if e["kind"] in ("crash", "hang")]
             for name in ("n0", left)}
    assert fired == {"n0": [("hang", 0, 24)], left: [("crash", 2, 13)]}
    assert not (root / stayed / "injected.jsonl").exists()


def _followers_by_fate(root) -> tuple[str, str]:
    """(the follower that was left out, the one that stayed). Which of n1 / n2 became
    node 2 is the rendezvous' choice (it ranks nodes by supervisor pid)."""
    left = [n for n in ("n1", "n2") if any(e["event"] == "excluded" for e in read_jsonl(root / n / "nodes.jsonl"))]
    assert len(left) == 1, left
    return left[0], ({"n1", "n2"} - set(left)).pop()


def test_each_supervisor_records_what_it_did(job):
    root, _, _ = job
    left, stayed = _followers_by_fate(root)
    events = {name: read_jsonl(root / name / "nodes.jsonl") for name in ("n0", "n1", "n2")}
    gone = events[left]
    assert [e["event"] for e in gone] == ["joined", "excluded"]
    assert gone[-1]["node"] == 2 and gone[-1]["incident"]["kind"] == "crash" and gone[-1]["nodes_after"] == [0, 1]
    survivor = events[stayed]
    assert [(e["event"], e.get("attempt"), e.get("nodes")) for e in survivor] == [
        ("joined", None, None), ("restart", 1, [0, 1]), ("restart", 2, [1]), ("finished", None, None)]
    assert survivor[-1]["code"] == 0 and survivor[-1]["node"] == 1
    n0 = events["n0"]
    assert [e["event"] for e in n0] == ["leader", "excluded", "finished"]
    assert n0[1]["node"] == 0 and "control plane" in n0[1]["note"] and n0[-1]["code"] == 0


def test_training_resumed_on_the_remaining_nodes_and_matches_an_uninterrupted_run(job):
    _, shared, codes = job
    assert codes["n0"] == 0
    log = read_jsonl(shared / "train_log.jsonl")
    assert [(r["step"], r["world"]) for r in log if r.get("event") == "start"] == [(0, 3), (10, 2), (20, 1)]
    assert sorted({r["step"] for r in log if "event" not in r}) == list(range(STEPS))
    final = json.loads((shared / "final.json").read_text())
    assert final["steps"] == STEPS and final["world"] == 1
    ref = reference_params(STEPS)
    got = torch.tensor(final["params"])
    assert torch.allclose(got, ref, atol=1e-5), (got - ref).abs().max()


def test_fixed_node_count_stops_every_node_and_names_the_node(tmp_path):
    """``--nnodes 2`` is a fixed size (torchrun's reading): a hang on the follower's
    worker stops the job on both nodes (exit 3) with an incident naming node 1. The
    hung worker never notices its peer is gone -- only the leader's ``stop`` to the
    follower's supervisor can end it, so both exiting proves that path."""
    codes = _run_nodes(tmp_path, 2, ["--nnodes", "2", "--inject", "hang:rank=1,at=4"],
                       ["--steps", "40", "--ckpt-every", "10", "--out", str(tmp_path / "shared"), "--compute-ms", "20"])
    assert codes == {"n0": 3, "n1": 3}, {n: _log_tail(tmp_path, n) for n in codes}
    (inc,) = read_jsonl(tmp_path / "n0" / "incidents.jsonl")
    assert inc["kind"] == "hang" and inc["slots"] == [1] and inc["excluded_nodes"] == [1]
    assert [w["node"] for w in inc["where"]] == [1] and inc["nodes_after"] == [0]
    assert "below --nnodes MIN=2" in inc["evidence"]["stopped"]
    assert [(e["event"], e.get("code")) for e in read_jsonl(tmp_path / "n1" / "nodes.jsonl")] == [
        ("joined", None), ("finished", 3)]


# -- the pieces, without processes ----------------------------------------------------


def test_nnodes_parsing_and_node_plans():
    assert parse_nnodes("3") == (3, 3) and parse_nnodes("1:4") == (1, 4) and parse_nnodes(2) == (2, 2)
    for bad, rule in [("3:2", "1 <= MIN <= MAX"), ("0", "1 <= MIN <= MAX"), ("a", "N or MIN:MAX"),
                      ("1:2:3", "N or MIN:MAX"), ("-1:2", "N or MIN:MAX")]:
        with pytest.raises(ValueError, match=rule) as err:
            parse_nnodes(bad)
        assert f"--nnodes={bad!r}" in str(err.value)
    assert node_slots([3, 0], 2) == [0, 1, 6, 7]
    assert plan_nodes([0, 1, 2, 3], [2], 2) == ([0, 1, 3], [])
    # world_multiple 4 with 2 ranks a node: 3 nodes = 6 ranks -> the highest healthy node goes too.
    assert plan_nodes([0, 1, 2, 3], [1], 2, world_multiple=4) == ([0, 2], [3])
    assert plan_nodes([0], [0], 1) == ([], [])


@pytest.mark.parametrize("args,message", [
    (["--nnodes", "3:2"], "needs 1 <= MIN <= MAX"),
    (["--nnodes", "2"], "--nnodes=2 needs --rdzv-endpoint host:port"),
    (["--nnodes", "x"], "must be N or MIN:MAX"),
])
def test_bad_node_counts_stop_the_launch_before_any_worker_starts(tmp_path, args, message):
    from commflow.cli import app

    res = CliRunner().invoke(app, ["launch", "--nproc-per-node", "1", "--out", str(tmp_path / "o"), *args,
                                   "--", "python", "-c", "pass"])
    assert res.exit_code == 2 and message in res.output
    assert not (tmp_path / "o" / "logs").exists()


def test_leader_link_protocol_over_the_coordinator_port():
    """A follower's link and the leader's coordinator: stop reaches the follower at
    once, plans for old attempts are skipped, done reports and disconnects reach the
    leader's Followers."""
    stops: list[int] = []
    followers = Followers()
    with Coordinator() as coord:
        coord.on_supervisor = followers.on_message
        link = LeaderLink(coord.endpoint, {"host": "h", "pid": 7, "nproc": 1}, on_stop=stops.append)
        link.connect(5.0)
        assert followers.wait(lambda: followers.links, 5.0)
        assert list(coord.supervisors.values()) == [{"host": "h", "pid": 7, "nproc": 1}]
        assert followers.connected() == {"h:7"}
        coord.post({"cmd": "stop", "attempt": 3})
        coord.post({"plan": {"attempt": 1, "nodes": [0]}})  # stale: the follower is past attempt 1
        coord.post({"plan": {"attempt": 2, "nodes": [1]}})
        assert link.next_decision(1, 5.0) == {"plan": {"attempt": 2, "nodes": [1]}}
        assert stops == [3]
        link.send({"done": {"attempt": 2, "ok": False, "failures": {"1": [-9, 12.5]}}})
        assert followers.wait(lambda: 2 in followers.reports, 5.0)
        assert followers.failures(2) == {1: (-9, 12.5)}
        coord.post({"end": {"code": 0}})
        assert link.next_decision(2, 5.0) == {"end": {"code": 0}}
        link.close()
        assert followers.wait(lambda: "h:7" in followers.gone, 5.0) and not followers.connected()
        assert link.next_decision(2, 0.2) is None


def test_descendants_lists_grandchildren():
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & wait"], start_new_session=True)
    try:
        deadline = time.time() + 5
        while time.time() < deadline and len(descendants(proc.pid)) < 1:
            time.sleep(0.05)
        below = descendants(os.getpid())
        assert proc.pid in below and set(descendants(proc.pid)) <= set(below) and descendants(proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
