"""benchmarks/overlap.py at tiny sizes on CPU: its rows, numbers and report.

The rows are measured by the benchmark's own worker on the test's (already running)
gloo pool instead of freshly spawned ranks, which would cost more start-up than the
measurement; ``python -m benchmarks overlap --device cpu --tiny`` runs the same worker
through the runner.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest

from benchmarks.overlap import _arguments, _rows_plan, _worker, report, summarize


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    _arguments(p)
    return p.parse_args(list(argv))


def test_overlap_benchmark_tiny_cpu_and_report(dist_pool, tmp_path, monkeypatch):
    args = _args("--device", "cpu", "--dtype", "float32", "--tiny", "--ops", "rs,ar,ag",
                 "--shapes", "llama3-70b-attn-out", "--m", "4096", "--small-m", "512",
                 "--warmup", "1", "--iters", "1", "--min-time-ms", "5", "--calls-per-sample", "1", "--no-calibrate")
    rows = _rows_plan(args)
    assert [(r["op"], r["m"], r["K"], r["N"], r["guard"]) for r in rows] == [
        (op, m, 128, 128, guard) for op in ("rs", "ar", "ag") for m, guard in ((64, False), (8, True))]
    partial = tmp_path / "partial.jsonl"
    out = dist_pool(2).run(_worker, rows, ["gemm", "comm", "sequential", "sequential_control", "torch_fused", "auto",
                                           "auto_backend", "overlap", "overlap_backend"], vars(args), str(partial))
    res = out[0]
    assert res["world_size"] == 2 and len(res["rows"]) == len(rows)
    assert len(partial.read_text().splitlines()) == len(rows)  # rank 0 wrote every row as it finished
    for r in res["rows"]:
        assert not r["errors"], r["errors"]
        expected = {"gemm", "comm", "sequential", "sequential_control", "auto", "overlap"} | ({"auto_backend",
                                                                                               "overlap_backend"}
                                                                         if r["op"] != "ag" else set())
        assert set(r["times_ms"]) == expected  # torch_fused is CUDA-only: not timed on CPU
        assert all(t > 0 for t in r["times_ms"].values())
        t = r["times_ms"]
        assert r["eta"]["overlap"] == pytest.approx((t["gemm"] + t["comm"] - t["overlap"]) / min(t["gemm"], t["comm"]))
        assert r["speedup_vs_sequential"]["auto"] == pytest.approx(t["sequential"] / t["auto"])
        assert r["speedup_vs_sequential"]["sequential_control"] == pytest.approx(t["sequential"] / t["sequential_control"])
        assert "sequential_control" not in r["rel_diff_vs_sequential"]  # the reference itself: nothing to check
        assert max(r["rel_diff_vs_sequential"].values()) < 1e-5  # every variant computed the same numbers
        assert r["plans"]["overlap"]["decision"] == "overlap" and sum(r["plans"]["overlap"]["chunk_sizes"]) > 0
    summary = summarize(res["rows"])
    assert set(summary) == {"rs/2", "ar/2", "ag/2"} and summary["rs/2"]["rows"] == 2
    assert all(entry["sequential_control"]["worst_speedup_all"] > 0 for entry in summary.values())  # the noise row
    main_rs = [r for r in res["rows"] if r["op"] == "rs" and not r["guard"]]
    ideal = [(r["times_ms"]["gemm"] + r["times_ms"]["comm"]) / max(r["times_ms"]["gemm"], r["times_ms"]["comm"])
             for r in main_rs]
    assert summary["rs/2"]["ideal_geomean_main"] == pytest.approx(ideal[0])  # one main row: its own ideal
    geo = summary["rs/2"]["auto"]["geomean_speedup_main"]
    assert ideal[0] > 1  # both times positive: perfect overlap always gains something
    assert summary["rs/2"]["auto"]["share_of_ideal_main"] == pytest.approx(math.log(geo) / math.log(ideal[0]))
    rs_auto = [r["speedup_vs_sequential"]["auto"] for r in res["rows"] if r["op"] == "rs"]
    assert summary["rs/2"]["auto"]["rows_below_guard"] == sum(1 for v in rs_auto if v < 0.97)

    record = {"benchmark": "overlap", "env": {"device": "cpu", "gpu_count": 0}, "args": vars(args),
              "results": {"worlds": [{"world_size": 2}], "rows": res["rows"]}}
    path = tmp_path / "overlap.json"
    path.write_text(json.dumps(record))
    text = report(path, tmp_path / "r.md", tmp_path / "img")
    assert "## matmul_reduce_scatter, 2 ranks" in text and "## Summary" in text and "| ours auto |" in text
    assert "seq again (noise)" in text and "rows < 0.97x" in text and "| ideal | share |" in text
    assert (tmp_path / "img" / "overlap_2x.png").stat().st_size > 1000


def test_unknown_ops_and_shapes_are_refused():
    with pytest.raises(SystemExit, match="--ops: unknown"):
        _rows_plan(_args("--ops", "rs,xx"))
    with pytest.raises(SystemExit, match="--shapes: unknown"):
        _rows_plan(_args("--shapes", "gpt5"))
    with pytest.raises(SystemExit, match="--min-time-ms: must be at least 0"):
        _rows_plan(_args("--min-time-ms", "-1"))


@pytest.mark.parametrize("min_time_ms, rounds", [(0.0, 3), (1e-12, 3), (1e9, 30), (1e9, 7)])
def test_sample_ms_rounds_go_on_until_the_time_budget(min_time_ms, rounds):
    """At least ``iters`` rounds; more while a variant has less than ``min_time_ms`` of
    timed calls, never more than ``max_rounds`` (default 10 x iters)."""
    import torch

    from commflow.overlap.autotune import sample_ms

    counts = [0, 0]

    def make(i):
        def fn():
            counts[i] += 1
        return fn

    max_rounds = 7 if rounds == 7 else None
    out = sample_ms([make(0), make(1)], iters=3, calls=2, device=torch.device("cpu"), min_time_ms=min_time_ms,
                    max_rounds=max_rounds)
    assert counts == [rounds * 2, rounds * 2]
    assert len(out) == 2 and all(t > 0 and h > 0 for t, h in out)


def test_ideal_speedup_is_perfect_overlap_at_standalone_speeds():
    from benchmarks.overlap import ideal_speedup

    assert ideal_speedup({"times_ms": {"gemm": 1.0, "comm": 3.0}}) == pytest.approx(4 / 3)
    assert ideal_speedup({"times_ms": {"gemm": 2.0, "comm": 2.0}}) == pytest.approx(2.0)
    assert ideal_speedup({"times_ms": {"gemm": 2.0}}) is None  # a row that failed before its comm was timed
