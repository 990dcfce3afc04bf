"""The C4P case: concurrent all-reduce jobs on an HPN-like dual-plane fabric, ECMP vs planned.

C4 (Dong et al., arXiv 2406.04594, HPCA'25) plans the few long-lived flows of collective
communication onto paths and reports ~15 % better end-to-end runtime for jobs with moderate
communication share. This benchmark builds the network_anchors.md B5 scenario, scaled down:

- fabric: 2 segments x 16 servers x 8 GPUs (256 GPUs), rail-optimized dual-plane (HPN):
  every NIC 2 x 200G ports, one ToR per (segment, rail, plane), 8 spines per plane,
  ToR uplinks 8 x 400G (1:1), NVLink 1600G inside a server;
- traffic: 8 concurrent 32-GPU all-reduce jobs of 1 GiB, each on 2 servers of each segment
  (so every job crosses segments), hierarchical (NVLink rings + per-rail inter-node ring)
  or halving-doubling;
- policies: ECMP with 1..8 QPs per connection (port and spine hashed per QP) over seeds,
  C4P-like planned (port and spine pinned per QP), ideal spraying.

Reported: completion time (all jobs), per-job bus bandwidth, and the end-to-end gain of
planning for a job whose communication is a share phi of its ECMP iteration time (no
overlap): ``1 / (1 - phi + phi * T_planned / T_ecmp) - 1``.
"""

from __future__ import annotations

import argparse

import numpy as np

from .registry import register


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--segments", type=int, default=2)
    p.add_argument("--servers-per-segment", type=int, default=16)
    p.add_argument("--spines-per-plane", type=int, default=8)
    p.add_argument("--jobs", type=int, default=8)
    p.add_argument("--servers-per-job", type=int, default=4, help="split evenly over the segments")
    p.add_argument("--size-mib", type=float, default=1024.0)
    p.add_argument("--algorithms", default="hierarchical,halving_doubling")
    p.add_argument("--ecmp-qps", default="1,2,4,8")
    p.add_argument("--planned-qps", default="1,2")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--png", default="")


def _jobs(net, args, algorithm):
    gps = 8
    per_seg = args.servers_per_job // args.segments
    jobs = []
    for j in range(args.jobs):
        servers = [g * args.servers_per_segment + j * per_seg + i for g in range(args.segments) for i in range(per_seg)]
        if max(s % args.servers_per_segment for s in servers) >= args.servers_per_segment:
            raise SystemExit("--jobs x --servers-per-job does not fit the segments")
        hosts = [s * gps + r for s in servers for r in range(gps)]
        jobs.append(net.collective("allreduce", algorithm, hosts=hosts, size_bytes=args.size_mib * 2**20,
                                   gpus_per_node=gps, name=f"job{j}"))
    return net.concurrent(*jobs)


def _summary(res):
    bus = np.array([j.busbw_GBps for j in res.jobs])
    return {"completion_s": res.completion_s, "mean_job_s": float(np.mean([j.completion_s for j in res.jobs])),
            "busbw_mean": float(bus.mean()), "busbw_min": float(bus.min()), "busbw": bus.tolist(),
            "max_congestion": res.max_congestion}


@register("net_c4p", "C4P: concurrent all-reduce jobs on a dual-plane fabric, ECMP vs planned vs spray", _arguments)
def run(args: argparse.Namespace) -> dict:
    from commflow import net

    topo = net.dual_plane(segments=args.segments, servers_per_segment=args.servers_per_segment,
                          spines_per_plane=args.spines_per_plane, port_gbps=200, uplink_gbps=400, nvlink_gbps=1600)
    print(topo.describe())
    out = {"topology": topo.describe(), "scenarios": []}
    for algorithm in args.algorithms.split(","):
        tr = _jobs(net, args, algorithm)
        runs = {}
        for k in (int(x) for x in args.ecmp_qps.split(",")):
            per_seed = [_summary(net.simulate(topo, tr, "ecmp", splits=k, seed=s)) for s in range(args.seeds)]
            runs[f"ecmp k={k}"] = {
                "policy": "ecmp", "splits": k,
                **{key: float(np.mean([r[key] for r in per_seed])) for key in
                   ("completion_s", "mean_job_s", "busbw_mean", "busbw_min", "max_congestion")},
                "completion_s_max": float(max(r["completion_s"] for r in per_seed)),
                "busbw_per_job_mean": np.mean([r["busbw"] for r in per_seed], axis=0).tolist(),
                "busbw_per_job_min": np.min([r["busbw"] for r in per_seed], axis=0).tolist()}
        for k in (int(x) for x in args.planned_qps.split(",")):
            r = _summary(net.simulate(topo, tr, "planned", splits=k))
            runs[f"planned k={k}"] = {"policy": "planned", "splits": k, **r, "busbw_per_job_mean": r["busbw"]}
        r = _summary(net.simulate(topo, tr, "spray"))
        runs["spray"] = {"policy": "spray", "splits": 1, **r, "busbw_per_job_mean": r["busbw"]}
        base = runs["ecmp k=1"]["mean_job_s"]
        best_plan = min((v for v in runs.values() if v["policy"] == "planned"), key=lambda v: v["mean_job_s"])
        ratio = best_plan["mean_job_s"] / base
        gain = {f"phi={phi}": 1 / (1 - phi + phi * ratio) - 1 for phi in (0.3, 0.5)}
        print(f"\n{algorithm}: {len(tr.jobs)} jobs x {len(tr.jobs[0].ranks)} GPUs, {args.size_mib:.0f} MiB each")
        for name, v in runs.items():
            print(f"  {name:>12}: mean job {v['mean_job_s'] * 1e3:8.2f} ms  all done {v['completion_s'] * 1e3:8.2f} ms"
                  f"  busbw mean {v['busbw_mean']:6.1f} min {v['busbw_min']:6.1f} GB/s  congestion {v['max_congestion']:.2f}")
        print(f"  planned / ECMP(1 QP) communication time: {ratio:.3f}; end-to-end gain {gain}")
        out["scenarios"].append({"algorithm": algorithm, "runs": runs, "planned_over_ecmp": ratio, "end_to_end_gain": gain})
    if args.png:
        _plot(out, args.png)
    return out


def _plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = out["scenarios"]
    fig, axes = plt.subplots(1, len(sc), figsize=(6 * len(sc), 3.6), squeeze=False)
    for ax, s in zip(axes[0], sc):
        names = list(s["runs"])
        njobs = len(s["runs"][names[0]]["busbw_per_job_mean"])
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            v = s["runs"][name]
            x = np.arange(njobs) + i * width
            ax.bar(x, v["busbw_per_job_mean"], width, label=name)
            if "busbw_per_job_min" in v:
                lo = np.asarray(v["busbw_per_job_mean"]) - np.asarray(v["busbw_per_job_min"])
                ax.errorbar(x, v["busbw_per_job_mean"], yerr=[lo, np.zeros(njobs)], fmt="none", ecolor="k", lw=0.6)
        ax.set_xticks(np.arange(njobs) + 0.4 - width / 2)
        ax.set_xticklabels([f"job{j}" for j in range(njobs)], fontsize=7)
        ax.set_ylabel("per-job busbw (GB/s)")
        ax.set_title(f"{s['algorithm']}: planned/ECMP(1 QP) time {s['planned_over_ecmp']:.2f} "
                     "(ECMP: seed mean, line to min)", fontsize=8)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(out["topology"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
