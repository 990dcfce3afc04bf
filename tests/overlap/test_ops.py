"""The three overlapped ops equal the unfused global computation, forward and backward.

Every rank builds the global X and W from one seed, runs the op on its shards in
every mode (plain, chunked with 2/3/plan-chosen uneven chunks, auto) and with both
reductions, and compares with the single-process product in float64. On CPU the
chunked schedule runs for real: gloo works in flight while the next chunk computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from commflow.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter
from commflow.overlap import reference as ref

FP32_TOL = 1e-5
"""Max |error| / max |reference| for fp32 inputs against the float64 product."""
BF16_TOL = 2e-2
"""Same for bf16: each bf16 value carries 2^-8 relative error, a few roundings deep."""

MODES = [("sequential", None), ("overlap", None), ("overlap", 2), ("overlap", 3), ("auto", None)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _global(shape_x, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape_x, generator=g, dtype=torch.float64)
    w = torch.randn(shape_x[-1], n, generator=g, dtype=torch.float64)
    return x, w, x.to(dtype), w.to(dtype)


def _reference_grads(X, W, dY):
    Xr, Wr = X.clone().requires_grad_(), W.clone().requires_grad_()
    torch.matmul(Xr, Wr).backward(dY)
    return Xr.grad, Wr.grad


def _op_errors(dtype_name: str) -> dict[str, float]:
    """Worst relative error per (op, case) over modes and reductions."""
    dtype = getattr(torch, dtype_name)
    r, world = dist.get_rank(), dist.get_world_size()
    errors: dict[str, float] = {}

    def note(key, *values):
        errors[key] = max([errors.get(key, 0.0), *values])

    # Row-parallel: x [..., K/R], w [K/R, N]. Leading dims: 2-D, and 3-D scattered on dim 1.
    for lead, dim in (((4 * world,), 0), ((3, 2 * world), 1), ((2 * world, 3), 0)):
        X64, W64, X, W = _global((*lead, 8 * world), 10, dtype)
        dY = torch.randn(*lead, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        gX, gW = _reference_grads(X64, W64, dY)
        gx_ref, gw_ref = ref.row_parallel_shards(gX, gW, world, r)
        for mode, chunks in MODES:
            for reduction in ("fp32", "backend"):
                x, w = ref.row_parallel_shards(X, W, world, r)
                x.requires_grad_(True)
                w.requires_grad_(True)
                y = matmul_reduce_scatter(x, w, scatter_dim=dim, mode=mode, n_chunks=chunks, reduction=reduction)
                y.backward(dY.chunk(world, dim)[r].to(dtype))
                key = f"rs lead={lead} dim={dim}"
                note(key + " fwd", _rel(y, ref.matmul_reduce_scatter_reference(X64, W64, world, r, dim)))
                note(key + " dx", _rel(x.grad, gx_ref))
                note(key + " dw", _rel(w.grad, gw_ref))

                x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
                y2 = matmul_all_reduce(x2, w2, mode=mode, n_chunks=chunks, reduction=reduction)
                y2.backward(dY.to(dtype))  # replicated output, replicated gradient
                key = f"ar lead={lead}"
                note(key + " fwd", _rel(y2, ref.matmul_all_reduce_reference(X64, W64)))
                note(key + " dx", _rel(x2.grad, gx_ref))
                note(key + " dw", _rel(w2.grad, gw_ref))

    # Column-parallel with a sequence-sharded input: x_shard [.., S/R, .., K], w [K, N/R].
    for lead, dim in (((4 * world,), 0), ((2, 3 * world), 1)):
        X64, W64, X, W = _global((*lead, 6), 4 * world, dtype, seed=2)
        dY = torch.randn(*lead, 4 * world, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        gX, gW = _reference_grads(X64, W64, dY)
        gxs_ref, gw_ref = ref.column_parallel_shards(gX, gW, world, r, dim)
        for mode, chunks in MODES:
            xs, w = ref.column_parallel_shards(X, W, world, r, dim)
            xs.requires_grad_(True)
            w.requires_grad_(True)
            y, x_full = all_gather_matmul(xs, w, gather_dim=dim, mode=mode, n_chunks=chunks, return_gathered=True)
            # Use the gathered input downstream too: its gradient must reach the shard.
            (y * dY.chunk(world, -1)[r].to(dtype)).sum().add((x_full * 0.5).sum()).backward()
            key = f"ag lead={lead} dim={dim}"
            note(key + " fwd", _rel(y, ref.all_gather_matmul_reference(X64, W64, world, r)))
            note(key + " gathered", _rel(x_full, X64))
            note(key + " dx", _rel(xs.grad, gxs_ref + 0.5 * world))
            note(key + " dw", _rel(w.grad, gw_ref))
    return errors


@pytest.mark.parametrize("world", [1, 2, 4])
def test_ops_equal_unfused_fp32(dist_pool, world):
    for errors in dist_pool(world).run(_op_errors, "float32"):
        worst = {k: v for k, v in errors.items() if v > FP32_TOL}
        assert not worst, worst


def test_ops_equal_unfused_bf16(dist_pool):
    for errors in dist_pool(2).run(_op_errors, "bfloat16"):
        worst = {k: v for k, v in errors.items() if v > BF16_TOL}
        assert not worst, worst


def _rounded_once() -> list[bool]:
    """The fp32 reduction sums the R bf16 partials in fp32 and rounds once: bitwise equal
    to summing every rank's partial locally that way."""
    r, world = dist.get_rank(), dist.get_world_size()
    _, _, X, W = _global((8 * world, 16 * world), 12, torch.bfloat16, seed=5)
    partials = [torch.mm(*ref.row_parallel_shards(X, W, world, s)) for s in range(world)]
    expected = torch.stack(partials).float().sum(0).to(torch.bfloat16)
    x, w = ref.row_parallel_shards(X, W, world, r)
    out = []
    for chunks in (None, 3):
        y = matmul_reduce_scatter(x, w, mode="overlap", n_chunks=chunks, reduction="fp32")
        out.append(torch.equal(y, expected.chunk(world, 0)[r]))
        y = matmul_all_reduce(x, w, mode="overlap", n_chunks=chunks, reduction="fp32")
        out.append(torch.equal(y, expected))
    return out


