"""Seeded fault scenarios on real traced gloo jobs, scored against ground truth.

Used by the tests and the benchmarks. :func:`run_scenario` starts a live
:class:`~commflow.monitor.coordinator.Coordinator` in this process and ``world``
worker processes (forked from a forkserver that has torch imported: ~0.1 s per world
instead of seconds). Each worker builds a gloo group, calls :func:`watch` with the
faults, and runs a synthetic training loop: per iteration :func:`step`, a compute
phase (``compute_ms``, a sleep: the CPU is shared by everyone, so sleeping makes the
nominal compute exact while real scheduling noise stays), then the collectives of
``ops``. The coordinator detects live and keeps going after each verdict; instead of
restarting without the culprit it tells the injectors to *heal* the faults that fired,
which is what excluding the culprit's hardware achieves. So one job can go through
many faults, each lasting until it is caught (or its ``until``/``hold`` bound), and
:func:`score` matches verdicts to the injected ground truth.

A scenario is a plain list of ``--inject`` specs, so many trials can share one job:
:func:`trial_plan` lays out ``n`` faults of one class at seeded ranks/edges and
iterations with healthy gaps between them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .coordinator import Coordinator, ProbeConfig
from .detect import DetectConfig, Verdict
from .inject import resolve_faults

__all__ = ["Scenario", "ScenarioResult", "healthy_iterations", "run_lanes", "run_scenario", "run_scenarios", "score",
           "trial_plan"]


@dataclass(kw_only=True)
class Scenario:
    """One job: world, workload, faults."""

    world: int = 4
    iterations: int = 200
    compute_ms: float = 8.0
    """Compute per iteration, split evenly between the ops: a sleep on CPU, bf16 GEMMs
    (calibrated at start) on CUDA."""
    ops: tuple[str, ...] = ("all_reduce", "all_gather")
    nbytes: int = 16 << 10
    """Bytes per collective and rank."""
    faults: list[str] = field(default_factory=list)
    seed: int = 0
    detect: DetectConfig = field(default_factory=DetectConfig)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(nbytes=64 << 10, reps=3, timeout_s=0.3))
    timeout_s: float = 300.0
    device: str = "cpu"
    """"cpu" (gloo) or "cuda" (NCCL, one GPU per rank)."""
    slow_mode: str = "work"
    """CUDA: a slow rank does ``factor`` x the GEMMs ("work") or runs a competing GEMM
    stream beside its own ("contend"). CPU always emulates with a sleep."""
    link_mode: str = "delay"
    """CUDA slowlink: "delay" holds the edge's transfers with a GPU sleep on the source's
    stream (the injector's emulation, as on CPU); "congest" loads the link for real."""
    congest_mib: int = 512
    """CUDA slowlink, link_mode "congest": bytes the link's two ends exchange per
    iteration on a side group, loading that pair's NVLink while the job runs."""
    pg_timeout_s: float | None = None
    """The job's own collective timeout (PyTorch's watchdog/gloo timeout), for the
    baseline comparison; None = torch's default."""
    nvrx_every: int | None = None
    """Also run nvidia-resiliency-ext's straggler Detector, reporting every N iterations."""
    heal_on_verdict: bool = True
    failure_grace_s: float = 5.0
    """After the first rank fails (exits non-zero or reports an error), how long to wait
    for the others before ending the job. Survivors of a crash on NCCL stay blocked in
    their collective until the 10-min watchdog; gloo raises at once. A real job would be
    torn down and restarted here, so the scenario does the same."""

    def __post_init__(self) -> None:
        if self.slow_mode not in ("work", "contend"):
            raise ValueError(f"slow_mode must be 'work' or 'contend', got {self.slow_mode!r}")
        if self.link_mode not in ("delay", "congest"):
            raise ValueError(f"link_mode must be 'delay' or 'congest', got {self.link_mode!r}")


@dataclass
class ScenarioResult:
    verdicts: list[Verdict]
    injected: list[dict]
    faults: list[Any]
    iterations: list[dict]
    """Per-iteration detector rows (period, lateness, comm time, flags)."""
    worker: dict[int, dict]
    """Per-rank outcome: iterations done, error text and time, NVRx findings."""
    wall_s: float
    drain_s: float = 0.0
    """How long the coordinator lagged behind the workers' end."""
    suspicions: list[Verdict] = field(default_factory=list)
    events: list = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: dict[int, float] = field(default_factory=dict)
    """When each rank's channel closed (coordinator clock)."""


def _gemm(dev: Any, ms: float) -> Callable[[float], None]:
    """A function doing ``scale * ms`` of bf16 GEMMs on ``dev`` (calibrated once)."""
    import torch

    a = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(dev)
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize(dev)
    per = (time.perf_counter() - t) / 20 * 1e3
    n = max(1, round(ms / per))

    def run(scale: float) -> None:
        for _ in range(max(1, round(n * scale))):
            a @ b

    return run


def _worker(rank: int, sc: Scenario, store_port: int, endpoint: str, faults: list[dict], q: Any,
            inject_log: str) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from . import runtime

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(sc.world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), COMMFLOW_INJECT_LOG=inject_log,
                      COMMFLOW_DEVICE=sc.device)
    out: dict = {"rank": rank, "iterations": 0, "error": None, "error_t": None}
    cuda = sc.device == "cuda"
    try:
        store = dist.TCPStore("127.0.0.1", store_port, sc.world, is_master=False)
        timeout = {} if sc.pg_timeout_s is None else {"timeout": timedelta(seconds=sc.pg_timeout_s)}
        if cuda:
            torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=sc.world, **timeout)
        pairs = {}
        if cuda and sc.link_mode == "congest" and any(f["kind"] == "slowlink" for f in faults):
            for a in range(sc.world):  # collective: every rank creates every pair group
                for b in range(a + 1, sc.world):
                    pairs[(a, b)] = dist.new_group([a, b])
        tracer = runtime.watch(endpoint, faults=faults, seed=sc.seed, interval=0.05)
        inj = tracer.injector
        if cuda and inj is not None:
            inj.emulate_compute = False  # the GEMMs below do the extra work
            inj.emulate_links = not pairs  # congest: the pair groups below load the link
        numel = max(1, sc.nbytes // 4)
        x = torch.ones(numel, device=dev)
        gathered = torch.empty(numel * sc.world, device=dev)
        per_op = sc.compute_ms / max(1, len(sc.ops))
        gemm = _gemm(dev, per_op) if cuda else None
        contend = _Contender(dev) if cuda and sc.slow_mode == "contend" else None
        big = torch.empty((sc.congest_mib << 20) // 2, device=dev, dtype=torch.bfloat16) if pairs else None
        nvrx = _nvrx(sc, out) if sc.nvrx_every else None
        from commflow.dist import all_gather_tensor, reduce_scatter_tensor

        for it in range(sc.iterations):
            runtime.step(it)
            scale = 1.0
            if cuda and inj is not None:
                # Contend: the slow fault switches the competing stream on; jitter still
                # scales every rank's own GEMMs (it used to switch the contender on too,
                # on every rank, whenever jitter came out above 1).
                scale = inj.compute_scale(it, slow=contend is None)
                if contend is not None:
                    contend.active = inj.slow_active(it)
            links = inj.active_links(it) if (pairs and inj is not None) else []
            works = []
            section = nvrx.detection_section("compute", profile_cuda=cuda) if nvrx else _nullcontext()
            for i, op in enumerate(sc.ops):
                with section if i == 0 else _nullcontext():
                    if cuda:
                        gemm(scale)
                    else:
                        time.sleep(per_op / 1e3)
                if i == 0:
                    # Load the link now, after the compute: issued at the iteration's start,
                    # the side transfer finished under the GEMMs and never met the job's
                    # collectives (0 of 2 slow links found on 4 H100s).
                    works = _load_links(links, pairs, big, rank)
                if op == "all_reduce":
                    dist.all_reduce(x)
                    x.fill_(1.0)
                elif op == "all_gather":
                    all_gather_tensor(gathered, x)
                elif op == "reduce_scatter":
                    reduce_scatter_tensor(x, gathered)
                elif op == "broadcast":
                    dist.broadcast(x, 0)
                elif op == "barrier":
                    dist.barrier()
            for w in works:
                w.wait()
            if nvrx and (it + 1) % sc.nvrx_every == 0 and not _nvrx_report(nvrx, it, out):
                nvrx = None
            out["iterations"] = it + 1
        if contend is not None:
            contend.stop()
        runtime.step(sc.iterations)  # closes the last iteration
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        time.sleep(0.2)  # let the reporter ship the last records
        runtime.unwatch()
    except BaseException as e:  # noqa: BLE001 - report like the launcher's worker wrapper
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
        out["error_t"] = time.time()
        runtime.unwatch(error=out["error"] + "\n" + traceback.format_exc(limit=3))
        _exit(q, out, 1)
    _exit(q, out, 0)


def _load_links(links: list[tuple[int, int]], pairs: dict, big: Any, rank: int) -> list:
    """Start the side-group transfers that load each (src, dst) link of ``links`` (CUDA
    slowlink emulation); returns their work handles."""
    import torch.distributed as dist

    works = []
    for s, d in links:
        g = pairs[(min(s, d), max(s, d))]
        if rank == s:
            works.append(g.send([big], dist.get_group_rank(g, d), 0))
        elif rank == d:
            works.append(g.recv([big], dist.get_group_rank(g, s), 0))
    return works


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _Contender:
    """A competing GEMM stream on the same GPU while ``active`` (a slow GPU)."""

    def __init__(self, dev: Any):
        import threading

        self.active = False
        self._stop = False
        self.dev = dev
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import torch

        torch.cuda.set_device(self.dev)
        stream = torch.cuda.Stream(self.dev)
        a = torch.randn(4096, 4096, device=self.dev, dtype=torch.bfloat16)
        while not self._stop:
            if not self.active:
                time.sleep(0.001)
                continue
            with torch.cuda.stream(stream):
                for _ in range(8):
                    a @ a
            stream.synchronize()

    def stop(self) -> None:
        self._stop = True
        self.thread.join(5)


def _nvrx(sc: Scenario, out: dict) -> Any:
    """nvidia-resiliency-ext's straggler Detector, or None (the reason goes to ``out``)."""
    if sc.device != "cuda":
        # NVRx 0.4's Detector.generate_report starts with torch.cuda.synchronize(): on a CPU
        # torch every report raised, and the job died at its first report (found running the
        # baseline on CPU with NVRx installed: our own slow-rank row then read "not detected").
        out["nvrx_error"] = "nvidia-resiliency-ext's straggler reports need CUDA (generate_report synchronizes the GPU)"
        return None
    try:
        import nvidia_resiliency_ext.straggler as straggler

        straggler.Detector.initialize(scores_to_compute="all", gather_on_rank0=True, profiling_interval=1,
                                      report_time_interval=1e9)
        return straggler.Detector
    except Exception as e:  # noqa: BLE001 - not installed / no CUPTI on this machine
        out["nvrx_error"] = f"{type(e).__name__}: {e}"[:300]
        return None


def _nvrx_report(detector: Any, it: int, out: dict) -> bool:
    """Ask NVRx for a report; False (and the reason in ``out``) if it failed: the caller
    stops asking, and the job, the thing being measured, goes on."""
    try:
        _nvrx_report_once(detector, it, out)
        return True
    except Exception as e:  # noqa: BLE001 - a baseline add-on must not end the job it observes
        out["nvrx_error"] = f"{type(e).__name__}: {e}"[:300]
        return False


def _nvrx_report_once(detector: Any, it: int, out: dict) -> None:
    report = detector.generate_report()
    if report is None:  # only rank 0 gets the gathered report
        return
    found = report.identify_stragglers()  # NVRx's default thresholds (score < 0.75)
    ranks: set[int] = set()
    for value in found.values():  # sets of StragglerId, or {section: set}
        for item in (value.values() if isinstance(value, dict) else [value]):
            ranks |= {s.rank for s in item}
    out.setdefault("nvrx", []).append({"iteration": it, "t": time.time(), "stragglers": sorted(ranks)})


def _exit(q: Any, out: dict, code: int) -> None:
    q.put(out)
    q.close()
    q.join_thread()  # os._exit would drop what the queue's feeder thread still holds
    os._exit(code)


_CTX: Any = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "commflow.monitor"])
    return _CTX


