"""``commflow launch`` end to end: a real 4-worker gloo DDP job (commflow.monitor.demo,
DCP checkpoints every 10 steps) with an injected crash and, later, an injected hang.

What this proves: the supervisor (torch elastic underneath) detects both, names the
right slot, restarts twice from the newest checkpoint with the culprit left out
(4 -> 3 -> 2 workers), and the job finishes with exactly the weights of an
uninterrupted single-process run -- so no checkpointed step was lost or repeated
wrongly. Incident and ground-truth records land in the --out directory, and
``commflow monitor report`` reads them. Bad --inject specs stop the launch before any
worker starts.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from commflow.monitor.demo import reference_params
from commflow.monitor.supervisor import read_jsonl, worker_command

STEPS, CKPT = 40, 10


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch")
    cmd = [sys.executable, "-m", "commflow", "launch", "--nproc-per-node", "4", "--out", str(out),
           "--resume-arg=--resume", "--quiet-workers",
           "--inject", "crash:rank=3,at=15", "--inject", "hang:rank=1,at=27", "--",
           "python", "-m", "commflow.monitor.demo", "--steps", str(STEPS), "--ckpt-every", str(CKPT),
           "--out", str(out), "--compute-ms", "20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    return out, proc


def test_job_finishes_after_a_crash_and_a_hang_without_the_culprits(job):
    out, proc = job
    assert proc.returncode == 0, proc.stderr[-3000:]
    crash, hang = read_jsonl(out / "incidents.jsonl")
    assert crash["kind"] == "crash" and crash["slots"] == [3] and crash["excluded_slots"] == [3]
    assert (crash["world_before"], crash["world_after"]) == (4, 3)
    # Attempt 1 runs slots 0,1,2 as ranks 0,1,2: slot 1 is rank 1 again.
    assert hang["kind"] == "hang" and hang["slots"] == [1] and hang["ranks"] == [1]
    assert (hang["world_before"], hang["world_after"]) == (3, 2)
    assert hang["evidence"]["missing"] == [1]
    for inc in (crash, hang):
        assert inc["detect_s"] is not None and inc["restart_s"] is not None and inc["localize_s"] is not None
        assert inc["where"][0]["pid"] > 0 and inc["where"][0]["host"]
    assert crash["detect_s"] < 2.0
    period = hang["evidence"]["period_s"]
    assert hang["detect_s"] <= max(3 * period, 2.0)
    assert (crash["resumed_from_step"], hang["resumed_from_step"]) == (10, 20)

    injected = [e for e in read_jsonl(out / "injected.jsonl") if e["kind"] in ("crash", "hang")]
    assert [(e["kind"], e["slot"], e["iteration"]) for e in injected] == [("crash", 3, 15), ("hang", 1, 27)]


def test_training_resumed_from_checkpoints_and_matches_an_uninterrupted_run(job):
    out, proc = job
    assert proc.returncode == 0
    log = read_jsonl(out / "train_log.jsonl")
    starts = [(r["step"], r["world"]) for r in log if r.get("event") == "start"]
    assert starts == [(0, 4), (10, 3), (20, 2)]
    steps = [r["step"] for r in log if "event" not in r]
    assert sorted(set(steps)) == list(range(STEPS))
    final = json.loads((out / "final.json").read_text())
    assert final["steps"] == STEPS and final["world"] == 2
    ref = reference_params(STEPS)
    assert torch.allclose(torch.tensor(final["params"]), ref, atol=1e-5), (torch.tensor(final["params"]) - ref).abs().max()


def test_report_prints_the_incidents(job):
    from commflow.cli import app

    out, _ = job
    res = CliRunner().invoke(app, ["monitor", "report", str(out)])
    assert res.exit_code == 0, res.output
    assert "crash" in res.output and "hang" in res.output and "ground truth" in res.output
    res = CliRunner().invoke(app, ["monitor", "report", str(out), "--json"])
    assert [json.loads(line)["kind"] for line in res.output.splitlines()] == ["crash", "hang"]


@pytest.mark.parametrize("spec,message", [
    ("hang:rank=7,at=1", "rank=7 must be < world size 2"),
    ("hang:rank=1", "hang needs ['at']"),
    ("slowlink:src=0,dst=0,delay=1ms", "src and dst are both 0"),
])
def test_bad_fault_specs_stop_the_launch_before_any_worker_starts(tmp_path, spec, message):
    from commflow.cli import app

    res = CliRunner().invoke(app, ["launch", "--nproc-per-node", "2", "--out", str(tmp_path / "o"), "--inject", spec,
                                   "--", "python", "-c", "pass"])
    assert res.exit_code == 2
    assert message in res.output
    assert not (tmp_path / "o" / "logs").exists()


def test_worker_command_wraps_python_and_commflow():
    exe, args = worker_command(["python", "-u", "train.py", "--lr", "1"])
    assert exe == sys.executable and args[-4:] == ["commflow.monitor.worker", "train.py", "--lr", "1"]
    assert worker_command(["python3", "-m", "pkg.mod", "x"])[1][-4:] == ["commflow.monitor.worker", "-m", "pkg.mod", "x"]
    assert worker_command(["commflow", "train", "--out", "d"])[1][-5:] == ["-m", "commflow", "train", "--out", "d"]
    assert worker_command(["./run.sh", "a"]) == ("./run.sh", ["a"])
    with pytest.raises(ValueError, match="names no script"):
        worker_command(["python", "-u"])
