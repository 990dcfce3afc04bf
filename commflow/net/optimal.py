"""The multi-commodity-flow optimum: the lower bound on congestion of any routing.

For each lockstep phase (concurrent steps of all jobs) solve, with HiGHS through
``scipy.optimize.linprog``::

    minimise t   s.t.  every demand is routed,   bytes_e <= t * capacity_e  for every link e

``paths="all"`` (default) is the edge formulation over the whole graph: commodities are
aggregated by source host (exact for fractional flows), switches conserve flow, hosts
only send their own bytes and absorb their own; any path may be used, so no routing at
all does better. ``paths="shortest"`` restricts each flow to its equal-cost paths (the
universe of ECMP, spraying and the planner); fewer variables, same value on uniform
2-tier fabrics. ``single_path=True`` makes the path variables binary (one path per
sub-flow, ``splits`` sub-flows per flow): the true optimum of single-path routing, by
MILP; only for small instances.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from .routing import _check_splits, _check_traffic, paths_of
from .simulate import phase_view
from .topology import Topology
from .traffic import Traffic

__all__ = ["OptimalResult", "optimal"]


@dataclass
class OptimalResult:
    max_congestion: float
    """Largest over phases of optimal bottleneck time / host bound (comparable to SimResult's)."""
    phase_congestion: np.ndarray
    phase_length: np.ndarray
    phase_bottleneck_s: np.ndarray
    """``[P]`` optimal max_e bytes_e / capacity_e per phase, seconds."""
    phase_link_bytes: list[np.ndarray]
    """``[P]`` of ``[num_links]`` link bytes of an optimal routing."""
    completion_lower_bound_s: float
    """sum over phases of bottleneck * length: a lower bound on a single job's completion
    with barrier steps (with several jobs: for the lockstep schedule)."""


def _solve_edges(topo: Topology, src: np.ndarray, dst: np.ndarray, size: np.ndarray, cap: np.ndarray):
    """Edge formulation, one commodity per source host. Returns (t, link_bytes)."""
    t = topo
    E, V = t.num_links, t.num_nodes
    up = t.link_up
    ls, ld = t.link_src, t.link_dst
    hs, hd = t.hosts[src], t.hosts[dst]
    sw_link = up & ~t.is_host[ls] & ~t.is_host[ld]
    srcs = np.unique(hs)
    cols_link, rows_eq, cols_eq, vals_eq, rhs = [], [], [], [], []
    nvar = 0
    nrow = 0
    for s in srcs:
        m = hs == s
        dem = np.bincount(hd[m], weights=size[m], minlength=V)
        sinks = dem > 0
        usable = sw_link | (up & (ls == s)) | (up & sinks[ld] & t.is_host[ld] & ~t.is_host[ls])
        usable &= ~(t.is_host[ls] & (ls != s))  # only the source's own host links leave a host
        usable |= up & (ls == s) & sinks[ld]     # a direct host-host cable to a sink
        links = np.flatnonzero(usable)
        k = len(links)
        var = nvar + np.arange(k)
        # node balance: out - in = supply
        nodes = np.unique(np.concatenate([ls[links], ld[links]]))
        row_of = {int(n): nrow + i for i, n in enumerate(nodes)}
        r_out = np.fromiter((row_of[int(n)] for n in ls[links]), np.int64, k)
        r_in = np.fromiter((row_of[int(n)] for n in ld[links]), np.int64, k)
        rows_eq += [r_out, r_in]
        cols_eq += [var, var]
        vals_eq += [np.ones(k), -np.ones(k)]
        supply = np.zeros(len(nodes))
        supply[nodes == s] = size[m].sum()
        supply -= dem[nodes]
        rhs.append(supply)
        cols_link.append((var, links))
        nvar += k
        nrow += len(nodes)
    scale = size.max()
    cscale = cap.max()
    n_all = nvar + 1  # last variable: t (scaled)
    A_eq = sp.csr_matrix((np.concatenate(vals_eq), (np.concatenate(rows_eq), np.concatenate(cols_eq))),
                         shape=(nrow, n_all))
    b_eq = np.concatenate(rhs) / scale
    var_all = np.concatenate([v for v, _ in cols_link])
    link_all = np.concatenate([lk for _, lk in cols_link])
    A_ub = sp.csr_matrix((np.ones(len(var_all)), (link_all, var_all)), shape=(E, n_all)).tolil()
    A_ub[:, nvar] = -(cap / cscale)[:, None]
    A_ub = A_ub.tocsr()
    c = np.zeros(n_all)
    c[-1] = 1.0
    res = linprog(c, A_ub=A_ub, b_ub=np.zeros(E), A_eq=A_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"LP failed: {res.message}")
    x = res.x
    lb = np.bincount(link_all, weights=x[var_all], minlength=E) * scale
    return float(x[-1] * scale / cscale), lb


def _solve_paths(topo: Topology, src, dst, size, cap, single_path: bool, splits: int, time_limit: float):
    """Path formulation over equal-cost paths. Returns (t, link_bytes)."""
    pt = paths_of(topo)
    E = topo.num_links
    if single_path:
        src, dst = np.repeat(src, splits), np.repeat(dst, splits)
        size = np.repeat(size / splits, splits)
    scale, cscale = size.max(), cap.max()
    cands = [pt.candidates(int(a), int(b)) for a, b in zip(src, dst)]
    npaths = np.fromiter((c.shape[0] for c in cands), np.int64, len(cands))
    nvar = int(npaths.sum())
    owner = np.repeat(np.arange(len(cands)), npaths)
    A_eq = sp.csr_matrix((np.ones(nvar), (owner, np.arange(nvar))), shape=(len(cands), nvar + 1))
    rows, cols, vals = [], [], []
    v = 0
    for i, c in enumerate(cands):
        for p in range(c.shape[0]):
            rows.append(c[p])
            cols.append(np.full(c.shape[1], v))
            vals.append(np.full(c.shape[1], size[i] / scale if single_path else 1.0))
            v += 1
    A_ub = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(E, nvar + 1))
    A_ub = A_ub.tolil()
    A_ub[:, nvar] = -(cap / cscale)[:, None]
    A_ub = A_ub.tocsr()
    c = np.zeros(nvar + 1)
    c[-1] = 1.0
    if single_path:
        integrality = np.ones(nvar + 1)
        integrality[-1] = 0
        ub = np.ones(nvar + 1)
        ub[-1] = np.inf
        res = milp(c, constraints=[LinearConstraint(A_eq, 1, 1), LinearConstraint(A_ub, -np.inf, 0)],
                   integrality=integrality, bounds=Bounds(np.zeros(nvar + 1), ub),
                   options={"time_limit": time_limit})
        if res.x is None:
            raise RuntimeError(f"MILP failed: {res.message}")
        x = np.round(res.x[:-1]) * size[owner]
    else:
        res = linprog(c, A_ub=A_ub, b_ub=np.zeros(E), A_eq=A_eq, b_eq=size / scale, bounds=(0, None),
                      method="highs")
        if res.status != 0:
            raise RuntimeError(f"LP failed: {res.message}")
        x = res.x[:-1] * scale
    link_bytes = A_ub[:, :nvar].astype(bool).astype(np.float64) @ x
    return float((link_bytes / cap).max()), link_bytes


