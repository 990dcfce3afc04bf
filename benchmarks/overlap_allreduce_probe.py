"""Probe: torch's symmetric-memory two-shot all-reduce as the transport of GEMM + all-reduce.

Not a registered benchmark (``python -m benchmarks.overlap_allreduce_probe --nproc 4 [--out FILE]``).
The copy-engine all-reduce of commflow.overlap leaves its all-gather half exposed after the last
GEMM (docs/overlap.md, session 11), and NCCL per chunk loses its bandwidth on smaller chunks. This
measures the candidate for a per-chunk transport: ``torch.ops.symm_mem.two_shot_all_reduce_``
(SM kernel, peer loads and stores over NVLink, no multicast; fp32 accumulation, one rounding),
every rank at once:

* ``transport``: NCCL's all-reduce against the two-shot all-reduce of a buffer in symmetric
  memory, at the output sizes of the Llama-3 GEMM + all-reduce rows (whole and in 2 or 4 row
  chunks);
* ``pipeline``: the GEMM in 1, 2 or 4 row chunks written straight into the symmetric buffer, each
  chunk's two-shot all-reduce on a side stream as soon as the chunk exists, beside sequential
  (mm, then NCCL) in the same run; each checked against sequential on a negated input. The
  result stays in the shared buffer; copying it out is timed apart (``copy_out``).

Medians over ``--rounds`` samples, slowest rank.
"""

from __future__ import annotations

import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SHAPES = [("llama3-8b-attn-out", 4096, 4096, 8192), ("llama3-8b-attn-out", 4096, 4096, 16384),
          ("llama3-8b-fc2", 14336, 4096, 16384), ("llama3-70b-attn-out", 8192, 8192, 16384)]  # (name, K, N, M)
CHUNKS = (1, 2, 4)


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    from benchmarks.overlap_probe import gemm_chunks_reduced
    from benchmarks.timing import max_over_ranks
    from commflow.dist import init_distributed
    from commflow.overlap.autotune import sample_ms

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    group_name = dist.group.WORLD.group_name
    enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
    if enable is not None:
        enable(group_name)
    two_shot = torch.ops.symm_mem.two_shot_all_reduce_
    side = torch.cuda.Stream(dev, priority=-1)
    rows = []
    for name, k, n, m in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(7 + info.rank)
        x = torch.randn(m, k // world, device=dev, generator=gen).to(torch.bfloat16)
        w = (torch.randn(k // world, n, device=dev, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
        buf = symm_mem.empty(m, n, dtype=torch.bfloat16, device=dev)
        symm_mem.rendezvous(buf, group_name)
        plain = torch.empty(m, n, dtype=torch.bfloat16, device=dev)

        def sequential(x=x, w=w):
            y = torch.mm(x, w)
            dist.all_reduce(y)
            return y

        def pipeline(c: int, x=x, w=w, buf=buf):
            # The result stays in the shared buffer; the caller's copy out is timed apart ("copy_out").
            return gemm_chunks_reduced(x, w, buf, c, side, lambda part: two_shot(part, "sum", group_name))

        fns = {"sequential": sequential, "gemm": lambda x=x, w=w: torch.mm(x, w), "copy_out": buf.clone}
        chunks = CHUNKS
        try:  # a slice of the symmetric buffer (storage offset) as the collective's input
            two_shot(buf[m // 2:], "sum", group_name)
        except Exception as e:  # noqa: BLE001 - recorded; whole-buffer variants only
            chunks = (1,)
            errors = f"{type(e).__name__}: {e}"[:300]
        else:
            errors = None
        for c in chunks:
            step = m // c
            fns[f"nccl_ar_{c}"] = lambda c=c, step=step, plain=plain: [dist.all_reduce(plain[i * step:(i + 1) * step])
                                                                      for i in range(c)]
            fns[f"two_shot_{c}"] = lambda c=c, step=step, buf=buf: [two_shot(buf[i * step:(i + 1) * step], "sum",
                                                                             group_name) for i in range(c)]
            fns[f"pipeline_{c}"] = lambda c=c: pipeline(c)
        with torch.no_grad():
            row = {"shape": name, "K": k, "N": n, "M": m, "bytes": m * n * 2, "slice_error": errors}
            x.neg_()
            ref = sequential().float()
            for c in chunks:
                got = pipeline(c).float()
                row[f"pipeline_{c}_rel_diff"] = max_over_ranks(((got - ref).abs().max() / ref.abs().max()).item())
            x.neg_()
            for f in fns.values():
                for _ in range(2):
                    f()
            torch.cuda.synchronize(dev)
            names = list(fns)
            res = sample_ms([fns[v] for v in names], iters=cfg["rounds"], calls=2, device=dev)
            for v, (ms, _) in zip(names, res):
                row[v + "_ms"] = max_over_ranks(ms)
        for c in chunks:
            row[f"pipeline_{c}_speedup"] = row["sequential_ms"] / row[f"pipeline_{c}_ms"]
        rows.append(row)
        if info.rank == 0:
            print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}), flush=True)
        del buf
    dist.barrier()
    return {"rows": rows, "torch": torch.__version__}


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_allreduce_probe", _worker, argv, __doc__, nproc=4, options={"rounds": 15},
                      timeout_s=300, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
