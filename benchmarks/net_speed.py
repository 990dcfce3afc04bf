"""Speed of the flow-level simulator: one ring step on 64 .. 8,192 GPUs (CPU).

Scenario: a 2-tier leaf-spine with 32 hosts per leaf and 32 spines (1:1), ranks placed
round-robin over leaves so every ring hop crosses the fabric (the worst case for ECMP and
the most work for the simulator). One ring step is ``n`` flows of ``M/n`` bytes, rank ``i``
to rank ``i+1``, one channel. For each policy the wall time of ``net.simulate`` (route +
max-min event loop + static congestion) is measured cold (fresh topology: path tables
built) and warm (paths cached), plus the full ring all-reduce (2(n-1) steps, collapsed).
"""

from __future__ import annotations

import argparse
import time

from .registry import register
from .report import pyplot, save_figure


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default="64,128,256,512,1024,2048,4096,8192", help="comma list of GPU counts")
    p.add_argument("--policies", default="ecmp,spray,planned")
    p.add_argument("--hosts-per-leaf", type=int, default=32)
    p.add_argument("--spines", type=int, default=32)
    p.add_argument("--size-mib", type=float, default=1024.0, help="all-reduce buffer per rank")
    p.add_argument("--repeats", type=int, default=3, help="warm timings: best of this many")
    p.add_argument("--png", default="", help="write the growth curve here (e.g. docs/img/net_speed.png)")


def _step_traffic(net, hosts, size):
    n = len(hosts)
    return net.flows([hosts[i] for i in range(n)], [hosts[(i + 1) % n] for i in range(n)], size / n, name="ring step")


@register("net_speed", "flow-level simulator speed: one ring all-reduce step on 64..8192 GPUs", _arguments)
def run(args: argparse.Namespace) -> dict:
    from commflow import net

    hpl, size = args.hosts_per_leaf, args.size_mib * 2**20
    rows = []
    for n in (int(x) for x in args.gpus.split(",")):
        leaves = max(2, n // hpl)
        per_leaf = n // leaves
        for policy in args.policies.split(","):
            topo = net.leaf_spine(leaves=leaves, spines=args.spines, hosts_per_leaf=per_leaf)
            hosts = [(i % leaves) * per_leaf + i // leaves for i in range(n)]
            step = _step_traffic(net, hosts, size)
            t0 = time.perf_counter()
            res = net.simulate(topo, step, policy=policy)
            cold = time.perf_counter() - t0
            warm = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                net.simulate(topo, step, policy=policy)
                warm.append(time.perf_counter() - t0)
            full = net.collective("allreduce", "ring", hosts=hosts, size_bytes=size)
            t0 = time.perf_counter()
            allreduce = net.simulate(topo, full, policy=policy)
            t_full = time.perf_counter() - t0
            row = {"gpus": n, "leaves": leaves, "spines": args.spines, "policy": policy, "flows": step.num_flows,
                   "step_cold_s": cold, "step_warm_s": min(warm), "allreduce_wall_s": t_full,
                   "step_sim_time_s": res.completion_s, "max_congestion": res.max_congestion,
                   "allreduce_sim_time_s": allreduce.completion_s, "busbw_GBps": allreduce.jobs[0].busbw_GBps}
            rows.append(row)
            print(f"{n:>6} GPUs {policy:>8}: step cold {cold:7.3f} s  warm {min(warm):7.3f} s  "
                  f"full all-reduce {t_full:7.3f} s  congestion {res.max_congestion:.2f}", flush=True)
    if args.png:
        _plot(rows, args.png)
    return {"rows": rows}


def _plot(rows, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        rs = [r for r in rows if r["policy"] == policy]
        ax.loglog([r["gpus"] for r in rs], [r["step_cold_s"] for r in rs], "o-", label=f"{policy} (cold)")
        ax.loglog([r["gpus"] for r in rs], [r["step_warm_s"] for r in rs], "x--", label=f"{policy} (warm)")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(10.0, color="grey", lw=0.8)
    ax.set_xlabel("GPUs (ring ranks)")
    ax.set_ylabel("wall time of net.simulate, one ring step (s)")
    ax.set_title("commflow.net speed, 2-tier leaf-spine, one Python process")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=120)
