"""GPU (NCCL) checks: the stream-ordered schedules equal the reference, stay correct when
the allocator reuses freed memory right away, and the layers and calibration work.

One spawn per world size runs every check (NCCL start-up costs seconds); the parent
asserts. Run on the GPU machine:
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 python -m pytest tests/overlap -m gpu -q
"""

from __future__ import annotations

import os

import torch

from commflow.dist import spawn

try:
    import pytest
except ImportError:  # the GPU machine may lack pytest: `python -m tests.overlap.test_gpu` still runs
    pytest = None

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
FP32_TOL = 1e-4
"""fp32 on GPU against float64 (cuBLAS may split K; TF32 stays off)."""
BF16_TOL = 2e-2
"""bf16 against float64: inputs and partials rounded to bf16."""
LAYER_TOL = 3e-2
"""bf16 two-layer MLP against the fp32 nn.Linear one (two GEMMs and a GELU deep)."""


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _gpu_checks(tmpdir: str) -> dict:
    import torch.distributed as dist
    from torch import nn

    from commflow.dist import init_distributed
    from commflow.overlap import (
        ColumnParallelLinear,
        RowParallelLinear,
        all_gather_matmul,
        calibrate,
        matmul_all_reduce,
        matmul_reduce_scatter,
        set_calibration,
    )
    from commflow.overlap import reference as ref

    os.environ.update(ENV)
    os.environ["COMMFLOW_OVERLAP_CALIBRATION_DIR"] = tmpdir
    info = init_distributed(device="cuda")
    dev, r, world = info.device, info.rank, info.world_size
    out: dict = {"errors": {}}
    errs = out["errors"]

    def note(key, *values):
        values = [errs.get(key, 0.0), *values]
        errs[key] = float("nan") if any(v != v for v in values) else max(values)  # max() would drop a NaN

    gen = torch.Generator(device=dev).manual_seed(0)
    m, k, n = 1024 * world, 512 * world, 1536
    X64 = torch.randn(m, k, device=dev, dtype=torch.float64, generator=gen)
    W64 = torch.randn(k, n, device=dev, dtype=torch.float64, generator=gen)
    dY = torch.randn(m, n, device=dev, dtype=torch.float64, generator=gen)
    Xr, Wr = X64.clone().requires_grad_(), W64.clone().requires_grad_()
    (Xr @ Wr).backward(dY)
    for dtype, tol_key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        X, W = X64.to(dtype), W64.to(dtype)
        for mode, chunks in (("sequential", None), ("overlap", None), ("overlap", 3), ("auto", None)):
            for reduction in ("fp32", "backend"):
                x, w = ref.row_parallel_shards(X, W, world, r)
                x.requires_grad_(True)
                w.requires_grad_(True)
                y = matmul_reduce_scatter(x, w, mode=mode, n_chunks=chunks, reduction=reduction)
                y.backward(dY.chunk(world, 0)[r].to(dtype))
                gx, gw = ref.row_parallel_shards(Xr.grad, Wr.grad, world, r)
                note(f"{tol_key} rs fwd", _rel(y, (X64 @ W64).chunk(world, 0)[r]))
                note(f"{tol_key} rs dx", _rel(x.grad, gx))
                note(f"{tol_key} rs dw", _rel(w.grad, gw))
                y = matmul_all_reduce(x.detach(), w.detach(), mode=mode, n_chunks=chunks, reduction=reduction)
                note(f"{tol_key} ar fwd", _rel(y, X64 @ W64))
            xs, wc = ref.column_parallel_shards(X, W, world, r)
            xs.requires_grad_(True)
            wc.requires_grad_(True)
            y = all_gather_matmul(xs, wc, mode=mode, n_chunks=chunks)
            y.backward(dY.chunk(world, 1)[r].to(dtype))
            gxs, gwc = ref.column_parallel_shards(Xr.grad, Wr.grad, world, r)
            note(f"{tol_key} ag fwd", _rel(y, X64 @ W64.chunk(world, 1)[r]))
            note(f"{tol_key} ag dx", _rel(xs.grad, gxs))
            note(f"{tol_key} ag dw", _rel(wc.grad, gwc))

    # Allocator reuse: drop inputs right after each call and scribble over fresh blocks
    # of the same size, while the side stream may still be reading; results must hold.
    X, W = X64.bfloat16(), W64.bfloat16()
    expected = (X64 @ W64).chunk(world, 0)[r]
    for i in range(10):
        x, w = ref.row_parallel_shards(X, W, world, r)
        y = matmul_reduce_scatter(x, w, mode="overlap", n_chunks=4)
        z = matmul_all_reduce(x, w, mode="overlap", n_chunks=4)
        del x, w
        junk = [torch.full((m, k // world), float("nan"), device=dev, dtype=torch.bfloat16) for _ in range(4)]
        y = y * 1.0  # consumed on the caller's stream right away
        note("reuse rs", _rel(y, expected))
        note("reuse ar", _rel(z, X64 @ W64))
        del junk
        if i == 0:
            first = y.clone()
    out["deterministic"] = bool(torch.equal(first, y))

    # Copy-engine schedules directly: every group split, GEMM pushes or direct stores,
    # workspaces poisoned with NaN first (every element read must have been written),
    # a smaller shape first so the workspace grows between calls, then calls back to
    # back with no sync between them (buffer reuse across calls and ops).
    from commflow.overlap import symm
    from commflow.overlap.validate import GroupInfo

    g = GroupInfo(group=None, rank=r, world_size=world)
    x, w = ref.row_parallel_shards(X, W, world, r)
    xs, wc = ref.column_parallel_shards(X, W, world, r)
    exp_rs, exp_ar, exp_ag = (X64 @ W64).chunk(world, 0)[r], X64 @ W64, X64 @ W64.chunk(world, 1)[r]

    def poison():
        torch.cuda.synchronize()
        dist.barrier()
        for ws in symm._WORKSPACES.values():
            if ws.tensor is not None:
                ws.tensor.fill_(255)  # 0xFFFF is a bf16 NaN
        torch.cuda.synchronize()
        dist.barrier()

    half = symm.matmul_reduce_scatter(x[: m // 2].contiguous(), w, g)
    note("symm rs grow", _rel(half, (X64[: m // 2] @ W64).chunk(world, 0)[r]))
    for sizes in (None, (512, 512), (384, 320, 320)):  # rows per destination block: m / world = 1024
        for direct in (False, True):
            poison()
            note("symm rs", _rel(symm.matmul_reduce_scatter(x, w, g, sizes, direct=direct), exp_rs))
            poison()
            note("symm ar", _rel(symm.matmul_all_reduce(x, w, g, sizes, direct=direct), exp_ar))
        poison()
        o, full = symm.all_gather_matmul(xs, wc, g, sizes, return_gathered=True)
        note("symm ag", _rel(o, exp_ag))
        note("symm ag gathered", _rel(full, X))
    outs = [(symm.matmul_reduce_scatter(x, w, g, (256,) * 4), symm.all_gather_matmul(xs, wc, g)[0],
             symm.matmul_all_reduce(x, w, g, (512, 512)), symm.matmul_reduce_scatter(x, w, g)) for _ in range(5)]
    for a, b, c, d in outs:
        note("symm back-to-back", _rel(a, exp_rs), _rel(b, exp_ag), _rel(c, exp_ar), _rel(d, exp_rs))
    out["symm workspaces"] = symm.workspace_bytes()

    # The same schedules replayed as CUDA graphs (graphs.py): captured on the first call,
    # replayed with fresh inputs after, odd and even step counts (one graph or two
    # alternating), interleaved with eager calls on the same workspaces.
    from dataclasses import replace as _replace

    from commflow.overlap import ops
    from commflow.overlap.functional import resolve_plan

    for sizes in ((512, 512), (1024,), (384, 320, 320)):
        p_rs = _replace(resolve_plan("matmul_reduce_scatter", m, n, k // world, g, x, "overlap", None, "fp32"),
                        chunk_sizes=sizes, n_chunks=len(sizes), graphed=True)
        p_ar = _replace(resolve_plan("matmul_all_reduce", m, n, k // world, g, x, "overlap", None, "fp32"),
                        chunk_sizes=sizes, n_chunks=len(sizes), graphed=True)
        p_ag = _replace(resolve_plan("all_gather_matmul", m, n // world, k, g, xs, "overlap", None, "fp32"),
                        chunk_sizes=sizes, n_chunks=len(sizes), graphed=True)
        for i in range(4):
            scale = float(i + 1)  # fresh inputs every call: the replay must copy them in
            note("graph rs", _rel(ops.matmul_reduce_scatter_forward(x * scale, w, g, 0, p_rs), exp_rs * scale))
            note("graph ar", _rel(ops.matmul_all_reduce_forward(x * scale, w, g, p_ar), exp_ar * scale))
            o, full = ops.all_gather_matmul_forward(xs * scale, wc, g, 0, p_ag, True)
            note("graph ag", _rel(o, exp_ag * scale))
            note("graph ag gathered", _rel(full, X * scale))
            note("graph then eager rs", _rel(symm.matmul_reduce_scatter(x, w, g, sizes), exp_rs))
    # Layers of one shape: a graph per weight, all of one workspace in one memory pool, all of
    # one kind with one set of static inputs and output buffers (graphs.py). Every output of a
    # round is kept while the other layers' graphs replay over the shared memory, then checked.
    layer_scales = (1.0, -2.0, 0.5)
    for sizes in ((1024,), (512, 512)):
        plans = {op: _replace(resolve_plan(op, m, n if op != "all_gather_matmul" else n // world,
                                           k // world if op != "all_gather_matmul" else k, g,
                                           x if op != "all_gather_matmul" else xs, "overlap", None, "fp32"),
                              chunk_sizes=sizes, n_chunks=len(sizes), graphed=True)
                 for op in ("matmul_reduce_scatter", "matmul_all_reduce", "all_gather_matmul")}
        weights = [(w * s, wc * s) for s in layer_scales]  # new tensors: one graph each
        for round_ in range(3):
            kept = []
            for (wl, wcl), s in zip(weights, layer_scales):
                xi = float(round_ + 1)
                kept.append((s, xi,
                             ops.matmul_reduce_scatter_forward(x * xi, wl, g, 0, plans["matmul_reduce_scatter"]),
                             ops.matmul_all_reduce_forward(x * xi, wl, g, plans["matmul_all_reduce"]),
                             ops.all_gather_matmul_forward(xs * xi, wcl, g, 0, plans["all_gather_matmul"], True)))
            for s, xi, y_rs, y_ar, (y_ag, full) in kept:
                note("graph layers rs", _rel(y_rs, exp_rs * (s * xi)))
                note("graph layers ar", _rel(y_ar, exp_ar * (s * xi)))
                note("graph layers ag", _rel(y_ag, exp_ag * (s * xi)))
                note("graph layers ag gathered", _rel(full, X * xi))
    from commflow.overlap import graphs as _graphs

    out["graphs captured"] = sum(v is not None for v in _graphs._GRAPHS.values())
    out["graph pools"] = len(_graphs._POOLS)

    # Layers, bf16 sequence-parallel MLP against fp32 nn.Linear.
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(512, 1024 * world, device=dev), nn.Linear(1024 * world, 512, device=dev)
    x_full = torch.randn(2, 256 * world, 512, device=dev)
    y_ref = fc2(torch.nn.functional.gelu(fc1(x_full)))
    for sp in (False, True):
        col = ColumnParallelLinear.from_linear(fc1, sequence_parallel=sp, overlap="overlap").bfloat16()
        row = RowParallelLinear.from_linear(fc2, sequence_parallel=sp, overlap="overlap").bfloat16()
        x = (x_full.chunk(world, 1)[r] if sp else x_full).bfloat16().requires_grad_(True)
        y = row(torch.nn.functional.gelu(col(x)))
        y.float().sum().backward()
        note(f"layers sp={sp}", _rel(y, y_ref.chunk(world, 1)[r] if sp else y_ref))
        out[f"layers sp={sp} grads finite"] = bool(torch.isfinite(x.grad).all() and
                                                   torch.isfinite(col.weight.grad).all())

    cal = calibrate()
    set_calibration(None, device_type="cuda")
    out["calibration"] = cal.to_json()
    dist.barrier()
    return out


def _world_sizes():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [w for w in (2, 4) if w <= n] or [2]


def check_gpu(world: int, tmpdir: str) -> None:
    """Every check on ``world`` GPUs; raises AssertionError naming what failed."""
    res = spawn(_gpu_checks, world, tmpdir, backend=None, init=False, env=ENV, timeout_s=600)
    for rank_out in res:
        errs = rank_out["errors"]
        bad = {k: v for k, v in errs.items()
               if not v <= (FP32_TOL if k.startswith("fp32") else LAYER_TOL if k.startswith("layers") else BF16_TOL)}
        assert not bad, bad
        assert rank_out["deterministic"]
        assert all(v for key, v in rank_out.items() if key.endswith("grads finite"))
        assert rank_out["graphs captured"] > 0, "every CUDA graph capture fell back to eager"
        assert rank_out["graph pools"] == 3, "one shared memory pool per workspace (rs, ar, ag)"
    cal = res[0]["calibration"]
    assert 100 < cal["gemm_tflops"] < 2000, cal
    assert all(10 < c["busbw_gbps"] < 2000 for c in cal["comm"].values()), cal["comm"]
    assert res[0]["calibration"] == res[-1]["calibration"]


if pytest is not None:

    @pytest.mark.gpu
    @pytest.mark.parametrize("world", _world_sizes())
    def test_gpu_ops_layers_calibration(world, tmp_path):
        if torch.cuda.device_count() < world:
            pytest.skip(f"needs {world} GPUs")
        check_gpu(world, str(tmp_path))


if __name__ == "__main__":  # without pytest: python -m tests.overlap.test_gpu
    import sys
    import tempfile

    failed = 0
    for world_size in [w for w in _world_sizes() if w <= torch.cuda.device_count()]:
        try:
            with tempfile.TemporaryDirectory() as d:
                check_gpu(world_size, d)
            print(f"PASS gpu overlap checks on {world_size} GPUs")
        except Exception as e:  # noqa: BLE001 - report and go on to the next world size
            failed += 1
            print(f"FAIL gpu overlap checks on {world_size} GPUs: {type(e).__name__}: {e}")
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing run")
    sys.exit(1 if failed else 0)
