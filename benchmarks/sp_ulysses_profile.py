"""Probe: where one Ulysses step's time goes on the GPU (4 ranks, bf16, causal, H=32, D=128).

Not a registered benchmark (``python -m benchmarks.sp_ulysses_profile --seq 131072 --out FILE``).
Times fwd+bwd of ``ulysses_attention`` and of the local kernel alone at the per-GPU shape
(``[1, S, H/W, D]``: the 1-GPU limit), then profiles one Ulysses step on rank 0 and sums the
device time per kernel: the attention kernels, the packing copies and the NCCL all-to-alls
(an NCCL kernel's time includes its wait for the peers).
"""

from __future__ import annotations

import collections
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _kernel_summary(prof) -> list[dict]:
    """Device ms and calls per kernel (the 20 largest) from a finished profile, summed by the
    full kernel name (template arguments tell the copy kernels apart), shown cut to 160."""
    per_kernel: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        for k in ev.kernels:
            per_kernel[k.name][0] += 1
            per_kernel[k.name][1] += k.duration / 1e3
    rows = ({"name": n[:160], "calls": c, "ms": ms} for n, (c, ms) in per_kernel.items())
    return sorted(rows, key=lambda r: -r["ms"])[:20]


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from commflow.dist import init_distributed
    from commflow.sp import ulysses_attention
    from commflow.sp.kernels import local_attention

    info = init_distributed(device="cuda")
    world, seq, h, d = info.world_size, cfg["seq"], 32, 128
    torch.manual_seed(info.rank)
    q, k, v = (torch.randn(1, seq // world, h, d, device=info.device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(1, seq // world, h, d, device=info.device, dtype=torch.bfloat16)
    ql, kl, vl = (torch.randn(1, seq, h // world, d, device=info.device, dtype=torch.bfloat16, requires_grad=True)
                  for _ in range(3))
    doutl = torch.randn(1, seq, h // world, d, device=info.device, dtype=torch.bfloat16)
    cases = {
        "ulysses": lambda: ulysses_attention(q, k, v, causal=True).backward(dout),
        "local_1gpu": lambda: local_attention(ql, kl, vl, causal=True).backward(doutl),
    }
    out = {"seq": seq, "world": world, "rows": {}}
    for name, fn in cases.items():
        ms = []
        for it in range(cfg["iters"] + 2):
            for t in (q, k, v, ql, kl, vl):
                t.grad = None
            dist.barrier()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            if it >= 2:
                ms.append(e0.elapsed_time(e1))
        t = torch.tensor(ms, device=info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        out["rows"][name] = {"ms_slowest_rank": t.tolist()}
    for t in (q, k, v):
        t.grad = None
    dist.barrier()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        cases["ulysses"]()
        torch.cuda.synchronize()
    if info.rank == 0:
        out["profile_rank0"] = _kernel_summary(prof)
    dist.barrier()
    return out


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("sp_ulysses_profile", _worker, argv, __doc__, nproc=4, options={"seq": 131072, "iters": 4}, timeout_s=600,
                      env=ENV)


if __name__ == "__main__":
    sys.exit(main())
