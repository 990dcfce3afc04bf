"""commflow.net: traffic planning and flow-level simulation of collectives on datacenter fabrics.

::

    from commflow import net
    topo = net.leaf_spine(leaves=8, spines=8, hosts_per_leaf=8, link_gbps=400)
    flows = net.collective("allreduce", algorithm="ring", hosts=range(64), size_bytes=2**30)
    res = net.simulate(topo, flows, policy="ecmp", splits=1, seed=0)   # "spray" | "planned"
    res.completion_s, res.max_congestion, res.link_bytes, res.step_times_s
    net.optimal(topo, flows).max_congestion                            # LP lower bound
    net.plan(topo, flows).write_json("plan.json")                     # C4P-style assignment
"""

from .io import from_dict, load, save
from .optimal import OptimalResult, optimal
from .routing import POLICIES, PathTable, Routing, lockstep_phases, minimal_splits, paths_of, plan, route
from .simulate import (
    JobResult,
    SimResult,
    congestion,
    max_min_rates,
    max_min_rates_reference,
    phase_view,
    simulate,
)
from .topology import Topology, dual_plane, fat_tree, leaf_spine, rail_optimized
from .traffic import ALGORITHMS, Job, Step, Traffic, collective, concurrent, flows

__all__ = [
    "Topology", "leaf_spine", "fat_tree", "rail_optimized", "dual_plane", "load", "save", "from_dict",
    "Traffic", "Job", "Step", "collective", "concurrent", "flows", "ALGORITHMS",
    "POLICIES", "Routing", "PathTable", "route", "plan", "minimal_splits", "lockstep_phases", "paths_of",
    "simulate", "congestion", "phase_view", "SimResult", "JobResult", "max_min_rates", "max_min_rates_reference",
    "optimal", "OptimalResult",
]
