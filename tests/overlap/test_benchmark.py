"""benchmarks/overlap.py runs end to end on CPU at tiny sizes and its report renders."""

from __future__ import annotations

import json

from benchmarks.__main__ import main
from benchmarks.overlap import report


def test_overlap_benchmark_tiny_cpu_and_report(tmp_path, monkeypatch):
    monkeypatch.setenv("COMMFLOW_OVERLAP_CALIBRATION_DIR", str(tmp_path / "cal"))
    out = tmp_path / "overlap.json"
    assert main(["overlap", "--nproc", "2", "--device", "cpu", "--dtype", "float32", "--tiny",
                 "--ops", "rs,ar,ag", "--shapes", "llama3-70b-attn-out", "--m", "4096", "--small-m", "512",
                 "--warmup", "1", "--iters", "1", "--calls-per-sample", "1", "--no-calibrate",
                 "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["results"]["rows"]
    assert {(r["op"], r["guard"]) for r in rows} == {(op, g) for op in ("rs", "ar", "ag") for g in (False, True)}
    for r in rows:
        assert not r["errors"], r["errors"]
        expected = {"gemm", "comm", "sequential", "auto", "overlap"} | ({"auto_backend", "overlap_backend"}
                                                                         if r["op"] != "ag" else set())
        assert set(r["times_ms"]) == expected
        assert all(t > 0 for t in r["times_ms"].values())
        # eta is computed from the same row's times.
        t = r["times_ms"]
        assert abs(r["eta"]["overlap"] - (t["gemm"] + t["comm"] - t["overlap"]) / min(t["gemm"], t["comm"])) < 1e-9
        # Every variant computed the same numbers as the sequential baseline.
        assert max(r["rel_diff_vs_sequential"].values()) < 1e-5
        assert r["plans"]["overlap"]["decision"] == "overlap"
    assert record["results"]["partial_file"] is None  # nothing failed, so nothing left beside
    text = report(out, tmp_path / "r.md", tmp_path / "img")
    assert "## matmul_reduce_scatter, 2 ranks" in text and "Summary" in text
    assert (tmp_path / "img" / "overlap_2x.png").stat().st_size > 1000
