"""The spraying paper's claim as a figure: max congestion vs number of splits.

Addanki et al. (arXiv 2407.00550) prove that on a 2-tier leaf-spine, single-path routing
with minimal application-level splitting equals ideal packet spraying in maximum
congestion. For each collective, oversubscription (1:1, 2:1, 4:1) and split count ``k``
this benchmark reports ``max_congestion(policy, k) / max_congestion(spray)`` for

- ECMP (seeded 5-tuple hash, ``k`` QPs per connection): mean, min, max over seeds;
- the planner (Koenig colouring, ``k`` sub-flows): expected to reach 1.0 at ``k*``;
- the LP optimum (multi-commodity flow over equal-cost paths): expected 1.0 everywhere.

Ranks are placed round-robin over the leaves (``--placement random`` for a seeded random
permutation); with 12 hosts per leaf and 16 spines the number of cross-leaf flows per leaf
(Delta) is not a multiple of the spine count, so ``k* > 1`` is visible. ECMP routing and the colouring do not depend on capacities, so each
(k, seed) routing is scored on all three oversubscription levels.
"""

from __future__ import annotations

import argparse

import numpy as np

from .registry import register
from .report import pyplot, save_figure


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--leaves", type=int, default=16)
    p.add_argument("--spines", type=int, default=16)
    p.add_argument("--hosts-per-leaf", type=int, default=12)
    p.add_argument("--oversub", default="1,2,4")
    p.add_argument("--splits", default="1,2,4,8,16")
    p.add_argument("--seeds", type=int, default=10, help="ECMP hash seeds per point")
    p.add_argument("--collectives", default="ring,halving_doubling,alltoall")
    p.add_argument("--a2a-scale", type=int, default=2, help="all-to-all runs on a fabric this many times smaller per side")
    p.add_argument("--placement", choices=["rr", "random"], default="rr")
    p.add_argument("--placement-seed", type=int, default=1)
    p.add_argument("--png", default="")


def _scenario(net, name, args):
    L, S, H = args.leaves, args.spines, args.hosts_per_leaf
    if name == "alltoall":
        L, S, H = (max(2, x // args.a2a_scale) for x in (L, S, H))
    n = L * H
    if args.placement == "random":
        hosts = [int(h) for h in np.random.default_rng(args.placement_seed).permutation(n)]
    else:
        hosts = [(i % L) * H + i // L for i in range(n)]
    size = float(n * 2**20)
    if name == "ring":
        tr = net.collective("allreduce", "ring", hosts=hosts, size_bytes=size)
    elif name == "halving_doubling":
        n2 = 1 << (n.bit_length() - 1)
        tr = net.collective("allreduce", "halving_doubling", hosts=hosts[:n2], size_bytes=size)
    elif name == "alltoall":
        tr = net.collective("alltoall", "direct", hosts=hosts, size_bytes=size)
    else:
        raise SystemExit(f"--collectives: unknown {name!r}")
    topos = {o: net.leaf_spine(leaves=L, spines=S, hosts_per_leaf=H, oversubscription=o)
             for o in (float(x) for x in args.oversub.split(","))}
    return tr, topos, (L, S, H)


def _cong(net, topo, tr, routing):
    _, cong, _, _, _ = net.phase_view(topo, tr, lambda j, s: routing.steps[j][s].link_bytes())
    return float(cong.max())


@register("net_splits", "max congestion vs splits: ECMP vs planner vs spraying vs LP at 1:1/2:1/4:1", _arguments)
def run(args: argparse.Namespace) -> dict:
    from commflow import net

    ks = [int(k) for k in args.splits.split(",")]
    rows = []
    for name in args.collectives.split(","):
        tr, topos, shape = _scenario(net, name, args)
        base = next(iter(topos.values()))
        spray_r = net.route(base, tr, "spray")
        spray = {o: _cong(net, t, tr, spray_r) for o, t in topos.items()}
        lp = {o: net.optimal(t, tr, paths="shortest").max_congestion for o, t in topos.items()}
        kstar = net.minimal_splits(base, tr)
        for k in ks:
            planned_r = net.route(base, tr, "planned", splits=k)
            ecmp = {o: [] for o in topos}
            for seed in range(args.seeds):
                r = net.route(base, tr, "ecmp", splits=k, seed=seed)
                for o, t in topos.items():
                    ecmp[o].append(_cong(net, t, tr, r) / spray[o])
            for o, t in topos.items():
                e = np.asarray(ecmp[o])
                row = {"collective": name, "fabric": list(shape), "oversub": o, "splits": k, "kstar": kstar,
                       "spray": spray[o], "lp_ratio": lp[o] / spray[o],
                       "planned_ratio": _cong(net, t, tr, planned_r) / spray[o],
                       "ecmp_mean": float(e.mean()), "ecmp_min": float(e.min()), "ecmp_max": float(e.max()),
                       "ecmp_p99": float(np.percentile(e, 99))}
                rows.append(row)
                print(f"{name:>17} {o:.0f}:1 k={k:>2} (k*={kstar}): ECMP {e.mean():.3f} [{e.min():.3f}, {e.max():.3f}]"
                      f"  planned {row['planned_ratio']:.3f}  LP {row['lp_ratio']:.4f}", flush=True)
    if args.png:
        _plot(rows, args.png)
    return {"rows": rows}


def _plot(rows, path):
    plt = pyplot()
    colls = list(dict.fromkeys(r["collective"] for r in rows))
    overs = list(dict.fromkeys(r["oversub"] for r in rows))
    fig, axes = plt.subplots(len(colls), len(overs), figsize=(3.4 * len(overs), 2.8 * len(colls)), squeeze=False)
    for i, c in enumerate(colls):
        for j, o in enumerate(overs):
            ax = axes[i][j]
            rs = [r for r in rows if r["collective"] == c and r["oversub"] == o]
            k = [r["splits"] for r in rs]
            ax.fill_between(k, [r["ecmp_min"] for r in rs], [r["ecmp_max"] for r in rs], alpha=0.2, color="C0")
            ax.plot(k, [r["ecmp_mean"] for r in rs], "o-", color="C0", label="ECMP (mean, min-max)")
            ax.plot(k, [r["planned_ratio"] for r in rs], "s-", color="C2", label="planned")
            ax.plot(k, [r["lp_ratio"] for r in rs], "k--", lw=1, label="LP optimum")
            ax.axvline(rs[0]["kstar"], color="C3", lw=0.8, ls=":", label="k* = S/gcd(S, Δ)")
            ax.set_xscale("log", base=2)
            ax.set_ylim(bottom=0.9)
            ax.set_title(f"{c}, {o:.0f}:1, {'x'.join(map(str, rs[0]['fabric']))}", fontsize=8)
            if j == 0:
                ax.set_ylabel("max congestion / spraying")
            if i == len(colls) - 1:
                ax.set_xlabel("splits k (QPs per connection)")
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path, dpi=120)


