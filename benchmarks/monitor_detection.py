"""commflow.monitor: detection latency against slowdown size, and localization accuracy.

Seeded faults injected into real traced jobs (4 ranks by default), one world per
setting, each fault lasting until its verdict heals it (or ``--max-fault-iters``):

* slow ranks at each ``--factors`` value (1.2x-5x): iterations and seconds from the
  fault's first iteration to the ``slow_rank`` verdict, and whether it named the rank;
* slow links at each ``--delays-ms``: a per-message delay on the edge (CPU: the source
  holds the call; CUDA: a GPU sleep on the source's stream inside each collective or
  send that crosses the edge, so the transfer itself starts late). CUDA with
  ``--link-mode congest`` instead loads the edge for real: its two GPUs exchange each
  ``--congest-mib`` per iteration on a side NCCL group (on an NVSwitch that does not
  slow the job's collectives measurably: 0/2 found on 2 and 4 H100s);
* hangs, dead links (CPU) and crashes: seconds to the verdict, against the bound
  max(3 x median step, 2 s);
* false alarms over the healthy iterations of all these jobs.

CPU (gloo) emulates compute with a sleep; CUDA (NCCL) runs bf16 GEMMs and slows a GPU
with more GEMMs (``--slow-mode work``) or a competing GEMM stream (``contend``).

    python -m benchmarks monitor_detection --device cpu --trials 10
    python -m benchmarks monitor_detection --device cuda --nproc 4 --trials 5 --slow-mode contend
"""

from __future__ import annotations

import argparse
import statistics
import time

from .registry import register


def _arguments(p: argparse.ArgumentParser) -> None:
    import torch

    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--trials", type=int, default=10, help="faults per setting")
    p.add_argument("--factors", default="1.2,1.5,2,3,5", help="slow-rank compute factors")
    p.add_argument("--delays-ms", default="2,5,20", help="slow-link delays per message (link mode delay)")
    p.add_argument("--link-mode", choices=["delay", "congest"], default="delay",
                   help="CUDA slow-link emulation: a GPU-side delay on the edge, or real load on it")
    p.add_argument("--congest-mib", default="256,1024", help="CUDA slow-link load per iteration")
    p.add_argument("--kinds", default="slow,slowlink,hang,linkdown,crash")
    p.add_argument("--compute-ms", type=float, default=40.0, help="compute per iteration")
    p.add_argument("--nbytes", type=int, default=0, help="bytes per collective (0: 64 KiB CPU, 64 MiB CUDA)")
    p.add_argument("--slow-mode", choices=["work", "contend"], default="work")
    p.add_argument("--max-fault-iters", type=int, default=80)
    p.add_argument("--gap", type=int, default=15, help="healthy iterations between faults")
    p.add_argument("--lanes", type=int, default=1, help="CPU: settings run side by side")
    p.add_argument("--jitter-pct", type=float, default=20.0, help="per-iteration compute jitter on every rank")
    p.add_argument("--seed", type=int, default=0)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _summary(result, kind_rows: list[dict]) -> dict:
    det = [r for r in kind_rows if r["detected"]]
    lat = [r["latency_s"] for r in det]
    iters = [r["latency_iters"] for r in det if r.get("latency_iters") is not None]
    out = {
        "n": len(kind_rows),
        "detected": len(det),
        "localized": sum(r["localized"] for r in kind_rows),
        "latency_s_median": statistics.median(lat) if lat else None,
        "latency_s_p95": _pct(lat, 0.95),
        "latency_iters_median": statistics.median(iters) if iters else None,
        "latency_iters_p95": _pct(iters, 0.95),
    }
    if any("direction_ok" in r for r in kind_rows):
        out["direction_ok"] = sum(bool(r.get("direction_ok")) for r in kind_rows)
    return out


