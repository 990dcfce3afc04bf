"""Gossip-learning simulator (commflow.decentral) on CPU: how long, and what it finds.

``decentral``: wall time of the vectorized simulator for N nodes x R rounds (local
SGD + averaging + scoring every node every round, with a relay-hub drop at R/5 so the
mixing matrix is rebuilt mid-run), per intra-op thread count; optionally a PNG of time
against N. ``prepare_s`` (graph, plan, data split) and ``simulate_s`` (the rounds) are
timed separately; ``total_s`` is both, the number the "100 x 100 in < 30 s" budget
is about. One untimed warm-up run comes first (imports, reading digits).

``decentral_sweep``: the reproduction study. Final mean accuracy (alive nodes) against
the drop fraction for each scenario, mean and standard deviation over seeds, one panel
per averaging rule; optionally a PNG. Everything about the setup that the seed paper
does not state is a flag here (see docs/decentral.md, "What is assumed").
"""

from __future__ import annotations

import argparse
import statistics
import time

from .registry import register


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


# --- decentral: time against nodes -----------------------------------------------


def _timing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", default="10,30,100,300,1000", help="comma-separated node counts")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--graph", default="ba:m=2")
    p.add_argument("--threads", default="1,2", help="comma-separated torch intra-op thread counts")
    p.add_argument("--repeats", type=int, default=1, help="runs per point; the median is reported")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--plot", default=None, help="write a PNG of time against nodes here")


