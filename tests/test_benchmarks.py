"""The benchmark runner: registry discovery and the result file's contents."""

from __future__ import annotations

import json

from benchmarks import REGISTRY, discover
from benchmarks.__main__ import main


def test_every_benchmark_module_imports_on_cpu():
    assert discover() == {}
    assert "collectives" in REGISTRY


def test_result_file_carries_environment_args_and_numbers(tmp_path):
    out = tmp_path / "r.json"
    assert main(["collectives", "--nproc", "2", "--device", "cpu", "--sizes-mib", "0.25",
                 "--ops", "all_reduce", "--iters", "2", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "collectives"
    for key in ("device", "gpu_count", "torch", "nccl", "triton", "git_commit", "date_utc"):
        assert key in record["env"]
    assert record["args"]["nproc"] == 2
    (row,) = record["results"]["rows"]
    assert row["op"] == "all_reduce" and row["time_ms"] > 0
    # busbw of all-reduce on 2 ranks is algbw * 2(n-1)/n = algbw.
    assert abs(row["busbw_gbps"] - row["algbw_gbps"]) < 1e-9


def test_unknown_benchmark_is_refused(capsys):
    assert main(["no_such_benchmark"]) == 2
    assert "unknown benchmark 'no_such_benchmark'" in capsys.readouterr().err


def _probe_worker(cfg: dict) -> dict:
    import os

    return {"rank": int(os.environ.get("RANK", "-1")), "rounds": cfg["rounds"], "nproc": cfg["nproc"]}


def test_probe_main_spawns_the_ranks_and_saves_rank_zeros_result(tmp_path):
    """The probes' shared command line: flags with their defaults, N spawned ranks, and rank
    0's return value saved as a result record (environment included)."""
    from benchmarks.results import probe_main

    out = tmp_path / "probe.json"
    rc = probe_main("some_probe", _probe_worker, ["--out", str(out), "--rounds", "7"], "A probe.\n\nMore.",
                    nproc=2, options={"rounds": 3}, timeout_s=120, env={})
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "some_probe" and record["args"]["rounds"] == 7 and record["args"]["nproc"] == 2
    assert record["results"] == {"rank": 0, "rounds": 7, "nproc": 2}
    assert "torch" in record["env"] and "git_commit" in record["env"]