def run(args: argparse.Namespace) -> dict:
    from commflow.monitor.coordinator import ProbeConfig
    from commflow.monitor.scenario import Scenario, healthy_iterations, run_lanes, score, trial_plan

    cuda = args.device == "cuda"
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    nbytes = args.nbytes or ((64 << 20) if cuda else (64 << 10))
    probe = ProbeConfig(nbytes=(64 << 20) if cuda else (64 << 10), reps=3, timeout_s=1.0 if cuda else 0.2,
                        backend="nccl" if cuda else "gloo")
    jitter = [f"jitter:pct={args.jitter_pct:g}"] if args.jitter_pct > 0 else []
    settings: list[tuple[str, str, Scenario]] = []
    w = args.nproc

    def scenario(specs, its, seed, **kw):
        return Scenario(world=w, iterations=its, compute_ms=args.compute_ms, nbytes=nbytes, faults=specs + jitter,
                        seed=seed, probe=probe, device=args.device, slow_mode=args.slow_mode,
                        heal_on_verdict=not cuda, timeout_s=3600, **kw)

    seed = args.seed
    if "slow" in kinds:
        for f in (float(x) for x in args.factors.split(",")):
            specs, its = trial_plan("slow", args.trials, world=w, seed=seed, start=40, gap=args.gap,
                                    length=args.max_fault_iters, factor=f)
            settings.append(("slow", f"factor={f}", scenario(specs, its, seed)))
            seed += 1
    if "slowlink" in kinds:
        congest = cuda and args.link_mode == "congest"
        values = args.congest_mib if congest else args.delays_ms
        for v in (x.strip() for x in values.split(",")):
            params = {"delay": "1ms"} if congest else {"delay": f"{v}ms"}  # congest: the load is the fault
            specs, its = trial_plan("slowlink", args.trials, world=w, seed=seed, start=40, gap=args.gap,
                                    length=args.max_fault_iters if not cuda else 40, **params)
            extra = {"congest_mib": int(v), "link_mode": "congest"} if congest else {}
            settings.append(("slowlink", f"{'congest_mib' if congest else 'delay_ms'}={v}",
                             scenario(specs, its, seed, **extra)))
            seed += 1
    if "hang" in kinds:
        specs, its = trial_plan("hang", args.trials, world=w, seed=seed, start=40, gap=args.gap, length=1,
                                hold="10s" if not cuda else "4s")
        settings.append(("hang", "hold", scenario(specs, its, seed)))
        seed += 1
    if "linkdown" in kinds and not cuda:
        specs, its = trial_plan("linkdown", args.trials, world=w, seed=seed, start=40, gap=args.gap, length=1,
                                hold="10s")
        settings.append(("linkdown", "hold", scenario(specs, its, seed)))
        seed += 1
    crash_lane = []
    if "crash" in kinds:
        import numpy as np

        rng = np.random.default_rng(seed)
        for j in range(args.trials):
            spec = f"crash:rank={int(rng.integers(w))},at={int(rng.integers(8, 16))}"
            crash_lane.append(Scenario(world=w, iterations=20, compute_ms=args.compute_ms / 4, nbytes=nbytes,
                                       faults=[spec], seed=seed + j, probe=probe, device=args.device, timeout_s=300))

    # Lay the settings out in lanes (1 lane: one after another, the quietest timing).
    lanes: list[list[Scenario]] = [[] for _ in range(max(1, args.lanes if not cuda else 1))]
    for i, (_, _, sc) in enumerate(settings):
        lanes[i % len(lanes)].append(sc)
    if crash_lane:
        lanes[-1].extend(crash_lane)
    t0 = time.time()
    results = run_lanes(lanes)
    flat: dict[int, object] = {}
    for lane, res in zip(lanes, results):
        for sc, r in zip(lane, res):
            flat[id(sc)] = r

    rows_out = []
    healthy = 0
    false_alarms = []
    periods = []
    for kind, label, sc in settings:
        r = flat[id(sc)]
        s = score(r)
        first_it = {e["fault"]["text"]: e["iteration"] for e in r.injected if e["kind"] not in ("jitter", "heal")}
        for row in s["faults"]:
            v_it = row.get("verdict_iteration")
            row["latency_iters"] = (v_it - first_it[row["fault"]]) if v_it is not None else None
        summ = _summary(r, s["faults"])
        period = statistics.median(x["period"] for x in r.iterations) if r.iterations else None
        periods.append(period)
        summ.update(kind=kind, setting=label, median_period_s=period, healthy_iterations=healthy_iterations(r),
                    false_alarms=len(s["false_alarms"]), repeated_verdicts=len(s["repeats"]),
                    suspicions=len(r.suspicions), wall_s=r.wall_s)
        if kind in ("hang", "linkdown") and period:
            summ["bound_s"] = max(3 * period, 2.0)
        healthy += summ["healthy_iterations"]
        false_alarms += s["false_alarms"]
        rows_out.append(summ)
    if crash_lane:
        crash_rows = []
        for sc in crash_lane:
            crash_rows += score(flat[id(sc)])["faults"]
        summ = _summary(None, crash_rows)
        summ.update(kind="crash", setting="exit(1)")
        rows_out.append(summ)
    return {
        "rows": rows_out,
        "healthy_iterations": healthy,
        "false_alarms": [(f["kind"], f["ranks"], f["link"]) for f in false_alarms],
        "wall_s": time.time() - t0,
        "note": "latency from the fault's first iteration (its injection time) to the verdict; "
                "localized = the verdict names the injected rank / edge",
    }


register("monitor_detection", "commflow.monitor: detection latency vs slowdown, localization accuracy",
         _arguments)(run)
