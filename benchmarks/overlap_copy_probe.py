"""Probe: how fast the copy-engine transfers of the symmetric-memory schedules run, and where
the time of one GEMM + all-reduce goes.

Not a registered benchmark (``python -m benchmarks.overlap_copy_probe --nproc 4 [--out FILE]``).
Session 10's overlap runs had the copy-engine GEMM + all-reduce at 0.84 ms eager (0.92 ms
graphed) on Llama-3 8B attention-out M=16384 over 4 H100, where GEMM time plus one pass of
pushes, the fp32 sum and one pass of pulls at the calibrated copy rate add up to ~0.6 ms,
and NCCL's all-reduce alone takes 0.66 ms. Two questions, every rank at once:

* ``transfers``: ``bytes`` per peer moved by copy engine to (``push``) or from (``pull``)
  every peer, the R - 1 copies issued one after another on one stream (``serial``, what
  the schedules do) or on one stream per peer (``parallel``); beside NCCL's all-to-all of
  the same bytes. GB/s per rank = (R - 1) * bytes / time (the symmetric-memory barrier in
  front of each sample is timed alone and taken off).
* ``cases``: the copy-engine GEMM + all-reduce / reduce-scatter of ``CASES`` (row groups,
  eager or graphed), each timed beside sequential (mm, then
  NCCL) and traced once on rank 0 (each GPU kernel and copy: start, duration, stream).
  Graphed cases end outside the graph as the library's do (``split``, symm.splits); the
  session-11 file ``overlap_copy_probe_4xH100_20261127-s11.json`` predates that (its graphed
  traces end with the copy out of the graph's buffer) and also timed the all-reduce's sum in
  two pieces, each pulled while the next was summed (``pieces``, since removed: 0.840 vs
  0.818 ms eager at 8B attn-out M=16384, 1.636 vs 1.602 ms at 70B; two graphed cases 1-3 %
  faster, within the spread). ``-s11-onestream.json`` (``cccfdfa``) timed an all-reduce with
  every transfer of a call on one copy stream (pushes of group g, barrier, pulls of group
  g - 1, ...; since removed): correct, slower on every shape but 8B attn-out M=16384, where
  that run's one-group eager case was unusually slow (70B attn-out M=16384: 1.85 ms graphed
  with 2 groups vs 1.67 ms for one group eager; its trace shows the link idle while
  the GEMMs of the next group run and the pulls of both groups at the end).
  ``-s12-defer.json`` (``b3462a5``, reverted) timed graphed all-reduces of 2 and 4 row groups with
  each group's pulls issued after the next group's pushes instead of before them (the copy engine
  runs peer copies one at a time in issue order): 1 % or less apart on 70B attention-out with 2
  groups (1.83 ms both) and 8B FC2 (1.20 vs 1.19 ms), 70B FC2 4 groups 3.46 vs 3.50 ms, 70B
  attention-out 4 groups 2.05 vs 2.14 ms; one group stayed best there (1.64 ms); dropped.

Medians over ``--rounds`` samples, slowest rank.
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SIZES_MB = (8, 32)
_8B, _70B = ("llama3-8b-attn-out", 4096, 4096), ("llama3-70b-attn-out", 8192, 8192)
CASES = [  # (shape, K, N, M, op, row groups, graphed)
    (*_8B, 16384, "ar", 1, False), (*_8B, 16384, "ar", 1, True), (*_8B, 16384, "ar", 2, True),
    (*_70B, 16384, "ar", 1, False), (*_70B, 16384, "ar", 2, False), (*_70B, 16384, "ar", 1, True),
    (*_8B, 8192, "ar", 1, True), (*_8B, 8192, "rs", 1, True), (*_8B, 8192, "rs", 2, True), (*_8B, 8192, "rs", 1, False),
]


def _transfer_row(g, dev, ws, streams, mb: int, rounds: int) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks, time_ms

    world, rank = g.world_size, g.rank
    peers = [(rank + s) % world for s in range(1, world)]
    main = torch.cuda.current_stream(dev)
    n = (mb << 20) // 2
    ws.ensure(world * n * 2)
    local = torch.randn(world * n, device=dev).to(torch.bfloat16)

    def slot(owner: int, j: int):
        return ws.view(owner, (n,), torch.bfloat16, j * n)

    def run(kind: str, parallel: bool):
        ws.barrier()
        for i, p in enumerate(peers):
            s = streams[i] if parallel else streams[0]
            s.wait_stream(main)
            with torch.cuda.stream(s):
                if kind == "push":  # this rank's piece for p into slot `rank` of p's buffer
                    slot(p, rank).copy_(local[p * n:(p + 1) * n])
                else:  # p's piece for this rank, from slot `rank` of p's buffer
                    local[p * n:(p + 1) * n].copy_(slot(p, rank))
        for s in streams:
            main.wait_stream(s)

    send = torch.randn(world * n, device=dev).to(torch.bfloat16)
    recv = torch.empty_like(send)
    fns = {"barrier": ws.barrier,
           "push_serial": lambda: run("push", False), "push_parallel": lambda: run("push", True),
           "pull_serial": lambda: run("pull", False), "pull_parallel": lambda: run("pull", True),
           "nccl_all_to_all": lambda: dist.all_to_all_single(recv, send)}
    for f in fns.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize(dev)
    row = {"mb_per_peer": mb}
    for name, f in fns.items():
        dist.barrier()
        torch.cuda.synchronize(dev)
        row[name + "_ms"] = max_over_ranks(time_ms(f, warmup=0, iters=rounds, device=dev)["median_ms"])
    moved = (world - 1) * (mb << 20)
    for name in fns:
        if name != "barrier":
            t = row[name + "_ms"] - (row["barrier_ms"] if name != "nccl_all_to_all" else 0.0)
            row[name + "_gbps"] = moved / max(t, 1e-6) / 1e6
    return row


def _transfers(g, dev, rounds: int) -> list[dict]:
    from commflow.overlap import symm

    streams = [torch.cuda.Stream(dev, priority=-1) for _ in range(g.world_size - 1)]
    ws = symm.workspace(g, "copy_probe", dev)
    return [_transfer_row(g, dev, ws, streams, mb, rounds) for mb in SIZES_MB]


def _timeline(g, dev, rounds: int) -> list[dict]:
    """Each case of ``CASES`` timed beside sequential (mm, then NCCL), and a profiler trace of
    its second call on rank 0."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.overlap import symm_call
    from benchmarks.timing import max_over_ranks
    from commflow.overlap.autotune import sample_ms

    world = g.world_size
    out = []
    for shape, k, n, m, op, groups, graphed in CASES:
        gen = torch.Generator(device=dev).manual_seed(5 + g.rank)
        x = torch.randn(m, k // world, device=dev, generator=gen).to(torch.bfloat16)
        w = (torch.randn(k // world, n, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
        call = symm_call(op, x, w, (m, n, k // world), groups=groups, graphed=graphed)

        def sequential(x=x, w=w, op=op):
            y = torch.mm(x, w)
            if op == "ar":
                dist.all_reduce(y)
                return y
            o = torch.empty(y.shape[0] // world, y.shape[1], device=dev, dtype=y.dtype)
            dist.reduce_scatter_tensor(o, y)
            return o

        with torch.no_grad():
            for _ in range(3):
                call()
                sequential()
            torch.cuda.synchronize(dev)
            (t_call, _), (t_seq, _) = sample_ms([call, sequential], iters=rounds, calls=4, device=dev)
            x.neg_()  # checked on other values than the warm-ups saw (a stale replay shows)
            ref = sequential().float()
            diff = ((call().float() - ref).abs().max() / ref.abs().max()).item()
            x.neg_()
            dist.barrier()
            torch.cuda.synchronize(dev)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    call()
                torch.cuda.synchronize(dev)
        row = {"shape": shape, "K": k, "N": n, "M": m, "op": op, "groups": groups, "graphed": graphed,
               "ms": max_over_ranks(t_call), "sequential_ms": max_over_ranks(t_seq), "rel_diff": max_over_ranks(diff)}
        row["speedup"] = row["sequential_ms"] / row["ms"]
        if g.rank == 0:
            print(json.dumps({k2: v for k2, v in row.items() if k2 not in ("K", "N")}), flush=True)
            evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                         key=lambda e: e.time_range.start)
            evs = evs[len(evs) // 2:]  # the second call
            t0 = evs[0].time_range.start if evs else 0
            row["events"] = [
                {"start_us": round(e.time_range.start - t0, 1), "us": round(e.time_range.end - e.time_range.start, 1),
                 "stream": getattr(e, "device_resource_id", None), "name": e.name[:80]} for e in evs[:160]]
        out.append(row)
    return out


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from commflow.dist import init_distributed
    from commflow.overlap.validate import check_group

    info = init_distributed(device="cuda")
    g = check_group(None, info.device)
    res = {"transfers": _transfers(g, info.device, cfg["rounds"]), "torch": torch.__version__}
    if info.rank == 0:
        for row in res["transfers"]:
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
    res["cases"] = _timeline(g, info.device, cfg["rounds"])
    dist.barrier()
    return res


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_copy_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 20}, timeout_s=300,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
