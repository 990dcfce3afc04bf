"""Probe: what the automatic path's plain all-gather + GEMM costs beyond the bare calls.

Not a registered benchmark (``python -m benchmarks.overlap_dispatch_probe --nproc 4 --out FILE``).
In session 10's overlap runs all but one of the rows where ``auto`` fell below 0.97x of
sequential ran the plain path, and most were all-gather rows: the entry's plain all-gather + GEMM took
4-9 us more host time per call than the benchmark's bare ``torch.empty`` + all-gather +
``torch.mm`` (reduce-scatter and all-reduce entries took the same as their bare calls), at
0.13-0.15 ms a call. This times, in alternation with the benchmark's ``sample_ms``, on the
small-M guard shapes (Llama-3 70B attention-out, K = N = 8192, and 8B at M = 2048):

* ``bench``: the benchmark's sequential (``commflow.dist.all_gather_tensor``, then ``mm``);
* ``pg_single`` / ``pg_base``: the process group's ``all_gather_single`` / ``_allgather_base``
  with blocking options built once (what ``commflow.overlap.plain`` may call), then ``mm``;
* ``entry``: ``all_gather_matmul(mode="sequential")``, the entry's whole call;
* ``entry_run``: the resolved entry's ``run`` alone (no signature lookup);
* ``plain_closure``: ``commflow.overlap.plain.plain_all_gather``'s collective, then ``mm``.

Medians in ms per call and host microseconds per call, slowest rank.

Found: session 11 (``overlap_dispatch_probe_4xH100_20261127-s11.json``, ``b973d17``) ``entry``
-1 to +5 us of host time against ``bench``, the lookup (``entry`` - ``entry_run``) 7-12 us;
session 13, after the ops build their key inline (``overlap_dispatch_probe_4xH100_20261127-s13.json``,
``ead9196``, a faster host) ``entry`` -1.5 to +0.7 us against ``bench``, the lookup ~7 us.
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
CASES = [(8192, 8192, 128), (8192, 8192, 256), (8192, 8192, 512), (4096, 4096, 2048)]  # (K, N global, M)


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    import commflow.dist as cdist
    from benchmarks.timing import max_over_ranks
    from commflow.dist import all_gather_tensor, init_distributed
    from commflow.overlap import all_gather_matmul, functional, plain
    from commflow.overlap.autotune import sample_ms

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    pg = dist.group.WORLD
    opts = c10d.AllgatherOptions()
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False
    methods = {"pg_single": getattr(pg, "all_gather_single", None), "pg_base": pg._allgather_base}
    rows = []
    for k, n, m in CASES:
        gen = torch.Generator(device=dev).manual_seed(11 + info.rank)
        xs = torch.randn(m // world, k, device=dev, generator=gen).to(torch.bfloat16)
        w = (torch.randn(k, n // world, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)

        def bench(xs=xs, w=w, m=m, k=k):
            full = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
            all_gather_tensor(full, xs)
            return torch.mm(full, w)

        def direct(method, xs=xs, w=w, m=m, k=k):
            full = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
            work = method(full, xs, opts)
            if work is not None:
                work.wait()
            return torch.mm(full, w)

        entry_call = lambda xs=xs, w=w: all_gather_matmul(xs, w, mode="sequential")  # noqa: E731
        entry_call()
        entry = functional._ENTRIES[functional._entry_key("ag", xs, w, None, 0, "sequential", None, "fp32")]
        collective = plain.plain_all_gather(None)

        def plain_closure(xs=xs, w=w, m=m, k=k, collective=collective):  # commflow.overlap.plain's collective, no entry
            full = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
            collective(full, xs)
            return torch.mm(full, w)

        fns = {"bench": bench, "entry": entry_call, "entry_run": lambda xs=xs, w=w, e=entry: e.run(xs, w),
               "plain_closure": plain_closure}
        fns.update({name: (lambda meth=meth: direct(meth)) for name, meth in methods.items() if meth is not None})
        names = list(fns)
        with torch.no_grad():
            for _ in range(50):
                for f in fns.values():
                    f()
            torch.cuda.synchronize(dev)
            res = sample_ms([fns[x] for x in names], iters=cfg["rounds"], calls=4, device=dev)
        row = {"K": k, "N": n, "m": m}
        for name, (ms, host_us) in zip(names, res):
            row[name] = {"ms": max_over_ranks(ms), "host_us": max_over_ranks(host_us)}
        rows.append(row)
        if info.rank == 0:
            print(json.dumps(row), flush=True)
    dist.barrier()
    return {"rows": rows, "has_all_gather_single": methods["pg_single"] is not None,
            "untraced": (dist.all_reduce, cdist.reduce_scatter_tensor, cdist.all_gather_tensor)
            == tuple(plain._ORIGINAL.values())
            and not plain._COALESCING, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_dispatch_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 60}, timeout_s=300,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