def run_scenario(sc: Scenario) -> ScenarioResult:
    """Run one job to the end (or its crash) with a live coordinator; see module doc."""
    return run_scenarios([sc])[0]


def run_scenarios(scenarios: list[Scenario]) -> list[ScenarioResult]:
    """Run several jobs at the same time (each its own world and coordinator)."""
    running = [_start(sc) for sc in scenarios]
    return [_finish(run) for run in running]


def run_lanes(lanes: list[list[Scenario]]) -> list[list[ScenarioResult]]:
    """Lanes run side by side; the jobs of one lane run one after another."""
    import threading

    out: list[list[ScenarioResult]] = [[] for _ in lanes]
    errors: list[BaseException] = []

    def lane(i: int) -> None:
        try:
            for sc in lanes[i]:
                t0 = time.time()
                out[i].append(run_scenario(sc))
                # One line per finished scenario: a long GPU run cut short still says how far it got.
                print(f"# scenario done in {time.time() - t0:.1f} s: {len(sc.faults)} fault spec(s), "
                      f"{sc.iterations} iterations, device {sc.device}", flush=True)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=lane, args=(i,)) for i in range(len(lanes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def _start(sc: Scenario) -> dict:
    import tempfile

    import torch.distributed as dist

    faults = resolve_faults(sc.faults, sc.world, sc.seed)
    ctx = _context()
    log_fd, inject_log = tempfile.mkstemp(prefix="commflow-injected-", suffix=".jsonl")
    os.close(log_fd)
    store = dist.TCPStore("127.0.0.1", 0, sc.world, is_master=True, wait_for_workers=False)
    coord = Coordinator(sc.detect, sc.probe, auto_ack=True, heal_on_verdict=sc.heal_on_verdict).start()
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, sc, store.port, coord.endpoint, [f.to_json() for f in faults], q,
                                                inject_log))
             for r in range(sc.world)]
    t0 = time.time()
    for p in procs:
        p.start()
    return {"sc": sc, "faults": faults, "log": inject_log, "store": store, "coord": coord, "q": q, "procs": procs,
            "t0": t0}


