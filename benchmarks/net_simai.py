"""Same scenario, two simulators: commflow.net vs SimAI-Analytical (Alibaba, NSDI'25).

Scenario: one data-parallel all-reduce of ``--size-mib`` over N GPUs, 8 GPUs per server,
NVLink ``--nvlink-GBps`` and a NIC of ``--nic-GBps`` per GPU. SimAI-Analytical
(``aliyun/SimAI``, ``SimAI_analytical``) estimates the time from bus-bandwidth formulas with
no network topology; commflow.net builds a rail-optimized 2-tier fabric (16 servers per
rail leaf, 1:1, NVLink switch per server), routes the hierarchical all-reduce with ECMP or
the planner and runs the max-min simulation. Both are timed as wall clock of one call.

SimAI is not part of commflow and is not built by it: pass ``--simai-bin`` (the
``SimAI_analytical`` binary) and ``--simai-root`` (the SimAI checkout it reads
``astra-sim-alibabacloud/inputs/ratio/*.csv`` from). Without them only commflow is timed.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
import time
from pathlib import Path

from .registry import register


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", default="256,1024,8192")
    p.add_argument("--size-mib", type=float, default=1024.0)
    p.add_argument("--nvlink-GBps", type=float, default=360.0)
    p.add_argument("--nic-GBps", type=float, default=48.5)
    p.add_argument("--policies", default="ecmp,planned")
    p.add_argument("--simai-bin", default="", help="path to SimAI_analytical (optional)")
    p.add_argument("--simai-root", default="", help="SimAI checkout the binary runs in (optional)")


def _simai(args, n: int) -> dict:
    """Run SimAI-Analytical on a one-layer workload whose weight-gradient all-reduce spans n GPUs."""
    root = Path(args.simai_root)
    size = int(args.size_mib * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "dp_allreduce.txt"
        work.write_text(
            "HYBRID_TRANSFORMER_FWD_IN_BCKWD model_parallel_NPU_group: 1 ep: 1 pp: 1 vpp: 1 ga: 1 "
            f"all_gpus: {n} checkpoints: 0 checkpoint_initiates: 0\n1\n"
            f"dp_allreduce -1 1 NONE 0 1 NONE 0 1 ALLREDUCE {size} 1\n")
        (root / "results").mkdir(exist_ok=True)
        prefix = f"commflow-bench-{n}-"
        cmd = [args.simai_bin, "-w", str(work), "-g", str(n), "-g_p_s", "8", "-r", prefix,
               "-nv", str(args.nvlink_GBps), "-nic", str(args.nic_GBps), "-n_p_s", "8"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"SimAI failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
        out = root / "results" / f"{prefix}EndToEnd.csv"
        rows = list(csv.reader(out.read_text().splitlines()))
        out.unlink()
    layer = next(r for r in rows if r and r[0] == "dp_allreduce")
    header = rows[2]
    wg = header.index("wg total comm")
    return {"wall_s": wall, "predicted_s": float(layer[wg]) * 1e-6, "busbw_GBps": float(layer[wg + 2])}


@register("net_simai", "commflow.net vs SimAI-Analytical on the same DP all-reduce (wall time, prediction)",
          _arguments)
def run(args: argparse.Namespace) -> dict:
    from commflow import net

    size = args.size_mib * 2**20
    rows = []
    for n in (int(x) for x in args.gpus.split(",")):
        servers = n // 8
        spl = min(16, servers)
        row = {"gpus": n}
        t0 = time.perf_counter()
        topo = net.rail_optimized(servers=servers, spines=spl, servers_per_leaf=spl,
                                  link_gbps=args.nic_GBps * 8, nvlink_gbps=args.nvlink_GBps * 8)
        tr = net.collective("allreduce", "hierarchical", hosts=range(n), size_bytes=size, gpus_per_node=8)
        row["build_s"] = time.perf_counter() - t0
        for policy in args.policies.split(","):
            t0 = time.perf_counter()
            res = net.simulate(topo, tr, policy=policy)
            row[f"commflow_{policy}_wall_s"] = time.perf_counter() - t0
            row[f"commflow_{policy}_predicted_s"] = res.completion_s
            row[f"commflow_{policy}_busbw_GBps"] = res.jobs[0].busbw_GBps
        if args.simai_bin:
            s = _simai(args, n)
            row.update({f"simai_{k}": v for k, v in s.items()})
        rows.append(row)
        print({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    return {"rows": rows, "simai_used": bool(args.simai_bin)}
