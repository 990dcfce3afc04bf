"""Probe: many layers of one shape through the automatic path, as a model calls them.

Not a registered benchmark (``python -m benchmarks.overlap_layers_probe --nproc 4 [--layers 48]
[--steps 8] [--out FILE]``). A CUDA graph of a copy-engine schedule is keyed by its weight's
address (graphs.py), so a model whose layers share a shape needs one graph per layer; with more
layers than ``graphs.MAX_GRAPHS`` the LRU evicts each graph before its layer comes round again.
Per step, every rank calls ``matmul_reduce_scatter(x, w_l)`` for each of ``--layers`` weights of
one shape (Llama-3 8B attention-out, M = 8192, where the plan replays a graph on 4 H100), and
the step is timed (median over ``--steps`` after two warm-up steps, slowest rank) for:

* ``sequential``: ``mode="sequential"`` (torch.mm + NCCL);
* ``auto``: the library as it is;
* ``auto_cache16``: ``mode="auto"`` with ``MAX_GRAPHS = 16`` (session 13's default): the thrash
  guard sends the layers beyond the cache to the plan's ``eager_fallback``;
* ``auto_private_pools``: ``mode="auto"`` with a cache above the layer count and a memory pool
  of its own for every graph (before session 14 every graph had one).

Also the graphs captured during the timed steps of each variant, the graphs held at the end
and the memory the variant added to the allocator's reserve (max over ranks).

Found (session 13, 4x H100, ``overlap_layers_probe_4xH100_20261127-s13.json``, ``c422741``, 24
layers): sequential 7.16 ms a step; before the thrash guard 118.8 ms (192 captures in 8 steps:
every call); with the guard 9.07 ms (the eager schedule, 0.79x sequential); with a cache above
the layer count 6.04 ms (1.19x). Session 14 (``overlap_layers_probe_4xH100_20261127-s14.json``,
``71d3365``): with ``eager_fallback`` the guard's 8 uncached layers run the plain path, 6.47 ms
(1.11x); 24 graphs with private pools reserve 1.44 GB more than sequential, ~60 MB a graph.
"""

from __future__ import annotations

import gc
import json
import math
import sys

import torch

ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
K_FULL, N, M = 4096, 4096, 8192


def _worker(cfg: dict) -> dict:
    import torch.distributed as dist

    from benchmarks.timing import max_over_ranks, time_ms
    from commflow.dist import init_distributed
    from commflow.overlap import functional, graphs, matmul_reduce_scatter

    info = init_distributed(device="cuda")
    dev, world = info.device, info.world_size
    k = K_FULL // world
    gen = torch.Generator(device=dev).manual_seed(3 + info.rank)
    x = torch.randn(M, k, device=dev, generator=gen).bfloat16()
    weights = [(torch.randn(k, N, device=dev, generator=gen) / math.sqrt(K_FULL)).bfloat16()
               for _ in range(cfg["layers"])]
    default_max = graphs.MAX_GRAPHS
    big = max(default_max, 4 * cfg["layers"] + 8)
    variants = {"sequential": ("sequential", default_max, False),
                "auto": ("auto", default_max, False),
                "auto_cache16": ("auto", 16, False),
                "auto_private_pools": ("auto", big, True)}
    captures_of, shared_pool = graphs._capture, graphs._pool
    out = {"layers": cfg["layers"], "M": M, "K": K_FULL, "N": N, "max_graphs_default": default_max,
           "max_graph_bytes_default": graphs.MAX_GRAPH_BYTES, "variants": {}}
    for name, (mode, max_graphs, private) in variants.items():
        graphs.clear()
        functional.clear_caches()
        gc.collect()
        torch.cuda.empty_cache()
        reserved_before = torch.cuda.memory_reserved(dev)
        graphs.MAX_GRAPHS = max_graphs
        graphs._pool = (lambda ws: torch.cuda.graph_pool_handle()) if private else shared_pool
        count = [0]

        def counting(*a, count=count, **kw):
            count[0] += 1
            return captures_of(*a, **kw)

        graphs._capture = counting

        def step(mode=mode):
            for w in weights:
                matmul_reduce_scatter(x, w, mode=mode)

        with torch.no_grad():
            for _ in range(2):  # warm-up steps: plans, autotune, first captures
                dist.barrier()
                step()
            torch.cuda.synchronize(dev)
            captured_before = count[0]
            step_ms = time_ms(step, warmup=0, iters=cfg["steps"], device=dev, barrier=True)["median_ms"]
        graphs._capture, graphs._pool = captures_of, shared_pool
        plan = functional._ENTRIES and next(iter(functional._ENTRIES.values())).plan
        out["variants"][name] = {"step_ms": max_over_ranks(step_ms),
                                 "captures_in_timed_steps": count[0] - captured_before,
                                 "graphs_held": len(graphs._GRAPHS),
                                 # what the variant's graphs (and plans' workspaces) keep reserved
                                 "reserved_mib_added": max_over_ranks(
                                     (torch.cuda.memory_reserved(dev) - reserved_before) / 2**20),
                                 "plan": None if not plan else f"{plan.decision}/{plan.n_chunks}/graphed={plan.graphed}"}
        if info.rank == 0:
            print(json.dumps({name: out["variants"][name]}), flush=True)
    graphs.MAX_GRAPHS = default_max
    graphs.clear()
    dist.barrier()
    return out


def main(argv=None) -> int:
    from benchmarks.results import probe_main

    return probe_main("overlap_layers_probe", _worker, argv, __doc__, nproc=4, options={"layers": 48, "steps": 8},
                      timeout_s=300, env=ENV)


if __name__ == "__main__":
    sys.exit(main())