@register("decentral", "gossip-learning simulator: wall time of N nodes x R rounds on CPU", _timing_arguments)
def run_timing(args: argparse.Namespace) -> dict:
    import torch

    from commflow.decentral import DecentralConfig, Schedule, prepare, scenario_events, simulate

    # Untimed warm-up: the first prepare pays for importing scikit-learn and reading digits.
    simulate(prepare(DecentralConfig(nodes=10, rounds=2), Schedule()))
    rows = []
    for threads in _ints(args.threads):
        torch.set_num_threads(threads)
        for n in _ints(args.nodes):
            cfg = DecentralConfig(nodes=n, graph=args.graph, rounds=args.rounds, dtype=args.dtype)
            schedule = Schedule(events=scenario_events("relay", fraction=0.3, at=args.rounds // 5))
            prep_t, sim_t, sim_cpu = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                prep = prepare(cfg, schedule)
                t1, c1 = time.perf_counter(), time.process_time()
                res = simulate(prep)
                t2, c2 = time.perf_counter(), time.process_time()
                prep_t.append(t1 - t0)
                sim_t.append(t2 - t1)
                sim_cpu.append(c2 - c1)
            row = {
                "threads": threads,
                "nodes": n,
                "rounds": args.rounds,
                "links": prep.graph.number_of_edges(),
                "params_per_node": prep.layout.num_params,
                "prepare_s": statistics.median(prep_t),
                "simulate_s": statistics.median(sim_t),
                # CPU seconds of this process: on a shared box, wall time also counts other people's work.
                "simulate_cpu_s": statistics.median(sim_cpu),
                "final_mean_acc": res.records[-1]["mean_acc"],
            }
            row["total_s"] = row["prepare_s"] + row["simulate_s"]
            row["ms_per_round"] = 1e3 * row["simulate_s"] / args.rounds
            rows.append(row)
            print(f"threads={threads} nodes={n:>5} rounds={args.rounds}: prepare {row['prepare_s']:6.2f} s, "
                  f"simulate {row['simulate_s']:7.2f} s ({row['ms_per_round']:7.1f} ms/round, "
                  f"{row['simulate_cpu_s']:.2f} CPU s), "
                  f"final mean acc {row['final_mean_acc']:.3f}", flush=True)
    if args.plot:
        _plot_timing(rows, args.plot, args.rounds)
    return {"rows": rows, "cpu_count": _cpu_count()}


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _plot_timing(rows: list[dict], path: str, rounds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(5.4, 3.8), constrained_layout=True)
    for k, threads in enumerate(sorted({r["threads"] for r in rows})):
        pts = [r for r in rows if r["threads"] == threads]
        color = f"C{k}"
        ax.plot([r["nodes"] for r in pts], [r["total_s"] for r in pts], marker="o", color=color,
                label=f"{threads} thread(s): wall")
        ax.plot([r["nodes"] for r in pts], [r["simulate_cpu_s"] for r in pts], marker="s", ls=":", color=color,
                label=f"{threads} thread(s): CPU s of the process")
    ax.axhline(30, color="grey", ls="--", lw=0.8, label="30 s budget (100 nodes)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_yticks([t for t in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
                   if min(r["simulate_cpu_s"] for r in rows) / 2 < t < 2 * max(r["total_s"] for r in rows)])
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("nodes")
    ax.set_ylabel(f"seconds for {rounds} rounds")
    ax.set_title("commflow.decentral simulator on CPU", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- decentral_sweep: final accuracy against drop fraction ------------------------


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--graph", default="ba:m=2")
    p.add_argument("--fractions", default="0.1,0.2,0.3")
    p.add_argument("--scenarios", default="data,relay,data:degree,relay:random,relay-nodrop")
    p.add_argument("--mixings", default="metropolis,data:0,data:0.1",
                   help="averaging rules; data:F is the data rule with floor F (0 = pure DecAvg weighting)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--at", type=int, default=20)
    p.add_argument("--split", default="iid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None, help="write a PNG of final accuracy against drop fraction here")


@register("decentral_sweep", "gossip learning under node loss: final accuracy vs drop fraction (CPU)",
          _sweep_arguments)
def run_sweep(args: argparse.Namespace) -> dict:
    import torch

    from commflow.decentral import DecentralConfig, run_comparison

    torch.set_num_threads(args.threads)
    fractions = _floats(args.fractions)
    scenarios = [s for s in args.scenarios.split(",") if s]
    rows = []
    t0 = time.perf_counter()
    for mixing in [m for m in args.mixings.split(",") if m]:
        rule, _, floor = mixing.partition(":")
        for seed in _ints(args.seeds):
            cfg = DecentralConfig(nodes=args.nodes, graph=args.graph, rounds=args.rounds, seed=seed, mixing=rule,
                                  floor=float(floor) if floor else 0.1, split=args.split)
            base = run_comparison(cfg, ["none"], fraction=0.0, at=args.at)["none"].records[-1]
            rows.append({"mixing": mixing, "seed": seed, "scenario": "none", "fraction": 0.0,
                         "final_mean_acc": base["mean_acc"], "final_min_acc": base["min_acc"],
                         "components": base["components"], "isolated": base["isolated"]})
            for f in fractions:
                res = run_comparison(cfg, scenarios, fraction=f, at=args.at)
                for name, r in res.items():
                    last = r.records[-1]
                    rows.append({"mixing": mixing, "seed": seed, "scenario": name, "fraction": f,
                                 "final_mean_acc": last["mean_acc"], "final_min_acc": last["min_acc"],
                                 "components": last["components"], "isolated": last["isolated"]})
            print(f"{mixing} seed {seed}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = _summarise(rows)
    for s in summary:
        print(f"{s['mixing']:>12} {s['scenario']:>14} f={s['fraction']:.2f}: final mean acc "
              f"{s['mean']:.3f} ± {s['std']:.3f}  (components {s['components']:.1f})")
    if args.plot:
        _plot_sweep(summary, args.plot, args)
    return {"rows": rows, "summary": summary, "wall_s": time.perf_counter() - t0}


def _summarise(rows: list[dict]) -> list[dict]:
    keys = sorted({(r["mixing"], r["scenario"], r["fraction"]) for r in rows}, key=str)
    out = []
    for mixing, scenario, f in keys:
        accs = [r["final_mean_acc"] for r in rows if (r["mixing"], r["scenario"], r["fraction"]) == (mixing, scenario, f)]
        comps = [r["components"] for r in rows if (r["mixing"], r["scenario"], r["fraction"]) == (mixing, scenario, f)]
        out.append({"mixing": mixing, "scenario": scenario, "fraction": f, "mean": statistics.fmean(accs),
                    "std": statistics.pstdev(accs), "seeds": len(accs), "components": statistics.fmean(comps)})
    return out


def _plot_sweep(summary: list[dict], path: str, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixings = list(dict.fromkeys(s["mixing"] for s in summary))
    fig, axes = plt.subplots(1, len(mixings), figsize=(4.2 * len(mixings), 3.6), sharey=True, squeeze=False,
                             constrained_layout=True)
    for ax, mixing in zip(axes[0], mixings):
        rows = [s for s in summary if s["mixing"] == mixing]
        none = next(s for s in rows if s["scenario"] == "none")
        ax.axhline(none["mean"], color="black", lw=1, label="none (no drop)")
        for scenario in dict.fromkeys(s["scenario"] for s in rows if s["scenario"] != "none"):
            pts = sorted((s for s in rows if s["scenario"] == scenario), key=lambda s: s["fraction"])
            xs = [s["fraction"] for s in pts]
            ax.errorbar(xs, [s["mean"] for s in pts], yerr=[s["std"] for s in pts], marker="o", capsize=3,
                        label=scenario, ls="--" if ":" in scenario else "-")
        ax.set_title(f"mixing: {mixing}", fontsize=9)
        ax.set_xlabel(f"fraction of nodes dropped at round {args.at}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final mean accuracy (round {args.rounds - 1}, alive nodes)")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{args.graph}, N={args.nodes}, {args.split}, mean ± std over seeds {args.seeds}", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