def test_fp32_reduction_rounds_once(dist_pool):
    for flags in dist_pool(4).run(_rounded_once):
        assert all(flags), flags


def _world_of_one_is_plain_matmul() -> bool:
    _, _, X, W = _global((6, 5), 7, torch.float32)
    expected = X @ W
    outs = [matmul_reduce_scatter(X, W, mode="overlap"), matmul_all_reduce(X, W, mode="overlap"),
            all_gather_matmul(X, W, mode="overlap")]
    return all(torch.equal(o, expected) for o in outs)


def test_world_of_one_equals_matmul_exactly(dist_pool):
    assert dist_pool(1).run(_world_of_one_is_plain_matmul) == [True]


def _resolved_once() -> dict:
    """A signature is checked and planned once; later calls run the stored path, with or
    without autograd, and give the same numbers; a new calibration forgets the entries."""
    from dataclasses import replace

    from commflow.overlap import functional, get_calibration, set_calibration

    r, world = dist.get_rank(), dist.get_world_size()
    X64, W64, X, W = _global((4 * world, 8 * world), 6, torch.float32, seed=7)
    x, w = ref.row_parallel_shards(X, W, world, r)
    functional.clear_caches()
    out = {}
    with torch.no_grad():
        y1 = matmul_reduce_scatter(x, w, mode="sequential")
    out["one entry"] = len(functional._ENTRIES) == 1
    y2 = matmul_reduce_scatter(x, w, mode="sequential")  # grad mode on, nothing requires grad
    out["still one"] = len(functional._ENTRIES) == 1
    xg = x.clone().requires_grad_(True)
    y3 = matmul_reduce_scatter(xg, w, mode="sequential")
    y3.sum().backward()
    gx = ref.row_parallel_shards(torch.ones(4 * world, 6, dtype=torch.float64) @ W64.t(), W64, world, r)[0]
    out["same numbers"] = bool(torch.equal(y1, y2) and torch.equal(y1, y3.detach()))
    out["grad"] = _rel(xg.grad, gx) < FP32_TOL
    out["correct"] = _rel(y1, ref.matmul_reduce_scatter_reference(X64, W64, world, r)) < FP32_TOL
    entries = len(functional._ENTRIES)  # the grad call is its own signature (requires_grad is not in it)
    cal = get_calibration(torch.device("cpu"), world)
    set_calibration(replace(cal, gemm_tflops=cal.gemm_tflops * 3), device_type="cpu")
    out["forgotten"] = entries >= 1 and len(functional._ENTRIES) == 0
    set_calibration(None, device_type="cpu")
    try:
        matmul_reduce_scatter(x[:1], w)  # bad input: refused, never stored
    except ValueError:
        out["bad input not stored"] = len(functional._ENTRIES) == 0
    try:
        matmul_all_reduce(x, w, n_chunks=[2])  # unhashable option: the check's error, not the lookup's
    except ValueError as e:
        out["unhashable option refused"] = "n_chunks" in str(e) and len(functional._ENTRIES) == 0
    # The ops build their lookup key inline; it must be _entry_key's, which the dispatch probe uses.
    xs, wc = ref.column_parallel_shards(X, W, world, r, 0)
    with torch.no_grad():
        matmul_reduce_scatter(x, w, mode="sequential")
        all_gather_matmul(xs, wc, mode="sequential")
        matmul_all_reduce(x, w, mode="sequential")
    keys = [functional._entry_key("rs", x, w, None, 0, "sequential", None, "fp32"),
            functional._entry_key("ag", xs, wc, None, 0, "sequential", None, "fp32"),
            functional._entry_key("ar", x, w, None, "sequential", None, "fp32")]
    out["inline keys are _entry_key's"] = all(k in functional._ENTRIES for k in keys) and len(functional._ENTRIES) == 3
    return out