def _finish(run: dict) -> ScenarioResult:
    import json

    sc, coord, q, procs = run["sc"], run["coord"], run["q"], run["procs"]
    outcome: dict[int, dict] = {}
    drain_s = 0.0
    try:
        deadline = run["t0"] + sc.timeout_s
        first_failure = None
        while len(outcome) < sc.world and time.time() < deadline:
            try:
                got = q.get(timeout=0.2)
                outcome[got["rank"]] = got
            except Exception:  # noqa: BLE001 - queue.Empty
                if all(not p.is_alive() for p in procs):
                    break
            if first_failure is None and (any(o.get("error") for o in outcome.values())
                                          or any(p.exitcode not in (None, 0) for p in procs)):
                first_failure = time.time()
            if first_failure is not None and time.time() - first_failure > sc.failure_grace_s:
                break  # the survivors may never return (NCCL): end the job as a restart would
        # Let the coordinator drain the last reports, or settle a crash verdict.
        t_drain = time.time()
        failed = len(outcome) < sc.world or any(o.get("error") for o in outcome.values())
        # Ranks that died without reporting (a crash, or NCCL's watchdog abort): wait until
        # a verdict names each of them (or the settle time passes), not for the first
        # verdict, which may be about another fault of the same job.
        silent = {r for r, p in enumerate(procs) if r not in outcome and p.exitcode not in (None, 0)}
        while time.time() - t_drain < 10:
            named = {r for v in coord.verdicts for r in v.ranks}
            settled = time.time() - t_drain > sc.detect.crash_settle_s + 1.5
            if failed and ((coord.verdicts and silent <= named) or settled):
                break
            if not failed and (coord.detector.next_close or 0) >= sc.iterations and coord._probe is None:
                break
            time.sleep(0.02)
        drain_s = time.time() - t_drain
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        coord.stop()
        del run["store"]
    with open(run["log"]) as fh:
        injected = [json.loads(line) for line in fh if line.strip()]
    os.unlink(run["log"])
    for r, p in enumerate(procs):
        outcome.setdefault(r, {"rank": r, "iterations": None, "error": f"exit code {p.exitcode}"})
    return ScenarioResult(
        verdicts=list(coord.verdicts),
        injected=injected,
        faults=run["faults"],
        iterations=list(coord.iteration_rows),
        worker=outcome,
        wall_s=time.time() - run["t0"],
        drain_s=drain_s,
        suspicions=list(coord.suspicions),
        events=list(coord.events),
        errors=list(coord.errors),
        closed={r: st.closed_at for r, st in coord.detector.ranks.items() if st.closed_at is not None},
    )


