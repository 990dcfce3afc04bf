"""Flow-level simulation: max-min fair rates, event-driven over flow completions.

Rates. At any instant the active (sub)flows share links max-min fairly (progressive
filling): all unfrozen rates rise together until some link is full; the flows crossing
it freeze; repeat. A row of the incidence matrix may use a link fractionally (a sprayed
flow puts ``w_e`` of its rate on link ``e``), which is the fluid model of ideal spraying.
:func:`max_min_rates` is the vectorised solver; :func:`max_min_rates_reference` is the
textbook loop it is tested against.

Time. Rates hold until the next flow finishes; then rates are solved again. A job's
next step starts when all flows of its current step have finished (steps are barriers,
see :mod:`commflow.net.traffic`). There is no latency, no congestion control and no
packet effect: bytes move at the fluid max-min rates.

Congestion. For a set of concurrent flows, the *bottleneck time* is
``max_e bytes_e / capacity_e`` (no routing can finish faster) and the *host bound* is the
largest ``bytes / capacity`` over every host's egress and ingress, where a host's capacity
sums the host links its flows in that phase can use (both ports of a dual-port NIC; the
NVLink port only for flows inside the server). It is what the endpoints alone impose,
independent of routing. ``max_congestion`` is their ratio,
the largest over the lockstep phases of :func:`commflow.net.routing.lockstep_phases`:
1.0 means the fabric is invisible, 2.0 means the busiest link needs twice the NIC time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from .routing import Routing, lockstep_phases, paths_of, route
from .topology import Topology
from .traffic import Traffic

__all__ = ["SimResult", "JobResult", "simulate", "congestion", "max_min_rates", "max_min_rates_reference", "phase_view"]

_RTOL = 1e-9


def max_min_rates(A: sp.csr_matrix, cap: np.ndarray) -> np.ndarray:
    """Max-min fair rates of the rows of ``A`` (``[R, E]``, fraction of a row's rate on each
    link) under link capacities ``cap`` (``[E]``). Every row must use some link.

    Progressive filling, vectorised: each round is two sparse mat-vecs, and every round
    freezes all rows crossing the links that fill at the same water level.
    """
    R = A.shape[0]
    rates = np.zeros(R)
    if R == 0:
        return rates
    At = A.T.tocsr()
    unfrozen = np.ones(R, bool)
    residual = cap.astype(np.float64).copy()
    level = 0.0
    while unfrozen.any():
        w = At @ unfrozen.astype(np.float64)
        live = np.flatnonzero(w > 1e-15)
        if len(live) == 0:
            raise ValueError("a flow crosses no link")
        share = residual[live] / w[live]
        d = max(share.min(), 0.0)
        level += d
        residual[live] -= d * w[live]
        sat = live[share <= d * (1 + _RTOL) + 1e-300]
        mark = np.zeros(A.shape[1])
        mark[sat] = 1.0
        hit = (A @ mark > 0) & unfrozen
        rates[hit] = level
        unfrozen &= ~hit
        residual[sat] = 0.0
    return rates


def max_min_rates_reference(paths: list[dict[int, float]], cap: dict[int, float]) -> list[float]:
    """Textbook progressive filling on Python dicts (``paths[f] = {link: fraction}``); slow, obvious."""
    rates = [0.0] * len(paths)
    frozen = [False] * len(paths)
    residual = dict(cap)
    while not all(frozen):
        best = None
        for e in residual:
            w = sum(p.get(e, 0.0) for f, p in enumerate(paths) if not frozen[f])
            if w > 0 and (best is None or residual[e] / w < best[0]):
                best = (residual[e] / w, e)
        d = best[0]
        for e in residual:
            residual[e] -= d * sum(p.get(e, 0.0) for f, p in enumerate(paths) if not frozen[f])
        for f in range(len(paths)):
            if not frozen[f]:
                rates[f] += d
        full = [e for e in residual if residual[e] <= 1e-9 * cap[e]]
        for f, p in enumerate(paths):
            if not frozen[f] and any(p.get(e, 0.0) > 0 for e in full):
                frozen[f] = True
    return rates


@dataclass
class JobResult:
    name: str
    completion_s: float
    step_times_s: np.ndarray
    """``[num_steps]`` duration of every step (repeats expanded)."""
    algbw_GBps: float
    """``size_bytes / completion_s`` in GB/s (nccl-tests algbw)."""
    busbw_GBps: float
    """``algbw * bus factor`` (nccl-tests busbw)."""


@dataclass
class SimResult:
    policy: str
    splits: int
    seed: int
    completion_s: float
    """When the last job finished."""
    jobs: list[JobResult]
    max_congestion: float
    """Largest over lockstep phases of bottleneck time / host bound (1.0 = NIC-bound)."""
    phase_congestion: np.ndarray
    """``[P]`` congestion of each lockstep phase."""
    phase_length: np.ndarray
    """``[P]`` how many consecutive lockstep steps each phase stands for."""
    phase_bottleneck_s: np.ndarray
    """``[P]`` max over links of bytes / capacity in the phase, seconds."""
    phase_link_bytes: list[np.ndarray]
    """``[P]`` of ``[num_links]`` bytes each link carries in one step of the phase."""
    link_bytes: np.ndarray
    """``[num_links]`` bytes carried over the whole simulation."""
    link_utilization: np.ndarray
    """``[num_links]`` link_bytes / (capacity * completion_s)."""
    routing: Routing = field(repr=False)

    @property
    def step_times_s(self) -> np.ndarray:
        """Per-step durations of the only job (several jobs: ``jobs[j].step_times_s``)."""
        if len(self.jobs) != 1:
            raise ValueError(f"step_times_s: {len(self.jobs)} jobs; use res.jobs[j].step_times_s")
        return self.jobs[0].step_times_s

    @property
    def link_load_bytes(self) -> np.ndarray:
        return self.link_bytes


def phase_view(topo: Topology, traffic: Traffic, step_link_bytes) -> tuple:
    """Static per-phase view: ``(phases, congestion, bottleneck_s, link_bytes, host_bound_s)``.

    ``step_link_bytes(j, s)`` gives the ``[num_links]`` bytes of template ``s`` of job ``j``.
    """
    cap = topo.capacity_Bps
    H = topo.num_hosts
    pt = paths_of(topo)
    phases = lockstep_phases(traffic)
    ports: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def usable_ports(j, s):
        """(host * num_links + link) codes of the host links the step's flows can use, out and in."""
        if (j, s) not in ports:
            st = traffic.jobs[j].steps[s]
            out_codes, in_codes = set(), set()
            for a, b in set(zip(st.src.tolist(), st.dst.tolist())):
                for lo, _, _, li in pt.parts(a, b):
                    out_codes.add(a * topo.num_links + lo)
                    in_codes.add(b * topo.num_links + (li if li >= 0 else lo))
            ports[(j, s)] = (np.fromiter(out_codes, np.int64), np.fromiter(in_codes, np.int64))
        return ports[(j, s)]

    cong, bott, loads, hosts = [], [], [], []
    for combo, _ in phases:
        lb = np.zeros(topo.num_links)
        out_b, in_b = np.zeros(H), np.zeros(H)
        out_c, in_c = [], []
        for j, s in combo:
            st = traffic.jobs[j].steps[s]
            lb += step_link_bytes(j, s)
            out_b += np.bincount(st.src, weights=st.size, minlength=H)
            in_b += np.bincount(st.dst, weights=st.size, minlength=H)
            o, i = usable_ports(j, s)
            out_c.append(o)
            in_c.append(i)
        out_cap, in_cap = (np.bincount(c // topo.num_links, weights=cap[c % topo.num_links], minlength=H)
                           for c in (np.unique(np.concatenate(out_c)), np.unique(np.concatenate(in_c))))
        busy_o, busy_i = out_b > 0, in_b > 0
        host = max((out_b[busy_o] / out_cap[busy_o]).max(initial=0.0), (in_b[busy_i] / in_cap[busy_i]).max(initial=0.0))
        b = float((lb / cap).max())
        cong.append(b / host)
        bott.append(b)
        loads.append(lb)
        hosts.append(host)
    return phases, np.asarray(cong), np.asarray(bott), loads, np.asarray(hosts)


def _event_loop(routed: list[list], schedules: list[list[tuple[int, int]]], cap: np.ndarray,
                num_links: int) -> tuple[list[list[float]], list[float], np.ndarray]:
    """Run jobs concurrently; ``schedules[j]`` = [(template, repeat), ...].

    Returns per-job step durations, per-job completion times, and bytes per link.
    """
    nj = len(routed)
    pos = [0] * nj  # index into schedule
    rep = [0] * nj
    rem = [None] * nj
    start = [0.0] * nj
    times: list[list[float]] = [[] for _ in range(nj)]
    done_at = [0.0] * nj
    link_bytes = np.zeros(num_links)

    def load(j):
        tmpl = schedules[j][pos[j]][0]
        rem[j] = routed[j][tmpl].size.astype(np.float64).copy()

    for j in range(nj):
        if schedules[j]:
            load(j)
    now = 0.0
    while True:
        live = [j for j in range(nj) if rem[j] is not None]
        if not live:
            break
        blocks, rows_of = [], []
        for j in live:
            idx = np.flatnonzero(rem[j] > 0)
            rows_of.append(idx)
            blocks.append(routed[j][schedules[j][pos[j]][0]].matrix[idx])
        A = sp.vstack(blocks, format="csr")
        r = np.concatenate([rem[j][idx] for j, idx in zip(live, rows_of)])
        rates = max_min_rates(A, cap)
        ttf = r / rates
        dt = float(ttf.min())
        finish = ttf <= dt * (1 + _RTOL)
        moved = np.where(finish, r, rates * dt)
        link_bytes += A.T @ moved
        now += dt
        off = 0
        for j, idx in zip(live, rows_of):
            k = len(idx)
            left = r[off:off + k] - moved[off:off + k]
            left[finish[off:off + k]] = 0.0
            rem[j][idx] = left
            off += k
            if not (rem[j] > 0).any():
                times[j].append(now - start[j])
                start[j] = now
                rep[j] += 1
                if rep[j] >= schedules[j][pos[j]][1]:
                    rep[j] = 0
                    pos[j] += 1
                if pos[j] < len(schedules[j]):
                    load(j)
                else:
                    rem[j] = None
                    done_at[j] = now
    return times, done_at, link_bytes


def simulate(topo: Topology, flows: Traffic, policy: str = "ecmp", splits: int | str = 1, seed: int = 0, *,
             collapse: bool = True, routing: Routing | None = None) -> SimResult:
    """Route ``flows`` with ``policy`` and simulate them to completion.

    policy: ``ecmp`` | ``spray`` | ``planned`` (see :mod:`commflow.net.routing`).
    splits: sub-flows per flow (queue pairs per connection); ``"auto"`` = the planner's
    minimal ``k*``.
    collapse: with a single job, simulate each step template once and repeat its time
    (exact, because each repeat starts from the same state); several jobs always run the
    full event loop.
    routing: a precomputed :class:`Routing` (then ``policy``, ``splits``, ``seed`` are taken from it).
    """
    if routing is None:
        routing = route(topo, flows, policy, splits, seed)
    elif routing.topo is not topo or routing.traffic is not flows:
        raise ValueError("routing: was made for another topology or traffic")
    cap = topo.capacity_Bps
    jobs = flows.jobs
    if len(jobs) == 1 and collapse:
        job = jobs[0]
        times, link_bytes = [], np.zeros(topo.num_links)
        for s, step in enumerate(job.steps):
            t, _, lb = _event_loop([routing.steps[0]], [[(s, 1)]], cap, topo.num_links)
            times += t[0] * step.repeat
            link_bytes += lb * step.repeat
        step_times = [times]
        done = [float(np.sum(times))]
    else:
        scheds = [[(s, st.repeat) for s, st in enumerate(job.steps)] for job in jobs]
        step_times, done, link_bytes = _event_loop(routing.steps, scheds, cap, topo.num_links)
    results = []
    for job, t, d in zip(jobs, step_times, done):
        algbw = job.size_bytes / d / 1e9 if d > 0 else float("inf")
        results.append(JobResult(job.name, d, np.asarray(t), algbw, algbw * job.bus_factor))
    completion = max(done)
    phases, cong, bott, loads, _ = phase_view(topo, flows, lambda j, s: routing.steps[j][s].link_bytes())
    return SimResult(
        policy=routing.policy, splits=routing.splits, seed=routing.seed, completion_s=completion, jobs=results,
        max_congestion=float(cong.max()), phase_congestion=cong,
        phase_length=np.asarray([n for _, n in phases]), phase_bottleneck_s=bott, phase_link_bytes=loads,
        link_bytes=link_bytes, link_utilization=link_bytes / (cap * completion), routing=routing)


def congestion(topo: Topology, flows: Traffic, policy: str = "ecmp", splits: int | str = 1, seed: int = 0, *,
               routing: Routing | None = None) -> float:
    """``max_congestion`` of :func:`simulate` without the time simulation (static loads only)."""
    if routing is None:
        routing = route(topo, flows, policy, splits, seed)
    _, cong, _, _, _ = phase_view(topo, flows, lambda j, s: routing.steps[j][s].link_bytes())
    return float(cong.max())
