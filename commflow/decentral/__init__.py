"""Decentralized (gossip) learning on peer-to-peer graphs while nodes and links drop out.

Reproduces, as a tool, the question of Palmieri et al. (ICT-DM 2023, arXiv 2310.02986):
when devices leave a fully decentralized learning network, does losing their
*connectivity* hurt more than losing their *data*? The main API:

* :class:`DecentralConfig` + :class:`Schedule` (events :class:`DropNodes`,
  :class:`FailLinks`, :class:`Rejoin`; :class:`RelayOnly`) describe a run; :func:`prepare` builds it;
* :func:`simulate` runs it vectorized in one process (N models as one tensor);
* :func:`run_p2p` / :func:`run_node` run it with one gloo process per node,
  exchanging models point-to-point, and give the simulator's numbers;
* :func:`run_comparison` + :func:`write_outputs` compare named scenarios
  (``none``, ``data``, ``relay``, ``relay-nodrop``), the ``commflow decentral`` command.

Building blocks: :func:`build_graph` / :func:`read_edge_list`, :func:`mixing_matrix` /
:func:`mixing_row`, :func:`partition`.
"""

from .compare import run_comparison, write_outputs
from .data import load_digits_dataset, partition
from .experiment import DecentralConfig, Prepared, RunResult, prepare
from .graphs import build_graph, read_edge_list
from .mixing import MIXING_RULES, invariant_weights, mixing_matrix, mixing_row
from .p2p import run_node, run_p2p
from .schedule import DropNodes, FailLinks, Plan, Rejoin, RelayOnly, Schedule, resolve, scenario_events
from .simulator import simulate

__all__ = [
    "DecentralConfig",
    "DropNodes",
    "FailLinks",
    "MIXING_RULES",
    "Plan",
    "Prepared",
    "Rejoin",
    "RelayOnly",
    "RunResult",
    "Schedule",
    "build_graph",
    "invariant_weights",
    "load_digits_dataset",
    "mixing_matrix",
    "mixing_row",
    "partition",
    "prepare",
    "read_edge_list",
    "resolve",
    "run_comparison",
    "run_node",
    "run_p2p",
    "scenario_events",
    "simulate",
    "write_outputs",
]
