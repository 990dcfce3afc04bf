"""Hang and slowness detection from peer homogeneity and periodicity (C4D's idea).

Training is a loop of identical iterations, and every rank of a group runs the same
collectives. So each rank is its peers' baseline and the past is the present's, and
no absolute threshold is needed. :class:`Detector` consumes the records the workers'
reporters send and emits :class:`Verdict` objects:

``hang`` (non-communication hang)
    Members of a group wait in collective *k* for longer than the deadline while some
    member never entered *k*. The culprit is followed through wait-for chains: a rank
    missing from *k* that itself waits in another group's collective points at that
    group's missing ranks; the root is a rank outside any collective (stuck in
    compute), one whose heartbeat stopped, or the members of a wait cycle.
``comm_hang``
    Every member entered *k*, none finished within the deadline. Statistics cannot
    name an edge; the coordinator runs the probe sweep (:mod:`.localize`).
``crash``
    A worker's channel closed without a goodbye (or with an error). The earliest
    silent closure is the culprit; peers that failed a moment later because their
    collective broke report errors and are not blamed.
``slow_rank`` (non-communication slow)
    One rank keeps arriving late. Per collective, peers finish together, so a rank's
    lateness is ``median_j(dur_j) - dur_r`` (shortest wait = last to arrive; no clock
    comparison); summed over an iteration and divided by the step period it is
    :math:`\\ell_r`. A rank is flagged when the median of its last *m* values
    (m in ``windows``) exceeds ``max(slow_floor, kappa * 1.2533 * sigma / sqrt(m))``,
    with sigma = 1.4826 MAD of healthy history pooled over ranks, and confirmed when
    flagged ``confirm`` iterations in a row. Short windows catch big slowdowns in a
    few iterations, long ones catch 1.2x; the median ignores a one-off GC pause.
``comm_slow``
    Everyone arrives on time but the collectives take longer: per collective the
    shortest duration (the last arriver's, i.e. pure transfer) summed over the
    iteration, against its own history, same window test. Localized by the probe.

Deadlines come from the observed period: a hang is declared after
``max(hang_factor * period, min_hang_s)`` (defaults 1.5 x and 1 s), measured from
when the first peer started waiting; before the attempt's first iterations have been
seen the deadline is ``startup_hang_s`` (imports, checkpoint loading). With the
reporter's 0.1 s heartbeat the flag comes within ``max(3 x period, 2 s)`` of the hang.
Calls inside :func:`commflow.monitor.quiet` sections (checkpoint, eval) get
``quiet_max_s`` instead.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DetectConfig", "Detector", "Verdict", "robust_sigma"]

P2P_OPS = ("send", "recv", "isend", "irecv")


@dataclass(kw_only=True)
class DetectConfig:
    """Detector thresholds (defaults are the ones the tests and benchmarks use)."""

    hang_factor: float = 1.5
    """Hang deadline in step periods."""
    min_hang_s: float = 1.5
    """Hang deadline floor, seconds (scheduling hiccups on busy hosts stay below it)."""
    startup_hang_s: float = 60.0
    """Deadline until the attempt's first iterations are seen (imports, loading)."""
    startup_iterations: int = 2
    """Closed iterations needed before the period-based deadline applies."""
    quiet_max_s: float = 600.0
    """Deadline for calls inside quiet (expected long) sections."""
    crash_settle_s: float = 0.3
    """Wait after the first channel loss for the rest to arrive before blaming."""
    warmup_iterations: int = 8
    """Iterations of an attempt kept out of the baseline (connection setup, caches)."""
    min_history: int = 24
    """Healthy iterations needed before slow checks run."""
    history: int = 256
    """Healthy iterations kept as the baseline."""
    windows: tuple[int, ...] = (3, 6, 12, 24, 48)
    """Window lengths (iterations) of the persistence test."""
    kappa: float = 5.0
    """Threshold in robust standard errors of the window median."""
    slow_floor: float = 0.05
    """Least lateness flagged, as a fraction of the step period."""
    comm_floor: float = 0.05
    """Least comm-time increase flagged, as a fraction of the step period."""
    comm_rel: float = 0.5
    """... and as a fraction of the baseline comm time. Only a trigger: the probe
    sweep, confirmed twice, decides whether there is a culprit."""
    sigma_floor: float = 0.003
    """Least noise scale assumed (fraction of the period); a jitter-free baseline
    would otherwise make any wobble significant."""
    confirm: int = 2
    """Consecutive flagged iterations before a slow verdict."""
    recheck_iterations: int = 30
    """A communication slowdown the probe could not pin is looked at again after this
    many iterations (or at once if it doubles)."""
    history_margin: float = 1.5
    """A window statistic must also exceed this many times the largest value the
    same statistic reached over the healthy history (bursty noise)."""
    latest_alpha: float = 0.002
    """A slow rank must also be the latest arriver in at least q of the window's m
    iterations, q the Binomial(m, 1/world) tail quantile at this level."""