# kind of fault -> verdict kinds that count as detecting it
EXPECTED = {
    "hang": {"hang"},
    "crash": {"crash"},
    "slow": {"slow_rank"},
    "slowlink": {"slow_link"},
    "linkdown": {"comm_hang"},
}


def trial_plan(kind: str, n: int, *, world: int, seed: int, start: int, gap: int, length: int,
               **params: Any) -> tuple[list[str], int]:
    """``n`` faults of ``kind`` at seeded ranks (or edges), ``gap`` iterations apart.

    Returns the specs and the iteration count the job needs.
    """
    rng = np.random.default_rng(seed)
    specs = []
    at = start
    for _ in range(n):
        if kind in ("slowlink", "linkdown"):
            src, dst = (int(v) for v in rng.choice(world, size=2, replace=False))
            who = f"src={src},dst={dst}"
        else:
            who = f"rank={int(rng.integers(world))}"
        extra = ",".join(f"{k}={v}" for k, v in params.items())
        until = f",until={at + length}" if kind in ("slow", "slowlink", "linkdown") else ""
        specs.append(f"{kind}:{who},at={at}{until}" + (f",{extra}" if extra else ""))
        at += length + gap
    return specs, at + 5


def healthy_iterations(result: ScenarioResult, *, recover: int = 5) -> int:
    """Closed iterations outside every fault's active stretch (from ``at`` to its heal,
    or to ``until``, plus ``recover`` iterations): the ones a false alarm could hit."""
    healed = {e["fault"].get("text"): e["iteration"] for e in result.injected if e["kind"] == "heal"}
    windows = []
    for f in result.faults:
        if f.kind == "jitter":
            continue
        end = healed.get(f.text, f.until if f.until is not None else f.at + 1)
        windows.append((f.at, end + recover))
    return sum(1 for row in result.iterations if not any(a <= row["iteration"] < b for a, b in windows))


