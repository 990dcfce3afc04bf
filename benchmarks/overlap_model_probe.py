"""Probe: a stack of tensor-parallel MLP blocks, forward and backward, as a model runs them.

Not a registered benchmark (``python -m benchmarks.overlap_model_probe --nproc 4 [--layers 16]
[--tokens 8192] [--steps 6] [--out FILE]``). The overlap benchmark times one op of one shape
in a loop, where its CUDA graph is always cached; a model calls every layer's four ops once a
step (forward: all-gather + GEMM into the column layer, GEMM + reduce-scatter out of the row
layer; backward: the reverse pair), each layer with a weight of its own, so it needs a graph
per layer, op and parity, and the all-gather graphs keep their outputs (graphs.py,
``MAX_GRAPH_BYTES``). Per block (Llama-3 8B dimensions, sequence parallel, bf16): ``x + row(gelu(col(x)))``,
``col`` 4096 -> 14336 and ``row`` 14336 -> 4096 split over the ranks; a step is the forward of
``--layers`` blocks over ``[1, tokens/R, 4096]`` per rank, a squared-mean loss and the backward
(no optimizer). Timed per step (median over ``--steps`` after two warm-up steps that plan,
autotune and capture; slowest rank), with the peak memory allocated and reserved (max over
ranks), the graphs kept and the bytes held for them (``graphs.held_bytes``), for:

* ``sequential``: ``overlap="sequential"`` (GEMM, then NCCL);
* ``auto``: ``overlap="auto"``, the library's defaults;
* ``auto_no_graphs``: ``overlap="auto"`` with CUDA graphs off;
* ``auto_graph_bytes_32g``: ``overlap="auto"`` with ``MAX_GRAPH_BYTES`` = 32 GiB.

Each variant builds the same blocks from one seed; the loss of the first step is compared
with ``sequential``'s.

Found (4x H100, 16 blocks, 8192 tokens; ``overlap_model_probe_4xH100_20261127-s14.json``,
``0efdfb7``, before the graphs of a kind shared their output buffers): sequential 50.6 ms a
step, auto 48.9 ms (1.034x) with 4.4 GiB more peak memory (the 64 all-gather and reduce-scatter
graphs' outputs held 4.0 GiB, at the ``MAX_GRAPH_BYTES`` default), auto without graphs 50.8 ms.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
HIDDEN, FFN = 4096, 14336


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist
    from torch import nn

    from benchmarks.timing import max_over_ranks, time_ms
    from commflow.dist import init_distributed
    from commflow.overlap import ColumnParallelLinear, RowParallelLinear, functional, graphs

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    default_bytes = graphs.MAX_GRAPH_BYTES

    class Block(nn.Module):
        def __init__(self, overlap: str):
            super().__init__()
            kw = {"sequence_parallel": True, "overlap": overlap, "bias": False, "device": dev, "dtype": torch.bfloat16}
            self.col, self.row = ColumnParallelLinear(HIDDEN, FFN, **kw), RowParallelLinear(FFN, HIDDEN, **kw)

        def forward(self, x):
            return x + self.row(torch.nn.functional.gelu(self.col(x)))

    variants = {"sequential": ("sequential", True, default_bytes), "auto": ("auto", True, default_bytes),
                "auto_no_graphs": ("auto", False, default_bytes), "auto_graph_bytes_32g": ("auto", True, 32 << 30)}
    out = {"layers": cfg["layers"], "tokens": cfg["tokens"], "hidden": HIDDEN, "ffn": FFN,
           "max_graph_bytes_default": default_bytes, "variants": {}}
    first_loss = {}
    for name, (overlap, use_graphs, max_bytes) in variants.items():
        graphs.clear()
        functional.clear_caches()
        graphs.MAX_GRAPH_BYTES = max_bytes
        graphs.set_graphs(None if use_graphs else False)
        torch.manual_seed(0)  # the same blocks and input on every variant (same on every rank: sharded below)
        blocks = nn.Sequential(*[Block(overlap) for _ in range(cfg["layers"])])
        x = torch.randn(1, cfg["tokens"], HIDDEN, device=dev).bfloat16().chunk(world, 1)[info.rank].contiguous()
        x.requires_grad_(True)
        losses = []

        def step(blocks=blocks, x=x, losses=losses):
            loss = blocks(x).float().square().mean()
            loss.backward()
            losses.append(loss.detach())
            for p in blocks.parameters():
                p.grad = None
            x.grad = None

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(2):  # plans, autotune, captures
            dist.barrier()
            step()
        torch.cuda.synchronize(dev)
        first_loss[name] = losses[0].item()
        step_ms = time_ms(step, warmup=0, iters=cfg["steps"], device=dev, barrier=True)["median_ms"]
        out["variants"][name] = {
            "step_ms": max_over_ranks(step_ms),
            "peak_allocated_gib": max_over_ranks(torch.cuda.max_memory_allocated(dev) / 2**30),
            "peak_reserved_gib": max_over_ranks(torch.cuda.max_memory_reserved(dev) / 2**30),
            "graphs_kept": len(graphs._GRAPHS), "graphs_held_gib": graphs.held_bytes() / 2**30,
            "thrashing_kinds": len(graphs._EAGER_KINDS),
            "first_loss_rel_diff": abs(first_loss[name] - first_loss["sequential"]) / abs(first_loss["sequential"]),
        }
        if info.rank == 0:
            print(json.dumps({name: out["variants"][name]}), flush=True)
        del blocks, x, losses
    graphs.MAX_GRAPH_BYTES = default_bytes
    graphs.set_graphs(None)
    graphs.clear()
    dist.barrier()
    return out


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_model_probe", _worker, argv, __doc__, nproc=4,
                      options={"layers": 16, "tokens": 8192, "steps": 6}, timeout_s=500, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