@dataclass(kw_only=True)
class Verdict:
    """A detection, with the numbers that justify it."""

    kind: str
    """hang | crash | slow_rank | slow_link | comm_hang | comm_slow."""
    ranks: list[int]
    """Culprit global ranks (may be empty when localization found nothing)."""
    link: list[int] | None = None
    """[src, dst] for link verdicts."""
    evidence: dict = field(default_factory=dict)
    t_onset: float = 0.0
    """When the anomaly began, as the monitor saw it (coordinator clock)."""
    t_detect: float = 0.0
    needs_probe: bool = False
    """Communication verdicts: the probe sweep has to name the link or rank."""
    t_localized: float | None = None
    iteration: int | None = None

    @property
    def detect_s(self) -> float:
        return self.t_detect - self.t_onset

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "ranks": list(self.ranks),
            "link": self.link,
            "evidence": self.evidence,
            "t_onset": self.t_onset,
            "t_detect": self.t_detect,
            "t_localized": self.t_localized,
            "detect_s": self.detect_s,
            "iteration": self.iteration,
        }


def robust_sigma(values: Any) -> float:
    """1.4826 x median absolute deviation: the standard deviation for Gaussian data,
    unmoved by a few outliers."""
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


@dataclass
class _Rank:
    info: dict
    last_hb: float = 0.0
    hb_t: float = 0.0  # when the worker sent its last heartbeat (its clock, offset-corrected)
    offset: float = 0.0
    iteration: int = 0
    quiet: int = 0
    inflight: list = field(default_factory=list)
    max_step: int = -1
    steps: dict = field(default_factory=dict)
    closed_at: float | None = None
    bye: dict | None = None
    error_at: float | None = None


def _channel(group: str, op: str, rank: int, peer: int) -> str:
    if op in ("send", "isend"):
        return f"{group}|{rank}>{peer}"
    if op in ("recv", "irecv"):
        return f"{group}|{peer}>{rank}"
    return group


