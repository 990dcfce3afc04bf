"""benchmarks/sp_attention end to end on CPU at a tiny size, and its report generator."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main
from benchmarks.sp_attention import flops_fwd_bwd
from benchmarks.sp_peers import is_variant, parse
from benchmarks.sp_report import _label, markdown
from benchmarks.sp_report import main as report_main


def test_flop_convention():
    # causal: 4 B S^2 H D / 2 forward, 3.5x for forward + backward
    assert flops_fwd_bwd(1, 1024, 32, 128, causal=True) == 4 * 1024**2 * 32 * 128 * 0.5 * 3.5
    assert flops_fwd_bwd(2, 8, 1, 1, causal=False) == 2 * flops_fwd_bwd(1, 8, 1, 1, causal=False)


def test_strategy_names():
    assert parse("ulysses:4@normal") == ("ulysses", "4", True)
    assert parse("torch_cp_alltoall:cudnn") == ("torch_cp_alltoall", "cudnn", False)
    assert parse("sdpa_1gpu") == ("sdpa_1gpu", "", False)
    for bad in ("ulysses:x", "ring:2", "torch_cp_allgather:fast", "deepspeed@high", "nope"):
        with pytest.raises(ValueError):
            parse(bad)
    assert is_variant("allgather:2") and is_variant("ring@normal") and not is_variant("torch_cp_allgather")
    assert _label("ulysses:8@normal") == "Ulysses (8 chunks) [normal-priority NCCL]"
    assert _label("torch_cp_alltoall:cudnn") == "torch CP (alltoall) (cudnn)"
    with pytest.raises(SystemExit):
        main(["sp_attention", "--device", "cpu", "--strategies", "ulysses:x"])
    with pytest.raises(SystemExit, match="--rounds: must be at least 1"):
        main(["sp_attention", "--device", "cpu", "--rounds", "0"])


def test_cpu_run_checks_times_and_reports(tmp_path):
    out = tmp_path / "sp.json"
    strategies = "ulysses,ring,allgather:2,ring@normal,torch_cp_alltoall,sdpa_1gpu,sdpa_1gpu_bhsd,sdpa_1gpu:flash"
    assert main(["sp_attention", "--device", "cpu", "--nproc", "2", "--seqs", "32", "--heads", "4",
                 "--kv-heads", "2", "--head-dim", "8", "--warmup", "0", "--iters", "1", "--check-seq", "16",
                 "--strategies", strategies, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    res = record["results"]
    # Every strategy of ours passed the correctness gate; the CUDA-only peer says why it did not run.
    checks = {c["strategy"]: c for c in res["checks"]}
    for name in ("ulysses", "ring", "allgather:2", "ring@normal", "sdpa_1gpu", "sdpa_1gpu_bhsd"):
        assert checks[name]["ok"] and checks[name]["max_rel_error"] < 3e-2, checks[name]
    assert "CUDA" in res["skipped"]["torch_cp_alltoall"] and "CUDA" in res["skipped"]["sdpa_1gpu:flash"]
    rows = {r["strategy"]: r for r in res["rows"]}
    assert set(rows) == {"ulysses", "ring", "allgather:2", "ring@normal", "sdpa_1gpu", "sdpa_1gpu_bhsd"}
    for row in rows.values():
        assert row["status"] == "ok" and row["time_ms"] > 0 and row["seq"] == 32
        expected = flops_fwd_bwd(1, 32, 4, 8, causal=True) / 2 / (row["time_ms"] * 1e-3) / 1e12
        assert abs(row["tflops_per_gpu"] - expected) <= 1e-9 * expected

    text = markdown(record)
    limit = max(rows["sdpa_1gpu"]["tflops_per_gpu"], rows["sdpa_1gpu_bhsd"]["tflops_per_gpu"])
    ratio = rows["ulysses"]["tflops_per_gpu"] / limit
    assert f"({ratio:.2f})" in text
    assert "--strategies " + strategies in text and "--device cpu" in text
    assert "torch CP (alltoall): torch context_parallel" in text
    # Variants get their own table, beside the base strategy they vary.
    variants = text[text.index("**variants"):]
    assert "| ring | ring [normal-priority NCCL] | all-gather KV (2 chunks) |" in variants
    png, md = tmp_path / "img" / "sp.png", tmp_path / "sp.md"
    assert report_main([str(out), "--png", str(png), "--md", str(md)]) == 0
    assert png.stat().st_size > 1000 and "![sp attention](img/sp.png)" in md.read_text()


def _torch_cp_context_patches_sdpa() -> dict:
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh

    from benchmarks.sp_peers import Strategy, torch_cp_strategy

    mesh = init_device_mesh("cpu", (1,))
    original = F.scaled_dot_product_attention
    strategy = torch_cp_strategy("torch_cp_allgather", "allgather", "default", True, mesh, "cpu", 64)
    with strategy.context():
        inside = F.scaled_dot_product_attention is not original
    try:
        Strategy("x", None, "contiguous", False)  # head_major positionally: refused
        positional = True
    except TypeError:
        positional = False
    return {"inside": inside, "after": F.scaled_dot_product_attention is original,
            "head_major": strategy.head_major, "positional": positional}


def test_the_torch_cp_strategy_runs_inside_context_parallel(dist_pool):
    # Its context was once passed positionally into head_major: every torch CP row of
    # sessions 2-4 ran plain SDPA on the local shard (the check failed with error ~20).
    res = dist_pool(1).run(_torch_cp_context_patches_sdpa)[0]
    assert res == {"inside": True, "after": True, "head_major": False, "positional": False}


def test_rounds_interleave_and_combine(tmp_path):
    """--rounds 3: every strategy measured three times per length, each round's time kept, the
    row's time the median of them; progress has one record per round."""
    out, progress = tmp_path / "sp.json", tmp_path / "progress.jsonl"
    assert main(["sp_attention", "--device", "cpu", "--nproc", "2", "--seqs", "32", "--heads", "4",
                 "--head-dim", "8", "--warmup", "0", "--iters", "1", "--check-seq", "0", "--rounds", "3",
                 "--strategies", "ulysses,sdpa_1gpu", "--progress", str(progress), "--out", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["results"]["rows"]}
    for row in rows.values():
        assert row["rounds"] == 3 and len(row["round_ms"]) == 3 and row["iters"] == 3
        assert row["time_ms"] == sorted(row["round_ms"])[1]
        assert row["min_ms"] <= min(row["round_ms"])
    kinds = [json.loads(line)["kind"] for line in progress.read_text().splitlines()]
    assert kinds.count("round") == 6 and kinds.count("row") == 2, kinds


def test_combine_rounds_keeps_the_worst_memory_and_any_oom():
    from benchmarks.sp_attention import combine_rounds

    ok = {"strategy": "ring", "seq": 8, "world": 2, "status": "ok", "iters": 2, "tflops_per_gpu": 10.0}
    rows = [{**ok, "time_ms": 2.0, "min_ms": 1.9, "peak_allocated_gib": 1.0},
            {**ok, "time_ms": 4.0, "min_ms": 3.0, "peak_allocated_gib": 3.0},
            {**ok, "time_ms": 3.0, "min_ms": 2.5, "peak_allocated_gib": 2.0}]
    row = combine_rounds(rows)
    assert row["time_ms"] == 3.0 and row["min_ms"] == 1.9 and row["peak_allocated_gib"] == 3.0
    assert abs(row["tflops_per_gpu"] - 10.0 * 2.0 / 3.0) < 1e-12  # rescaled to the median time
    assert combine_rounds([rows[0], {**ok, "status": "oom"}])["status"] == "oom"
    assert combine_rounds(rows[:1]) is rows[0]
