"""Probe: the all-reduce's pulls by a few CTAs instead of the copy engine (peer_pull.py).

Not a registered benchmark (``python -m benchmarks.overlap_pull_probe --nproc 4 [--rounds 15]
[--out FILE]``). The copy-engine GEMM + all-reduce with row groups issues the pulls of group
``g`` before the pushes of group ``g + 1``; the copy engine runs peer copies one at a time in
issue order, so a push whose data is ready waits behind pulls still waiting for their barrier
(session-11 trace), and one group has been the fastest schedule on 4 ranks. With the pulls in a
kernel of ``ctas`` CTAs on the pull stream the copy engine only pushes. Question: does that make
two or four row groups pay, and by how much beside sequential (``torch.mm`` + NCCL)?

Per shape, every (row groups, CTAs) variant of the library's all-reduce forced to overlap as a
CUDA graph (``benchmarks.overlap.symm_call``; CTAs 0 = the copy engine), checked against
sequential on a negated input after warm-up, then all timed in alternation
(``commflow.overlap.autotune.sample_ms``, medians, slowest rank). Rank 0 also records a kernel
and copy trace of two variants of the first shape (``traces``).
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [  # (name, K, N, M): row-parallel, x [M, K/R] @ w [K/R, N]
    ("llama3-70b-attn-out", 8192, 8192, 16384), ("llama3-70b-attn-out", 8192, 8192, 4096),
    ("llama3-8b-attn-out", 4096, 4096, 16384), ("llama3-8b-attn-out", 4096, 4096, 8192),
    ("llama3-70b-fc2", 28672, 8192, 16384), ("llama3-8b-fc2", 14336, 4096, 16384),
    ("llama3-8b-fc2", 14336, 4096, 8192),
]
GROUPS = (1, 2, 4)
CTAS = (0, 16, 32, 64)
TRACED = ((2, 0), (2, 32))


def _trace(call, dev) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            call()
        torch.cuda.synchronize(dev)
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    evs = evs[len(evs) // 2:]  # the second call
    t0 = evs[0].time_range.start if evs else 0
    return [{"start_us": round(e.time_range.start - t0, 1), "us": round(e.time_range.end - e.time_range.start, 1),
             "stream": getattr(e, "device_resource_id", None), "name": e.name[:60]} for e in evs[:200]]


def _row(g, dev, name: str, k_full: int, n: int, m: int, rounds: int, traces: list) -> dict:
    import torch.distributed as dist

    from benchmarks.overlap import symm_call
    from benchmarks.timing import max_over_ranks
    from commflow.overlap import symm
    from commflow.overlap.autotune import sample_ms

    world = g.world_size
    k = k_full // world
    gen = torch.Generator(device=dev).manual_seed(7 + g.rank)
    x = torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16)
    w = (torch.randn(k, n, device=dev, generator=gen) / math.sqrt(k_full)).to(torch.bfloat16)

    def sequential():
        y = torch.mm(x, w)
        dist.all_reduce(y)
        return y

    def variant(groups: int, ctas: int):
        call = symm_call("ar", x, w, (m, n, k), groups=groups, graphed=True)

        def run():
            symm.set_pull_ctas(ctas)  # the graph's signature holds it: each variant replays its own
            return call()
        return run

    fns = {"sequential": sequential}
    fns.update({f"g{gr}_ctas{c}": variant(gr, c) for gr in GROUPS for c in CTAS})
    row = {"shape": name, "K": k_full, "N": n, "M": m, "ms": {}, "rel_diff": {}}
    with torch.no_grad():
        for _ in range(3):
            for f in fns.values():
                f()
        x.neg_()  # checked on other values than the warm-ups saw (a stale replay shows)
        ref = sequential().float()
        for key, f in fns.items():
            row["rel_diff"][key] = max_over_ranks(((f().float() - ref).abs().max() / ref.abs().max()).item())
        x.neg_()
        torch.cuda.synchronize(dev)
        times = sample_ms(list(fns.values()), iters=rounds, calls=4, device=dev)
        for key, (ms, _) in zip(fns, times):
            row["ms"][key] = max_over_ranks(ms)
        if not traces:
            dist.barrier()
            for gr, c in TRACED:
                events = _trace(fns[f"g{gr}_ctas{c}"], dev)
                if g.rank == 0:
                    traces.append({"shape": name, "M": m, "groups": gr, "ctas": c, "events": events})
    symm.set_pull_ctas(0)
    seq = row["ms"]["sequential"]
    row["speedup"] = {key: seq / t for key, t in row["ms"].items()}
    return row


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from commflow.dist import init_distributed
    from commflow.overlap.validate import check_group

    info = init_distributed(device="cuda")
    g = check_group(None, info.device)
    rows, traces = [], []
    for name, k, n, m in SHAPES:
        row = _row(g, info.device, name, k, n, m, cfg["rounds"], traces)
        if info.rank == 0:
            best = max((v, key) for key, v in row["speedup"].items())
            print(json.dumps({"shape": name, "M": m, "best": best[1], "speedup": round(best[0], 3),
                              **{key: round(v, 3) for key, v in row["speedup"].items()}}), flush=True)
        rows.append(row)
    dist.barrier()
    import triton

    return {"rows": rows, "traces": traces, "torch": torch.__version__, "triton": triton.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_pull_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 15}, timeout_s=420,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