def _names_culprit(v: Verdict, ev: dict) -> bool:
    """Whether verdict ``v`` names the injected fault ``ev``'s edge (either direction) or rank."""
    if ev["kind"] in ("slowlink", "linkdown"):
        return v.link is not None and sorted(v.link) == sorted(ev["link_ranks"])
    return v.ranks == [ev["rank"]]


def score(result: ScenarioResult, *, window_s: float = 30.0) -> dict:
    """Match each fired fault to the first verdict after it; count the rest as false alarms.

    A fault is *detected* if a verdict of the expected kind follows its firing
    (within ``window_s``, before the next fault fires) and *localized* if the
    verdict names its rank (or, for links, its edge). Returns per-fault rows and
    totals, with latencies from the fault's firing to the verdict.
    """
    fired = sorted((e for e in result.injected if e["kind"] not in ("jitter", "heal")), key=lambda e: e["t"])
    # One event per fault (a link fault fires on its source only).
    verdicts = sorted(result.verdicts, key=lambda v: v.t_detect)
    # Each fault's window: from its firing to the next fault's, at most window_s.
    ends = [min(fired[i + 1]["t"] if i + 1 < len(fired) else float("inf"), ev["t"] + window_s)
            for i, ev in enumerate(fired)]
    used: set[int] = set()
    rows = []
    for i, ev in enumerate(fired):
        f = ev["fault"]
        hit = None
        for j, v in enumerate(verdicts):
            if j in used or v.t_detect < ev["t"] or v.t_detect > ends[i]:
                continue
            hit = j
            break
        row = {"kind": ev["kind"], "fault": f.get("text"), "rank": ev.get("rank"), "iteration": ev["iteration"],
               "detected": False, "localized": False, "verdict": None, "latency_s": None}
        if hit is not None:
            used.add(hit)
            v = verdicts[hit]
            row["verdict"] = v.kind
            row["verdict_iteration"] = v.iteration
            row["ranks"] = v.ranks
            row["link"] = v.link
            row["latency_s"] = v.t_detect - ev["t"]
            row["localize_s"] = (v.t_localized or v.t_detect) - v.t_detect
            row["detected"] = v.kind in EXPECTED[ev["kind"]]
            row["localized"] = row["detected"] and _names_culprit(v, ev)
            if ev["kind"] in ("slowlink", "linkdown"):
                row["direction_ok"] = v.link == ev["link_ranks"]
        rows.append(row)
    # A verdict that names a fault's culprit again while that fault still runs (not yet
    # healed: on CUDA a verdict does not heal, and the fault lasts its whole length)
    # repeats a true alarm; only the others are false.
    healed: dict[str, float] = {}
    for e in result.injected:
        if e["kind"] == "heal":
            text = e["fault"].get("text")
            healed[text] = min(healed.get(text, float("inf")), e["t"])
    repeats, false = [], []
    for j, v in enumerate(verdicts):
        if j in used:
            continue
        same = any(ev["t"] <= v.t_detect <= min(ends[i], healed.get(ev["fault"].get("text"), float("inf")))
                   and v.kind in EXPECTED[ev["kind"]] and _names_culprit(v, ev) for i, ev in enumerate(fired))
        (repeats if same else false).append(v.to_json())
    return {
        "faults": rows,
        "n": len(rows),
        "detected": sum(r["detected"] for r in rows),
        "localized": sum(r["localized"] for r in rows),
        "false_alarms": false,
        "repeats": repeats,
    }
