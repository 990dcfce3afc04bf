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
