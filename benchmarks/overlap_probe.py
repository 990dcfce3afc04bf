"""Probe for commflow.overlap on the GPU machine: which schedule wins, measured side by side.

Not a registered benchmark (``python -m benchmarks.overlap_probe --out DIR``): one run
answers the design questions of issue 8 in a single device call, for 2 and 4 ranks:

* host cost: microseconds of CPU per launched op (mm, copy, event, NCCL collective,
  symmetric-memory barrier), and per call of each variant;
* GEMM + reduce-scatter: sequential, torch's fused op, copy-engine push over symmetric
  memory (``symm``), GEMM stores straight into the peer (``symm_direct``), NCCL
  reduce-scatter per row group after one batched GEMM per group, with NCCL's CTA
  count capped or not (``nccl_rows<chunks>[_c<ctas>]``);
* GEMM + all-reduce: sequential, copy-engine reduce-scatter + all-gather with 1/2/4
  row groups (``symm_g<groups>``), NCCL all-reduce per row chunk (capped CTAs);
* all-gather + GEMM: sequential, torch's fused op, copy-engine pull (``symm``).

Every variant's output is compared with the sequential one (max abs diff / max abs).
Times: ``wall`` = CUDA events around ``reps`` calls after a cross-rank alignment (host
launch cost included when the GPU is faster than the host); ``dev`` = the same with a
sleep kernel queued first so the host runs ahead (pure device time); ``host`` = CPU
microseconds to launch one call. All are medians, slowest rank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [  # (name, K global, N, M)
    ("70b-attn", 8192, 8192, 16384),
    ("70b-attn", 8192, 8192, 4096),
    ("8b-attn", 4096, 4096, 16384),
    ("70b-fc2", 28672, 8192, 8192),
    ("8b-fc2", 14336, 4096, 2048),
    ("70b-attn", 8192, 8192, 512),
]


def _align(dev):
    import torch.distributed as dist

    flag = torch.zeros(1, device=dev)
    dist.all_reduce(flag)
    torch.cuda.synchronize(dev)


def _max(values: list[float], dev) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _time(fn, dev, reps=3, iters=8, warmup=2) -> dict:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(dev)
    wall, host, devt = [], [], []
    for _ in range(iters):
        _align(dev)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        host.append((time.perf_counter() - t0) / reps * 1e6)
        e.synchronize()
        wall.append(s.elapsed_time(e) / reps)
    host_us = statistics.median(host)
    # Every rank sleeps as long as the slowest host needs: with per-rank sleeps, a schedule
    # that synchronises the ranks (barrier, NCCL) would count a peer's longer sleep as its
    # own device time (the first 4xH100 probe's "dev" exceeded its wall time that way).
    host_max = _max([host_us], dev)[0]
    cycles = int(1.8e9 * (host_max * reps * 2e-6 + 5e-4))
    for _ in range(iters):
        _align(dev)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        devt.append(s.elapsed_time(e) / reps)
    w, d, h = _max([statistics.median(wall), statistics.median(devt), host_us], dev)
    return {"wall": w, "dev": d, "host_us": h}


def _host_costs(dev, info) -> dict:
    import torch.distributed as dist

    from commflow.dist import reduce_scatter_tensor
    from commflow.overlap import symm
    from commflow.overlap.validate import GroupInfo

    a = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    small = torch.empty(256 // info.world_size, 256, device=dev, dtype=torch.bfloat16)
    side = torch.cuda.Stream(device=dev)
    g = GroupInfo(group=None, rank=info.rank, world_size=info.world_size)
    ws = symm.workspace(g, "probe", dev)
    ws.ensure(2**20)
    ops = {
        "mm": lambda: torch.mm(a, a),
        "mm_out": lambda: torch.mm(a, a, out=b),
        "empty": lambda: torch.empty(256, 256, device=dev, dtype=torch.bfloat16),
        "copy_": lambda: b.copy_(a),
        "slice": lambda: a[16:32],
        "wait_stream": lambda: side.wait_stream(torch.cuda.current_stream()),
        "reduce_scatter": lambda: reduce_scatter_tensor(small, a),
        "all_reduce": lambda: dist.all_reduce(b),
        "symm_barrier": lambda: ws.barrier(),
    }
    # Copy-engine rates: pull 64 MiB from the next rank; push to it; pull from every peer at once.
    big = 64 << 20
    ws.ensure(big)
    src = ws.view((info.rank + 1) % info.world_size, (big // 2,), torch.bfloat16, 0)
    dst = torch.empty(big // 2, device=dev, dtype=torch.bfloat16)
    streams = [torch.cuda.Stream(device=dev) for _ in range(info.world_size - 1)]

    def pull_all():
        main = torch.cuda.current_stream()
        for i, st in enumerate(streams):
            st.wait_stream(main)
            with torch.cuda.stream(st):
                peer = (info.rank + 1 + i) % info.world_size
                dst[i * big // 8:(i + 1) * big // 8].copy_(ws.view(peer, (big // 8,), torch.bfloat16, 0))
        for st in streams:
            main.wait_stream(st)

    rates = {}
    for name, fn, nbytes in (("pull_next", lambda: dst.copy_(src), big),
                             ("push_next", lambda: src.copy_(dst), big),
                             ("pull_all_streams", pull_all, big // 8 * (info.world_size - 1))):
        t = _time(fn, dev, reps=3, iters=5)["dev"]
        rates[f"{name}_gbps"] = nbytes / (t * 1e-3) / 1e9
    out = {}
    for name, fn in ops.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize(dev)
        _align(dev)
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e6
        torch.cuda.synchronize(dev)
    return {**dict(zip(out, _max(list(out.values()), dev))), **rates}


def _host_profile(fn, calls: int = 20, top: int = 20) -> list[dict]:
    """CPU time per call of each op ``fn`` issues (torch.profiler, CPU activity only):
    where a schedule's host microseconds go, op by op."""
    for _ in range(3):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    rows = [{"name": e.key[:100], "self_cpu_us_per_call": e.self_cpu_time_total / calls,
             "count_per_call": e.count / calls} for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self_cpu_us_per_call"])
    return rows[:top]


def _nccl_group(world: int, max_ctas: int | None):
    import torch.distributed as dist

    opts = dist.ProcessGroupNCCL.Options()
    if max_ctas is not None:
        opts.config.max_ctas = max_ctas
        opts.config.min_ctas = 1
    return dist.new_group(list(range(world)), backend="nccl", pg_options=opts)


def _variants(op, x, w, info, groups, side):
    """name -> callable for one op and its inputs."""
    import torch.distributed as dist

    from commflow.dist import all_gather_tensor, reduce_scatter_tensor
    from commflow.overlap import all_gather_matmul, matmul_all_reduce, matmul_reduce_scatter, symm
    from commflow.overlap.validate import GroupInfo

    R, rank, dev = info.world_size, info.rank, info.device
    g = GroupInfo(group=None, rank=rank, world_size=R)
    name = dist.group.WORLD.group_name
    calls = {}
    if op == "rs":
        m, kl, n = x.shape[0], x.shape[1], w.shape[1]
        part = torch.mm(x, w)  # real values: never time on garbage

        def seq():
            out = torch.empty(m // R, n, device=dev, dtype=x.dtype)
            reduce_scatter_tensor(out, torch.mm(x, w))
            return out

        calls["gemm"] = lambda: torch.mm(x, w, out=part)
        calls["comm"] = lambda: reduce_scatter_tensor(torch.empty(m // R, n, device=dev, dtype=x.dtype), part)
        calls["seq"] = seq
        calls["torch_fused"] = lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(x, w, "sum", 0, name)
        calls["symm"] = lambda: symm.matmul_reduce_scatter(x, w, g)
        calls["symm_g2"] = lambda: symm.matmul_reduce_scatter(x, w, g, _split(m // R, 2))
        calls["symm_direct"] = lambda: symm.matmul_reduce_scatter(x, w, g, direct=True)
        calls["auto"] = lambda: matmul_reduce_scatter(x, w)

        def nccl_rows(chunks, pg):
            mr = m // R
            mrg = mr // chunks
            xv = x.view(R, chunks, mrg, kl)
            wx = w.expand(R, kl, n)
            out = torch.empty(mr, n, device=dev, dtype=x.dtype)
            main = torch.cuda.current_stream(dev)
            keep = []
            for c in range(chunks):
                p = torch.bmm(xv[:, c], wx)
                keep.append(p)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    reduce_scatter_tensor(out[c * mrg:(c + 1) * mrg], p.view(R * mrg, n), group=pg)
            main.wait_stream(side)
            return out

        for key, pg in groups.items():
            for chunks in (2, 4):
                if m // R % chunks == 0:
                    calls[f"nccl_rows{chunks}{key}"] = (lambda c=chunks, pg=pg: nccl_rows(c, pg))
    elif op == "ar":
        m, n = x.shape[0], w.shape[1]
        part = torch.mm(x, w)

        def seq():
            y = torch.mm(x, w)
            dist.all_reduce(y)
            return y

        calls["gemm"] = lambda: torch.mm(x, w, out=part)
        calls["comm"] = lambda: dist.all_reduce(part)
        calls["seq"] = seq
        for gr in (1, 2, 4):
            calls[f"symm_g{gr}"] = (lambda gr=gr: symm.matmul_all_reduce(x, w, g, _split(m // R, gr)))
        calls["symm_g2_direct"] = lambda: symm.matmul_all_reduce(x, w, g, _split(m // R, 2), direct=True)
        calls["auto"] = lambda: matmul_all_reduce(x, w)

        def nccl_chunks(chunks, pg):
            out = torch.empty(m, n, device=dev, dtype=x.dtype)
            return gemm_chunks_reduced(x, w, out, chunks, side, lambda part: dist.all_reduce(part, group=pg))

        for key, pg in groups.items():
            for chunks in (2, 4):
                calls[f"nccl_rows{chunks}{key}"] = (lambda c=chunks, pg=pg: nccl_chunks(c, pg))
    else:  # ag: x is the shard [M/R, K], w [K, N/R]
        ms, k, n = x.shape[0], x.shape[1], w.shape[1]
        full = torch.cat([x] * R)

        def seq():
            f = torch.empty(ms * R, k, device=dev, dtype=x.dtype)
            all_gather_tensor(f, x)
            return torch.mm(f, w)

        calls["gemm"] = lambda: torch.mm(full, w)
        calls["comm"] = lambda: all_gather_tensor(full, x)
        calls["seq"] = seq
        calls["torch_fused"] = lambda: torch.ops.symm_mem.fused_all_gather_matmul(x, [w], 0, name)[1][0]
        calls["symm"] = lambda: symm.all_gather_matmul(x, w, g)[0]
        calls["symm_g2"] = lambda: symm.all_gather_matmul(x, w, g, _split(ms, 2))[0]
        calls["auto"] = lambda: all_gather_matmul(x, w)
    return calls


def gemm_chunks_reduced(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, chunks: int, side, reduce) -> torch.Tensor:
    """``out = x @ w`` in ``chunks`` row chunks, ``reduce(chunk)`` of each on the ``side`` stream as
    soon as the chunk exists (the NCCL-per-chunk pipeline the probes compare against)."""
    main = torch.cuda.current_stream(x.device)
    step = x.shape[0] // chunks
    for c in range(chunks):
        part = out[c * step:(c + 1) * step]
        torch.mm(x[c * step:(c + 1) * step], w, out=part)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            reduce(part)
    main.wait_stream(side)
    return out


def _split(total: int, parts: int) -> tuple[int, ...]:
    base = total // parts
    return (*[base] * (parts - 1), total - base * (parts - 1))


def _worker(args_dict: dict) -> dict:
    os.environ.update(ENV)
    import torch.distributed as dist

    from commflow.dist import init_distributed

    args = argparse.Namespace(**args_dict)
    info = init_distributed(device="cuda")
    dev, R, rank = info.device, info.world_size, info.rank
    t_start = time.perf_counter()
    res = {"world_size": R, "host_costs": {}, "host_profiles": {}, "rows": [], "errors": []}
    try:
        res["host_costs"] = _host_costs(dev, info)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"host_costs: {type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}")
    groups = {"": dist.group.WORLD}
    for ctas in (8, 16):
        try:
            groups[f"_c{ctas}"] = _nccl_group(R, ctas)
        except Exception as e:  # noqa: BLE001
            res["errors"].append(f"nccl group max_ctas={ctas}: {type(e).__name__}: {e}")
    side = torch.cuda.Stream(device=dev, priority=torch.cuda.Stream.priority_range()[1])
    try:
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(dist.group.WORLD.group_name)
    except Exception as e:  # noqa: BLE001
        res["errors"].append(f"symm_mem: {type(e).__name__}: {e}")
    dtype = torch.bfloat16
    for op in args.ops.split(","):
        for shape, big_k, n_full, m in SHAPES:
            if time.perf_counter() - t_start > args.budget_s:
                res["errors"].append(f"budget: skipped {op} {shape} M={m}")
                continue
            gen = torch.Generator(device=dev).manual_seed(100 + rank)
            if op in ("rs", "ar"):
                x = torch.randn(m, big_k // R, device=dev, generator=gen).to(dtype)
                w = (torch.randn(big_k // R, n_full, device=dev, generator=gen) / math.sqrt(big_k)).to(dtype)
            else:
                x = torch.randn(m // R, n_full, device=dev, generator=gen).to(dtype)
                w = (torch.randn(n_full, big_k // R, device=dev, generator=gen) / math.sqrt(n_full)).to(dtype)
            row = {"op": op, "shape": shape, "M": m, "times": {}, "rel_diff": {}, "errors": {}}
            calls = _variants(op, x, w, info, groups, side)
            ref = calls["seq"]().float()
            for name, fn in calls.items():
                try:
                    if name not in ("gemm", "comm", "seq"):
                        got = fn()
                        diff = ((got.float() - ref).abs().max() / ref.abs().max()).item()
                        row["rel_diff"][name] = _max([diff], dev)[0]
                    row["times"][name] = _time(fn, dev, reps=args.reps, iters=args.iters)
                    if name in ("symm", "symm_g1", "seq") and m <= 4096 and f"{op}/{name}" not in res["host_profiles"]:
                        res["host_profiles"][f"{op}/{name}"] = {"shape": shape, "M": m, "ops": _host_profile(fn)}
                except Exception as e:  # noqa: BLE001
                    row["errors"][name] = f"{type(e).__name__}: {e}"[:300]
                    res["errors"].append(f"{op} {shape} {m} {name}: {traceback.format_exc()[-1500:]}")
                    torch.cuda.synchronize(dev)
            res["rows"].append(row)
            if rank == 0:
                t = row["times"]
                seq = t.get("seq", {}).get("dev")
                print(f"[{R}] {op} {shape} M={m} " + " ".join(
                    f"{k}={v['dev']:.3f}/{v['wall']:.3f}/{v['host_us']:.0f}us"
                    + (f"({seq / v['dev']:.2f}x)" if seq and k not in ("gemm", "comm") else "")
                    for k, v in t.items()) + (f" ERR={list(row['errors'])}" if row["errors"] else "")
                    + " diff=" + " ".join(f"{k}:{v:.1e}" for k, v in row["rel_diff"].items()), flush=True)
            del x, w, calls
            torch.cuda.empty_cache()
    res["elapsed_s"] = time.perf_counter() - t_start
    dist.barrier()
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overlap_probe")
    p.add_argument("--nproc", default="2,4")
    p.add_argument("--ops", default="rs,ar,ag")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--budget-s", type=float, default=100.0, help="per world size")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    from commflow.dist import spawn

    results = []
    for world in (int(v) for v in args.nproc.split(",")):
        if world > torch.cuda.device_count():
            continue
        t0 = time.perf_counter()
        try:
            res = spawn(_worker, world, vars(args), backend=None, init=False, timeout_s=args.budget_s + 120, env=ENV)[0]
        except Exception as e:  # noqa: BLE001
            res = {"world_size": world, "failed": f"{type(e).__name__}: {e}"[-3000:]}
        res["spawn_s"] = time.perf_counter() - t0
        results.append(res)
        with open(os.path.join(args.out, "overlap_probe.json"), "w") as f:
            json.dump(results, f, indent=1)
        print(f"[{world}] host costs (us): {json.dumps(res.get('host_costs'))}", flush=True)
        for key, prof in res.get("host_profiles", {}).items():
            print(f"[{world}] host profile {key} ({prof['shape']} M={prof['M']}): " + ", ".join(
                f"{o['name']} {o['self_cpu_us_per_call']:.0f}us x{o['count_per_call']:.0f}" for o in prof["ops"][:10]),
                flush=True)
        for err in res.get("errors", []):
            print(f"[{world}] ERROR {err[:400]}", flush=True)
        if "failed" in res:
            print(f"[{world}] FAILED {res['failed'][-1500:]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