class Detector:
    """Turns worker reports into verdicts. Single-threaded: the coordinator's loop
    calls :meth:`hello`, :meth:`ingest`, :meth:`closed` and :meth:`tick`."""

    def __init__(self, config: DetectConfig | None = None):
        self.cfg = config or DetectConfig()
        self.reset()

    # -- lifecycle ----------------------------------------------------------------------

    def reset(self, world_size: int | None = None) -> None:
        """Forget everything about the previous attempt (the world changed)."""
        self.world_size = world_size
        self.ranks: dict[int, _Rank] = {}
        self.groups: dict[str, tuple[int, ...]] = {}
        self.entered: dict[str, dict[int, int]] = defaultdict(dict)  # channel -> rank -> max seq
        self.done: dict[str, dict[int, int]] = defaultdict(dict)
        self.iter_recs: dict[int, dict[str, dict[int, tuple]]] = defaultdict(lambda: defaultdict(dict))
        self.quiet_iters: set[int] = set()
        self.next_close: int | None = None
        self.closed_iters = 0
        # per closed iteration (recent) and healthy baseline
        self.recent: deque = deque(maxlen=max(self.cfg.windows) + self.cfg.confirm + 2)
        self.base_late: deque = deque(maxlen=self.cfg.history)  # lateness vectors (member order)
        self.base_comm: deque = deque(maxlen=self.cfg.history)
        self.base_period: deque = deque(maxlen=self.cfg.history)
        self.base_its: deque = deque(maxlen=self.cfg.history)  # iteration of each base_late/base_comm entry
        self.period_its: deque = deque(maxlen=self.cfg.history)
        self._hist_version = 0  # bumped on every change; caches key on it
        self.streak: dict[tuple, int] = defaultdict(int)
        self.suppressed: set[tuple] = set()
        self.calm_for: dict[tuple, int] = {}
        self.recheck: tuple[int, float] | None = None  # (until iteration, excess) of an unexplained slowdown
        self.reported_hangs: set[tuple] = set()
        self.fired: Verdict | None = None
        self._hold: Verdict | None = None  # the verdict in force (until reset/acknowledge)
        self.metrics: deque = deque(maxlen=4096)  # per-iteration metrics for JSONL/Prometheus
        self.crash_handled = False
        self._quorum: dict[tuple[int, int], int] = getattr(self, "_quorum", {})
        self._hist_cache: dict[int, tuple] = {}
        self._base_cache: tuple | None = None

    def acknowledge(self, verdict: Verdict, *, unexplained: bool = False) -> None:
        """Keep watching after ``verdict`` without a restart (trials, benchmarks):
        the same anomaly is not reported again until it clears.

        ``unexplained``: a communication slowdown the probe found no culprit for. It is
        held back only for ``recheck_iterations``, or until it grows to twice its
        size: a real fault that starts while a host-wide slowdown is being ignored must
        not hide behind it.
        """
        self.fired = None
        self._hold = None
        if verdict.kind in ("hang", "comm_hang"):
            key = verdict.evidence.get("channel"), verdict.evidence.get("seq")
            self.reported_hangs.add(key)
        elif verdict.kind == "slow_rank":
            self.suppressed.add(("slow", verdict.ranks[0]))
        elif verdict.kind in ("comm_slow", "slow_link"):
            self.suppressed.add(("comm",))
            if unexplained:
                ev = verdict.evidence
                excess = float(ev.get("comm_per_period", 0.0)) - float(ev.get("baseline_comm_per_period", 0.0))
                self.recheck = (self.closed_iters + self.cfg.recheck_iterations, 2.0 * max(excess, 0.0))
            else:
                self.recheck = None
        # Only the acknowledged kind starts counting again; a slow rank building up its
        # confirmation meanwhile keeps its count.
        family = {"slow_rank": "slow", "comm_slow": "comm", "slow_link": "comm"}.get(verdict.kind)
        for key in [k for k in self.streak if k[0] == family]:
            del self.streak[key]

    # -- input -----------------------------------------------------------------------

    def hello(self, rank: int, info: dict, now: float) -> None:
        self.ranks[rank] = _Rank(info=dict(info), last_hb=now)
        if self.world_size is None and info.get("world"):
            self.world_size = int(info["world"])

    def ingest(self, rank: int, msg: dict, now: float) -> None:
        """One reporter message: events (records, groups, steps, quiet marks) + heartbeat."""
        st = self.ranks.get(rank)
        if st is None:
            return
        if "offset" in msg:
            st.offset = float(msg["offset"])
        off = st.offset
        for ev in msg.get("ev", ()):
            tag = ev[0]
            if tag == "r":
                self._record(rank, ev[1:], off)
            elif tag == "group":
                self.groups[ev[1]] = tuple(ev[2])
            elif tag == "step":
                it, t = int(ev[1]), float(ev[2]) + off
                st.steps[it] = t
                st.max_step = max(st.max_step, it)
                if self.next_close is None or it < self.next_close and not self.closed_iters:
                    self.next_close = it
            elif tag == "quiet" and ev[1]:
                self.quiet_iters.add(st.iteration)
        hb = msg.get("hb")
        if hb is not None:
            st.last_hb = now
            st.hb_t = float(msg.get("t", now)) + off
            st.iteration = int(hb.get("it", st.iteration))
            st.quiet = int(hb.get("quiet", 0))
            if st.quiet:
                self.quiet_iters.add(st.iteration)
            st.inflight = []
            for w in hb.get("inflight", ()):
                idx, group, seq, op, peer, it, t_enter, quiet = w
                ch = _channel(group, op, rank, peer)
                seen = self.entered[ch]
                if seen.get(rank, -1) < seq:
                    seen[rank] = seq
                if self.done[ch].get(rank, -1) >= seq:
                    continue  # completed already (reported in an earlier message)
                st.inflight.append((ch, seq, op, int(it), float(t_enter) + off, bool(quiet)))
        self._close_iterations()

    def _record(self, rank: int, w: list, off: float) -> None:
        idx, group, seq, op, peer, nbytes, it, t_enter, t_done, dur, quiet, error = w
        ch = _channel(group, op, rank, peer)
        if self.entered[ch].get(rank, -1) < seq:
            self.entered[ch][rank] = seq
        if self.done[ch].get(rank, -1) < seq:
            self.done[ch][rank] = seq
        if quiet:
            self.quiet_iters.add(int(it))
        if op in P2P_OPS or error:
            return
        self.iter_recs[int(it)][f"{ch}#{seq}"][rank] = (float(t_enter) + off, dur, op, nbytes)

    def closed(self, rank: int, now: float, bye: dict | None) -> None:
        """The rank's channel closed; ``bye`` is its goodbye (None: it vanished)."""
        st = self.ranks.get(rank)
        if st is None or st.closed_at is not None:
            return
        st.closed_at = now
        st.bye = bye
        if bye is not None and not bye.get("ok", True):
            st.error_at = now

    # -- iteration statistics ---------------------------------------------------------------

    def _members(self) -> list[int]:
        n = self.world_size or (max(self.ranks) + 1 if self.ranks else 0)
        return list(range(n))

    def _close_iterations(self) -> None:
        members = self._members()
        if self.next_close is None or not members or any(r not in self.ranks for r in members):
            return
        while True:
            it = self.next_close
            for r in members:
                st = self.ranks[r]
                # Calls still open from older iterations are the hang check's business;
                # only this iteration's own calls hold it open.
                if st.max_step < it + 1 or any(f[3] == it for f in st.inflight):
                    return
            self._close(it, members)
            self.next_close = it + 1

    def _close(self, it: int, members: list[int]) -> None:
        recs = self.iter_recs.pop(it, {})
        for old in [k for k in self.iter_recs if k < it]:
            del self.iter_recs[old]
        periods = [self.ranks[r].steps[it + 1] - self.ranks[r].steps[it]
                   for r in members if it in self.ranks[r].steps and it + 1 in self.ranks[r].steps]
        for r in members:
            for k in [k for k in self.ranks[r].steps if k < it - 2]:
                del self.ranks[r].steps[k]
        if not periods:
            return
        period = statistics.median(periods)
        late = dict.fromkeys(members, 0.0)
        comm = 0.0
        n_coll = 0
        for key, by_rank in recs.items():
            group = key.split("#", 1)[0]
            group_ranks = self.groups.get(group.split("|", 1)[0])
            if group_ranks is None or any(r not in by_rank for r in group_ranks) or len(group_ranks) < 2:
                continue
            durs = {r: by_rank[r][1] for r in group_ranks}
            if any(d is None for d in durs.values()):
                continue
            med = statistics.median(durs.values())
            for r, d in durs.items():
                if r in late:
                    late[r] += med - d
            comm += min(durs.values())
            n_coll += 1
        quiet = it in self.quiet_iters
        self.quiet_iters.discard(it)
        self.closed_iters += 1
        ref = statistics.median(self.base_period) if len(self.base_period) >= 3 else period
        row = {
            "iteration": it,
            "t": self.ranks[members[0]].steps.get(it, 0.0),
            "period": period,
            "ref_period": ref,
            "late": {r: late[r] / ref for r in members},
            "comm": comm / ref,
            "comm_s": comm,
            "collectives": n_coll,
            "quiet": quiet,
            "flags": [],
        }
        self.recent.append(row)
        self.metrics.append(row)
        if not quiet and n_coll:
            self._evaluate(row, members)
        warm = self.closed_iters > self.cfg.warmup_iterations  # first iterations: lazy setup, caches
        if row["flags"]:
            self._forget_since(min(it - f[2]["window"] + 1 for f in row["flags"]))
        elif not quiet and (warm or len(self.base_period) < 3):
            self.base_period.append(period)
            self.period_its.append(it)
            self._hist_version += 1
            if n_coll and warm:
                self.base_late.append([row["late"][r] for r in members])
                self.base_comm.append(row["comm"])
                self.base_its.append(it)
        # An acknowledged anomaly is over once the shortest window has been calm for
        # that many iterations; the windows then restart, so the longer ones do not
        # re-raise it from the anomaly's own iterations.
        for key in list(self.suppressed):
            if key[0] == "slow":
                hot = row.get("short_slow", {}).get(key[1], False)
            else:
                hot = row.get("short_comm", False)
            self.calm_for[key] = 0 if hot else self.calm_for.get(key, 0) + 1
            if self.calm_for[key] >= self.cfg.windows[0]:
                self.suppressed.discard(key)
                del self.calm_for[key]
                self.recent.clear()
                self.streak.clear()

    def _latest_quorum(self, m: int, world: int) -> int:
        """Least number of the last ``m`` iterations a healthy rank is the latest
        arriver in with probability <= ``latest_alpha`` (ranks exchangeable, so the
        count is Binomial(m, 1/world)); capped at ``m``."""
        key = (m, world)
        if key not in self._quorum:
            p = 1.0 / world

            def tail(q: int) -> float:  # P(X >= q)
                return sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(q, m + 1))

            self._quorum[key] = next((q for q in range(1, m + 1) if tail(q) <= self.cfg.latest_alpha), m)
        return self._quorum[key]

    def _forget_since(self, first: int) -> None:
        """Drop baseline entries from iteration ``first`` on: an anomaly's first
        iterations enter the baseline before its window fills up and flags it, and
        would teach the detector that the anomaly is normal."""
        dropped = False
        while self.base_its and self.base_its[-1] >= first:
            self.base_its.pop()
            self.base_late.pop()
            self.base_comm.pop()
            dropped = True
        while self.period_its and self.period_its[-1] >= first:
            self.period_its.pop()
            self.base_period.pop()
            dropped = True
        if dropped:
            self._hist_version += 1000  # invalidates the cached statistics

    def _history_max(self, m: int) -> tuple[float, float]:
        """Largest m-window median the healthy history reached: (lateness of any rank,
        comm time). Noise on a shared host comes in bursts (a process starved of CPU
        for several iterations), which a Gaussian rule underrates; a fault has to beat
        the worst the same statistic did while healthy. Refreshed every 8 iterations."""
        key = self._hist_version // 8
        hit = self._hist_cache.get(m)
        if hit is not None and hit[0] == key:
            return hit[1]
        from numpy.lib.stride_tricks import sliding_window_view

        late = np.asarray(self.base_late, dtype=float)
        comm = np.asarray(self.base_comm, dtype=float)
        lmax = float(np.median(sliding_window_view(late, m, axis=0), axis=-1).max()) if len(late) >= m else 0.0
        cmax = float(np.median(sliding_window_view(comm, m), axis=-1).max() - np.median(comm)) if len(comm) >= m else 0.0
        self._hist_cache[m] = (key, (lmax, cmax))
        return lmax, cmax

    def _baseline(self) -> tuple[float, float, float]:
        """(sigma of lateness, median comm, sigma of comm) of the healthy history,
        refreshed every 8 iterations (they move slowly; this runs per iteration)."""
        key = self._hist_version // 8
        if self._base_cache is None or self._base_cache[0] != key:
            cfg = self.cfg
            sigma_l = max(robust_sigma(np.asarray(self.base_late).ravel()), cfg.sigma_floor)
            comm = np.asarray(self.base_comm, dtype=float)
            self._base_cache = (key, (sigma_l, float(np.median(comm)), max(robust_sigma(comm), cfg.sigma_floor)))
        return self._base_cache[1]

    def _evaluate(self, row: dict, members: list[int]) -> None:
        cfg = self.cfg
        if len(self.base_comm) < cfg.min_history:
            return
        rows = [r for r in self.recent if r["collectives"] and not r["quiet"]]
        sigma_l, comm_med, sigma_c = self._baseline()
        longest = rows[-max(cfg.windows):]
        late = np.array([[w["late"].get(r, 0.0) for r in members] for w in longest])  # [iterations, ranks]
        comm = np.array([w["comm"] for w in longest])
        latest_of = late.argmax(axis=1)
        slow_hit = comm_hit = None
        for m in cfg.windows:
            if len(rows) < m or len(self.base_comm) < max(cfg.min_history, 2 * m):
                break
            se = 1.2533 / math.sqrt(m)  # standard error of a median of m, in sigmas
            late_max, comm_max = self._history_max(m)
            if slow_hit is None:
                med_arr = np.median(late[-m:], axis=0)
                med = {r: float(v) for r, v in zip(members, med_arr)}
                worst_i = int(med_arr.argmax())
                worst = members[worst_i]
                thr = max(cfg.slow_floor, cfg.kappa * se * sigma_l, cfg.history_margin * late_max)
                # Persistence in rank order too: scheduling noise makes a random rank
                # late now and then; a slow rank is the latest nearly every time.
                latest = int(np.sum(latest_of[-m:] == worst_i))
                quorum = self._latest_quorum(m, len(members))
                if m == cfg.windows[0]:
                    row["short_slow"] = {r: med[r] > thr for r in members}
                if med[worst] > thr and latest >= quorum:
                    slow_hit = {"rank": worst, "window": m, "median_lateness": med[worst], "threshold": thr,
                                "window_medians": med, "latest": latest, "quorum": quorum,
                                "history_max": late_max}
            if comm_hit is None:
                excess = float(np.median(comm[-m:])) - comm_med
                thr = max(cfg.comm_floor, cfg.comm_rel * comm_med, cfg.kappa * se * sigma_c,
                          cfg.history_margin * comm_max)
                if m == cfg.windows[0]:
                    row["short_comm"] = excess > thr
                if excess > thr:
                    comm_hit = {"window": m, "excess": excess, "threshold": thr, "baseline": comm_med,
                                "history_max": comm_max}
        if slow_hit is not None:
            row["flags"].append(("slow", slow_hit["rank"], slow_hit))
        if comm_hit is not None:
            row["flags"].append(("comm", None, comm_hit))
        # Confirmation: the same flag on `confirm` consecutive iterations.
        now_keys = {f[:2] for f in row["flags"]}
        for key in list(self.streak):
            if key not in now_keys:
                del self.streak[key]
        for kind, who, stats in row["flags"]:
            self.streak[(kind, who)] += 1
            if self.fired is not None or self._hold is not None or self.streak[(kind, who)] < cfg.confirm:
                continue
            if (kind, who) in self.suppressed:
                continue
            if kind == "comm" and ("comm",) in self.suppressed:
                if self.recheck is None:
                    continue
                until, level = self.recheck
                if self.closed_iters < until and stats["excess"] <= level:
                    continue
                self.suppressed.discard(("comm",))  # look again: it lasted, or it grew
            self.fired = self._slow_verdict(kind, who, stats, rows, sigma_l, sigma_c, comm_med, row)

    def _slow_verdict(self, kind, who, stats, rows, sigma_l, sigma_c, comm_med, row) -> Verdict:
        m = stats["window"]
        win = rows[-(m + self.cfg.confirm - 1):]
        if kind == "slow":
            onset_rows = [w for w in win if w["late"].get(who, 0.0) > stats["threshold"]] or win
            ev = {
                "class": "non-communication slow: one rank keeps arriving late",
                "window": m,
                "lateness_by_rank": {str(r): round(v, 4) for r, v in stats["window_medians"].items()},
                "threshold": round(stats["threshold"], 4),
                "sigma": round(sigma_l, 4),
                "history_max": round(stats["history_max"], 4),
                "period_s": round(row["ref_period"], 5),
                "recent_lateness": [round(w["late"].get(who, 0.0), 4) for w in win],
                "latest_in_window": f"{stats['latest']}/{m} (quorum {stats['quorum']})",
                "note": "lateness = time the rank arrived after the median peer, per step period",
            }
            return Verdict(kind="slow_rank", ranks=[who], evidence=ev, t_onset=onset_rows[0]["t"],
                          iteration=row["iteration"])
        onset_rows = [w for w in win if w["comm"] - comm_med > stats["threshold"]] or win
        ev = {
            "class": "communication slow: all ranks arrive on time, transfers take longer",
            "window": m,
            "comm_per_period": round(stats["excess"] + comm_med, 4),
            "baseline_comm_per_period": round(comm_med, 4),
            "threshold": round(stats["threshold"], 4),
            "sigma": round(sigma_c, 4),
            "history_max": round(stats["history_max"], 4),
            "period_s": round(row["ref_period"], 5),
            "recent_comm": [round(w["comm"], 4) for w in win],
        }
        return Verdict(kind="comm_slow", ranks=[], evidence=ev, t_onset=onset_rows[0]["t"],
                       needs_probe=True, iteration=row["iteration"])

    # -- periodic checks -----------------------------------------------------------------

    def period(self) -> float | None:
        """The step period the deadlines scale with (None during startup)."""
        if self.closed_iters < self.cfg.startup_iterations or not self.base_period:
            return None
        return statistics.median(self.base_period)

    def hang_deadline(self) -> float:
        p = self.period()
        if p is None:
            return self.cfg.startup_hang_s
        return max(self.cfg.hang_factor * p, self.cfg.min_hang_s)

    def tick(self, now: float) -> Verdict | None:
        """Check deadlines; return at most one new verdict (then stay quiet until
        :meth:`reset` or :meth:`acknowledge`)."""
        if self._hold is not None:
            return None
        if self.fired is not None:
            v, self.fired = self.fired, None
            v.t_detect = now
            self._hold = v
            return v
        v = self._check_crash(now) or self._check_hang(now)
        if v is not None:
            v.t_detect = now
            self._hold = v
        return v

    def _check_crash(self, now: float) -> Verdict | None:
        if self.crash_handled:
            return None
        gone = [(st.closed_at, r, st) for r, st in self.ranks.items()
                if st.closed_at is not None and not (st.bye and st.bye.get("ok"))]
        if not gone:
            return None
        first = min(t for t, _, _ in gone)
        if now - first < self.cfg.crash_settle_s:
            return None
        silent = sorted((t, r) for t, r, st in gone if st.bye is None)
        errors = sorted((t, r) for t, r, st in gone if st.bye is not None)
        culprit_t, culprit = (silent or errors)[0]
        self.crash_handled = True
        ev = {
            "class": "crash: the worker's channel closed " + ("without a goodbye" if silent else "with an error"),
            "closed": {str(r): round(t - first, 4) for t, r, _ in sorted(gone)},
            "errors": {str(r): (st.bye or {}).get("error") for _, r, st in gone if st.bye is not None},
            "last_iteration": self.ranks[culprit].iteration,
        }
        return Verdict(kind="crash", ranks=[culprit], evidence=ev, t_onset=culprit_t,
                       iteration=self.ranks[culprit].iteration)

    def _members_of(self, ch: str) -> tuple[int, ...]:
        if "|" in ch:
            a, b = ch.split("|", 1)[1].split(">")
            return (int(a), int(b))
        return self.groups.get(ch, ())

    def _check_hang(self, now: float) -> Verdict | None:
        deadline = self.hang_deadline()
        # Oldest in-flight call per rank: what each rank is waiting in.
        waiting: dict[int, tuple] = {}
        for r, st in self.ranks.items():
            if st.closed_at is None and st.inflight:
                waiting[r] = min(st.inflight, key=lambda f: f[4])
        by_call: dict[tuple[str, int], list[tuple[int, float, bool, float]]] = defaultdict(list)
        for r, (ch, seq, _op, _it, t_enter, quiet) in waiting.items():
            # How long the rank itself says it has waited (its last heartbeat minus its
            # entry): a lagging coordinator or reporter cannot inflate it.
            by_call[(ch, seq)].append((r, t_enter, quiet, self.ranks[r].hb_t - t_enter))
        best = None
        for (ch, seq), waiters in by_call.items():
            if (ch, seq) in self.reported_hangs:
                continue
            members = self._members_of(ch)
            if not members:
                continue
            quiet = any(w[2] for w in waiters) or any(self.ranks.get(m) and self.ranks[m].quiet for m in members)
            limit = self.cfg.quiet_max_s if quiet else deadline
            missing = [m for m in members if self.entered[ch].get(m, -1) < seq]
            if missing:
                if max(w[3] for w in waiters) <= limit:
                    continue
                cand = (min(w[1] for w in waiters), "hang", ch, seq, waiters, missing, limit)
            else:
                done = [m for m in members if self.done[ch].get(m, -1) >= seq]
                if len(waiters) + len(done) < len(members) or min(w[3] for w in waiters) <= limit:
                    continue
                cand = (max(w[1] for w in waiters), "comm_hang", ch, seq, waiters, done, limit)
            if best is None or cand[0] < best[0]:
                best = cand
        if best is None:
            return self._check_silent(now, deadline)
        t0, kind, ch, seq, waiters, other, limit = best
        op = waiting[waiters[0][0]][2]
        ev = {
            "channel": ch,
            "seq": seq,
            "op": op,
            "deadline_s": round(limit, 3),
            "period_s": self.period(),
            "waiting": {str(w[0]): round(w[3], 3) for w in sorted(waiters)},
            "last_seq_entered": {str(m): self.entered[ch].get(m, -1) for m in self._members_of(ch)},
        }
        if kind == "hang":
            roots, chain = self._roots(other, now, deadline)
            ev["class"] = "non-communication hang: peers wait in a collective a rank never entered"
            ev["missing"] = other
            ev["wait_chain"] = chain
            ev["culprit_state"] = {str(r): self._state(r, now) for r in roots}
            return Verdict(kind="hang", ranks=roots, evidence=ev, t_onset=t0,
                           iteration=self.ranks[waiters[0][0]].iteration)
        ev["class"] = "communication hang: every rank entered the collective, none finished"
        ev["finished"] = other
        return Verdict(kind="comm_hang", ranks=[], evidence=ev, t_onset=t0, needs_probe=True,
                       iteration=self.ranks[waiters[0][0]].iteration)

    def _check_silent(self, now: float, deadline: float) -> Verdict | None:
        """A live connection that stopped reporting while its peers still report: its
        main thread holds the GIL or the process is frozen (SIGSTOP). Measured against
        the freshest peer, so a stall of the coordinator itself blames nobody."""
        limit = max(deadline, 1.0) * 2
        live = [st for st in self.ranks.values() if st.closed_at is None]
        if len(live) < 2:
            return None
        freshest = max(st.last_hb for st in live)
        for r, st in self.ranks.items():
            if st.closed_at is not None or ("silent", r) in self.reported_hangs:
                continue
            if now - st.last_hb > limit and freshest - st.last_hb > limit:
                self.reported_hangs.add(("silent", r))
                ev = {"class": "non-communication hang: the rank's heartbeat stopped",
                      "silent_s": round(now - st.last_hb, 3), "deadline_s": round(limit, 3),
                      "channel": None, "seq": None, "culprit_state": {str(r): self._state(r, now)}}
                return Verdict(kind="hang", ranks=[r], evidence=ev, t_onset=st.last_hb, iteration=st.iteration)
        return None

    def _state(self, r: int, now: float) -> dict:
        st = self.ranks.get(r)
        if st is None:
            return {"connected": False}
        s = {"iteration": st.iteration, "heartbeat_age_s": round(now - st.last_hb, 3), "quiet": bool(st.quiet)}
        if st.inflight:
            ch, seq, op, _it, t_enter, _q = min(st.inflight, key=lambda f: f[4])
            s["inside"] = {"channel": ch, "seq": seq, "op": op, "since_s": round(now - t_enter, 3)}
        else:
            s["inside"] = None
        return s

    def _roots(self, missing: list[int], now: float, deadline: float) -> tuple[list[int], list]:
        """Follow wait-for edges from the missing ranks to the ranks that block everyone."""
        roots: list[int] = []
        chain: list = []
        seen: set[int] = set()
        stack = list(missing)
        while stack:
            r = stack.pop()
            if r in seen:
                continue
            seen.add(r)
            st = self.ranks.get(r)
            if st is None or st.closed_at is not None or now - st.last_hb > deadline or not st.inflight:
                roots.append(r)  # not connected, gone, silent, or outside any collective
                continue
            ch, seq, op, _it, _t, _q = min(st.inflight, key=lambda f: f[4])
            blockers = [m for m in self._members_of(ch) if self.entered[ch].get(m, -1) < seq]
            chain.append({"rank": r, "waits_in": ch, "seq": seq, "op": op, "for": blockers})
            if not blockers:
                roots.append(r)  # everyone is in its call: a communication problem under r
            stack.extend(blockers)
        if not roots:  # a wait cycle (mismatched collectives): blame its members
            roots = sorted(seen)
        return sorted(set(roots)), chain