def optimal(topo: Topology, flows: Traffic, *, paths: str = "all", single_path: bool = False, splits: int = 1,
            time_limit: float = 60.0) -> OptimalResult:
    """The lowest achievable congestion of ``flows`` per lockstep phase (see the module docstring).

    paths: ``all`` (edge formulation, any path) | ``shortest`` (equal-cost paths only).
    single_path / splits: one path per sub-flow (MILP, implies ``paths="shortest"``).
    """
    if paths not in ("all", "shortest"):
        raise ValueError(f"paths: must be 'all' or 'shortest', got {paths!r}")
    _check_traffic(topo, flows)
    splits = _check_splits(splits)
    cap = topo.capacity_Bps
    per_phase: dict[tuple, tuple[float, np.ndarray]] = {}

    def solve(combo):
        src = np.concatenate([flows.jobs[j].steps[s].src for j, s in combo])
        dst = np.concatenate([flows.jobs[j].steps[s].dst for j, s in combo])
        size = np.concatenate([flows.jobs[j].steps[s].size for j, s in combo]).astype(np.float64)
        if single_path or paths == "shortest":
            return _solve_paths(topo, src, dst, size, cap, single_path, splits, time_limit)
        return _solve_edges(topo, src, dst, size, cap)

    phases, _, _, _, host = phase_view(topo, flows, lambda j, s: np.zeros(topo.num_links))
    loads, bott = [], []
    for combo, _ in phases:
        if combo not in per_phase:
            per_phase[combo] = solve(combo)
        bott.append(per_phase[combo][0])
        loads.append(per_phase[combo][1])
    bott = np.asarray(bott)
    cong = bott / host
    length = np.asarray([n for _, n in phases])
    return OptimalResult(max_congestion=float(cong.max()), phase_congestion=cong, phase_length=length,
                         phase_bottleneck_s=bott, phase_link_bytes=loads,
                         completion_lower_bound_s=float((bott * length).sum()))
