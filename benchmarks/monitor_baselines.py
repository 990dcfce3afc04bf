"""commflow.monitor beside PyTorch's own timeout and nvidia-resiliency-ext's straggler detector.

Same job, same injected fault, both detectors watching:

* **hang** -- one rank stops before a collective. PyTorch's answer is the collective
  timeout: the NCCL watchdog (``ProcessGroupNCCL``, default 10 min, aborts the process),
  or gloo's collective timeout on CPU (default 30 min, raises in the waiting ranks).
  A 10-30 min run per trial is not affordable, so the job runs with
  ``--pg-timeout-s`` (default 20 s) and the table states both the measured time at
  that setting and the default. PyTorch's timeout also names no culprit: every
  waiting rank fails with the same "timed out"; the culprit is the one that does not.
* **slow rank** -- one rank's compute runs ``--factor`` x slower. nvidia-resiliency-ext
  (``nvidia_resiliency_ext.straggler.Detector``, relative + individual scores, its
  default 0.75 thresholds) wraps the compute section and reports every
  ``--nvrx-every`` iterations; we record the first report that names the rank. It
  needs CUPTI (``libcupti.so.12``): on a machine without it the row says why.

    python -m benchmarks monitor_baselines --device cpu
    python -m benchmarks monitor_baselines --device cuda --nproc 4 --pg-timeout-s 20
"""

from __future__ import annotations

import argparse

from .registry import register


def _arguments(p: argparse.ArgumentParser) -> None:
    import torch

    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--pg-timeout-s", type=float, default=20.0)
    p.add_argument("--compute-ms", type=float, default=40.0)
    p.add_argument("--factor", type=float, default=3.0)
    p.add_argument("--nvrx-every", type=int, default=5)
    p.add_argument("--slow-mode", choices=["work", "contend"], default="contend")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict:
    from commflow.monitor.coordinator import ProbeConfig
    from commflow.monitor.scenario import Scenario, run_scenario

    cuda = args.device == "cuda"
    probe = ProbeConfig(nbytes=(64 << 20) if cuda else (64 << 10), backend="nccl" if cuda else "gloo")
    nbytes = (64 << 20) if cuda else (64 << 10)
    hold = args.pg_timeout_s + 15.0
    culprit = 1
    hang = run_scenario(Scenario(
        world=args.nproc, iterations=60, compute_ms=args.compute_ms, nbytes=nbytes, device=args.device,
        faults=[f"hang:rank={culprit},at=30,hold={hold}s"], pg_timeout_s=args.pg_timeout_s, probe=probe,
        heal_on_verdict=False, seed=args.seed, timeout_s=hold + 120))
    t_inj = next(e["t"] for e in hang.injected if e["kind"] == "hang")
    ours = next((v for v in hang.verdicts if v.kind == "hang"), None)
    # PyTorch: the first waiting rank whose collective failed (gloo raises; the NCCL
    # watchdog tears the process down, which closes its channel).
    failed = [o["error_t"] for r, o in hang.worker.items() if r != culprit and o.get("error_t")]
    failed += [t for r, t in hang.closed.items() if r != culprit]
    torch_t = min(failed) if failed else None
    default_s = 600.0 if cuda else 1800.0
    hang_row = {
        "fault": f"hang:rank={culprit},at=30",
        "commflow_detect_s": ours.t_detect - t_inj if ours else None,
        "commflow_culprit": ours.ranks if ours else None,
        "pytorch_timeout_setting_s": args.pg_timeout_s,
        "pytorch_detect_s": (torch_t - t_inj) if torch_t else None,
        "pytorch_default_timeout_s": default_s,
        "pytorch_default_config": ("ProcessGroupNCCL watchdog, timeout=10 min (default_pg_nccl_timeout), "
                                   "TORCH_NCCL_ASYNC_ERROR_HANDLING=3 (tear down)" if cuda else
                                   "ProcessGroupGloo collective timeout = default_pg_timeout (30 min)"),
        "pytorch_names_culprit": False,
        "pytorch_errors": sorted({(o.get("error") or "")[:120] for r, o in hang.worker.items() if r != culprit}),
    }

    slow = run_scenario(Scenario(
        world=args.nproc, iterations=120, compute_ms=args.compute_ms, nbytes=nbytes, device=args.device,
        faults=[f"slow:rank={culprit},factor={args.factor},at=40,until=110"], nvrx_every=args.nvrx_every,
        slow_mode=args.slow_mode, probe=probe, heal_on_verdict=False, seed=args.seed))
    t_slow = next((e["t"] for e in slow.injected if e["kind"] == "slow"), None)
    ours = next((v for v in slow.verdicts if v.kind == "slow_rank"), None)
    nvrx = slow.worker.get(0, {}).get("nvrx") or []
    nvrx_hit = next((r for r in nvrx if r["iteration"] >= 40 and culprit in r["stragglers"]), None)
    nvrx_false = [r for r in nvrx if r["iteration"] < 40 and r["stragglers"]]
    slow_row = {
        "fault": f"slow:rank={culprit},factor={args.factor},at=40",
        "commflow_detect_s": (ours.t_detect - t_slow) if ours and t_slow else None,
        "commflow_detect_iters": (ours.iteration - 40) if ours else None,
        "commflow_culprit": ours.ranks if ours else None,
        "nvrx_detect_s": (nvrx_hit["t"] - t_slow) if nvrx_hit and t_slow else None,
        "nvrx_detect_iters": (nvrx_hit["iteration"] - 40) if nvrx_hit else None,
        "nvrx_report_every": args.nvrx_every,
        "nvrx_false_before_fault": len(nvrx_false),
        "nvrx_error": slow.worker.get(0, {}).get("nvrx_error"),
    }
    return {"hang": hang_row, "slow": slow_row}


register("monitor_baselines", "commflow.monitor vs PyTorch's collective timeout and NVRx straggler detection",
         _arguments)(run)