def _graph_fallbacks() -> dict:
    """The plain path a graphed plan falls back to where its graphs cannot be kept
    (ops._SEQUENTIAL, eager_fallback="sequential"), in the form the schedules return."""
    from commflow.overlap import ops
    from commflow.overlap.validate import GroupInfo

    r, world = dist.get_rank(), dist.get_world_size()
    g = GroupInfo(group=None, rank=r, world_size=world)
    X64, W64, X, W = _global((4 * world, 8 * world), 6, torch.float32, seed=13)
    x, w = ref.row_parallel_shards(X, W, world, r)
    xs, wc = ref.column_parallel_shards(X, W, world, r, 0)
    out, full = ops._SEQUENTIAL["ag"](xs, wc, g, True)
    out2, none = ops._SEQUENTIAL["ag"](xs, wc, g, False)
    return {"rs": _rel(ops._SEQUENTIAL["rs"](x, w, g), ref.matmul_reduce_scatter_reference(X64, W64, world, r)),
            "ar": _rel(ops._SEQUENTIAL["ar"](x, w, g), ref.matmul_all_reduce_reference(X64, W64)),
            "ag": max(_rel(out, ref.all_gather_matmul_reference(X64, W64, world, r)), _rel(out2, out)),
            "ag gathered": _rel(full, X64), "ag not gathered": float(none is not None)}


def test_the_graph_fallback_is_the_plain_computation(dist_pool):
    for res in dist_pool(2).run(_graph_fallbacks):
        assert all(v < FP32_TOL for v in res.values()), res


def test_signature_is_resolved_once(dist_pool):
    for flags in dist_pool(2).run(_resolved_once):
        assert all(flags.values()) and len(flags) == 9, flags


def _plain_path_traced_and_untraced() -> dict:
    """The sequential path issues its collective straight to the process group, and goes
    through torch.distributed's functions while commflow.monitor traces them: the same
    numbers both ways, and under the tracer one record per call with the right op and size."""
    import commflow.dist as cdist
    from commflow import monitor
    from commflow.overlap import functional

    r, world = dist.get_rank(), dist.get_world_size()
    X64, W64, X, W = _global((4 * world, 8 * world), 6, torch.float32, seed=11)
    x, w = ref.row_parallel_shards(X, W, world, r)
    xs, wc = ref.column_parallel_shards(X, W, world, r, 0)
    functional.clear_caches()

    def calls():
        with torch.no_grad():
            return (matmul_reduce_scatter(x, w, mode="sequential"), matmul_all_reduce(x, w, mode="sequential"),
                    all_gather_matmul(xs, wc, mode="sequential"))

    plain = calls()
    tr = monitor.watch(infer_iterations=False)
    try:
        traced = calls()
        recs = [(rec.op, rec.nbytes) for rec in tr.records()]
    finally:
        monitor.unwatch()
    again = calls()  # untraced again once unwatch() put the functions back
    bytes_ = 4  # float32
    return {
        "same": all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(plain, traced, again)),
        "correct": _rel(plain[0], ref.matmul_reduce_scatter_reference(X64, W64, world, r)) < FP32_TOL
        and _rel(plain[1], ref.matmul_all_reduce_reference(X64, W64)) < FP32_TOL,
        "records": recs,
        # The op names of this torch's functions (reduce_scatter_single on torch >= 2.12,
        # reduce_scatter_tensor before); the sizes the tracer records (the input's bytes).
        "expected": [(cdist.reduce_scatter_tensor.__name__, 4 * world * 6 * bytes_),
                     ("all_reduce", 4 * world * 6 * bytes_),
                     (cdist.all_gather_tensor.__name__, xs.numel() * bytes_)],
    }


def test_plain_path_is_direct_yet_visible_to_the_monitor(dist_pool):
    for res in dist_pool(2).run(_plain_path_traced_and_untraced):
        assert res["same"] and res["correct"], res
        assert res["records"] == res["expected"], res
